"""First-run demo: two digit classifiers that *predict* alike but *represent* differently.

Command::

    python -m lightning_repsim.demo                 # or: make demo
    python -m lightning_repsim.demo --quick         # 3 epochs: a smoke test (tests use it)
    python -m lightning_repsim.demo --epochs 60 --out /tmp/demo --no-wandb

Runtime (measured, ``time python -m lightning_repsim.demo``, imports included, 2 CPU cores): 28 s
with one other single-threaded job on the machine; 1 min 45 s when other jobs kept it busy (load
average 6). About 26 s of CPU time, one thread. No GPU, no network.

What it does: trains a *reference* (seed 0) and then a *student* (seed 1) on scikit-learn's bundled
8x8 digits (no download), both the same MLP with a 2-D bottleneck followed by ``nn.Linear(2, 10)``
(the callback's default extractor finds that head). The student is trained with
:class:`lightning_repsim.callbacks.ReferenceComparison` attached, which compares it with the frozen
reference on the 450 held-out digits after every epoch. Lightning's progress bar runs; a per-epoch
table is printed (student accuracy, agreement with the reference, KL, d_LLV, d_SVD, mCCA and the
bounds 2·M·d_LLV and 2·d_LLV² on d_SVD); metrics go to a CSV logger and to wandb in offline mode (no
account, no network; the callback also logs its table, curves and the embedding image there); the
final embedding plot is saved as a PNG.

Expected output (default run, deterministic): test accuracy 0.973 (reference) and 0.969 (student);
they predict the same class for 96.7% of the test digits; KL(reference || student) falls from 2.15
after epoch 1 to 0.61 nats (0.36 on the digits where they agree); yet d_LLV = 1.52, d_SVD = 0.81 and
mCCA = 0.62: the two 2-D embeddings are stars with the classes in a different order
(``embeddings.png``; the README shows it as ``docs/demo_embeddings.png``). The bounds on d_SVD are uninformative
(> 1) precisely because d_LLV is large. Everything is written under ``--out`` (default
``./outputs/demo``); the last lines say where (with the ``wandb sync`` command for the offline run).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

__all__ = ["main", "load_digits_split", "digits_classifier", "EpochTable"]

DEFAULT_EPOCHS = 40
QUICK_EPOCHS = 3
BATCH_SIZE = 32
#: Lightning warnings that say nothing to a demo user (silenced inside the demo only).
_QUIET = (".*does not have many workers.*", ".*no `val_dataloader`.*", ".*LeafSpec.*is deprecated.*")


# ---------------------------------------------------------------------------------------------
# data: scikit-learn's bundled digits (1797 images of 8x8 pixels), 75% train / 25% test
# ---------------------------------------------------------------------------------------------
def load_digits_split(test_fraction: float = 0.25, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)``: digits scaled to [0, 1], a stratified split fixed by ``seed``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test = round(test_fraction * len(idx))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tr, te = torch.cat(train_idx), torch.cat(test_idx)
    return x[tr], y[tr], x[te], y[te]


class ShiftAugment:
    """Collate function: stack a batch and shift each image by up to one pixel (zero fill), with probability 1/2."""

    def __call__(self, items: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        x = torch.stack([it[0] for it in items]).view(-1, 1, 8, 8)
        y = torch.stack([it[1] for it in items])
        padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
        offsets = torch.randint(0, 3, (x.shape[0], 2))
        offsets[torch.rand(x.shape[0]) < 0.5] = 1  # no shift
        out = torch.empty_like(x)
        for dy in range(3):
            for dx in range(3):
                sel = (offsets[:, 0] == dy) & (offsets[:, 1] == dx)
                if sel.any():
                    out[sel] = padded[sel, :, dy : dy + 8, dx : dx + 8]
        return out.view(-1, 64), y


def digits_classifier(lr: float = 3e-3):
    """The demo's model: MLP 64 -> 256 -> 256 -> 256 -> 2 (the embedding f) -> ``nn.Linear(2, 10)`` (g), trained
    with Adam (one-cycle schedule, weight decay 1e-4). The callback's default extractor finds the head."""
    from lightning_repsim.models import BottleneckClassifier, Classifier

    net = BottleneckClassifier(64, 10, hidden=(256, 256, 256), rep_dim=2)
    return Classifier(net, lr=lr, weight_decay=1e-4, one_cycle=True)


