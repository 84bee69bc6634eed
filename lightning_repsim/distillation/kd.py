"""Hinton knowledge distillation, one pass over the logits per direction.

Per row, with ``a = s / T``, ``b = t / T`` and ``p_t = softmax(b)``:
``T^2 KL(p_t || p_s) = T^2 (sum_y p_t,y (b_y - a_y) + logsumexp(a) - logsumexp(b))``. The forward pass keeps the
two log-partitions (2N numbers); the backward pass rebuilds ``T (p_s - p_t)`` block by block into the gradient.
Two exponentials per logit each way, no ``(N, K)`` temporary but the gradient (``F.kl_div`` on two
``log_softmax`` outputs allocates five and takes five exponentials).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from lightning_repsim.distillation.base import RowwiseLoss, check_number
from lightning_repsim.distillation.rows import LogitRows

__all__ = ["KDLoss"]


def kd_rows(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(KL(softmax(b) || softmax(a)), logsumexp(a), logsumexp(b))`` per row of temperature-scaled logits.
    Overwrites ``a`` and ``b`` (blocks the caller owns)."""
    lse_a = torch.logsumexp(a, -1)
    top = b.amax(-1, keepdim=True)
    a.sub_(b)  # a - b
    e = b.sub_(top).exp_()  # exp(b - max b)
    total = e.sum(-1)
    lse_b = top.squeeze(-1) + total.log()
    return lse_a - lse_b - torch.linalg.vecdot(e, a) / total, lse_a, lse_b


class _KDRows(torch.autograd.Function):
    """Per-row ``T^2 KL(p_t^T || p_s^T)`` of ``rows`` (N,), with a hand-written backward."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, rows: LogitRows, temperature: float) -> Tensor:
        out = torch.zeros(rows.num_rows, dtype=rows.dtype, device=student.device)
        lse = torch.zeros(2, rows.num_rows, dtype=rows.dtype, device=student.device)
        inv = 1.0 / temperature
        for i, j in rows.blocks():
            sb, tb, drop = rows.block(i, j)
            a, b = rows.sanitise(sb * inv, drop), rows.sanitise(tb * inv, drop)
            out[i:j], lse[0, i:j], lse[1, i:j] = kd_rows(a, b)
        ctx.save_for_backward(student, teacher, lse)
        ctx.rows, ctx.temperature = rows, temperature
        return out * (temperature * temperature)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows: Tensor):
        student, teacher, lse = ctx.saved_tensors
        rows = dataclasses.replace(ctx.rows, student=student, teacher=teacher)
        temperature = ctx.temperature
        inv, scale = 1.0 / temperature, grad_rows.to(rows.dtype) * temperature
        grad = rows.new_grad()
        direct = grad.dtype == rows.dtype and rows.keep is None
        for i, j in rows.blocks():
            sb, tb, drop = rows.block(i, j)
            # dropped rows stay in their own row (possibly NaN) until ``store`` zeroes them
            ps = torch.mul(sb, inv, out=grad[i:j]) if direct else sb * inv
            ps.sub_(lse[0, i:j, None]).exp_()
            pt = (tb * inv).sub_(lse[1, i:j, None]).exp_()
            ps.sub_(pt).mul_(scale[i:j, None])
            if not direct:
                rows.store(grad, i, j, ps, drop)
        return grad, None, None, None


class KDLoss(RowwiseLoss):
    r"""Hinton knowledge distillation: ``T^2 * KL(p_t^T || p_s^T)`` per input, with
    ``p^T = softmax(logits / T)`` (teacher ``t``, student ``s``).

    Called as ``loss(student_logits, teacher_logits, mask=None)`` (like a torch loss's ``(input, target)``:
    the student receives the gradient, the teacher is detached).

    **Cross-entropy convention.** This module returns *only* the distillation term, already scaled
    by ``T^2`` (so its gradient magnitude does not shrink as ``T`` grows). It takes no ``alpha`` and
    no labels: the usual objective ``alpha * KDLoss + (1 - alpha) * CE(student, labels)`` (Hinton et
    al. 2015) is assembled by the caller, with whatever weights.

    As ``T -> inf``, ``2 K T^2 KL_T -> ||c(s) - c(t)||^2`` (the centred :class:`LogitDistanceLoss`,
    ``c`` = subtract the mean over the ``K`` classes); at ``T = 100`` with logits of order 1 the two
    agree to well under 1 %. :class:`~lightning_repsim.distillation.HiddenStateKDLoss` takes hidden states and
    linear heads instead of logits.

    Args:
        temperature: ``T > 0`` (default 4.0).
        kwargs: the options every loss has, ``reduction`` (``"mean"`` over kept rows: the ``"batchmean"`` KL
            convention; ``"sum"``; ``"none"``: per row), ``dtype``, ``check_finite`` and ``chunk_size`` (see
            :class:`~lightning_repsim.distillation.base.DistillationLoss`).

    Example:
        >>> import torch
        >>> s = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64)
        >>> t = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
        >>> round(float(KDLoss(temperature=1.0)(s, t)), 4)  # KL(p_t || p_s)
        1.1504
        >>> from lightning_repsim.losses import LogitDistanceLoss
        >>> kd = float(KDLoss(temperature=100.0)(s, t))
        >>> l2 = float(LogitDistanceLoss()(s, t))  # ||c(s) - c(t)||^2 = 8
        >>> round(2 * 3 * kd / l2, 3)
        1.0
    """

    def __init__(self, temperature: float = 4.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.temperature = check_number(temperature, "temperature")

    def per_row(self, rows: LogitRows) -> Tensor:
        return _KDRows.apply(rows.student, rows.teacher, rows, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, " + super().extra_repr()
