"""Benchmark of the functional core: ``compare`` and ``llv_distance`` at N = 10,000.

Usage::

    python benchmarks/bench_functional.py                       # the four sizes of the issue, plus the naive baseline
    python benchmarks/bench_functional.py --json results.json   # also write every measured number as JSON
    python benchmarks/bench_functional.py --quick               # a smoke run (small N)

Timing: every timed call is measured twice, as wall time (``time.perf_counter``) and as CPU time of
the process (``time.process_time``), with ONE torch intra-op thread by default (``--threads``): the
child processes get ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` set and call ``torch.set_num_threads``.
On a noisy shared machine the CPU time is the reproducible figure; a wall time well above the CPU
time means the process waited for a core. ``compare`` and ``llv_distance`` are run once untimed
(warm-up) and then ``--repeats`` times; the table shows the median of the repeats (all samples are in
the JSON).

Each size runs in two fresh subprocesses so that peak resident memory (ru_maxrss) is their own:

* ``compare`` (its peak memory above the inputs, warm-up call included, is reported);
* ``llv_distance`` and then the naive baseline in the SAME process, so that the ratio
  naive / ``llv_distance`` (from CPU times) compares two measurements taken under the same conditions.

The "naive" baseline is a straightforward in-memory implementation written for this benchmark
(Python loops over pivots, left-out labels and candidate sets, as the authors' reference code is
structured); the script asserts that it agrees with ``llv_distance`` to 1e-9 (relative). It is
timed once (repeated like the others when one run takes under ``NAIVE_REPEAT_BELOW_S`` CPU seconds).
Time limit: the naive loop stops once it has used ``--naive-budget`` CPU seconds (checked after each
pivot label, so it can overrun by one pivot); it is then reported as "> budget" together with the
fraction of pivots done, and a linear extrapolation of its total CPU time (pivots cost about the same)
is given in the JSON and in parentheses in the table, clearly as an estimate. No agreement check is
possible for a stopped run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import torch
from _machine import current_rss_mb, peak_rss_mb

SIZES = [(10, 2), (100, 5), (300, 8), (1000, 16)]
#: The authors' ``d_prob`` (d_LLV only), measured in issue 9 on this machine class: one process, one thread, CPU
#: time, N = 10,000, 200 candidate sets. Not reproducible here (their code is not part of this repository).
AUTHORS_SECONDS = {10: "0.04", 100: "3.2-4.3", 300: "28.6", 1000: "532"}
NAIVE_REPEAT_BELOW_S = 2.0
AGREEMENT_RTOL = 1e-9
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


class NaiveBudgetExceeded(Exception):
    """The naive loop used more CPU time than allowed; ``pivots_done`` of ``pivots`` were evaluated."""

    def __init__(self, pivots_done: int, pivots: int):
        super().__init__(f"stopped after {pivots_done}/{pivots} pivots")
        self.pivots_done = pivots_done
        self.pivots = pivots


def make_pair(n: int, k: int, m: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    f1 = torch.randn(n, m, generator=gen, dtype=torch.float64)
    g1 = torch.randn(k, m, generator=gen, dtype=torch.float64)
    f2 = f1 + 0.3 * torch.randn(n, m, generator=gen, dtype=torch.float64)
    g2 = g1 + 0.3 * torch.randn(k, m, generator=gen, dtype=torch.float64)
    return f1, g1, f2, g2


def naive_llv(lp: torch.Tensor, lq: torch.Tensor, sets: torch.Tensor, cpu_deadline: float = float("inf")) -> float:
    """Straightforward d_LLV (max/max): loops over pivots, left-out labels and candidate sets.

    Raises :class:`NaiveBudgetExceeded` when ``time.process_time()`` passes ``cpu_deadline`` (checked
    after each pivot label)."""
    k = lp.shape[1]
    best = (float("inf"), None, None)
    for y0 in range(k):
        if time.process_time() > cpu_deadline:
            raise NaiveBudgetExceeded(y0, k)
        rest = [y for y in range(k) if y != y0]
        s1 = (lp[:, rest] - lp[:, [y0]]).std(0)
        s2 = (lq[:, rest] - lq[:, [y0]]).std(0)
        a = (lp[:, rest] / s1 - lq[:, rest] / s2).std(0)
        ap = (lp[:, [y0]] / s1 - lq[:, [y0]] / s2).std(0)
        for j, lo in enumerate(rest):
            keep = [i for i in range(len(rest)) if i != j]
            score = float(torch.maximum(a[keep], ap[keep]).max())
            if score < best[0]:
                best = (score, y0, lo)
    t1 = best[0]
    t2 = float("inf")
    for s in sets:
        x0, xs = s[0], s[1:]
        tp = (lp[xs] - lp[x0]).std(1, keepdim=True)
        tq = (lq[xs] - lq[x0]).std(1, keepdim=True)
        b = (lp[xs] / tp - lq[xs] / tq).std(1)
        bp = (lp[x0] / tp - lq[x0] / tq).std(1)
        t2 = min(t2, float(torch.maximum(b.max(), bp.max())))
    return max(t1, t2)


def timed(fn):
    """``(result, wall seconds, CPU seconds)`` of one call."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    out = fn()
    cpu1, wall1 = time.process_time(), time.perf_counter()
    return out, wall1 - wall0, cpu1 - cpu0


