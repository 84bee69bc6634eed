"""Benchmark of the streaming metrics: update throughput, compute() time, state size and peak memory.

Usage::

    python benchmarks/bench_metrics.py            # the sizes of issue 3 (a few minutes on 2 CPU cores)
    python benchmarks/bench_metrics.py --quick    # a smoke run (seconds)

* logits route (:class:`LLVDistance`, state O(K^2)): K in {10, 100, 1000};
* representation route (:class:`SVDDissimilarity`, whose ``.llv`` is d_LLV, state O(M^2)): GPT-2's
  K = 50,257 with M in {2, 64, 768};
* memory against N: the same metric after N = 1e4 and N = 1e6 inputs.

For N <= 1e4 the same metric with ``input_set_search="sample"`` (the sampled candidate sets only) is fed the same
batches; after the timed first ``compute()``, the computation is repeated for both metrics (now without one-time
costs): the cost of the default optimised input-set search as a ratio from one run. (The twin's state is part of
the process's peak memory.)

Each configuration runs in a fresh subprocess so that its peak resident memory (ru_maxrss) is its
own; "peak above baseline" subtracts the resident memory after imports and model set-up, so it is
what the metric itself needed (state, update temporaries, compute temporaries). Inputs are generated
batch by batch (not stored) and their generation is not timed.

``--threads`` sets torch's intra-op threads (default: torch's default). On a CPU shared with other
jobs, ``--threads 1`` is often much faster: the metrics' many small operations otherwise wait for
the second thread on every parallel region.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from _machine import current_rss_mb, peak_rss_mb

# (route, K, M, N)
FULL = [
    ("logits", 10, 2, 10_000),
    ("logits", 100, 5, 10_000),
    ("logits", 1000, 16, 10_000),
    ("repr", 50_257, 2, 10_000),
    ("repr", 50_257, 64, 10_000),
    ("repr", 50_257, 768, 2_048),
]
FULL_FLAT = [("logits", 100, 5), ("repr", 1000, 16)]
QUICK = [("logits", 10, 2, 1_000), ("logits", 100, 5, 1_000), ("repr", 5_000, 2, 1_000), ("repr", 5_000, 16, 1_000)]
QUICK_FLAT = [("logits", 10, 2)]


def run_one(route: str, k: int, m: int, n: int, batch: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    from lightning_repsim.metrics import LLVDistance, SVDDissimilarity

    gen = torch.Generator().manual_seed(0)
    if route == "repr":
        w_p = torch.randn(k, m, generator=gen) / m**0.5
        w_q = w_p + 0.1 * torch.randn(k, m, generator=gen) / m**0.5
        mix = torch.randn(m, m, generator=gen) / m**0.5
        metric = SVDDissimilarity(unemb_p=w_p, unemb_q=w_q)
    else:
        metric = LLVDistance(rep_dim=m)
    # the same metric with the sampled candidate sets only (input_set_search="sample", the authors' procedure), fed
    # the same batches: compute() of both in one process gives the cost ratio of the default optimised search
    sampled = SVDDissimilarity(unemb_p=w_p, unemb_q=w_q, input_set_search="sample") if route == "repr" else \
        LLVDistance(rep_dim=m, input_set_search="sample")

    def make_batch(size: int):
        if route == "repr":
            f_p = 2 * torch.randn(size, m, generator=gen)
            return f_p, f_p @ mix + 0.3 * torch.randn(size, m, generator=gen)
        z_p = 2 * torch.randn(size, k, generator=gen)
        return z_p, z_p + 0.5 * torch.randn(size, k, generator=gen)

    metric.update(*make_batch(batch))  # first update sizes the state
    base_mb = current_rss_mb()
    metric.reset()
    twin = n <= 10_000  # the memory-against-N runs (N = 1e6) skip the sampled twin
    resource_peak0 = peak_rss_mb()
    update_s = 0.0
    done = 0
    while done < n:
        size = min(batch, n - done)
        data = make_batch(size)
        start = time.perf_counter()
        metric.update(*data)
        update_s += time.perf_counter() - start
        if twin:
            sampled.update(*data)
        done += size
    state_mb = metric.state_nbytes() / 2**20
    peak_update = peak_rss_mb()
    start = time.perf_counter()
    res = metric.compute_result()
    compute_s = time.perf_counter() - start
    peak = peak_rss_mb()
    warm_s = sampled_s = None
    if twin:  # both again, after the first compute() paid the one-time costs (lazy initialisations)
        start = time.perf_counter()
        metric._result_from(metric._states())
        warm_s = time.perf_counter() - start
        start = time.perf_counter()
        sampled._result_from(sampled._states())
        sampled_s = time.perf_counter() - start
    llv = res.llv if route == "repr" else res
    return {
        "update_per_s": n / update_s,
        "compute_s": compute_s,
        "compute_warm_s": warm_s,
        "compute_sampled_s": sampled_s,
        "state_mb": state_mb,
        "peak_update_mb": max(0.0, max(peak_update, resource_peak0) - base_mb),
        "peak_mb": max(0.0, peak - base_mb),
        "base_mb": base_mb,
        "d_llv": float(llv.value),
        "label_search": llv.label_search,
        "d_svd": float(res.value) if route == "repr" else None,
        "subsets": int(res.svd.msvd_f.numel()) if route == "repr" else None,
    }


def subprocess_run(config: list, timeout: float) -> dict | None:
    cmd = [sys.executable, __file__, "--child", json.dumps(config)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return None
    except subprocess.CalledProcessError as err:
        print(err.stderr, file=sys.stderr)
        raise
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--batch", type=int, default=256, help="inputs per update")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(*json.loads(args.child))))
        return
    from _machine import machine_info

    configs, flat = (QUICK, QUICK_FLAT) if args.quick else (FULL, FULL_FLAT)
    n_small, n_large = (1_000, 100_000) if args.quick else (10_000, 1_000_000)
    torch.set_num_threads(args.threads)
    print(f"machine: {machine_info()}")
    print(f"batch {args.batch} inputs per update, {args.threads} torch threads, float32 inputs, float64 statistics; "
          "no GPU in this run\n")
    print(
        "| route | K | M | N | update (inputs/s) | compute() (s) | compute() again: optimised / sampled sets only (s) "
        "| state (MB) | peak above baseline: update / compute (MB) | label search | f-part subsets |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for route, k, m, n in configs:
        r = subprocess_run([route, k, m, n, args.batch, args.threads], args.timeout)
        name = "logits (LLVDistance)" if route == "logits" else "representation (SVDDissimilarity)"
        if r is None:
            print(f"| {name} | {k} | {m} | {n} | timeout | | | | | | |", flush=True)
            continue
        print(
            f"| {name} | {k:,} | {m} | {n:,} | {r['update_per_s']:,.0f} | {r['compute_s']:.2f} | "
            f"{r['compute_warm_s']:.2f} / {r['compute_sampled_s']:.2f} | {r['state_mb']:.2f} | "
            f"{r['peak_update_mb']:.0f} / {r['peak_mb']:.0f} | {r['label_search']} | {r['subsets'] or ''} |",
            flush=True,
        )
    print("\nMemory against the number of inputs N (same metric, same batch size):\n")
    print("| route | K | M | N | update (inputs/s) | state (MB) | peak above baseline (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for route, k, m in flat:
        for n in (n_small, n_large):
            r = subprocess_run([route, k, m, n, args.batch, args.threads], args.timeout)
            if r is None:
                print(f"| {route} | {k} | {m} | {n:,} | timeout | | |", flush=True)
                continue
            print(
                f"| {route} | {k:,} | {m} | {n:,} | {r['update_per_s']:,.0f} | {r['state_mb']:.3f} | {r['peak_mb']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
