"""The second moments a mini-batch d_LLV needs, in two passes over blocks of logits, with a hand-written backward.

Write ``X = l_p = log_softmax(s)`` (student), ``Q = l_q = log_softmax(t)`` (teacher), ``D = Q - X``, and for a row
reference ``r(x) = w . l(x)`` (``w`` the mean over labels, or the pivot label) ``U = X - r_p``, ``V = D - (r_q - r_p)``.
Every label term of :class:`~lightning_repsim.distillation.LLVLoss` (T1, T3) is a function of the column
moments over the kept rows (unbiased, per label)

    Var X, Cov(X, D), Var D, Var U, Delta = 2 Cov(U, V) + Var V

and of the row references ``r_p``, ``r_q - r_p``; the all-pivots input terms (``input_set_search="mean"``: every
row against the column means ``Xbar``, ``Dbar``) are functions of the same moments taken over labels per row,
and of ``Xbar``, ``Dbar``; the input terms of explicit or sampled input sets are functions of the moments over labels of each
compared row against its set's pivot row and of each row alone. :func:`batch_moments` returns exactly these, so the
loss is assembled from small tensors by ordinary autograd. (Moments over labels need no ``log_softmax``: centring
over labels removes the log-partition.)

Pass 1 finds the row log-partitions, references and the column sums; pass 2 the centred products (accumulated in
float64). The backward pass is the transpose of those sums: for a centred moment ``(1/(n-1)) sum_i A~_i B~_i``
the gradient in ``A_i`` is ``B~_i / (n-1)``, so the gradient in ``X`` is a per-label (or per-row) combination
of the same centred blocks, mapped through ``log_softmax`` (``g - p sum_y g``). Nothing of size ``(N, K)`` is
kept or allocated but the gradient.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_repsim.distillation.rows import LogitRows

__all__ = ["BatchMoments", "batch_moments"]


class BatchMoments(NamedTuple):
    """Moments over the kept rows (compute dtype, differentiable in the student's logits).

    Attributes:
        label: ``(Var X, Cov(X, D), Var D, Var U, Delta)`` over rows, each (K,).
        x_ref, d_ref: ``r_p`` and ``r_q - r_p`` per kept row, (n,).
        rows: the same five moments over labels per kept row against the column means, each (n,) (empty unless
            requested: the all-pivots input terms).
        col_x, col_d: the column means ``Xbar``, ``Dbar`` (K,).
        pairs: ``(Var U, Delta)`` over labels of the requested rows against their reference rows (input sets:
            every compared input against its set's pivot), each (P,).
        own: ``(Var X, Cov(X, D), Var D)`` over labels of the requested rows, each (R,).
    """

    label: tuple[Tensor, ...]
    x_ref: Tensor
    d_ref: Tensor
    rows: tuple[Tensor, ...]
    col_x: Tensor
    col_d: Tensor
    pairs: tuple[Tensor, ...]
    own: tuple[Tensor, ...]


@dataclasses.dataclass
class _Pass1:
    """Per-row and per-label quantities of pass 1 (rows not kept hold zeros)."""

    lse_s: Tensor  # (N,)
    lse_t: Tensor
    ref_s: Tensor  # w . s per row
    ref_t: Tensor
    mean_s: Tensor  # mean over labels per row (row terms)
    mean_t: Tensor
    x_ref_c: Tensor  # r_p centred over kept rows, (N,)
    d_ref_c: Tensor
    col_x: Tensor  # Xbar (K,)
    col_q: Tensor  # Qbar
    col_x0: Tensor  # Xbar centred over labels (row terms' reference)
    col_d0: Tensor  # Dbar centred over labels


def _pass1(rows: LogitRows, index: Tensor, pivot: int | None) -> tuple[_Pass1, Tensor, Tensor]:
    n_all, k, cdt = rows.num_rows, rows.num_classes, rows.dtype
    dev = rows.student.device
    buf = torch.zeros(6, n_all, dtype=cdt, device=dev)
    col = torch.zeros(2, k, dtype=torch.float64, device=dev)
    for a, b in rows.blocks():
        sb, tb, _ = rows.block(a, b)
        buf[0, a:b], buf[1, a:b] = torch.logsumexp(sb, -1), torch.logsumexp(tb, -1)
        buf[4, a:b], buf[5, a:b] = sb.mean(-1), tb.mean(-1)
        if pivot is not None:
            buf[2, a:b], buf[3, a:b] = sb[:, pivot], tb[:, pivot]
        col[0] += sb.sum(0, dtype=torch.float64)
        col[1] += tb.sum(0, dtype=torch.float64)
    if pivot is None:
        buf[2:4] = buf[4:6]
    n = index.numel()
    kept = buf.index_select(1, index).to(torch.float64)
    x_ref = kept[2] - kept[0]
    d_ref = (kept[3] - kept[1]) - x_ref
    col_x = col[0] / n - kept[0].mean()
    col_q = col[1] / n - kept[1].mean()
    col_d = col_q - col_x
    centred = torch.zeros(2, n_all, dtype=cdt, device=dev)
    centred[:, index] = torch.stack([x_ref - x_ref.mean(), d_ref - d_ref.mean()]).to(cdt)
    p1 = _Pass1(buf[0], buf[1], buf[2], buf[3], buf[4], buf[5], centred[0], centred[1], col_x.to(cdt),
                col_q.to(cdt), (col_x - col_x.mean()).to(cdt), (col_d - col_d.mean()).to(cdt))
    return p1, torch.stack([x_ref, d_ref]).to(cdt), torch.stack([col_x, col_d]).to(cdt)


def _label_fields(sb: Tensor, tb: Tensor, p1: _Pass1, a: int, b: int) -> tuple[Tensor, Tensor]:
    """Column-centred ``X~`` and ``D~`` of a block."""
    xt = (sb - p1.lse_s[a:b, None]).sub_(p1.col_x)
    dt = (tb - p1.lse_t[a:b, None]).sub_(p1.col_q).sub_(xt)
    return xt, dt


def _row_fields(sb: Tensor, tb: Tensor, p1: _Pass1, a: int, b: int) -> tuple[Tensor, Tensor]:
    """Label-centred ``X`` and ``D`` of a block (``s - mean s``, ``(t - mean t) - (s - mean s)``)."""
    cs = sb - p1.mean_s[a:b, None]
    cd = (tb - p1.mean_t[a:b, None]).sub_(cs)
    return cs, cd


def _column_dot(x: Tensor, y: Tensor) -> Tensor:
    """``sum_i x_i y_i`` over the rows, accumulated in float64."""
    return (x * y).sum(0, dtype=torch.float64)


def _pass2(rows: LogitRows, p1: _Pass1, row: bool) -> tuple[Tensor, Tensor]:
    """Label sums (6, K) of ``X~X~, X~D~, D~D~, U~U~, U~V~, V~V~`` and, with ``row``, the same sums over labels per
    row (6, N) against the column means."""
    dev, cdt = rows.student.device, rows.dtype
    acc = torch.zeros(6, rows.num_classes, dtype=torch.float64, device=dev)
    per_row = torch.zeros(6, rows.num_rows if row else 0, dtype=cdt, device=dev)
    dot = torch.linalg.vecdot
    for a, b in rows.blocks():
        sb, tb, _ = rows.block(a, b)
        # products summed over the block's rows in float64: the same sums whatever the blocks
        xt, dt = _label_fields(sb, tb, p1, a, b)
        acc[0] += _column_dot(xt, xt)
        acc[1] += _column_dot(xt, dt)
        acc[2] += _column_dot(dt, dt)
        ut, vt = xt.sub_(p1.x_ref_c[a:b, None]), dt.sub_(p1.d_ref_c[a:b, None])
        acc[3] += _column_dot(ut, ut)
        acc[4] += _column_dot(ut, vt)
        acc[5] += _column_dot(vt, vt)
        if row:
            cs, cd = _row_fields(sb, tb, p1, a, b)
            per_row[0, a:b], per_row[1, a:b], per_row[2, a:b] = dot(cs, cs), dot(cs, cd), dot(cd, cd)
            uc, vc = cs.sub_(p1.col_x0), cd.sub_(p1.col_d0)
            per_row[3, a:b], per_row[4, a:b], per_row[5, a:b] = dot(uc, uc), dot(uc, vc), dot(vc, vc)
    return acc, per_row


def _moments(sums: Tensor, count: int) -> tuple[Tensor, ...]:
    """``(Var X, Cov(X, D), Var D, Var U, Delta)`` from the six sums (unbiased with ``count`` terms)."""
    scale = 1.0 / (count - 1)
    return (sums[0] * scale, sums[1] * scale, sums[2] * scale, sums[3] * scale, (2 * sums[4] + sums[5]) * scale)


def _gathered(rows: LogitRows, positions: Tensor) -> tuple[Tensor, Tensor]:
    """Label-centred ``X`` and ``D`` of the rows at ``positions`` (a copy)."""
    sb = rows.student.index_select(0, positions).to(rows.dtype)
    tb = rows.teacher.index_select(0, positions).to(rows.dtype)
    cs = sb - sb.mean(-1, keepdim=True)
    return cs, (tb - tb.mean(-1, keepdim=True)).sub_(cs)


def _pair_pass(rows: LogitRows, pairs: Tensor, own: Tensor) -> tuple[Tensor, Tensor]:
    """Sums over labels: ``(U U, U V, V V)`` of the row pairs ``pairs`` (2, P) (``U = X_i - X_r``, ``V = D_i - D_r``)
    and ``(X X, X D, D D)`` of the rows ``own``, in blocks of ``rows.block_rows``."""
    dot, step = torch.linalg.vecdot, rows.block_rows
    pair_sums = torch.zeros(3, pairs.shape[1], dtype=rows.dtype, device=pairs.device)
    own_sums = torch.zeros(3, own.numel(), dtype=rows.dtype, device=own.device)
    for i in range(0, pairs.shape[1], step):
        cs, cd = _gathered(rows, pairs[0, i:i + step])
        cs0, cd0 = _gathered(rows, pairs[1, i:i + step])
        u, v = cs.sub_(cs0), cd.sub_(cd0)
        pair_sums[:, i:i + step] = torch.stack([dot(u, u), dot(u, v), dot(v, v)])
    for i in range(0, own.numel(), step):
        cs, cd = _gathered(rows, own[i:i + step])
        own_sums[:, i:i + step] = torch.stack([dot(cs, cs), dot(cs, cd), dot(cd, cd)])
    return pair_sums, own_sums


def _pair_grad(rows: LogitRows, pairs: Tensor, own: Tensor, g_pairs, g_own, grad: Tensor) -> None:
    """Add the gradient of ``<g_pairs, pair moments> + <g_own, own moments>`` to ``grad`` (fields over labels need
    no ``log_softmax``: the label centring removes the log-partition)."""
    cr, step = 1.0 / (rows.num_classes - 1), rows.block_rows
    k_u = cr * (2 * g_pairs[0] - 2 * g_pairs[1])  # d/dU - d/dV of (Var U, Delta)
    k_x, k_d = cr * (2 * g_own[0] - g_own[1]), cr * (g_own[1] - 2 * g_own[2])
    for i in range(0, pairs.shape[1], step):
        cs, _ = _gathered(rows, pairs[0, i:i + step])
        cs0, _ = _gathered(rows, pairs[1, i:i + step])
        part = cs.sub_(cs0).mul_(k_u[i:i + step, None]).to(grad.dtype)
        grad.index_add_(0, pairs[0, i:i + step], part)
        grad.index_add_(0, pairs[1, i:i + step], part, alpha=-1)
    for i in range(0, own.numel(), step):
        cs, cd = _gathered(rows, own[i:i + step])
        part = cs.mul_(k_x[i:i + step, None]).addcmul_(cd, k_d[i:i + step, None])
        grad.index_add_(0, own[i:i + step], part.to(grad.dtype))


class _BatchMoments(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, rows, index, sets, options):
        (pairs, own), (pivot, mean_rows) = sets, options
        p1, refs, cols = _pass1(rows, index, pivot)
        acc, per_row = _pass2(rows, p1, mean_rows)
        pair_sums, own_sums = _pair_pass(rows, pairs, own)
        n, k = index.numel(), rows.num_classes
        empty = student.new_zeros(0, dtype=rows.dtype)
        label_m = tuple(m.to(rows.dtype) for m in _moments(acc, n))
        row_m = tuple(m.index_select(0, index) for m in _moments(per_row, k)) if mean_rows else (empty,) * 5
        cr = 1.0 / (k - 1)
        pair_m = (pair_sums[0] * cr, (2 * pair_sums[1] + pair_sums[2]) * cr)
        own_m = tuple(own_sums * cr)
        ctx.save_for_backward(student, teacher, index, pairs, own)
        ctx.rows, ctx.p1, ctx.options = rows, p1, (pivot, mean_rows)
        return (*label_m, refs[0], refs[1], *row_m, cols[0], cols[1], *pair_m, *own_m)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        student, teacher, index, pairs, own = ctx.saved_tensors
        rows = dataclasses.replace(ctx.rows, student=student, teacher=teacher)
        grad = _logits_grad(rows, ctx.p1, index, ctx.options, grads)
        g = [x.to(rows.dtype) for x in grads]
        if pairs.numel() or own.numel():
            _pair_grad(rows, pairs, own, g[14:16], g[16:19], grad)
        return grad, None, None, None, None, None


def _logits_grad(rows: LogitRows, p1: _Pass1, index: Tensor, options, grads) -> Tensor:
    """The gradient in the student's logits of ``sum <grad, output>`` over the outputs of :class:`_BatchMoments`."""
    pivot, row = options
    cdt, dev, k, n = rows.dtype, rows.student.device, rows.num_classes, index.numel()
    g = [x.to(cdt) for x in grads]
    full = torch.zeros(7, rows.num_rows, dtype=cdt, device=dev)  # per-row grads scattered to all rows
    full[0, index], full[1, index] = g[5], g[6]  # r_p, r_q - r_p
    if row:
        for j in range(5):
            full[2 + j, index] = g[7 + j]
    c, cr = 1.0 / (n - 1), 1.0 / (k - 1)
    gvx, gcxd, gvd, gvu, gdel = g[:5]
    k_x, k_d, k_u = c * (2 * gvx - gcxd), c * (gcxd - 2 * gvd), c * (2 * gvu - 2 * gdel)
    # X~ @ [kX + kU, 2c Gvu, 2c Gdelta] and D~ @ [kD, 2c Gdelta]: the row sums of the label part
    proj_x = torch.stack([k_x + k_u, 2 * c * gvu, 2 * c * gdel], 1)
    proj_d = torch.stack([k_d, 2 * c * gdel], 1)
    sums = (k_u.sum(), proj_x[:, 1].sum(), proj_x[:, 2].sum())
    col_grad = (g[12] - g[13]) / n  # Xbar and Dbar are means over the kept rows: every row gets 1/n
    if row:
        alpha, beta = cr * (2 * full[2] - full[3]), cr * (full[3] - 2 * full[4])
        gamma = cr * (2 * full[5] - 2 * full[6])
        col_grad = col_grad - _row_reference_grad(rows, p1, full) / n
    col_grad_sum = col_grad.sum()
    grad = rows.new_grad()
    for a, b in rows.blocks():
        sb, tb, _ = rows.block(a, b)
        xt, dt = _label_fields(sb, tb, p1, a, b)
        px, pd = xt @ proj_x, dt @ proj_d
        xr, dr = p1.x_ref_c[a:b], p1.d_ref_c[a:b]
        # the gradients in the row references r_p and r_q - r_p, through U = X - r_p and V = D - (r_q - r_p)
        r_ref = full[0, a:b] - (px[:, 1] - xr * sums[1] + pd[:, 1] - dr * sums[2])
        d_ref = full[1, a:b] - (px[:, 2] - xr * sums[2] + pd[:, 1] - dr * sums[2])
        out = xt.mul_(k_x + k_u).addcmul_(dt, k_d)
        outer_rows, outer_cols = [torch.ones(b - a, dtype=cdt, device=dev), -xr], [col_grad, k_u]
        row_sum = col_grad_sum + px[:, 0] + pd[:, 0] - xr * sums[0]
        if row:
            cs, cd = _row_fields(sb, tb, p1, a, b)
            out.addcmul_(cs, (alpha[a:b] + gamma[a:b])[:, None]).addcmul_(cd, beta[a:b, None])
            outer_rows.append(-gamma[a:b])
            outer_cols.append(p1.col_x0)
        out.addmm_(torch.stack(outer_rows, 1), torch.stack(outer_cols, 0))
        shift = r_ref - d_ref  # the gradient in the row reference w . X
        if pivot is None:
            out.add_(shift[:, None] / k)
        else:
            out[:, pivot] += shift
        row_sum = row_sum + shift
        prob = (sb - p1.lse_s[a:b, None]).exp_()  # through log_softmax: g - p sum_y g
        out.addcmul_(prob, row_sum[:, None], value=-1.0)
        rows.store(grad, a, b, out, None)
    return grad


def _row_reference_grad(rows: LogitRows, p1: _Pass1, full: Tensor) -> Tensor:
    """The gradient of the all-pivots row moments in their reference (the centred column means), summed over all
    rows: ``sum_i (d/dU_i - d/dV_i)``, which every row then receives through ``Xbar``, ``Dbar``."""
    cr = 1.0 / (rows.num_classes - 1)
    sum_u = torch.zeros(rows.num_classes, dtype=torch.float64, device=rows.student.device)
    sum_v = torch.zeros_like(sum_u)
    for a, b in rows.blocks():
        sb, tb, _ = rows.block(a, b)
        uc, vc = _row_fields(sb, tb, p1, a, b)
        uc.sub_(p1.col_x0)
        vc.sub_(p1.col_d0)
        w_u, w_d = 2 * cr * full[5, a:b, None], 2 * cr * full[6, a:b, None]
        sum_u += _column_dot(uc, w_u) + _column_dot(vc, w_d)
        sum_v += _column_dot(uc.add_(vc), w_d)
    return (sum_u - sum_v).to(rows.dtype)


@torch.compiler.disable  # the block loops run eagerly under torch.compile (a graph break); the rest compiles
def batch_moments(rows: LogitRows, pivot: int | None, mean_rows: bool, pairs: Tensor, own: Tensor) -> BatchMoments:
    """The moments of the module docstring over the kept rows of ``rows`` (whose runs must be known), for the
    label reference ``pivot`` (None: the mean over labels); the per-row moments against the column means when
    ``mean_rows``; the pair moments of ``pairs`` (2, P) and the own moments of ``own`` (R,) (row positions). The
    blocks must hold kept rows only (``LogitRows(..., host_runs=True)``): masked rows are never zeroed here."""
    if rows.keep is not None:
        raise ValueError("batch_moments needs the kept rows as runs (LogitRows(..., host_runs=True))")
    index = rows.kept_index()
    out = _BatchMoments.apply(rows.student, rows.teacher, rows, index, (pairs, own), (pivot, mean_rows))
    return BatchMoments(out[0:5], out[5], out[6], out[7:12], out[12], out[13], out[14:16], out[16:19])
