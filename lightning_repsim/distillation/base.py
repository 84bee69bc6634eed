"""What every distillation loss shares: the argument convention, the common options, input preparation and
the reductions.

**Argument convention.** A loss is called like a torch loss, ``loss(input, target)``: the **student's**
logits come first and receive the gradient, the **teacher's** second and are detached (no gradient ever
reaches the teacher). The metrics and the functional core take ``(reference p, student q)`` instead; see the
README's table.

**Common options** (every loss): ``reduction`` (``"mean"`` over kept rows, ``"sum"``, ``"none"``),
``dtype`` (the compute dtype: float32, or float64 when an input is float64), ``check_finite`` (raise on
non-finite logits in kept rows; it reads a few derived numbers, not the logits, on the host) and
``chunk_size`` (at most this many rows per block: bounds the float32 work memory, see
:mod:`~lightning_repsim.distillation.rows`).
The computation runs with autocast disabled, so bf16/fp16 logits are upcast block by block.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_repsim.distillation.rows import LogitRows, check_values_finite, logit_rows, reduce_rows
from lightning_repsim.functional._validation import check_choice, check_positive_int

__all__ = ["REDUCTIONS", "DistillationLoss", "RowwiseLoss", "check_compute_dtype", "check_number", "no_autocast"]

REDUCTIONS = ("mean", "sum", "none")


def check_number(value: float, name: str, allow_zero: bool = False) -> float:
    """A finite float ``> 0`` (``>= 0`` with ``allow_zero``)."""
    value = float(value)
    ok = value >= 0 if allow_zero else value > 0
    if not (ok and math.isfinite(value)):
        raise ValueError(f"`{name}` must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return value


def check_compute_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    if dtype not in (None, torch.float32, torch.float64):
        raise ValueError(f"`dtype` (the compute dtype) must be None, torch.float32 or torch.float64, got {dtype!r}")
    return dtype


def no_autocast(x: Tensor) -> torch.autocast:
    """Autocast switched off for the device of ``x``: the maths runs in float32/float64."""
    return torch.autocast(device_type=x.device.type, enabled=False)


class DistillationLoss(nn.Module):
    """Base of the distillation losses: the common options and input preparation.

    Every loss takes these keyword arguments (its own ``__init__`` passes ``**kwargs`` on, as torchmetrics'
    metrics do):

    Args:
        reduction: ``"mean"`` over the kept rows (default), ``"sum"``, or ``"none"`` (per row, the leading shape
            ``(B,)`` / ``(B, T)``, masked rows 0; :class:`~lightning_repsim.distillation.LLVLoss`: its four terms).
        dtype: the compute dtype, None (default: float32, or float64 when an input is float64), float32 or float64.
        check_finite: raise on non-finite values in kept rows (default True; one host read of a few numbers derived
            from the logits; skipped while ``torch.compile`` traces).
        chunk_size: at most this many rows per block: besides the gradient, the loss holds a few ``chunk_size x K``
            float32 blocks. Default: blocks of about 1 MB on the CPU (already the leanest and the fastest there),
            of 2^26 numbers on an accelerator (pass ``chunk_size`` there to bound the memory further).
    """

    def __init__(
        self,
        *,
        reduction: str = "mean",
        dtype: torch.dtype | None = None,
        check_finite: bool = True,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.reduction = check_choice(reduction, "reduction", REDUCTIONS)
        self.dtype = check_compute_dtype(dtype)
        self.check_finite = bool(check_finite)
        self.chunk_size = None if chunk_size is None else check_positive_int(chunk_size, "chunk_size")

    def logit_rows(self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None,
                   host_runs: bool = False) -> LogitRows:
        return logit_rows(student_logits, teacher_logits, mask, self.dtype, self.chunk_size, host_runs)

    def extra_repr(self) -> str:
        chunk = "" if self.chunk_size is None else f", chunk_size={self.chunk_size}"
        return f"reduction={self.reduction!r}{chunk}"


class RowwiseLoss(DistillationLoss):
    """A loss that sums (or averages) a per-row value: subclasses implement :meth:`per_row`."""

    def per_row(self, rows: LogitRows) -> Tensor:
        """The loss of every row, shape (N,), 0 on masked rows (differentiable in ``rows.student``)."""
        raise NotImplementedError

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None) -> Tensor:
        """The loss of the student's logits against the teacher's, ``(B, K)`` or ``(B, T, K)`` each; ``mask``
        of the leading shape (bool or 0/1 integers, True = keep the row)."""
        with no_autocast(student_logits):
            rows = self.logit_rows(student_logits, teacher_logits, mask)
            per_row = self.per_row(rows)
            check_values_finite(per_row.detach(), rows, self.check_finite)
            return reduce_rows(per_row, rows.lead, rows.num_kept(), self.reduction)
