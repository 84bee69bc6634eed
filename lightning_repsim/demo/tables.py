"""The per-epoch tables: Lightning callbacks that print one row per comparison (the students side by side, or a
single :class:`ReferenceComparison`) and keep the rows."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from lightning_repsim.demo.training import STUDENTS

__all__ = ["EpochTable", "StudentsTable", "fmt", "fmt_small"]


def fmt(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def fmt_small(value: float) -> str:
    """d_SVD and other values that go to ~1e-5: 4 decimals, or 2 significant digits below 1e-3."""
    if not (isinstance(value, (int, float)) and math.isfinite(value)):
        return "-"
    return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"


class _Printer:
    def __init__(self, printer: Any = None) -> None:
        self.printer = printer

    def _print(self, trainer: Any, text: str) -> None:
        bar = trainer.progress_bar_callback
        if self.printer is not None:
            self.printer(text)
        elif bar is not None and hasattr(bar, "print"):
            bar.print(text)
        else:
            print(text, flush=True)


class StudentsTable(Callback, _Printer):
    """Prints, after every compared epoch, one row with the students side by side: agreement with the teacher and
    the comparisons' KL, d_LLV, d_SVD and mCCA (read from each :class:`ReferenceComparison`'s ``history``; agreement
    and accuracy from the module's ``counts``). Register it *after* the comparisons. The rows are kept in ``rows``
    (``{"epoch": e, name: {"acc", "agree", "kl", "d_llv", "d_svd", "mcca"}}``).
    """

    KEYS = ("kl", "d_llv", "d_svd", "mcca")

    def __init__(self, comparisons: Mapping[str, Any], printer: Any = None) -> None:
        _Printer.__init__(self, printer)
        self.comparisons = dict(comparisons)
        self.rows: list[dict[str, Any]] = []
        self._printed_header = False

    def header(self) -> str:
        top = f"{'':>5} |" + "|".join(f" {STUDENTS[n][0]:<38}" for n in self.comparisons)
        cols = f"{'epoch':>5} |" + "|".join(f" {'agree':>6} {'KL':>7} {'d_LLV':>7} {'d_SVD':>8} {'mCCA':>6} "
                                            for _ in self.comparisons)
        return f"{top}\n{cols}"

    def format_row(self, row: Mapping[str, Any]) -> str:
        parts = [f" {fmt(r['agree'], '6.3f')} {fmt(r['kl'], '7.4f')} {fmt(r['d_llv'], '7.4f')} {fmt_small(r['d_svd']):>8} "
                 f"{fmt(r['mcca'], '6.4f')} " for r in (row[n] for n in self.comparisons)]
        return f"{row['epoch']:>5} |" + "|".join(parts)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        row: dict[str, Any] = {"epoch": trainer.current_epoch + 1}
        for name, comparison in self.comparisons.items():
            history = comparison.history
            if not history or history[-1]["global_step"] != trainer.global_step:
                return
            correct, agree, seen = getattr(pl_module, "counts", {}).get(name, (0, 0, 0))
            row[name] = {"acc": correct / seen if seen else math.nan, "agree": agree / seen if seen else math.nan,
                         **{k: history[-1][k] for k in self.KEYS}}
        self.rows.append(row)
        if not self._printed_header:
            self._print(trainer, self.header())
            self._printed_header = True
        self._print(trainer, self.format_row(row))


class EpochTable(Callback, _Printer):
    """Prints one row per comparison of a single :class:`ReferenceComparison` (reads its ``history``) with the
    student's accuracy on the compared inputs and the share of them where the reference and the student
    predict the same class (both computed here from the student's ``validation_step`` output
    ``{"logits": ...}`` and one reference forward per batch). Register it *after* the comparison callback.
    The rows are kept in ``rows``. (Used by ``examples/cifar10.py``.)

    Args:
        comparison: the :class:`ReferenceComparison` callback.
        agreement: run the reference on each validation batch to compute ``agree`` (else ``nan``).
        printer: ``str -> None`` (default: the progress bar's ``print``, or ``print``).
    """

    HEADER = (f"{'epoch':>5} {'acc':>6} {'agree':>6} {'KL':>7} {'d_LLV':>7} {'d_SVD':>7} {'mCCA':>6} "
              f"{'2M·d_LLV':>9} {'2·d_LLV²':>9}")

    def __init__(self, comparison: Any, agreement: bool = True, printer: Any = None) -> None:
        _Printer.__init__(self, printer)
        self.comparison = comparison
        self.agreement = agreement
        self.rows: list[dict[str, Any]] = []
        self._counts = [0, 0, 0]  # correct, agreeing, seen
        self._printed_header = False

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
        return (f"{r['epoch']:>5} {fmt(r['acc'], '6.3f')} {fmt(r['agree'], '6.3f')} {fmt(r['kl'], '7.3f')} "
                f"{fmt(r['d_llv'], '7.3f')} {fmt(r['d_svd'], '7.3f')} {fmt(r['mcca'], '6.3f')} "
                f"{fmt(r['bound_paper'], '9.2f')} {fmt(r['bound_sharp'], '9.2f')}")
