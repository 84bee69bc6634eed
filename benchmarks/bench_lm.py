"""What ReferenceComparison costs on a language model: a validation epoch with and without the comparison.

Command (about 2 min on 2 CPU cores)::

    python benchmarks/bench_lm.py                      # both sizes, one thread, best of 2 epochs each
    python benchmarks/bench_lm.py --sizes small --json benchmarks/results/lm.json
    python benchmarks/bench_lm.py --smaller-student     # teacher width 128 vs students of width 128 and 64, V = 50,257

Models are Hugging Face ``GPT2LMHeadModel`` built from configs (never downloaded), 2 layers, random weights,
random tokens (the cost does not depend on the values): *small* = width 128, vocabulary 8,192, 58 sequences of
256 tokens (14,848 tokens, as in the issue); *wide* = width 768, vocabulary 50,257 (GPT-2's head), 8 sequences of
256 tokens (2,048 tokens: the forward dominates). For each size, in one process:

1. the student's plain validation epoch (and, separately, its forward alone on the same batches, no Lightning loop);
2. + the reference's forward on every batch (what any comparison must pay, via a tiny callback);
3. + ``ReferenceComparison(reference)`` with default settings;

each timed as CPU time (``time.process_time``) with one torch thread, the best of ``--repeats`` epochs. The
comparison's own time is split into per-batch work (its ``on_validation_batch_end`` minus the forwards run inside
it) and the end-of-epoch computation (``on_validation_epoch_end``). Ratios are taken within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info  # noqa: E402

from lightning_repsim import ReferenceComparison  # noqa: E402

SIZES = {
    "small": {"width": 128, "vocab": 8192, "sequences": 58, "length": 256, "batch": 8},
    "wide": {"width": 768, "vocab": 50257, "sequences": 8, "length": 256, "batch": 4},
}


def gpt2(width: int, vocab: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_embd=width, n_layer=2, n_head=max(1, width // 64), n_positions=512,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


class Student(pl.LightningModule):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)

    def validation_step(self, batch, batch_idx):
        self(**batch)


class ReferenceForward(Callback):
    """Runs the reference on every validation batch and nothing else: the unavoidable part of a comparison."""

    def __init__(self, reference) -> None:
        self.reference = reference.eval().requires_grad_(False)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        with torch.no_grad():
            self.reference(**batch)


class Timed:
    """CPU seconds spent in some methods of objects (wrapped in place): ``{name: object}``; ``inside[(outer, inner)]``:
    the seconds of ``inner`` spent while ``outer`` ran (a forward inside the batch hook, not one run elsewhere)."""

    def __init__(self, methods: dict) -> None:
        self.seconds = dict.fromkeys(methods, 0.0)
        self.inside: dict[tuple[str, str], float] = {}
        active: list[str] = []
        for name, obj in methods.items():
            original = getattr(obj, name)

            def wrapper(*args, _name=name, _original=original, **kwargs):
                start = time.process_time()
                active.append(_name)
                try:
                    return _original(*args, **kwargs)
                finally:
                    active.pop()
                    spent = time.process_time() - start
                    self.seconds[_name] += spent
                    for outer in set(active):
                        self.inside[(outer, _name)] = self.inside.get((outer, _name), 0.0) + spent

            setattr(obj, name, wrapper)


def comparison_timer(cb) -> Timed:
    """The callback's batch and epoch-end hooks, and the forwards its comparison runs (the reference's on every batch,
    the student's when its validation forward cannot be reused, or to check the reuse)."""
    return Timed({"on_validation_batch_end": cb, "on_validation_epoch_end": cb,
                  "reference_representations": cb.comparison, "student_representations": cb.comparison})


def per_batch_seconds(timer: Timed) -> float:
    """The callback's batch hook less the forwards run inside it (the reference's on every batch; the student's own
    where its validation forward is not reused, or to check the reuse): the comparison's own per-batch work."""
    forwards = ("reference_representations", "student_representations")
    return timer.seconds["on_validation_batch_end"] - sum(timer.inside.get(("on_validation_batch_end", f), 0.0) for f in forwards)


def data(size: dict, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, size["vocab"], (size["sequences"], size["length"]), generator=g)
    mask = torch.ones_like(ids)
    return [{"input_ids": ids[i : i + size["batch"]], "attention_mask": mask[i : i + size["batch"]]}
            for i in range(0, size["sequences"], size["batch"])]