# ---------------------------------------------------------------------------------------------
# the per-epoch table
# ---------------------------------------------------------------------------------------------
def _fmt(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and math.isfinite(value) else "-"


class EpochTable(Callback):
    """Prints one row per comparison of a :class:`ReferenceComparison` (reads its ``history``) with the
    student's accuracy on the compared inputs and the share of them where the reference and the student
    predict the same class (both computed here from the student's ``validation_step`` output
    ``{"logits": ...}`` and one reference forward per batch). Register it *after* the comparison callback.
    The rows are kept in ``rows``.

    Args:
        comparison: the :class:`ReferenceComparison` callback.
        agreement: run the reference on each validation batch to compute ``agree`` (else ``nan``).
        printer: ``str -> None`` (default: the progress bar's ``print``, or ``print``).
    """

    HEADER = (f"{'epoch':>5} {'acc':>6} {'agree':>6} {'KL':>7} {'d_LLV':>7} {'d_SVD':>7} {'mCCA':>6} "
              f"{'2M·d_LLV':>9} {'2·d_LLV²':>9}")

    def __init__(self, comparison: Any, agreement: bool = True, printer: Any = None) -> None:
        self.comparison = comparison
        self.agreement = agreement
        self.printer = printer
        self.rows: list[dict[str, Any]] = []
        self._counts = [0, 0, 0]  # correct, agreeing, seen
        self._printed_header = False

    def _print(self, trainer: Any, text: str) -> None:
        bar = trainer.progress_bar_callback
        if self.printer is not None:
            self.printer(text)
        elif bar is not None and hasattr(bar, "print"):
            bar.print(text)
        else:
            print(text, flush=True)

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._counts = [0, 0, 0]

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking or not isinstance(outputs, dict) or "logits" not in outputs:
            return
        pred = outputs["logits"].argmax(-1)
        self._counts[0] += int((pred == batch[1]).sum())
        if self.agreement:
            with torch.no_grad():
                ref = self.comparison.reference(batch[0].to(pl_module.device))
            self._counts[1] += int((ref.argmax(-1) == pred).sum())
        self._counts[2] += int(pred.shape[0])

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        history = self.comparison.history
        if trainer.sanity_checking or not history or history[-1]["global_step"] != trainer.global_step:
            return
        h = history[-1]
        seen = max(1, self._counts[2])
        row = {
            "epoch": h["epoch"] + 1,
            "global_step": h["global_step"],
            "stage": h["stage"],
            "acc": self._counts[0] / seen if self._counts[2] else math.nan,
            "agree": self._counts[1] / seen if self._counts[2] and self.agreement else math.nan,
            **{k: h[k] for k in ("kl", "d_llv", "d_svd", "mcca", "bound_paper", "bound_sharp")},
        }
        self.rows.append(row)
        if not self._printed_header:
            self._print(trainer, self.HEADER)
            self._printed_header = True
        self._print(trainer, self.format_row(row))

    @staticmethod
    def format_row(r: dict[str, Any]) -> str:
        return (f"{r['epoch']:>5} {_fmt(r['acc'], '6.3f')} {_fmt(r['agree'], '6.3f')} {_fmt(r['kl'], '7.3f')} "
                f"{_fmt(r['d_llv'], '7.3f')} {_fmt(r['d_svd'], '7.3f')} {_fmt(r['mcca'], '6.3f')} "
                f"{_fmt(r['bound_paper'], '9.2f')} {_fmt(r['bound_sharp'], '9.2f')}")


# ---------------------------------------------------------------------------------------------
# environment: wandb offline, one torch thread (restored afterwards)
# ---------------------------------------------------------------------------------------------
@contextmanager
def _demo_environment(threads: int):
    """WANDB_MODE=offline (unless set), quiet wandb, ``threads`` torch threads; the environment (wandb and
    Lightning's seeding write variables too) and the thread count are restored afterwards."""
    import logging
    import warnings

    saved_env = dict(os.environ)
    saved_threads = torch.get_num_threads()
    pl_logger = logging.getLogger("lightning.pytorch")
    saved_level = pl_logger.level
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    torch.set_num_threads(threads)
    pl_logger.setLevel(logging.WARNING)  # no "GPU available: False" banners
    try:
        with warnings.catch_warnings():
            for message in _QUIET:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        pl_logger.setLevel(saved_level)
        torch.set_num_threads(saved_threads)
        for k in set(os.environ) - set(saved_env):
            del os.environ[k]
        for k, v in saved_env.items():
            if os.environ.get(k) != v:
                os.environ[k] = v


def _loaders(x_train, y_train, x_test, y_test, seed: int):
    from torch.utils.data import DataLoader, TensorDataset

    gen = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=BATCH_SIZE, shuffle=True, generator=gen,
                       collate_fn=ShiftAugment())
    test = DataLoader(TensorDataset(x_test, y_test), batch_size=256)
    return train, test


