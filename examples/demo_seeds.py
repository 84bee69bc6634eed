"""The first-run demo (``python -m lightning_repsim.demo``) on several seeds: does its message hold beyond the default?

Command::

    python examples/demo_seeds.py                       # radial, seeds 0 (the default), 1, 2; about 1 min on 2 cores
    python examples/demo_seeds.py --digits-seeds 0 1 2  # also the same recipe on scikit-learn's digits (why not digits)
    python examples/demo_seeds.py --quick               # 1 epoch per model, seed 0 (a smoke test)

For each seed ``S`` it runs the demo exactly as ``make demo`` does (teacher seed ``S``, both students seed ``S + 1``),
without wandb, and records its ``summary.json`` and the demo's acceptance (both students' final KL <= 0.05 nats,
their d_LLV at least 10x apart, their mCCA at least 0.05 apart). Writes ``demo_seeds.md`` and ``demo_seeds.json`` to
``--out`` (default ``examples/results/``; ``demo_seeds_quick.*`` with ``--quick``). The seconds are the demo's own
clock (training, comparisons, picture; imports not included) on a shared machine: indicative only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the examples' shared helpers
from _results import shown_args  # noqa: E402

from lightning_repsim.demo import D_LLV_RATIO_MIN, KL_MAX, MCCA_GAP_MIN, STUDENTS, acceptance
from lightning_repsim.demo import main as demo_main

RESULTS = Path(__file__).resolve().parent / "results"


def run(data: str, seed: int, quick: bool, work: Path) -> dict:
    argv = ["--data", data, "--seed", str(seed), "--out", str(work / f"{data}-seed{seed}"), "--no-wandb", "--no-progress"]
    if quick:
        argv += ["--epochs", "1"]
    try:
        result = demo_main(argv)
    except Exception as error:  # noqa: BLE001  (a failed run is recorded, the others still run)
        return {"data": data, "seed": seed, "error": f"{type(error).__name__}: {error}"}
    summary = result["summary"]
    return {"data": data, "seed": seed, "summary": summary, "acceptance": acceptance(summary), "seconds": result["seconds"]}


def markdown(records: list[dict], argv: list[str], runtime: float) -> str:
    cmd = "python examples/demo_seeds.py" + ("" if not argv else " " + " ".join(argv))
    lines = [
        "# The demo on several seeds",
        "",
        f"Command: `{cmd}` — {runtime / 60:.1f} min in all on a shared 2-core machine. Each row is one run of "
        "`python -m lightning_repsim.demo --seed S` (teacher seed S, both students seed S + 1; `--data digits` for the "
        "digits rows), numbers on the held-out points from its `summary.json`. Acceptance: both students' final KL ≤ "
        f"{KL_MAX} nats, d_LLV ratio ≥ {D_LLV_RATIO_MIN:.0f}, mCCA gap ≥ {MCCA_GAP_MIN}.",
        "",
        "| data | seed | teacher acc | student | acc | agreement | KL | d_LLV | d_SVD | mCCA | max KL | d_LLV ratio | "
        "mCCA gap | holds? | demo's clock |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['data']} | {r['seed']} | – | the run failed: `{r['error']}` | | | | | | | | | | | |")
            continue
        s, a = r["summary"], r["acceptance"]
        for i, name in enumerate(STUDENTS):
            v = s["students"][name]
            tail = (f"{a['max_kl']:.3f} | {a['d_llv_ratio']:.0f} | {a['mcca_gap']:.3f} | {'yes' if a['ok'] else 'no'} | "
                    f"{r['seconds']:.0f} s |") if i == 0 else "| | | | |"
            lead = f"| {r['data']} | {r['seed']} | {s['teacher_accuracy']:.4f} |" if i == 0 else "| | | |"
            lines.append(f"{lead} {STUDENTS[name][0]} | {v['accuracy']:.4f} | {v['agreement']:.4f} | {v['kl']:.4f} | "
                         f"{v['d_llv']:.4f} | {v['d_svd']:.2e} | {v['mcca']:.4f} | {tail}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="radial seeds (default 0 1 2)")
    parser.add_argument("--digits-seeds", type=int, nargs="*", default=[], help="digits seeds (default none)")
    parser.add_argument("--quick", action="store_true", help="1 epoch per model, seed 0")
    parser.add_argument("--out", type=Path, default=RESULTS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    start = time.perf_counter()
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for data, data_seeds in (("radial", seeds), ("digits", args.digits_seeds)):
            for seed in data_seeds:
                records.append(run(data, seed, args.quick, Path(tmp)))
    runtime = time.perf_counter() - start
    shown = shown_args(argv)
    stem = "demo_seeds_quick" if args.quick else "demo_seeds"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({"runtime_s": runtime, "args": shown, "runs": records}, indent=1) + "\n")
    text = markdown(records, shown, runtime)
    (args.out / f"{stem}.md").write_text(text)
    print("\n" + text)
    return records


if __name__ == "__main__":
    main()