def summary(samples: list[dict]) -> dict:
    return {
        "wall_s": statistics.median(s["wall_s"] for s in samples),
        "cpu_s": statistics.median(s["cpu_s"] for s in samples),
        "wall_min_s": min(s["wall_s"] for s in samples),
        "cpu_min_s": min(s["cpu_s"] for s in samples),
        "samples": samples,
    }


def run_repeated(fn, repeats: int) -> tuple[float, dict]:
    """Warm-up call (untimed), then ``repeats`` timed calls; ``(value, summary)``."""
    value = fn()
    samples = []
    for _ in range(repeats):
        value, wall, cpu = timed(fn)
        samples.append({"wall_s": wall, "cpu_s": cpu})
    return value, summary(samples)


def run_child(n: int, k: int, m: int, what: str, sets: int, repeats: int, threads: int, naive_budget: float) -> dict:
    torch.set_num_threads(threads)
    from lightning_repsim.functional import compare, draw_input_sets, llv_distance, logits_from_representations

    f1, g1, f2, g2 = make_pair(n, k, m)
    l1, l2 = logits_from_representations(f1, g1), logits_from_representations(f2, g2)
    out: dict = {
        "torch_threads": torch.get_num_threads(), "env": {v: os.environ.get(v) for v in THREAD_ENV}, "package": package_id(),
    }
    base_mb = current_rss_mb()
    if what == "compare":
        value, out["compare"] = run_repeated(lambda: float(compare(f1, g1, f2, g2, num_input_sets=sets).llv.value), repeats)
        out["compare"]["peak_mb_above_inputs"] = peak_rss_mb() - base_mb
        out["compare"]["value"] = value
        return out
    # llv_distance, then the naive loops, in this same process
    value, out["llv"] = run_repeated(lambda: float(llv_distance(l1, l2, rep_dim=m, num_input_sets=sets).value), repeats)
    out["llv"]["peak_mb_above_inputs"] = peak_rss_mb() - base_mb
    out["llv"]["value"] = value
    # the same with the sampled sets only (input_set_search="sample", the behaviour before the optimised search)
    value_s, out["llv_sample"] = run_repeated(
        lambda: float(llv_distance(l1, l2, rep_dim=m, num_input_sets=sets, input_set_search="sample").value), repeats)
    out["llv_sample"]["value"] = value_s
    cand = draw_input_sets(n, m + 1, sets, seed=0)
    lp, lq = torch.log_softmax(l1, -1), torch.log_softmax(l2, -1)
    samples: list[dict] = []
    naive: dict = {"budget_cpu_s": naive_budget, "completed": True}
    while True:
        cpu_start = time.process_time()
        wall_start = time.perf_counter()
        try:
            naive_value = naive_llv(lp, lq, cand, cpu_deadline=cpu_start + naive_budget)
            cpu, wall = time.process_time() - cpu_start, time.perf_counter() - wall_start
        except NaiveBudgetExceeded as stop:
            cpu, wall = time.process_time() - cpu_start, time.perf_counter() - wall_start
            naive.update(
                completed=False, pivots_done=stop.pivots_done, pivots=stop.pivots, stopped_after_cpu_s=cpu,
                stopped_after_wall_s=wall, estimated_total_cpu_s=cpu * stop.pivots / max(stop.pivots_done, 1),
            )
            break
        samples.append({"wall_s": wall, "cpu_s": cpu})
        if cpu >= NAIVE_REPEAT_BELOW_S or len(samples) >= repeats:
            break
    if naive["completed"]:
        naive.update(summary(samples))
        naive["value"] = naive_value
        naive["abs_diff_vs_llv"] = abs(naive_value - value_s)  # the same (sampled) candidate sets
        naive["agrees_to_1e-9"] = naive["abs_diff_vs_llv"] <= AGREEMENT_RTOL * max(1.0, abs(value))
        naive["ratio_cpu_vs_llv"] = naive["cpu_s"] / out["llv"]["cpu_s"]
        naive["ratio_wall_vs_llv"] = naive["wall_s"] / out["llv"]["wall_s"]
    else:
        naive["ratio_cpu_vs_llv_lower_bound"] = naive["stopped_after_cpu_s"] / out["llv"]["cpu_s"]
        naive["ratio_cpu_vs_llv_estimated"] = naive["estimated_total_cpu_s"] / out["llv"]["cpu_s"]
    out["naive"] = naive
    return out


