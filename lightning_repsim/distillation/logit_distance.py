"""The (centred) logit distance as a distillation loss, one pass over the logits per direction.

``||c(s) - c(t)||^2`` per row needs no exponential: the forward pass keeps the row means of ``d = s - t``
(N numbers) and the backward pass rebuilds ``2 (d - mean d)`` block by block straight into the gradient, so
nothing of size ``(N, K)`` is allocated besides the gradient (autograd's graph of the same formula keeps
five such tensors).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from lightning_repsim.distillation.base import RowwiseLoss, check_number
from lightning_repsim.distillation.rows import LogitRows
from lightning_repsim.functional._validation import check_choice

__all__ = ["LogitDistanceLoss"]


def _row_norm(d: Tensor, p: int, eps: float) -> Tensor:
    """``sum_y d_y^2`` (p = 2) or ``sum_y sqrt(d_y^2 + eps^2) - eps`` (p = 1; ``|d_y|`` when ``eps = 0``)."""
    if p == 2:
        return torch.linalg.vecdot(d, d)
    if eps == 0:
        return d.abs().sum(-1)
    return (torch.sqrt(d * d + eps * eps) - eps).sum(-1)


class _LogitDistanceRows(torch.autograd.Function):
    """Per-row logit distance of ``rows`` (N,), with a hand-written backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, rows: LogitRows, options: tuple) -> Tensor:
        p, centered, eps, per_class = options
        out = torch.zeros(rows.num_rows, dtype=rows.dtype, device=student.device)
        means = torch.zeros_like(out) if centered else None
        for a, b in rows.blocks():
            sb, tb, drop = rows.block(a, b)
            d = rows.sanitise(sb - tb, drop)
            if centered:
                m = d.mean(-1, keepdim=True)
                d.sub_(m)
                means[a:b] = m.squeeze(-1)
            out[a:b] = _row_norm(d, p, eps)
        if per_class:
            out /= rows.num_classes
        ctx.save_for_backward(student, teacher, means)
        ctx.rows, ctx.options = rows, options
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows: Tensor):
        student, teacher, means = ctx.saved_tensors
        rows = dataclasses.replace(ctx.rows, student=student, teacher=teacher)
        p, centered, eps, per_class = ctx.options
        scale = grad_rows.to(rows.dtype) * ((1.0 / rows.num_classes) if per_class else 1.0)
        grad = rows.new_grad()
        direct = grad.dtype == rows.dtype and rows.keep is None
        for a, b in rows.blocks():
            sb, tb, drop = rows.block(a, b)
            # dropped rows stay in their own row (possibly NaN) until ``store`` zeroes them
            d = torch.sub(sb, tb, out=grad[a:b]) if direct and p == 2 else sb - tb
            if centered:
                d.sub_(means[a:b, None])
            if p == 2:
                gd = d.mul_(2 * scale[a:b, None])
            else:
                gd = torch.sign(d) if eps == 0 else d / torch.sqrt(d * d + eps * eps)
                if centered:  # the gradient of the centring: subtract the mean over classes
                    gd.sub_(gd.mean(-1, keepdim=True))
                gd.mul_(scale[a:b, None])
            if not (direct and p == 2):
                rows.store(grad, a, b, gd, drop)
        return grad, None, None, None


class LogitDistanceLoss(RowwiseLoss):
    r"""Logit distance between a student and a teacher, the distillation loss of the follow-up paper
    (Nielsen et al., "Logit Distance Bounds Representational Similarity", arXiv 2602.15438).

    Called as ``loss(student_logits, teacher_logits, mask=None)`` (like a torch loss's ``(input, target)``:
    the student receives the gradient, the teacher is detached).

    Per row (input) ``x``, with ``d = s(x) - t(x)`` and ``c(v) = v - mean_y v_y`` (centring over classes):

    * ``p=2, centered=True`` (default): ``sum_y (c(s) - c(t))_y^2 = ||c(d)||_2^2``;
    * ``p=1, centered=True``: ``sum_y |c(d)_y|`` (smoothed, see ``eps``);
    * ``centered=False``: the same on the raw difference ``d`` (not invariant to per-input shifts
      of the logits, i.e. not a function of the predictive distributions).

    The centred loss is zero exactly when student and teacher logits differ by a per-input
    constant, i.e. when their log-probabilities coincide; ``2 K T^2 KL_T`` of :class:`KDLoss` tends to
    the ``p=2`` centred value as the temperature ``T`` grows.

    At language-model vocabularies the sum over classes grows with K (about ``2 K`` for independent standard
    normal logits: 16,400 at K = 8,192, swamping a cross-entropy of weight 1); ``class_reduction="mean"``
    divides by K, so the scale does not depend on the vocabulary. When the logits come from linear heads and
    the vocabulary is large, :class:`~lightning_repsim.distillation.HiddenStateLogitDistanceLoss` computes the
    same value from the hidden states without forming the logits.

    Args:
        p: 1 or 2.
        centered: subtract the mean over classes first (default True).
        class_reduction: ``"sum"`` over classes (default, the follow-up paper's d_logit^2 per input) or
            ``"mean"`` (divided by K).
        eps: only for ``p=1``: ``|u|`` is replaced by ``sqrt(u^2 + eps^2) - eps`` (within ``eps`` of
            ``|u|``, smooth, gradient 0 at 0). ``eps=0`` gives the exact L1 norm (subgradient 0 at 0).
        kwargs: the options every loss has, ``reduction`` (``"mean"`` over kept rows, ``"sum"``, ``"none"``: per
            row), ``dtype``, ``check_finite`` and ``chunk_size`` (see
            :class:`~lightning_repsim.distillation.base.DistillationLoss`).

    Example:
        >>> import torch
        >>> s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 3.0]])
        >>> t = torch.tensor([[11.0, 12.0, 13.0], [0.0, 0.0, 0.0]])  # row 0: a per-input shift
        >>> LogitDistanceLoss(reduction="none")(s, t)  # row 1: c(d) = (-1, -1, 2)
        tensor([0., 6.])
        >>> LogitDistanceLoss(p=1, eps=0.0, reduction="sum")(s, t)
        tensor(4.)
        >>> LogitDistanceLoss(centered=False, reduction="none")(s, t)
        tensor([300.,   9.])
        >>> LogitDistanceLoss(class_reduction="mean", reduction="none")(s, t)  # divided by K = 3
        tensor([0., 2.])
    """

    def __init__(
        self,
        p: int = 2,
        centered: bool = True,
        class_reduction: str = "sum",
        eps: float = 1e-6,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if p not in (1, 2) or isinstance(p, bool):
            raise ValueError(f"`p` must be 1 or 2, got {p!r}")
        self.p = int(p)
        self.centered = bool(centered)
        self.class_reduction = check_choice(class_reduction, "class_reduction", ("sum", "mean"))
        self.eps = check_number(eps, "eps", allow_zero=True)

    def per_row(self, rows: LogitRows) -> Tensor:
        options = (self.p, self.centered, self.eps, self.class_reduction == "mean")
        return _LogitDistanceRows.apply(rows.student, rows.teacher, rows, options)

    def extra_repr(self) -> str:
        return (f"p={self.p}, centered={self.centered}, class_reduction={self.class_reduction!r}, eps={self.eps}, "
                + super().extra_repr())
