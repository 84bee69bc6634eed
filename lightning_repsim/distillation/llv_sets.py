"""Which labels and which inputs a mini-batch d_LLV compares: the label reference (a pivot label or the mean
over labels) with the compared labels, and the input sets (explicit, sampled, the first rows, or the all-pivots
``"mean"`` mode). Index tensors are built once per vocabulary size or batch size and cached."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_repsim.functional._validation import check_choice, check_input_sets, check_label_index, check_positive_int

__all__ = ["INPUT_SET_SEARCH", "InputSetChoice", "LabelChoice"]

INPUT_SET_SEARCH = ("sample", "first", "mean")


class LabelChoice:
    """The label reference and the compared labels (SPEC §3 with a fixed pivot, or the all-pivots mode)."""

    def __init__(self, label_pivot: int | str, leave_out: int | None) -> None:
        if isinstance(label_pivot, str):
            if label_pivot != "mean":
                raise ValueError(f"`label_pivot` must be 'mean' or a label index, got {label_pivot!r}")
        else:
            label_pivot = check_label_index(label_pivot, "label_pivot")
        self.leave_out = check_label_index(leave_out, "leave_out")
        if self.leave_out is not None and self.leave_out == label_pivot:
            raise ValueError(f"`label_pivot` and `leave_out` must differ, both are {leave_out}")
        self.label_pivot = label_pivot
        self._cache: dict[tuple[int, str], Tensor] = {}

    @property
    def pivot(self) -> int | None:
        """The pivot label, or None for the mean over labels."""
        return None if self.label_pivot == "mean" else int(self.label_pivot)

    def compared(self, k: int, device: torch.device) -> Tensor | None:
        """Index of the compared labels among ``k`` (None: all of them)."""
        pivot = self.pivot
        for value, name in ((pivot, "label_pivot"), (self.leave_out, "leave_out")):
            check_label_index(value, name, k)
        drop = [v for v in (pivot, self.leave_out) if v is not None]
        if not drop:
            return None
        if k - len(drop) < 1:
            raise ValueError(f"no label left to compare with K = {k}, label_pivot={pivot}, leave_out={self.leave_out}")
        return self._index(k, tuple(drop), device)

    @torch.compiler.disable
    def _index(self, k: int, drop: tuple[int, ...], device: torch.device) -> Tensor:
        key = (k, str(device))
        if key not in self._cache:
            keep = torch.ones(k, dtype=torch.bool)
            keep[list(drop)] = False
            self._cache[key] = torch.nonzero(keep).flatten().to(device)
        return self._cache[key]


class InputSetChoice:
    """Candidate input sets of M+1 kept rows (first = the pivot input), or None for the all-pivots mode."""

    def __init__(self, rep_dim: int | None, search: str, input_sets, num_input_sets: int, seed: int,
                 needed: bool) -> None:
        self.rep_dim = rep_dim
        self.search = check_choice(search, "input_set_search", INPUT_SET_SEARCH)
        if search in ("first", "sample") and rep_dim is None and needed and input_sets is None:
            raise ValueError(f"`input_set_search={search!r}` needs `rep_dim` (input sets have M+1 rows)")
        self.num_input_sets = check_positive_int(num_input_sets, "num_input_sets")
        self.seed = int(seed)
        self.input_sets = None if input_sets is None else self.check(input_sets)
        self._draws: dict[tuple[int, str], Tensor] = {}

    def check(self, input_sets) -> tuple[tuple[int, ...], ...]:
        """Explicit sets as a tuple of row-index tuples (built into a tensor per call: compile-friendly)."""
        sets = check_input_sets(input_sets, self.rep_dim)
        return tuple(tuple(int(i) for i in row) for row in sets.tolist())

    def candidates(self, input_sets, n: int, device: torch.device) -> Tensor | None:
        """``(S, M+1)`` positions among the ``n`` kept rows (``input_sets`` given to this call first)."""
        chosen = self.input_sets if input_sets is None else self.check(input_sets)
        if chosen is not None:
            top = max(max(row) for row in chosen)
            if top >= n:
                raise ValueError(f"`input_sets` needs {top + 1} (kept) rows, the batch has {n}")
            return torch.tensor(chosen, device=device)
        if self.search == "mean":
            return None
        if n < self.rep_dim + 1:
            raise ValueError(
                f"`input_set_search={self.search!r}` needs M+1 = {self.rep_dim + 1} (kept) rows, the batch has {n}"
            )
        if self.search == "first":
            return torch.arange(self.rep_dim + 1, device=device)[None]
        return self._drawn(n, device)

    @torch.compiler.disable
    def _drawn(self, n: int, device: torch.device) -> Tensor:
        """``num_input_sets`` seeded sets of M+1 distinct row positions for ``n`` rows (cached per ``n``)."""
        key = (n, str(device))
        if key not in self._draws:
            gen = torch.Generator().manual_seed(self.seed)
            order = torch.rand(self.num_input_sets, n, generator=gen).argsort(dim=1)
            self._draws[key] = order[:, : self.rep_dim + 1].to(device)
        return self._draws[key]

    def __repr__(self) -> str:
        return f"input_set_search={self.search!r}, input_sets={self.input_sets!r}"