def subprocess_run(config: list, threads: int, timeout: float) -> dict:
    env = dict(os.environ)
    for var in THREAD_ENV:
        env[var] = str(threads)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(config)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True, env=env)
    except subprocess.CalledProcessError as err:
        print(err.stderr, file=sys.stderr)
        raise
    return json.loads(out.stdout.strip().splitlines()[-1])


def package_id() -> dict:
    """Where ``lightning_repsim`` was imported from and a SHA-256 of its ``.py`` sources (relative path and
    content, sorted): identifies the code each child measured, also when run against an exported snapshot."""
    import hashlib

    import lightning_repsim

    root = os.path.dirname(os.path.abspath(lightning_repsim.__file__))
    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, root).encode() + b"\0")
            with open(path, "rb") as fh:
                digest.update(fh.read() + b"\0")
    return {"path": root, "sources_sha256": digest.hexdigest()}


def git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, check=True).stdout
        return sha + (" (working tree modified)" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small N smoke run")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--sets", type=int, default=200, help="candidate input sets")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (and OMP/MKL_NUM_THREADS) in the children")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of compare / llv_distance after one warm-up call")
    parser.add_argument(
        "--naive-budget", type=float, default=180.0, help="CPU seconds after which the naive loop is stopped (checked per pivot)"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per child process")
    parser.add_argument("--json", metavar="PATH", help="also write all measured numbers, machine, date and command as JSON")
    parser.add_argument("--lm", action="store_true",
                        help="only compare at a language-model size (K = 8,192, M = 128, N = --n): route, CPU, peak memory")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(*json.loads(args.child))))
        return
    torch.set_num_threads(args.threads)
    from _machine import machine_info

    if args.lm:
        config = [args.sets, min(args.repeats, 2), args.threads, args.naive_budget]
        c = subprocess_run([args.n, 8192, 128, "compare", *config], args.threads, args.timeout)["compare"]
        print(f"machine: {machine_info()}\ncompare at K = 8,192, M = 128, N = {args.n:,} ({args.threads} thread(s), median of "
              f"{min(args.repeats, 2)}): wall {c['wall_s']:.2f} s, CPU {c['cpu_s']:.2f} s, peak memory above the inputs "
              f"{c['peak_mb_above_inputs']:.0f} MB")
        return

    started = datetime.datetime.now(datetime.timezone.utc)
    t0_wall, t0_cpu = time.perf_counter(), time.process_time()
    command = shlex.join(["python", *sys.argv])
    if os.environ.get("PYTHONPATH"):
        command = f"PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])} {command}"
    n = 1000 if args.quick else args.n
    sizes = SIZES[:2] if args.quick else SIZES
    machine = machine_info()
    load_before = os.getloadavg()
    print(f"command: `{command}`  ")
    print(f"date: {started.isoformat(timespec='seconds')}  ")
    print(f"machine: {machine}  ")
    print(f"load average (1/5/15 min) at start: {load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f}  ")
    print(
        f"N = {n}, {args.sets} candidate input sets, float64, {args.threads} torch thread(s); compare / llv_distance: "
        f"median of {args.repeats} calls after a warm-up call; naive: CPU budget {args.naive_budget:g} s\n"
    )
    print(
        "| K | M | compare wall (s) | compare CPU (s) | compare peak memory (MB above inputs) | llv_distance wall (s) "
        "| llv_distance CPU (s) | llv_distance, sampled sets only, CPU (s) "
        "| naive loops wall (s) | naive loops CPU (s) | naive / llv_distance (CPU) "
        "| authors' d_prob CPU (s, issue 9) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for k, m in sizes:
        config = [args.sets, args.repeats, args.threads, args.naive_budget]
        cmp = subprocess_run([n, k, m, "compare", *config], args.threads, args.timeout)
        both = subprocess_run([n, k, m, "llv", *config], args.threads, args.timeout)
        llv, naive = both["llv"], both["naive"]
        assert abs(cmp["compare"]["value"] - llv["value"]) <= AGREEMENT_RTOL * max(1.0, abs(llv["value"])), (cmp, llv)
        if naive["completed"]:
            assert naive["agrees_to_1e-9"], (naive, llv)
            naive_wall, naive_cpu = f"{naive['wall_s']:.3f}", f"{naive['cpu_s']:.3f}"
            ratio = f"{naive['ratio_cpu_vs_llv']:,.0f}x"
        else:
            done = f"stopped after {naive['pivots_done']}/{naive['pivots']} pivots"
            naive_wall = f"> {naive['stopped_after_wall_s']:.3g} ({done})"
            naive_cpu = f"> {naive['stopped_after_cpu_s']:.3g} (est. {naive['estimated_total_cpu_s']:,.0f})"
            ratio = f"> {naive['ratio_cpu_vs_llv_lower_bound']:,.0f}x (est. {naive['ratio_cpu_vs_llv_estimated']:,.0f}x)"
        c = cmp["compare"]
        print(
            f"| {k} | {m} | {c['wall_s']:.3f} | {c['cpu_s']:.3f} | {c['peak_mb_above_inputs']:.0f} | {llv['wall_s']:.3f} "
            f"| {llv['cpu_s']:.3f} | {both['llv_sample']['cpu_s']:.3f} "
            f"| {naive_wall} | {naive_cpu} | {ratio} | {AUTHORS_SECONDS[k]} |",
            flush=True,
        )
        rows.append({"K": k, "M": m, "compare": c, "llv_distance": llv, "naive": naive,
                     "child_threads": {"compare": cmp["torch_threads"], "llv_and_naive": both["torch_threads"]},
                     "child_env": both["env"], "package": both["package"]})
        if cmp["package"] != both["package"]:
            rows[-1]["package_compare_child"] = cmp["package"]
    total_wall, total_cpu = time.perf_counter() - t0_wall, time.process_time() - t0_cpu
    load_after = os.getloadavg()
    children = ("package", "package_compare_child")
    packages = {json.dumps(r.get(key, r["package"]), sort_keys=True) for r in rows for key in children}
    if len(packages) > 1:
        print("\nWARNING: the package sources changed during the run (children imported different code):", *packages, sep="\n")
    else:
        pkg = rows[0]["package"]
        print(f"\nlightning_repsim imported from {pkg['path']}, sources SHA-256 {pkg['sources_sha256'][:16]}...  ")
    print(f"load average at end: {load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f}; "
          f"total wall time {total_wall:.0f} s")
    if args.json:
        record = {
            "benchmark": "bench_functional",
            "command": command,
            "python_executable": sys.executable,
            "date_utc": started.isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "machine": machine,
            "machine_details": {
                "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                "python": platform.python_version(), "load_average_start": load_before, "load_average_end": load_after,
            },
            "config": {"n": n, "sets": args.sets, "threads": args.threads, "repeats": args.repeats,
                       "naive_budget_cpu_s": args.naive_budget, "naive_repeat_below_cpu_s": NAIVE_REPEAT_BELOW_S,
                       "agreement_rtol": AGREEMENT_RTOL, "dtype": "float64", "quick": args.quick},
            "notes": "wall = time.perf_counter, cpu = time.process_time around each call; wall_s/cpu_s are medians of the "
                     "samples; ratio = naive / llv_distance from CPU medians measured in the same child process.",
            "rows": rows,
            "total_wall_s": total_wall,
            "parent_cpu_s": total_cpu,
            "authors_seconds_issue": AUTHORS_SECONDS,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(record, fh, indent=2)
            fh.write("\n")


if __name__ == "__main__":
    main()
