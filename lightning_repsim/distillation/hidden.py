"""Distillation losses from hidden states and linear output layers, for vocabularies too large for the logits.

A language model's logits are a linear head of its last hidden state, ``z = W h + b`` (``W``: V x M). These
losses take the student's and the teacher's hidden states and heads, so the ``(B, T, V)`` logits are never
formed (all of them at once, or at all):

* :class:`HiddenStateLogitDistanceLoss`: with ``c`` the centring over classes, the centred logit distance of two
  linear heads is a quadratic form of ``x = [h_s; 1; h_t]``:
  ``||c(z_s) - c(z_t)||^2 = x^T G x`` with ``G = A^T A`` and ``A = [C W_s, C (b_s - b_t), -C W_t]``
  (V x (M_s + 1 + M_t)). ``G`` costs ``O(V (M_s + M_t)^2)`` once per call (the teacher's block only when its
  weight changed), every token ``O((M_s + M_t)^2)`` instead of ``O(V (M_s + M_t))``; exact. It runs in float64:
  ``x^T G x`` adds large terms of both signs when the student is close to its teacher.
* :class:`HiddenStateKDLoss`: KD over chunks of tokens; each chunk's logits are formed, used and dropped, and
  formed again in the backward pass (no ``(N, V)`` tensor is kept; at most ``chunk_size x V`` numbers exist).

The widths ``M_s`` and ``M_t`` may differ (distillation into a narrower student is the usual case). Both losses are
called as ``loss(student_hidden, teacher_hidden, student_head, teacher_head, mask=None)``; a head is an
``nn.Linear`` (e.g. ``model.lm_head``), a ``(weight, bias)`` pair (bias may be None) or a weight tensor. The
gradient reaches the student's hidden states and head; the teacher's are detached.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_repsim.distillation.base import DistillationLoss, check_number, no_autocast
from lightning_repsim.distillation.kd import kd_rows
from lightning_repsim.distillation.rows import compiling, reduce_rows
from lightning_repsim.functional._validation import check_choice, check_finite, check_mask, check_tensor

__all__ = ["HiddenStateKDLoss", "HiddenStateLogitDistanceLoss", "linear_head"]

Head = nn.Linear | tuple | Tensor
#: Numbers per chunk of logits in :class:`HiddenStateKDLoss` by default (16 MB of float32).
KD_CHUNK_NUMBERS = 1 << 22


def linear_head(head: Head, name: str) -> tuple[Tensor, Tensor | None]:
    """``(weight (V, M), bias (V,) or None)`` of an ``nn.Linear``, a ``(weight, bias)`` pair or a weight."""
    if isinstance(head, nn.Linear):
        weight, bias = head.weight, head.bias
    elif isinstance(head, Tensor):
        weight, bias = head, None
    elif isinstance(head, (tuple, list)) and len(head) == 2:
        weight, bias = head
    else:
        raise TypeError(f"`{name}` must be an nn.Linear, a (weight, bias) pair or a weight tensor, got {type(head).__name__}")
    check_tensor(weight, f"{name} weight")
    if weight.ndim != 2 or not weight.is_floating_point():
        raise ValueError(f"`{name}` weight must be a floating-point (V, M) matrix, got {weight.dtype} {tuple(weight.shape)}")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"`{name}` bias must be None or a ({weight.shape[0]},) tensor")
    return weight, bias


@dataclass(frozen=True)
class HiddenRows:
    """The kept tokens' hidden states ``(n, M)`` and both heads, checked; ``index`` their positions among ``N``."""

    student: Tensor
    teacher: Tensor
    student_head: tuple[Tensor, Tensor | None]
    teacher_head: tuple[Tensor, Tensor | None]
    index: Tensor | None
    num_rows: int
    lead: torch.Size
    dtype: torch.dtype

    def scatter(self, per_token: Tensor) -> Tensor:
        """Per-token values of the kept tokens placed among all ``N`` (0 elsewhere)."""
        if self.index is None:
            return per_token
        return per_token.new_zeros(self.num_rows).index_put((self.index,), per_token)