def epoch_seconds(student, batches, callbacks, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
        start = time.process_time()
        trainer.validate(student, DataLoader(batches, batch_size=None), verbose=False)
        best = min(best, time.process_time() - start)
    return best


def forward_seconds(student, batches, repeats: int) -> float:
    """CPU seconds of the student's own forward on every batch (no Lightning loop), best of ``repeats``."""
    best = float("inf")
    student.eval()
    with torch.no_grad():
        for _ in range(repeats):
            start = time.process_time()
            for batch in batches:
                student(**batch)
            best = min(best, time.process_time() - start)
    return best


def run(name: str, repeats: int) -> dict:
    size = SIZES[name]
    batches = data(size)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    student = Student(gpt2(size["width"], size["vocab"], seed=0))
    reference = gpt2(size["width"], size["vocab"], seed=1)
    plain = epoch_seconds(student, batches, [], repeats)
    forward = forward_seconds(student, batches, repeats)
    with_reference = epoch_seconds(student, batches, [ReferenceForward(reference)], repeats)
    best = None
    for _ in range(repeats):
        cb = ReferenceComparison(reference, log_media=False)
        timer = comparison_timer(cb)
        seconds = epoch_seconds(student, batches, [cb], 1)
        if best is None or seconds < best[0]:
            best = (seconds, dict(timer.seconds), dict(cb.history[-1]), dict(cb.stats), timer)
    seconds, parts, entry, stats, timer = best
    reference_forward = with_reference - plain
    forwards = parts["reference_representations"] + parts["student_representations"]
    per_batch = per_batch_seconds(timer)
    return {
        "size": name, **size, "tokens": tokens,
        "plain_s": plain, "student_forward_s": forward, "with_reference_forward_s": with_reference,
        "with_comparison_s": seconds,
        "reference_forward_s": reference_forward, "comparison_forwards_s": forwards,
        "per_batch_update_s": per_batch, "epoch_end_s": parts["on_validation_epoch_end"],
        "ratio_to_plain": seconds / plain, "per_batch_over_student_forward": per_batch / forward,
        "beyond_reference_pct": 100 * (seconds - with_reference) / with_reference,
        "d_llv": entry["d_llv"], "kl": entry["kl"], "stats": stats,
    }


def run_smaller_student(repeats: int) -> list[dict]:
    """A teacher of width 128 at GPT-2's vocabulary (1 layer, as in issue 21) compared with a student of the same width
    and with one of width 64, on the same 2,048 tokens: the epoch end and the state of the comparison."""
    size = {"width": 128, "vocab": 50257, "sequences": 16, "length": 128, "batch": 4}
    batches = data(size)

    def model(width: int, seed: int):
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(seed)
        return GPT2LMHeadModel(GPT2Config(vocab_size=size["vocab"], n_embd=width, n_layer=1, n_head=2, n_positions=512))

    teacher = model(128, 1)
    rows = []
    for width in (128, 64):
        student = Student(model(width, 0))
        best = None
        for _ in range(repeats):
            cb = ReferenceComparison(teacher, log_media=False)
            timer = comparison_timer(cb)
            seconds = epoch_seconds(student, batches, [cb], 1)
            if best is None or timer.seconds["on_validation_epoch_end"] < best[1]["on_validation_epoch_end"]:
                best = (seconds, dict(timer.seconds), dict(cb.history[-1]), cb.history[-1]["state_bytes"], timer)
        seconds, parts, entry, state, timer = best
        rows.append({"student_width": width, "epoch_s": seconds, "epoch_end_s": parts["on_validation_epoch_end"],
                     "per_batch_s": per_batch_seconds(timer), "state_mb": state / 1e6,
                     **{k: entry[k] for k in ("kl", "d_llv", "d_svd", "mcca", "rep_dim", "num_inputs")}})
    print("| teacher / student width | tokens | epoch (s) | per-batch work (s) | epoch end (s) | state (MB) | KL | d_LLV | "
          "d_SVD | mCCA | M |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| 128 / {r['student_width']} | {r['num_inputs']:,} | {r['epoch_s']:.2f} | {r['per_batch_s']:.2f} | "
              f"{r['epoch_end_s']:.2f} | {r['state_mb']:.1f} | {r['kl']:.4f} | {r['d_llv']:.4f} | {r['d_svd']:.4f} | "
              f"{r['mcca']:.4f} | {r['rep_dim']} |")
    print(f"epoch end, smaller student / equal widths: {rows[1]['epoch_end_s'] / rows[0]['epoch_end_s']:.2f}x")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--smaller-student", action="store_true", help="only the smaller-student comparison")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smaller_student:
        print(f"Machine: {machine_info()}; torch {torch.__version__}, {args.threads} thread(s); CPU seconds, best of "
              f"{args.repeats}")
        return run_smaller_student(args.repeats)
    rows = [run(name, args.repeats) for name in args.sizes]
    print(f"Machine: {machine_info()}; torch {torch.__version__}, {args.threads} thread(s); CPU seconds, best of "
          f"{args.repeats}")
    print("| model | tokens | plain epoch (s) | student forward alone (s) | + reference forward (s) | "
          "+ ReferenceComparison (s) | ratio to plain | per-batch update (s) | per-batch / student forward | "
          "epoch end (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| GPT-2 {r['size']}: width {r['width']}, V={r['vocab']:,} | {r['tokens']:,} | {r['plain_s']:.2f} | "
              f"{r['student_forward_s']:.2f} | {r['with_reference_forward_s']:.2f} | {r['with_comparison_s']:.2f} | "
              f"{r['ratio_to_plain']:.2f}x | {r['per_batch_update_s']:.2f} | {r['per_batch_over_student_forward']:.2f} | "
              f"{r['epoch_end_s']:.2f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine_info(), "command": " ".join(["python"] + sys.argv),
                                         "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2, default=str))
    return rows


if __name__ == "__main__":
    main()
