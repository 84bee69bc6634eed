"""Reproduce Table 1 of the paper (Theorem 3.1): KL goes to 0, representations stay different.

Command::

    python examples/table1.py            # full: rho = 1..20, 500 inputs per class (about 5 s on 2 CPU cores)
    python examples/table1.py --quick    # rho in {1, 5, 20}, 50 inputs per class (tests use this)

Expected output (full mode): a markdown table with one row per rho in which the mean KL divergence
falls from about 0.8 to about 3e-5 while d_LLV stays at 1.317, mCCA at about 0.001 and d_SVD^f at
about 0.9997; a plot ``table1.png`` of the four quantities against rho; both written to
``--out`` (default ``examples/results/``).

The pair of models is :func:`lightning_repsim.theorem31_pair` (SPEC §7): two 7-class models whose
2-D embeddings are stars with permuted arms. All distances come from
:func:`lightning_repsim.functional.compare` (d_LLV chooses the label/input sets, d_SVD uses them).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lightning_repsim import theorem31_pair
from lightning_repsim.functional import compare

COLUMNS = ("kl", "d_llv", "mcca", "d_svd_f", "d_svd")


def run(rhos, n_per_class: int, seed: int) -> list[dict[str, float]]:
    rows = []
    for rho in rhos:
        pair = theorem31_pair(float(rho), n_per_class=n_per_class, seed=seed)
        rep = compare(pair.emb_p, pair.unemb_p, pair.emb_q, pair.unemb_q, seed=seed)
        rows.append({"rho": float(rho), **{c: rep.as_dict()[c] for c in COLUMNS}})
    return rows


def to_markdown(rows: list[dict[str, float]]) -> str:
    lines = ["| rho | mean KL | d_LLV | mCCA | d_SVD^f | d_SVD |", "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['rho']:g} | {r['kl']:.3e} | {r['d_llv']:.4f} | {r['mcca']:.4f} | {r['d_svd_f']:.4f} | {r['d_svd']:.4f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rho = [r["rho"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].semilogy(rho, [r["kl"] for r in rows], "o-", label="mean KL")
    ax[0].set_xlabel("rho")
    ax[0].set_title("predictions converge (KL -> 0)")
    ax[0].legend()
    for key, label in (("d_llv", "d_LLV"), ("mcca", "mCCA"), ("d_svd_f", "d_SVD^f")):
        ax[1].plot(rho, [r[key] for r in rows], "o-", label=label)
    ax[1].set_xlabel("rho")
    ax[1].set_title("representations stay different")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 values of rho, 50 inputs per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rhos = (1, 5, 20) if args.quick else range(1, 21)
    rows = run(rhos, 50 if args.quick else 500, args.seed)
    table = to_markdown(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "table1_quick" if args.quick else "table1"
    (args.out / f"{stem}.md").write_text(table + "\n")
    plot(rows, args.out / f"{stem}.png")
    print(table)
    print(f"\nwrote {args.out / (stem + '.md')} and {args.out / (stem + '.png')} in {time.perf_counter() - start:.1f} s")
    return rows


if __name__ == "__main__":
    main()
