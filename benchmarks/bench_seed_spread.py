"""How much d_LLV moves with ``seed``: the functional core and the streaming metrics at N = 10,000 inputs.

Usage::

    python benchmarks/bench_seed_spread.py                 # N = 10,000, seeds 0..9, buffers 1024..N (about 10 min)
    python benchmarks/bench_seed_spread.py --quick         # N = 3,000, 3 seeds, two buffer sizes (a minute)

The functional core (``functional.compare``, default settings) scores every pair of candidate inputs up to its budget,
so T2 and d_LLV do not depend on the seed at all. The streaming metrics keep a bounded candidate buffer: when N
exceeds it, which inputs the seeded sketch kept still decides the input set. This script measures that spread, over
seeds, for the representation route (``SVDDissimilarity``, what the callback uses with embeddings) at several buffer
sizes and for the logits route (``LLVDistance`` on the models' logits, default buffer), on four model families shaped
like the reference cases (SPEC §8):

* ``gauss_k7_m2``: the reference case's unembeddings, Gaussian embeddings (a linear map plus noise);
* ``table1_rho5``: the Theorem 3.1 construction at rho = 5 (permuted stars);
* ``authors_k4_w128``, ``authors_k6_w32``: the authors' trained radial models' 2,000 test embeddings, resampled with a
  1 % jitter to N inputs (the models themselves are not in the repository).

Relative spread = (max - min) / mean over the seeds. Each configuration reports the time of one ``compute()``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CASES = ROOT / "tests" / "data" / "reference_cases"


def families(n: int) -> dict[str, tuple[torch.Tensor, ...]]:
    from lightning_repsim import theorem31_pair

    gen = torch.Generator().manual_seed(0)
    out = {}
    gauss = {k: torch.from_numpy(v) for k, v in np.load(CASES / "gauss_k7_m2.npz").items()}
    f1 = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    mix = torch.randn(2, 2, generator=gen, dtype=torch.float64)
    out["gauss_k7_m2"] = (f1, gauss["g1"], f1 @ mix + 0.5 * torch.randn(n, 2, generator=gen, dtype=torch.float64), gauss["g2"])
    pair = theorem31_pair(rho=5.0, n_per_class=-(-n // 7), seed=0)
    out["table1_rho5"] = (pair.emb_p[:n], pair.unemb_p, pair.emb_q[:n], pair.unemb_q)
    for name, file in (("authors_k4_w128", "authors_k4_w128_s0s1.npz"), ("authors_k6_w32", "authors_k6_w32_s1s2.npz")):
        case = {k: torch.from_numpy(v) for k, v in np.load(CASES / file).items()}
        rows = torch.randint(case["f1"].shape[0], (n,), generator=gen)
        jitter = [0.01 * case[f].std(0) * torch.randn(n, case[f].shape[1], generator=gen, dtype=torch.float64)
                  for f in ("f1", "f2")]
        out[name] = (case["f1"][rows] + jitter[0], case["g1"], case["f2"][rows] + jitter[1], case["g2"])
    return out


def spread(values: list[float]) -> float:
    t = torch.tensor(values, dtype=torch.float64)
    return float((t.max() - t.min()) / t.mean()) if float(t.mean()) else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from lightning_repsim.functional import compare
    from lightning_repsim.functional.family import split_unembedding
    from lightning_repsim.metrics import LLVDistance, SVDDissimilarity

    n = 3000 if args.quick else 10_000
    seeds = range(3) if args.quick else range(10)
    buffers = [1024, None] if args.quick else [1024, 2048, 4096, 8192, None]  # None: the default (sized from the widths)
    print(f"# d_LLV over seeds {list(seeds)} at N = {n:,}\n\nMachine: {machine_info()}\n")
    print("| family | path | buffer | T2 spread | d_LLV spread | d_LLV mean | compute() (s) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, (f_p, g_p, f_q, g_q) in families(n).items():
        start = time.process_time()
        reports = [compare(f_p, g_p, f_q, g_q, seed=s) for s in seeds]
        took = (time.process_time() - start) / len(reports)
        t2, d = [float(r.llv.t2) for r in reports], [float(r.llv.value) for r in reports]
        print(f"| {name} | `compare` | all {n:,} | {spread(t2):.1e} | {spread(d):.1e} | {np.mean(d):.4f} | {took:.2f} |",
              flush=True)
        for size in buffers:
            t2, d, took = [], [], 0.0
            for s in seeds:
                metric = SVDDissimilarity(unemb_p=g_p, unemb_q=g_q, buffer_size=size, seed=s)
                for i in range(0, n, 256):
                    metric.update(f_p[i : i + 256], f_q[i : i + 256], ids=torch.arange(i, min(n, i + 256)))
                start = time.process_time()
                res = metric.compute_result().llv
                took += time.process_time() - start
                t2.append(float(res.t2))
                d.append(float(res.value))
            kept = f"default: {metric.buffer_size:,}" if size is None else f"{size:,}"
            print(f"| {name} | `SVDDissimilarity` | {kept} | {spread(t2):.1e} | {spread(d):.1e} | {np.mean(d):.4f} | "
                  f"{took / len(seeds):.2f} |", flush=True)
        # the logits route's metric at its default buffer (1,024 inputs), fed the two models' logits
        logits = [f @ w.T + (0.0 if bias is None else bias)
                  for f, (w, bias) in ((f_p, split_unembedding(g_p, f_p.shape[1])), (f_q, split_unembedding(g_q, f_q.shape[1])))]
        t2, d, took = [], [], 0.0
        for s in seeds:
            metric = LLVDistance(seed=s)
            for i in range(0, n, 256):
                metric.update(logits[0][i : i + 256], logits[1][i : i + 256], ids=torch.arange(i, min(n, i + 256)))
            start = time.process_time()
            res = metric.compute_result()
            took += time.process_time() - start
            t2.append(float(res.t2))
            d.append(float(res.value))
        print(f"| {name} | `LLVDistance` (logits) | default: {metric.buffer_size:,} | {spread(t2):.1e} | {spread(d):.1e} | "
              f"{np.mean(d):.4f} | {took / len(seeds):.2f} |", flush=True)


if __name__ == "__main__":
    main()
