"""What the callback tells the user about a comparison besides its values: each warning or note once per fit (rank 0),
however many epochs repeat the condition."""

from __future__ import annotations

import warnings

from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_repsim.callbacks.comparison import ComparisonOutcome
from lightning_repsim.functional.svd import DiversityWarning

__all__ = ["Notices"]

_ACROSS_PROCESSES = {
    "replicated": ("warn", "ReferenceComparison: processes compared the same validation inputs (the loader has no "
                   "DistributedSampler): each input was counted once, as by one process. Lightning's default "
                   "`use_distributed_sampler=True` shares the work instead."),
    "positions, shared by groups": ("info", "ReferenceComparison: groups of processes compared the same inputs (a "
                                    "DistributedSampler over fewer replicas than processes, e.g. tensor-parallel ranks): "
                                    "each input was counted once."),
    "unknown": ("warn", "ReferenceComparison: several processes without a DistributedSampler, and the model inputs are "
                "not tensors, so whether processes saw the same inputs cannot be checked: an input seen by several "
                "processes is counted once per process."),
}


class Notices:
    """Warnings and notes given once per fit (:meth:`clear` at each fit start)."""

    def __init__(self) -> None:
        self.given: set[str] = set()

    def clear(self) -> None:
        self.given.clear()

    def warn_once(self, key: str, message: str, category: type[Warning] = UserWarning) -> None:
        if key not in self.given:
            self.given.add(key)
            rank_zero_warn(message, category=category)

    def info_once(self, key: str, message: str) -> None:
        if f"info:{key}" not in self.given:
            self.given.add(f"info:{key}")
            rank_zero_info(message)

    def report(self, outcome: ComparisonOutcome) -> None:
        """A comparison's warnings and undefined values, how inputs were shared across processes, dropped inputs and
        the representation dimension used."""
        for caught in outcome.warnings:  # a near-singular diversity set is reported once per fit, not every epoch
            if issubclass(caught.category, DiversityWarning):
                self.warn_once(f"diversity:{str(caught.message)[:48]}", str(caught.message), DiversityWarning)
            else:
                warnings.warn_explicit(caught.message, caught.category, caught.filename, caught.lineno)
        for key, message in outcome.problems.items():
            self.warn_once(f"{key}:{message[:48]}",
                           f"ReferenceComparison: `{key}` is not defined here and is not logged: {message}")
        info = outcome.info
        kind, message = _ACROSS_PROCESSES.get(info.get("inputs_across_processes"), (None, ""))
        if kind == "warn":
            self.warn_once(f"across:{info['inputs_across_processes']}", message)
        elif kind == "info":
            self.info_once(f"across:{info['inputs_across_processes']}", message)
        if info.get("num_dropped"):
            self.warn_once("dropped", f"ReferenceComparison: {info['num_dropped']} validation input(s) had non-finite "
                           "outputs and were skipped (history: `num_dropped`); the values use the other inputs.")
        if info.get("rep_dim") is not None:
            widths = f", embedding widths {tuple(info['widths'])}" if info.get("widths") else ""
            self.info_once("rep_dim", f"ReferenceComparison: comparing at representation dimension M={info['rep_dim']} "
                           f"({info.get('rep_dim_reason', '')}{widths})")
