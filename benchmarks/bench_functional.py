"""Benchmark of the functional core: ``compare`` and ``llv_distance`` at N = 10,000.

Usage::

    python benchmarks/bench_functional.py            # the four sizes of the issue, plus the naive baseline
    python benchmarks/bench_functional.py --quick    # a smoke run (small N)

Each configuration runs in a fresh subprocess so that its peak resident memory (ru_maxrss) is its
own. The "naive" column is a straightforward in-memory implementation written for this benchmark
(Python loops over pivots, left-out labels and candidate sets, as the authors' reference code is
structured); it is skipped where it would take more than ``--naive-budget`` seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from _machine import current_rss_mb, peak_rss_mb

SIZES = [(10, 2), (100, 5), (300, 8), (1000, 16)]
AUTHORS_SECONDS = {10: "1.7", 100: "22", 300: "113", 1000: "> 600"}


def make_pair(n: int, k: int, m: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    f1 = torch.randn(n, m, generator=gen, dtype=torch.float64)
    g1 = torch.randn(k, m, generator=gen, dtype=torch.float64)
    f2 = f1 + 0.3 * torch.randn(n, m, generator=gen, dtype=torch.float64)
    g2 = g1 + 0.3 * torch.randn(k, m, generator=gen, dtype=torch.float64)
    return f1, g1, f2, g2


def naive_llv(lp: torch.Tensor, lq: torch.Tensor, sets: torch.Tensor) -> float:
    """Straightforward d_LLV (max/max): loops over pivots, left-out labels and candidate sets."""
    k = lp.shape[1]
    best = (float("inf"), None, None)
    for y0 in range(k):
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


def run_one(n: int, k: int, m: int, what: str, sets: int) -> dict:
    from lightning_repsim.functional import compare, draw_input_sets, llv_distance, logits_from_representations

    f1, g1, f2, g2 = make_pair(n, k, m)
    l1, l2 = logits_from_representations(f1, g1), logits_from_representations(f2, g2)
    base_mb = current_rss_mb()
    start = time.perf_counter()
    if what == "compare":
        rep = compare(f1, g1, f2, g2, num_input_sets=sets)
        value = float(rep.llv.value)
    elif what == "llv":
        value = float(llv_distance(l1, l2, rep_dim=m, num_input_sets=sets).value)
    else:
        cand = draw_input_sets(n, m + 1, sets, seed=0)
        lp, lq = torch.log_softmax(l1, -1), torch.log_softmax(l2, -1)
        value = naive_llv(lp, lq, cand)
    seconds = time.perf_counter() - start
    peak_mb = peak_rss_mb()
    return {"seconds": seconds, "peak_mb": peak_mb - base_mb, "value": value}


def subprocess_run(n, k, m, what, sets, timeout):
    cmd = [sys.executable, __file__, "--child", json.dumps([n, k, m, what, sets])]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small N smoke run")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--sets", type=int, default=200, help="candidate input sets")
    parser.add_argument("--naive-budget", type=float, default=300.0, help="seconds allowed for the naive baseline")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(*json.loads(args.child))))
        return
    from _machine import machine_info

    n = 1000 if args.quick else args.n
    sizes = SIZES[:2] if args.quick else SIZES
    print(f"machine: {machine_info()}")
    print(f"N = {n}, {args.sets} candidate input sets, float64\n")
    print(
        "| K | M | compare (s) | compare peak memory (MB above inputs) | llv_distance (s) | naive loops (s) "
        "| speed-up vs naive | authors' code (s, issue) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k, m in sizes:
        cmp = subprocess_run(n, k, m, "compare", args.sets, 900)
        llv = subprocess_run(n, k, m, "llv", args.sets, 900)
        naive = subprocess_run(n, k, m, "naive", args.sets, args.naive_budget)
        if naive is not None:
            assert abs(naive["value"] - llv["value"]) <= 1e-9 * max(1.0, abs(llv["value"])), (naive, llv)
        naive_s = f"{naive['seconds']:.2f}" if naive else f"> {args.naive_budget:.0f}"
        speedup = f"{naive['seconds'] / llv['seconds']:.0f}x" if naive else f"> {args.naive_budget / llv['seconds']:.0f}x"
        print(
            f"| {k} | {m} | {cmp['seconds']:.3f} | {cmp['peak_mb']:.0f} | {llv['seconds']:.3f} | {naive_s} | {speedup} "
            f"| {AUTHORS_SECONDS[k]} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