def hidden_rows(student_hidden: Tensor, teacher_hidden: Tensor, student_head: Head, teacher_head: Head,
                mask: Tensor | None, dtype: torch.dtype | None) -> HiddenRows:
    ws, bs = linear_head(student_head, "student_head")
    wt, bt = linear_head(teacher_head, "teacher_head")
    for h, w, name in ((student_hidden, ws, "student_hidden"), (teacher_hidden, wt, "teacher_hidden")):
        check_tensor(h, name)
        if not h.is_floating_point() or h.ndim < 2:
            raise ValueError(f"`{name}` must be a floating-point (B, M) or (B, T, M) tensor, got {h.dtype} {tuple(h.shape)}")
        if h.shape[-1] != w.shape[1]:
            raise ValueError(f"`{name}` has width {h.shape[-1]} but its head expects {w.shape[1]}")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError("`student_hidden` and `teacher_hidden` must have the same leading shape, "
                         f"got {tuple(student_hidden.shape[:-1])} and {tuple(teacher_hidden.shape[:-1])}")
    if ws.shape[0] != wt.shape[0] or ws.shape[0] < 2:
        raise ValueError(f"the heads must have the same number of classes V >= 2, got {ws.shape[0]} and {wt.shape[0]}")
    lead = student_hidden.shape[:-1]
    if dtype is None:
        wide = torch.float64 in (student_hidden.dtype, teacher_hidden.dtype, ws.dtype, wt.dtype)
        dtype = torch.float64 if wide else torch.float32
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    keep = check_mask(mask, lead, hs.device)
    index = None
    if keep is not None:
        index = torch.nonzero(keep).flatten()
        hs, ht = hs.index_select(0, index), ht.index_select(0, index)
    teacher = (wt.detach(), None if bt is None else bt.detach())
    return HiddenRows(hs, ht, (ws, bs), teacher, index, lead.numel(), lead, dtype)


def _check_hidden_finite(values: Tensor, rows: HiddenRows, enabled: bool) -> None:
    if not enabled or compiling() or bool(torch.isfinite(values).all()):
        return
    named = (("student_hidden", rows.student), ("teacher_hidden", rows.teacher), ("student_head", rows.student_head[0]),
             ("teacher_head", rows.teacher_head[0]))
    for name, x in named:
        check_finite(x.detach(), name)


_CLASS_CHUNK = 4096  # classes per float64 chunk of a teacher head (25 MB at width 768)


class _CrossGram(torch.autograd.Function):
    """``A^T W`` (float64) for a float64 ``A`` (V x p) and a teacher head ``W`` (V x q, any float dtype, no gradient),
    over chunks of classes: no float64 copy of ``W`` is kept."""

    @staticmethod
    def forward(ctx, a: Tensor, w: Tensor) -> Tensor:
        out = torch.zeros(a.shape[1], w.shape[1], dtype=a.dtype, device=a.device)
        for i in range(0, w.shape[0], _CLASS_CHUNK):
            out.addmm_(a[i:i + _CLASS_CHUNK].T, w[i:i + _CLASS_CHUNK].to(a.dtype))
        ctx.save_for_backward(w)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        (w,) = ctx.saved_tensors
        out = torch.empty(w.shape[0], grad.shape[0], dtype=grad.dtype, device=grad.device)
        for i in range(0, w.shape[0], _CLASS_CHUNK):
            torch.mm(w[i:i + _CLASS_CHUNK].to(grad.dtype), grad.T, out=out[i:i + _CLASS_CHUNK])
        return out, None


