"""Student and teacher logits as every distillation loss reads them: checked once, flattened to ``(N, K)`` rows
without a copy, the kept rows known, and visited in blocks of rows.

Why blocks: a loss over ``(B, T, V)`` logits written as whole-tensor torch operations allocates a fresh
``(N, V)`` float32 temporary for every step (upcast, masking ``where``, ``log_softmax``, the element-wise
product, their gradients) and streams each through main memory. The losses here walk the rows in blocks of
about :data:`CPU_BLOCK_NUMBERS` numbers, so that every temporary of a block stays in the CPU cache and the only
``(N, V)`` tensor ever allocated is the gradient itself. ``chunk_size`` (rows per block) makes the bound
explicit on any device; without it an accelerator takes blocks of 256 MB of float32 (few kernel launches).

Masks: on the CPU the kept rows are found once as contiguous runs (left or right padding gives one run per
sequence) and masked rows are never read, so they may hold anything, even NaN. Where the mask must stay on
the device (an accelerator, or ``torch.compile`` tracing) :meth:`LogitRows.block` returns each block with the mask of
its dropped rows, and the loss zeroes them in its first temporary (``masked_fill_``) and in what it stores.

``chunk_size`` is an upper bound on the rows per block. On the CPU the default blocks are already about 1 MB (a
larger ``chunk_size`` changes nothing: bigger blocks leave the cache and are slower); elsewhere the default blocks
hold :data:`DEVICE_BLOCK_NUMBERS` numbers, and ``chunk_size`` bounds the float32 work to a few ``chunk_size x K``
blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_repsim.functional._validation import check_finite, check_mask, check_same_shape, check_tensor

__all__ = [
    "CPU_BLOCK_NUMBERS",
    "DEVICE_BLOCK_NUMBERS",
    "LogitRows",
    "check_values_finite",
    "compiling",
    "logit_rows",
    "reduce_rows",
]

#: Numbers per block on the CPU (1 MB of float32: the dozen temporaries of a block stay in a 1-2 MB L2 cache).
CPU_BLOCK_NUMBERS = 1 << 18
#: Numbers per block by default elsewhere (an accelerator, or a graph being compiled): 256 MB of float32, a few
#: kernel launches for a language model's batch.
DEVICE_BLOCK_NUMBERS = 1 << 26


def compiling() -> bool:
    return bool(torch.compiler.is_compiling())


@dataclass(frozen=True)
class LogitRows:
    """Validated ``(N, K)`` rows of one student/teacher pair (see the module docstring).

    Attributes:
        student: ``(N, K)``, the caller's dtype, a view of the input whenever its layout allows.
        teacher: ``(N, K)``, detached.
        lead: the leading shape (``(B,)`` or ``(B, T)``) for ``reduction="none"``.
        dtype: the compute dtype (float32, or float64).
        runs: the kept rows as ``[start, stop)`` runs, known on the host (None: see ``keep``).
        keep: ``(N,)`` bool mask applied inside each block (only when ``runs`` is None and a mask was given).
        block_rows: rows per block (at most ``chunk_size``).
    """

    student: Tensor
    teacher: Tensor
    lead: torch.Size
    dtype: torch.dtype
    runs: tuple[tuple[int, int], ...] | None
    keep: Tensor | None
    block_rows: int

    @property
    def num_rows(self) -> int:
        return self.student.shape[0]

    @property
    def num_classes(self) -> int:
        return self.student.shape[1]

    def num_kept(self) -> Tensor | int:
        """Kept rows: an int when the runs are known, else a device tensor (no host read)."""
        if self.runs is not None:
            return sum(b - a for a, b in self.runs)
        return self.keep.sum() if self.keep is not None else self.num_rows

    def blocks(self) -> Iterator[tuple[int, int]]:
        """``[start, stop)`` blocks of at most ``block_rows`` rows covering the kept rows (all rows without runs)."""
        for a, b in self.runs if self.runs is not None else ((0, self.num_rows),):
            for i in range(a, b, self.block_rows):
                yield i, min(i + self.block_rows, b)

    def block(self, a: int, b: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """Student and teacher rows ``a:b`` in the compute dtype (views when no cast is needed: never write to
        them) and the block's drop mask ``(b - a, 1)`` (None when every row is kept). With a drop mask the rows may
        hold anything: pass the block's first temporary through :meth:`sanitise`."""
        sb, tb = self.student[a:b].to(self.dtype), self.teacher[a:b].to(self.dtype)
        return sb, tb, None if self.keep is None else ~self.keep[a:b, None]

    @staticmethod
    def sanitise(x: Tensor, drop: Tensor | None) -> Tensor:
        """Zero the dropped rows of a temporary, in place."""
        return x if drop is None else x.masked_fill_(drop, 0.0)

    def kept_index(self) -> Tensor:
        """Positions of the kept rows, in order (a host read of the mask when the runs are not known)."""
        if self.runs is not None:
            parts = [torch.arange(a, b) for a, b in self.runs]
            index = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
            return index.to(self.student.device)
        if self.keep is not None:
            return torch.nonzero(self.keep).flatten()
        return torch.arange(self.num_rows, device=self.student.device)

    def new_grad(self) -> Tensor:
        """An uninitialised gradient of the student rows whose masked rows (the gaps between runs) are zero."""
        grad = torch.empty_like(self.student, memory_format=torch.contiguous_format)
        if self.runs is not None:
            start = 0
            for a, b in (*self.runs, (self.num_rows, self.num_rows)):
                if a > start:
                    grad[start:a].zero_()
                start = b
        return grad

    def store(self, grad: Tensor, a: int, b: int, value: Tensor, drop: Tensor | None) -> None:
        """Write a block of the gradient (zero on dropped rows, cast to the gradient's dtype)."""
        grad[a:b].copy_(self.sanitise(value, drop))