def _trainer(epochs: int, callbacks: list, loggers: list | bool, progress: bool):
    import lightning.pytorch as pl

    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, callbacks=callbacks, logger=loggers, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=progress, num_sanity_val_steps=0, log_every_n_steps=10,
        deterministic=True,
    )


def _accuracy(model, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def _kl_where_agreeing(reference, student, x: Tensor) -> tuple[float, float]:
    """(share of inputs where both predict the same class, mean KL(reference || student) on those inputs)."""
    from lightning_repsim.functional import mean_kl_divergence

    reference.eval()
    student.eval()
    with torch.no_grad():
        zr, zs = reference(x).double(), student(x).double()
    same = zr.argmax(-1) == zs.argmax(-1)
    kl = float(mean_kl_divergence(zr[same], zs[same])) if bool(same.any()) else math.nan
    return float(same.double().mean()), kl


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the demo; returns ``history`` (the callback's), ``rows`` (the printed table), accuracies and paths."""
    parser = argparse.ArgumentParser(prog="python -m lightning_repsim.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=None, help=f"epochs per model (default {DEFAULT_EPOCHS})")
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output directory (default ./outputs/demo)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_EPOCHS} epochs: a smoke test")
    parser.add_argument("--no-wandb", action="store_true", help="CSV logging only")
    parser.add_argument("--no-progress", action="store_true", help="hide Lightning's progress bars")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: fastest for this small MLP)")
    args = parser.parse_args(argv)
    epochs = args.epochs or (QUICK_EPOCHS if args.quick else DEFAULT_EPOCHS)
    with _demo_environment(args.threads):
        return _run(args, epochs)


def _run(args: argparse.Namespace, epochs: int) -> dict[str, Any]:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from lightning_repsim.callbacks import ReferenceComparison

    start = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress

    x_train, y_train, x_test, y_test = load_digits_split()
    print(f"Digits (scikit-learn, bundled): {len(y_train)} training and {len(y_test)} test images of 8x8 pixels, 10 classes.")
    print("Model: MLP 64-256-256-256 -> 2-D embedding f(x) -> nn.Linear(2, 10) (unembedding g = its weight rows).\n")

    # 1. the reference
    print(f"[1/2] Training the reference (seed 0, {epochs} epochs)...", flush=True)
    pl.seed_everything(0, verbose=False)
    reference = digits_classifier()
    train, test = _loaders(x_train, y_train, x_test, y_test, seed=0)
    _trainer(epochs, [], False, progress).fit(reference, train)
    ref_acc = _accuracy(reference, x_test, y_test)
    print(f"      reference test accuracy: {ref_acc:.3f}\n", flush=True)

    # 2. the student, compared with the reference after every epoch
    print(f"[2/2] Training the student (seed 1, {epochs} epochs) with ReferenceComparison(reference)...", flush=True)
    pl.seed_everything(1, verbose=False)
    student = digits_classifier()
    train, test = _loaders(x_train, y_train, x_test, y_test, seed=1)
    comparison = ReferenceComparison(reference, prog_bar=True)
    table = EpochTable(comparison)
    loggers: list[Any] = [CSVLogger(save_dir=str(out), name="csv")]
    wandb_logger = None
    if not args.no_wandb:
        from lightning.pytorch.loggers import WandbLogger

        wandb_logger = WandbLogger(project="lightning_repsim-demo", name="digits-student-seed1", save_dir=str(out),
                                   offline=True)
        wandb_logger.log_hyperparams({"epochs": epochs, "batch_size": BATCH_SIZE, "reference_seed": 0, "student_seed": 1,
                                      "reference_test_acc": ref_acc})
        loggers.append(wandb_logger)
    _trainer(epochs, [comparison, table], loggers, progress).fit(student, train, test)
    stu_acc = _accuracy(student, x_test, y_test)

    # outputs
    png = out / "embeddings.png"
    fig = comparison.embedding_figure()
    if fig is not None:
        fig.savefig(png, dpi=110)
    csv_path = Path(loggers[0].log_dir) / "metrics.csv"
    wandb_dir = None
    if wandb_logger is not None:
        wandb_dir = Path(wandb_logger.experiment.dir).parent
        wandb_logger.experiment.finish()
    elapsed = time.perf_counter() - start

    first, last = comparison.history[0], comparison.history[-1]
    agree, kl_same = _kl_where_agreeing(reference, student, x_test)
    shown = [r for r in table.rows if r["epoch"] in (1, 2, 3, 5, 10, 20, 30) or r is table.rows[-1]]
    print(f"\nReference vs student on the {len(y_test)} test digits (every epoch: see the CSV / wandb):")
    print(EpochTable.HEADER)
    for r in shown:
        print(EpochTable.format_row(r))
    print()
    print(f"Reference (seed 0) test accuracy {ref_acc:.3f}, student (seed 1) {stu_acc:.3f}; "
          f"they predict the same class for {agree:.1%} of the test digits.")
    print(f"Predictions alike:        mean KL(reference || student) = {last['kl']:.3f} nats (after epoch 1: "
          f"{first['kl']:.3f}); {kl_same:.3f} on the digits where they agree.")
    print(f"Representations differ:   d_LLV = {last['d_llv']:.3f}, d_SVD = {last['d_svd']:.3f}, mCCA = {last['mcca']:.3f} "
          "(0, 0 and 1 for embeddings equal up to an invertible linear map).")
    print("                          The embedding plot shows why: two stars whose arms are in a different order.")
    print(f"\nDone in {elapsed:.0f} s. Outputs in {out}:")
    if fig is not None:
        print(f"  embedding plot (reference vs student): {png}")
    print(f"  per-epoch metrics (CSV):               {csv_path}")
    if wandb_dir is not None:
        print(f"  wandb offline run:                     {wandb_dir}")
        print(f"    view it online with:  wandb sync {wandb_dir}")
    return {
        "history": comparison.history,
        "rows": table.rows,
        "reference_acc": ref_acc,
        "student_acc": stu_acc,
        "agreement": agree,
        "kl_where_agreeing": kl_same,
        "out": out,
        "png": png if fig is not None else None,
        "csv": csv_path,
        "wandb_dir": wandb_dir,
        "seconds": elapsed,
    }


if __name__ == "__main__":
    main(sys.argv[1:])