class HiddenStateLogitDistanceLoss(DistillationLoss):
    r"""The centred logit distance ``||c(W_s h_s + b_s) - c(W_t h_t + b_t)||^2`` per token (``p=2``) from hidden
    states and linear heads, without the logits (see :mod:`~lightning_repsim.distillation.hidden`). Equal to
    ``LogitDistanceLoss(centered=..., class_reduction=...)`` on the heads' logits.

    Called as ``loss(student_hidden, teacher_hidden, student_head, teacher_head, mask=None)``; hidden states
    ``(B, M)`` or ``(B, T, M)`` (widths may differ between the models), heads ``nn.Linear``, ``(weight, bias)`` or
    a weight.

    **When it wins.** Per call it costs about ``3 V M_s (M_s + M_t)`` multiply-adds in float64 (the student's
    blocks of ``G`` and their gradient; the teacher's block is cached while its weight is unchanged) plus
    ``N (M_s + M_t)^2`` per token; forming the logits costs ``N V (M_s + M_t)`` in float32 and the logit loss
    ``O(N V)`` more. It wins when the tokens per step ``N`` are several times ``M_s``; the benchmark's table in
    the README gives measured break-even points.

    Args:
        centered: centre over classes (default True).
        class_reduction: ``"sum"`` (default) or ``"mean"`` (divided by V).
        kwargs: ``reduction``, ``dtype`` (the returned dtype: ``G`` and the quadratic forms are float64),
            ``check_finite``, and ``chunk_size`` (tokens per block of quadratic forms; default: all), as for every
            loss (:class:`~lightning_repsim.distillation.base.DistillationLoss`).

    Example:
        >>> import torch
        >>> from lightning_repsim.losses import LogitDistanceLoss
        >>> g = torch.Generator().manual_seed(0)
        >>> student_head, teacher_head = torch.nn.Linear(4, 50), torch.nn.Linear(6, 50)  # widths 4 < 6
        >>> hs, ht = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 6, generator=g)
        >>> hidden = HiddenStateLogitDistanceLoss()(hs, ht, student_head, teacher_head)
        >>> logits = LogitDistanceLoss()(student_head(hs), teacher_head(ht))
        >>> bool(torch.isclose(hidden, logits, rtol=1e-5))
        True
    """

    def __init__(self, centered: bool = True, class_reduction: str = "sum", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.centered = bool(centered)
        self.class_reduction = check_choice(class_reduction, "class_reduction", ("sum", "mean"))
        self._teacher_block: tuple | None = None

    def _centre(self, x: Tensor) -> Tensor:
        return x - x.mean(0, keepdim=True) if self.centered else x

    def _teacher_gram(self, weight: Tensor) -> Tensor:
        """``(C W_t)^T (C W_t)`` in float64 (over chunks of classes), cached while the same weight is unchanged."""
        key = (weight._version, self.centered, weight.device, weight.dtype, weight.shape)
        cached = self._teacher_block
        if cached is not None and cached[0]() is weight and cached[1] == key:
            return cached[2]
        w = weight.detach()
        mean = w.sum(0, dtype=torch.float64) / w.shape[0] if self.centered else None
        gram = torch.zeros(w.shape[1], w.shape[1], dtype=torch.float64, device=w.device)
        for i in range(0, w.shape[0], _CLASS_CHUNK):
            part = w[i:i + _CLASS_CHUNK].to(torch.float64)
            part = part - mean if mean is not None else part
            gram.addmm_(part.T, part)
        self._teacher_block = (weakref.ref(weight), key, gram)
        return gram

    def gram(self, rows: HiddenRows) -> Tensor:
        """``G`` of the module docstring (float64, differentiable in the student's head), order ``[h_s, 1, h_t]``.
        The cross block needs no centred copy of the teacher's head: ``(C A)^T W = A^T C W`` for a centred ``A``."""
        (ws, bs), (wt, bt) = rows.student_head, rows.teacher_head
        f64 = torch.float64
        bias = torch.zeros(ws.shape[0], dtype=f64, device=ws.device)
        if bs is not None:
            bias = bias + bs.to(f64)
        if bt is not None:
            bias = bias - bt.to(f64)
        a1 = self._centre(torch.cat([ws.to(f64), bias[:, None]], 1))
        g11, g12 = a1.T @ a1, -_CrossGram.apply(a1, wt)
        g22 = self._teacher_gram(wt)
        return torch.cat([torch.cat([g11, g12], 1), torch.cat([g12.T, g22], 1)], 0)

    def forward(self, student_hidden: Tensor, teacher_hidden: Tensor, student_head: Head, teacher_head: Head,
                mask: Tensor | None = None) -> Tensor:
        """The loss of the student (hidden states and head) against the teacher's."""
        with no_autocast(student_hidden):
            rows = hidden_rows(student_hidden, teacher_hidden, student_head, teacher_head, mask, self.dtype)
            g = self.gram(rows)
            f64 = torch.float64
            ones = torch.ones(rows.student.shape[0], 1, dtype=f64, device=g.device)
            x = torch.cat([rows.student.to(f64), ones, rows.teacher.to(f64)], 1)
            step = self.chunk_size or max(x.shape[0], 1)
            parts = [torch.linalg.vecdot(x[i:i + step] @ g, x[i:i + step]) for i in range(0, x.shape[0], step)]
            per_token = torch.cat(parts) if parts else x.new_zeros(0)
            if self.class_reduction == "mean":
                per_token = per_token / rows.student_head[0].shape[0]
            _check_hidden_finite(per_token.detach(), rows, self.check_finite)
            per_row = rows.scatter(per_token.to(rows.dtype))
            return reduce_rows(per_row, rows.lead, per_token.shape[0], self.reduction)

    def extra_repr(self) -> str:
        return f"centered={self.centered}, class_reduction={self.class_reduction!r}, " + super().extra_repr()


def _kd_and_grad(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``(KL(softmax(b) || softmax(a)), softmax(a) - softmax(b))`` per row; overwrites ``a`` and ``b``."""
    diff = b - a
    top_a, top_b = a.amax(-1, keepdim=True), b.amax(-1, keepdim=True)
    ea, eb = a.sub_(top_a).exp_(), b.sub_(top_b).exp_()
    sa, sb = ea.sum(-1, keepdim=True), eb.sum(-1, keepdim=True)
    kl = (torch.linalg.vecdot(eb, diff) / sb.squeeze(-1) + (top_a + sa.log() - top_b - sb.log()).squeeze(-1))
    return kl, ea.div_(sa).sub_(eb.div_(sb))


class _HiddenKD(torch.autograd.Function):
    """``T^2 KL(p_t^T || p_s^T)`` from hidden states and heads, in chunks of tokens. With ``weights`` (N,) it returns
    ``sum_n weights_n KL_n`` and forms the gradient in the forward pass (each chunk's logits are formed once);
    without, the per-token values, and the backward pass forms each chunk's logits again."""

    @staticmethod
    def forward(ctx, hs, ws, bs, teacher, weights, options):
        (ht, wt, bt), (temperature, step, dtype, want_grad) = teacher, options
        n, inv = hs.shape[0], 1.0 / temperature
        out = torch.zeros(n, dtype=dtype, device=hs.device)
        lse = torch.zeros(2, n, dtype=dtype, device=hs.device)
        grads = _zero_grads(ctx, hs, ws, bs, dtype) if weights is not None and want_grad else None
        for i in range(0, n, step):
            h = hs[i:i + step]
            zs, zt = _logits(h, ws, bs, dtype).mul_(inv), _logits(ht[i:i + step], wt, bt, dtype).mul_(inv)
            if grads is None:
                out[i:i + step], lse[0, i:i + step], lse[1, i:i + step] = kd_rows(zs, zt)
            else:
                out[i:i + step], gz = _kd_and_grad(zs, zt)
                _add_chunk_grads(grads, gz.mul_((temperature * weights[i:i + step])[:, None]), h, ws, i)
        t2 = temperature * temperature
        if weights is not None:
            ctx.grads = None if grads is None else [None if g is None else g.to(x.dtype) for g, x in zip(grads, (hs, ws, bs))]
            return (out * weights).sum() * t2
        ctx.save_for_backward(hs, ws, bs, ht, wt, bt, lse)
        ctx.options = (temperature, step, dtype)
        return out * t2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if hasattr(ctx, "grads"):  # formed in the forward pass: scale by the (scalar) incoming gradient
            grads = [None if x is None else (x * grad_out.to(x.dtype)) for x in ctx.grads or (None,) * 3]
        else:
            grads = _backward_recompute(ctx, grad_out)
        hs, ws, bs = grads
        return hs, ws, bs, None, None, None


def _zero_grads(ctx, hs: Tensor, ws: Tensor, bs: Tensor | None, dtype: torch.dtype) -> list:
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    return [torch.zeros(hs.shape, dtype=dtype, device=hs.device) if need_h else None,
            torch.zeros(ws.shape, dtype=dtype, device=ws.device) if need_w else None,
            torch.zeros(ws.shape[0], dtype=dtype, device=ws.device) if need_b and bs is not None else None]


def _add_chunk_grads(grads: list, gz: Tensor, h: Tensor, ws: Tensor, i: int) -> None:
    """Add one chunk's gradient in the logits ``gz`` to the gradients of ``h`` (rows ``i:``), ``W`` and ``b``."""
    if grads[0] is not None:
        grads[0][i:i + gz.shape[0]] = gz @ ws.to(gz.dtype)
    if grads[1] is not None:
        grads[1].addmm_(gz.T, h.to(gz.dtype))
    if grads[2] is not None:
        grads[2] += gz.sum(0)


def _backward_recompute(ctx, grad_tokens: Tensor) -> list:
    hs, ws, bs, ht, wt, bt, lse = ctx.saved_tensors
    temperature, step, dtype = ctx.options
    inv, scale = 1.0 / temperature, grad_tokens.to(dtype) * temperature
    grads = _zero_grads(ctx, hs, ws, bs, dtype)
    for i in range(0, hs.shape[0], step):
        h = hs[i:i + step]
        ps = _logits(h, ws, bs, dtype).mul_(inv).sub_(lse[0, i:i + step, None]).exp_()
        pt = _logits(ht[i:i + step], wt, bt, dtype).mul_(inv).sub_(lse[1, i:i + step, None]).exp_()
        _add_chunk_grads(grads, ps.sub_(pt).mul_(scale[i:i + step, None]), h, ws, i)
    return [None if g is None else g.to(x.dtype) for g, x in zip(grads, (hs, ws, ws if bs is None else bs))]


def _logits(h: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    h, weight = h.to(dtype), weight.to(dtype)
    if bias is None:
        return h @ weight.T
    return torch.addmm(bias.to(dtype), h, weight.T)


class HiddenStateKDLoss(DistillationLoss):
    r"""Hinton KD ``T^2 KL(p_t^T || p_s^T)`` per token from hidden states and linear heads, in chunks of tokens
    (see :mod:`~lightning_repsim.distillation.hidden`). Equal to ``KDLoss(temperature)`` on the heads' logits.

    Called as ``loss(student_hidden, teacher_hidden, student_head, teacher_head, mask=None)``. With
    ``reduction="mean"`` or ``"sum"`` each chunk's logits are formed once and the gradient in the student's hidden
    states and head is formed in the same pass (the multiply-adds of the heads plus their backward, as with
    logits); with ``"none"`` the backward pass forms them again. At most ``chunk_size x V`` numbers of logits
    exist at a time, instead of the ``(B, T, V)`` logits and their gradient.

    Args:
        temperature: ``T > 0`` (default 4.0).
        kwargs: ``reduction``, ``dtype``, ``check_finite``, and ``chunk_size`` (tokens per chunk; default: about 4M
            numbers of logits, 131 tokens at V = 32,000), as for every loss.

    Example:
        >>> import torch
        >>> from lightning_repsim.losses import KDLoss
        >>> g = torch.Generator().manual_seed(0)
        >>> student_head, teacher_head = torch.nn.Linear(4, 50), torch.nn.Linear(6, 50)
        >>> hs, ht = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 6, generator=g)
        >>> hidden = HiddenStateKDLoss(chunk_size=4)(hs, ht, student_head, teacher_head)
        >>> bool(torch.isclose(hidden, KDLoss()(student_head(hs), teacher_head(ht)), rtol=1e-5))
        True
    """

    def __init__(self, temperature: float = 4.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.temperature = check_number(temperature, "temperature")

    def forward(self, student_hidden: Tensor, teacher_hidden: Tensor, student_head: Head, teacher_head: Head,
                mask: Tensor | None = None) -> Tensor:
        """The loss of the student (hidden states and head) against the teacher's."""
        with no_autocast(student_hidden):
            rows = hidden_rows(student_hidden, teacher_hidden, student_head, teacher_head, mask, self.dtype)
            (ws, bs), (wt, bt) = rows.student_head, rows.teacher_head
            step = self.chunk_size or max(1, KD_CHUNK_NUMBERS // ws.shape[0])
            n = rows.student.shape[0]
            want_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (rows.student, ws, bs))
            weights = None
            if self.reduction != "none":  # the loss is a weighted sum: its gradient is formed in the forward pass
                weights = torch.full((n,), 1.0 / max(n, 1) if self.reduction == "mean" else 1.0, dtype=rows.dtype,
                                     device=rows.student.device)
            options = (self.temperature, step, rows.dtype, want_grad)
            value = _HiddenKD.apply(rows.student, ws, bs, (rows.teacher, wt, bt), weights, options)
            _check_hidden_finite(value.detach(), rows, self.check_finite)
            if weights is not None:
                return value
            return reduce_rows(rows.scatter(value), rows.lead, n, self.reduction)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, " + super().extra_repr()