def _runs(keep: Tensor) -> tuple[tuple[int, int], ...]:
    """Contiguous runs of True in a host bool vector."""
    edges = torch.diff(keep.to(torch.int8), prepend=keep.new_zeros(1, dtype=torch.int8),
                       append=keep.new_zeros(1, dtype=torch.int8))
    starts, stops = torch.nonzero(edges == 1).flatten().tolist(), torch.nonzero(edges == -1).flatten().tolist()
    return tuple(zip(starts, stops))


def logit_rows(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None,
    dtype: torch.dtype | None,
    chunk_size: int | None,
    host_runs: bool = False,
) -> LogitRows:
    """Check a ``(student_logits, teacher_logits)`` pair and its ``mask`` (see :class:`LogitRows`).

    ``host_runs=True`` finds the kept rows on the host on every device (one host read of the mask); otherwise
    only on the CPU outside ``torch.compile``.
    """
    for x, name in ((student_logits, "student_logits"), (teacher_logits, "teacher_logits")):
        check_tensor(x, name)
        if not x.is_floating_point():
            raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {x.dtype}")
        if x.ndim < 2:
            raise ValueError(f"`{name}` must have shape (B, K) or (B, T, K), got shape {tuple(x.shape)}")
    check_same_shape(student_logits, teacher_logits, "student_logits", "teacher_logits")
    k = student_logits.shape[-1]
    if k < 2:
        raise ValueError(f"need at least K = 2 labels (classes), got K = {k}")
    lead = student_logits.shape[:-1]
    if dtype is None:
        wide = torch.float64 in (student_logits.dtype, teacher_logits.dtype)
        dtype = torch.float64 if wide else torch.float32
    s = student_logits.reshape(-1, k)
    t = teacher_logits.detach().reshape(-1, k)
    n = s.shape[0]
    keep = check_mask(mask, lead, s.device)
    on_host = host_runs or (s.device.type == "cpu" and not compiling())
    runs: tuple[tuple[int, int], ...] | None = ((0, n),) if n else ()
    if keep is not None and on_host:
        runs, keep = _runs(keep.cpu()), None
    elif keep is not None:
        runs = None  # the mask stays on the device: applied inside each block
    if s.device.type == "cpu" and not compiling():  # cache-sized blocks: the fastest and the leanest
        block = max(1, CPU_BLOCK_NUMBERS // k)
        block = block if chunk_size is None else min(block, chunk_size)
    else:  # few large blocks (few kernel launches; graphs inductor fuses) unless bounded
        block = chunk_size or max(1, min(n, DEVICE_BLOCK_NUMBERS // k))
    return LogitRows(s, t, lead, dtype, runs, keep, block)


def check_values_finite(values: Tensor, rows: LogitRows, enabled: bool) -> None:
    """Raise on non-finite logits in kept rows, reading only ``values`` (a few numbers derived from every kept
    logit: non-finite whenever one of them is) unless they are non-finite; then the logits are searched for the
    message. Values that overflowed from finite logits pass. Skipped while ``torch.compile`` traces."""
    if not enabled or compiling() or bool(torch.isfinite(values).all()):
        return
    keep = None
    if rows.runs is not None:
        keep = torch.zeros(rows.num_rows, dtype=torch.bool, device=rows.student.device)
        for a, b in rows.runs:
            keep[a:b] = True
    elif rows.keep is not None:
        keep = rows.keep
    for x, name in ((rows.student.detach(), "student_logits"), (rows.teacher, "teacher_logits")):
        check_finite(x if keep is None else torch.where(keep[:, None], x, 0.0), name)


def reduce_rows(per_row: Tensor, lead: torch.Size, num_kept: Tensor | int, reduction: str) -> Tensor:
    """``reduction`` of a per-row loss (N,) whose masked rows hold 0: ``"none"`` (leading shape ``lead``),
    ``"sum"``, or ``"mean"`` over the ``num_kept`` kept rows (0 when none is kept)."""
    if reduction == "none":
        return per_row.reshape(lead)
    total = per_row.sum()
    if reduction == "sum":
        return total
    count = num_kept
    if isinstance(count, Tensor):
        return total / count.to(total.dtype).clamp_min(1.0)
    return total / max(count, 1)
