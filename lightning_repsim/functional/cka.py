"""Linear CKA (biased and debiased), the orthogonal Procrustes distance and the logit distance, from sufficient
statistics that stream exactly.

**Linear CKA** (Kornblith et al. 2019) between embeddings ``X`` (N x d_p) and ``Y`` (N x d_q) of the same inputs,
centred over inputs: ``CKA = ||X^T Y||_F^2 / (||X^T X||_F ||Y^T Y||_F)``, the Gram-matrix form
``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with ``K = X X^T``, ``L = Y Y^T`` and the biased HSIC. Only the
centred co-moment of ``[x; y]`` enters: O(d_p d_q + d_p^2 + d_q^2) numbers.

**Debiased linear CKA** (Nguyen et al. 2021) uses the unbiased HSIC estimator of Song et al. (2012),
``HSIC_1(K, L) = [tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))`` with ``K~`` the Gram matrix
with a zero diagonal. It is a U-statistic, invariant to translating ``x`` or ``y``, so it may be evaluated on the
centred embeddings ``x' = x - mean``, where ``1'K~1 = -sum_i |x'_i|^2``, ``1'K~L~1 = sum_i |x'_i|^2 |y'_i|^2`` and
``tr(K~ L~) = ||X'^T Y'||_F^2 - sum_i |x'_i|^2 |y'_i|^2``. Besides the co-moment it needs the per-input squared
norms ``a_i = |x'_i|^2``, ``b_i = |y'_i|^2`` and their sums of products ``sum a b``, ``sum a^2``, ``sum b^2``. Each
``|x'_i|^2`` is a quadratic in ``x_i``, so the streaming state accumulates, relative to a shift ``c`` (the first
batch's mean, which keeps large offsets out of the squares), the centred co-moment of
``u = [x - c_x, y - c_y, |x - c_x|^2, |y - c_y|^2]``; with ``delta = mean(x) - c_x``,
``|x'|^2 = |x - c_x|^2 - 2 delta . (x - c_x) + |delta|^2`` is affine in ``u``, so every needed sum follows exactly.
States with different shifts merge after an exact affine change of shift (:func:`cka_merge`).

**Orthogonal Procrustes distance** (Williams et al. 2021) on centred embeddings scaled to unit Frobenius norm:
``d^2 = 2 - 2 ||X^T Y||_* / (||X||_F ||Y||_F)`` (0 when one is an orthogonal transform of the other times a scale).

**Logit distance** (Nielsen et al. 2026): ``d_logit^2 = mean_x sum_y (c(z_p)_y - c(z_q)_y)^2`` with ``c`` the centring
over classes; a per-input mean (the quantity :class:`~lightning_repsim.losses.LogitDistanceLoss` trains on).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_repsim.functional._moments import add_rows_, centred_blocks, column_means
from lightning_repsim.functional.inputs import as_rows, check_logit_pair
from lightning_repsim.functional.kl import _blocks, _centre_rows_

__all__ = [
    "check_cka_state",
    "cka_batch_state",
    "cka_merge",
    "cka_shift",
    "cka_state_size",
    "cka_values",
    "embedding_pair",
    "linear_cka",
    "logit_distance",
    "logit_distance_rows",
    "procrustes_distance",
]


# ----------------------------------------------------------------------------------------------
# the state: [d_p, d_q, shift (d_p + d_q), n, mean (D), m2 (D*D)], D = d_p + d_q + 2
# ----------------------------------------------------------------------------------------------
def cka_state_size(dim_p: int, dim_q: int) -> int:
    d = dim_p + dim_q + 2
    return 2 + dim_p + dim_q + 1 + d + d * d


def _unpack(state: Tensor) -> tuple[int, int, Tensor, Tensor, Tensor, Tensor]:
    dim_p, dim_q = int(state[0]), int(state[1])
    d = dim_p + dim_q + 2
    shift = state[2 : 2 + dim_p + dim_q]
    rest = state[2 + dim_p + dim_q :]
    return dim_p, dim_q, shift, rest[0], rest[1 : 1 + d], rest[1 + d :].view(d, d)


def _pack(dim_p: int, dim_q: int, shift: Tensor, n: Tensor, mean: Tensor, m2: Tensor) -> Tensor:
    head = shift.new_tensor([float(dim_p), float(dim_q)])
    return torch.cat([head, shift, n.reshape(1), mean, m2.reshape(-1)])


def cka_batch_state(x: Tensor, y: Tensor, shift: Tensor | None = None) -> Tensor:
    """The packed statistic of embeddings ``x`` (B, d_p), ``y`` (B, d_q) of any float dtype, relative to ``shift``
    (d_p + d_q; default: their exact means). Read in blocks of rows: ``u`` is formed one block at a time in float64
    and added by a Welford/Chan update (:func:`~lightning_repsim.functional._moments.add_rows_`), so no B x (d_p + d_q)
    float64 copy exists beyond a block."""
    dim_p, dim_q = x.shape[1], y.shape[1]
    if shift is None:
        shift = torch.cat([column_means(x, "emb_p"), column_means(y, "emb_q")])
    d = dim_p + dim_q + 2
    n = shift.new_zeros(())
    mean, m2 = shift.new_zeros(d), shift.new_zeros(d, d)
    for u in centred_blocks([(x, shift[:dim_p]), (y, shift[dim_p:])], extra=2):
        u[:, -2] = torch.linalg.vector_norm(u[:, :dim_p], dim=1).square_()  # |x - c_x|^2
        u[:, -1] = torch.linalg.vector_norm(u[:, dim_p : dim_p + dim_q], dim=1).square_()
        add_rows_(n, mean, m2, u)
    return _pack(dim_p, dim_q, shift, n, mean, m2)


def _reshift(state: Tensor, shift: Tensor) -> Tensor:
    """The same statistic relative to another shift: ``u`` changes by the exact affine map ``u -> T u + o`` where
    ``T`` is the identity except the two squared-norm rows (``|x - c'|^2 = |x - c|^2 + 2 delta.(x - c) + |delta|^2``),
    so ``T m2 T^T`` costs O(D^2), not O(D^3)."""
    dim_p, dim_q, old, n, mean, m2 = _unpack(state)
    delta = old - shift  # x - new = (x - old) + delta
    d = dim_p + dim_q + 2
    ia = dim_p + dim_q
    e = state.new_zeros(2, d)  # the rows of T - I
    e[0, :dim_p] = 2 * delta[:dim_p]
    e[1, dim_p:ia] = 2 * delta[dim_p:]
    r = e @ m2  # (T - I) m2: two rows
    out = m2.clone()
    out[ia:] += r
    out[:, ia:] += r.T
    out[ia:, ia:] += r @ e.T
    offset = torch.cat([delta, (delta[:dim_p] ** 2).sum().reshape(1), (delta[dim_p:] ** 2).sum().reshape(1)])
    return _pack(dim_p, dim_q, shift, n, mean + torch.cat([mean.new_zeros(ia), e @ mean]) + offset, out)


def cka_shift(state: Tensor) -> Tensor | None:
    """The shift of a packed statistic, or None for the empty (all-zero or unsized) statistic."""
    if state.numel() == 0 or float(state[2 + int(state[0]) + int(state[1])]) == 0:
        return None
    return _unpack(state)[2]


def cka_merge(a: Tensor, b: Tensor) -> Tensor:
    """Exact merge of two packed statistics (Chan merge after bringing ``b`` to ``a``'s shift; an empty side, n = 0,
    is the identity)."""
    if cka_shift(b) is None:
        return a
    if cka_shift(a) is None:
        return b
    dim_p, dim_q, shift, n_a, mean_a, m2_a = _unpack(a)
    if not torch.equal(_unpack(b)[2], shift):
        b = _reshift(b, shift)
    _, _, _, n_b, mean_b, m2_b = _unpack(b)
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + m2_b + torch.outer(delta, delta) * (n_a * n_b / n)
    return _pack(dim_p, dim_q, shift, n, mean, m2)


def cka_values(state: Tensor) -> dict[str, Tensor]:
    """Linear CKA (biased and debiased) and the Procrustes distance from a packed statistic (float64 scalars)."""
    dim_p, dim_q, _, n_t, mean, m2 = _unpack(state)
    n = float(n_t)
    px, py = slice(0, dim_p), slice(dim_p, dim_p + dim_q)
    ia, ib = dim_p + dim_q, dim_p + dim_q + 1
    sxx, syy, sxy = m2[px, px], m2[py, py], m2[px, py]  # centred sums of products over inputs
    # centred squared norms a = |x'|^2 = A - 2 delta.(x - c) + |delta|^2 with A = |x - c|^2, delta = mean(x) - c
    dx, dy = mean[px], mean[py]
    wa = torch.zeros_like(mean)
    wa[ia], wa[px] = 1.0, -2 * dx
    wb = torch.zeros_like(mean)
    wb[ib], wb[py] = 1.0, -2 * dy
    mean_a = (wa * mean).sum() + (dx * dx).sum()  # = tr(Sxx) / n
    mean_b = (wb * mean).sum() + (dy * dy).sum()
    sum_ab = wa @ m2 @ wb + n * mean_a * mean_b
    sum_aa = wa @ m2 @ wa + n * mean_a * mean_a
    sum_bb = wb @ m2 @ wb + n * mean_b * mean_b
    tr_x, tr_y = sxx.trace(), syy.trace()
    hsic_xy, hsic_xx, hsic_yy = (sxy * sxy).sum(), (sxx * sxx).sum(), (syy * syy).sum()
    out = {"cka": hsic_xy / (hsic_xx.sqrt() * hsic_yy.sqrt())}

    def unbiased(hsic: Tensor, sum_prod: Tensor, tr_1: Tensor, tr_2: Tensor) -> Tensor:
        return ((hsic - sum_prod) + tr_1 * tr_2 / ((n - 1) * (n - 2)) - 2 / (n - 2) * sum_prod) / (n * (n - 3))

    u_xy = unbiased(hsic_xy, sum_ab, tr_x, tr_y)
    u_xx, u_yy = unbiased(hsic_xx, sum_aa, tr_x, tr_x), unbiased(hsic_yy, sum_bb, tr_y, tr_y)
    out["cka_debiased"] = u_xy / (u_xx.clamp_min(0).sqrt() * u_yy.clamp_min(0).sqrt())
    out["procrustes"] = _procrustes(sxy, tr_x, tr_y)
    return out


def _procrustes(sxy: Tensor, tr_x: Tensor, tr_y: Tensor) -> Tensor:
    """``sqrt(2 - 2 ||X^T Y||_* / (||X||_F ||Y||_F))`` from the centred cross co-moment and the two traces."""
    nuclear = torch.linalg.svdvals(sxy).sum()
    return (2 - 2 * nuclear / (tr_x.sqrt() * tr_y.sqrt())).clamp_min(0).sqrt()


def check_cka_state(state: Tensor, name: str = "embeddings") -> None:
    """Refuse statistics on which CKA is undefined: fewer than 4 inputs, or a constant embedding."""
    dim_p, dim_q, _, n_t, _, m2 = _unpack(state)
    _check_defined(int(n_t), m2[:dim_p, :dim_p].trace(), m2[dim_p : dim_p + dim_q, dim_p : dim_p + dim_q].trace(), name)


def _check_defined(n: int, tr_x: Tensor, tr_y: Tensor, name: str = "embeddings") -> None:
    if n < 4:
        raise ValueError(f"linear CKA needs at least 4 inputs (the debiased estimator divides by n - 3), got N={n}")
    if not bool(tr_x > 0) or not bool(tr_y > 0):
        raise ValueError(f"the {name} of one model are constant over the inputs: CKA is undefined")


def embedding_pair(emb_p: Tensor, emb_q: Tensor) -> tuple[Tensor, Tensor]:
    """Two embeddings of the same inputs as (N, d_p) and (N, d_q) rows in their own dtype (no float64 copy: the
    blocked statistics convert one block at a time; :func:`~lightning_repsim.functional._moments.column_means` refuses
    non-finite values)."""
    x, y = as_rows(emb_p, "emb_p"), as_rows(emb_q, "emb_q")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"`emb_p` and `emb_q` must hold the same inputs, got {x.shape[0]} and {y.shape[0]} rows")
    return x, y


def _cross_statistic(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(Sxy, tr Sxx, tr Syy)``: the cross block and the traces of the centred co-moment of ``[x; y]`` (two passes:
    exact means, then the centred products block by block) -- all the Procrustes distance needs."""
    mean_x, mean_y = column_means(x, "emb_p"), column_means(y, "emb_q")
    dim_p = x.shape[1]
    sxy = mean_x.new_zeros(dim_p, y.shape[1])
    traces = mean_x.new_zeros(2)
    for block in centred_blocks([(x, mean_x), (y, mean_y)]):
        xc, yc = block[:, :dim_p], block[:, dim_p:]
        sxy.addmm_(xc.T, yc)
        traces[0] += torch.linalg.vector_norm(xc).square()
        traces[1] += torch.linalg.vector_norm(yc).square()
    return sxy, traces[0], traces[1]


def linear_cka(emb_p: Tensor, emb_q: Tensor, debiased: bool = False) -> Tensor:
    """Linear CKA between two embeddings of the same inputs (N x d_p and N x d_q; the widths may differ), float64.

    Example:
        >>> import torch
        >>> x = torch.randn(100, 5, dtype=torch.float64)
        >>> q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
        >>> round(float(linear_cka(x, 3 * x @ q + 7)), 12)  # invariant to rotation, scale and offset
        1.0
        >>> bool(linear_cka(x, torch.randn(100, 8, dtype=torch.float64), debiased=True).abs() < 0.2)
        True
    """
    x, y = embedding_pair(emb_p, emb_q)
    state = cka_batch_state(x, y)
    check_cka_state(state)
    return cka_values(state)["cka_debiased" if debiased else "cka"]


def procrustes_distance(emb_p: Tensor, emb_q: Tensor) -> Tensor:
    """Orthogonal Procrustes distance ``sqrt(2 - 2 ||X^T Y||_* / (||X||_F ||Y||_F))`` between centred embeddings
    (N x d_p, N x d_q), in [0, sqrt(2)].

    Example:
        >>> import torch
        >>> x = torch.randn(100, 3, dtype=torch.float64)
        >>> q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
        >>> float(procrustes_distance(x, 2 * x @ q + 1)) < 1e-7
        True
    """
    x, y = embedding_pair(emb_p, emb_q)
    sxy, tr_x, tr_y = _cross_statistic(x, y)
    _check_defined(x.shape[0], tr_x, tr_y)
    return _procrustes(sxy, tr_x, tr_y)


def logit_distance_rows(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """``sum_y (c(z_p)_y - c(z_q)_y)^2`` per row of (N, K) logits (float64), with ``c`` the centring over classes;
    in blocks of rows with one reused float64 buffer, so a large vocabulary never needs an N x K float64 copy
    (:func:`~lightning_repsim.functional.kl.logit_pair_rows` gives it together with the KL)."""
    blocks, rows = _blocks(logits_p.shape[0], logits_p.shape[1], logits_p.device)
    buf = torch.empty(rows, logits_p.shape[1], dtype=torch.float64, device=logits_p.device)
    out = logits_p.new_empty(logits_p.shape[0], dtype=torch.float64)
    for sl in blocks:
        d = buf[: logits_p[sl].shape[0]].copy_(logits_q[sl]).neg_().add_(logits_p[sl])
        out[sl] = _centre_rows_(d)[1]
    return out


def logit_distance(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """The logit distance ``d_logit = sqrt(mean_x sum_y (c(z_p)_y - c(z_q)_y)^2)`` (Nielsen et al. 2026), float64;
    0 exactly when the two models' log-probabilities coincide.

    Example:
        >>> import torch
        >>> z = torch.randn(10, 4, dtype=torch.float64)
        >>> float(logit_distance(z, z + 5.0)) < 1e-12
        True
    """
    p, q = check_logit_pair(logits_p, logits_q)
    if p.shape[0] == 0:
        raise ValueError("logit_distance needs at least one input, got N=0")
    return logit_distance_rows(p, q).mean().sqrt()
