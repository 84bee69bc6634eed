"""Mean KL divergence between two models' predictive distributions (SPEC §2)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_repsim.functional.inputs import check_logit_pair

__all__ = [
    "kl_of_logit_rows",
    "kl_per_input",
    "log_partition_rows",
    "logit_pair_rows",
    "mean_kl_divergence",
]

#: Numbers per block when logit rows are cast to float64: 2 MB on CPU (the block's passes stay in cache: 2.8x faster
#: than 32 MB blocks for a (4096, 8192) pair), 32 MB on accelerators (fewer kernel launches).
_BLOCK_CPU = 1 << 18
_BLOCK = 1 << 22


def _at_least_zero_(kl: Tensor) -> Tensor:
    """Per-input KLs that round-off put below 0 (about -1e-17 for models that agree to float64 precision) set to 0,
    in place: a KL is never negative. Non-finite values (a non-finite logit) stay as they are."""
    return kl.masked_fill_((kl < 0) & torch.isfinite(kl), 0.0)


def kl_per_input(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p(.|x) || q(.|x))`` for each row, from float64 log-probabilities of shape (N, K) (never below 0)."""
    return _at_least_zero_((log_p.exp() * (log_p - log_q)).sum(dim=-1))


def _blocks(n: int, k: int, device: torch.device):
    # at least 4 rows per block, so that a 150k vocabulary does not pay the per-block overhead on every row
    step = max(4, (_BLOCK_CPU if device.type == "cpu" else _BLOCK) // max(k, 1))
    return [slice(start, start + step) for start in range(0, n, step)], min(step, n)


def _centre_rows_(d: Tensor) -> tuple[Tensor, Tensor]:
    """Centre each row of ``d`` over classes, in place (two passes: exact to float64 round-off, unlike a one-pass
    variance); returns ``(row means (R, 1), sums of squares of the centred rows (R,))``."""
    centre = d.mean(dim=1, keepdim=True)
    d.sub_(centre)
    return centre, torch.linalg.vector_norm(d, dim=1).square_()  # one reduction pass, no temporary


def log_partition_rows(logits: Tensor) -> Tensor:
    """``logZ = logsumexp`` of each row of an (N, K) logit matrix of any float dtype, in float64, over blocks of rows
    (the row maximum is taken in the input's dtype, exactly; one reused float64 block buffer, no N x K copy).

    Example:
        >>> import torch
        >>> z = torch.randn(5, 7)
        >>> bool(torch.allclose(log_partition_rows(z), torch.logsumexp(z.double(), dim=1)))
        True
    """
    blocks, rows = _blocks(logits.shape[0], logits.shape[1], logits.device)
    buf = torch.empty(rows, logits.shape[1], dtype=torch.float64, device=logits.device)
    out = logits.new_empty(logits.shape[0], dtype=torch.float64)
    for sl in blocks:
        block = logits[sl]
        m = block.amax(dim=1, keepdim=True).to(torch.float64)
        e = buf[: block.shape[0]].copy_(block).sub_(m).exp_()
        out[sl] = m.squeeze(1) + e.sum(dim=1).log()
    return out


def kl_of_logit_rows(logits_p: Tensor, logits_q: Tensor, logz_p: Tensor | None = None, logz_q: Tensor | None = None) -> Tensor:
    """``KL(p(.|x) || q(.|x))`` per row of two (N, K) logit matrices of any float dtype, in float64, over blocks of
    rows (two reused float64 block buffers, never an N x K float64 copy). ``logz_p``/``logz_q``: the rows'
    log-partitions when the caller already has them (:func:`log_partition_rows`); then
    ``KL = sum_y p_y (z_p - z_q)_y - logZ_p + logZ_q``, else the KL of :func:`logit_pair_rows` (one sweep, accurate
    under large per-input offsets). A row with any non-finite logit in either model gets a
    non-finite value (NaN or inf), so one check per row replaces a check per logit.

    Example:
        >>> import torch
        >>> z = torch.tensor([[0.0, 1.0], [0.0, float("-inf")]])
        >>> kl_of_logit_rows(z, z.flip(-1))
        tensor([0.4621,    nan], dtype=torch.float64)
    """
    if logz_p is None and logz_q is None:  # one sweep, and the KL assembled without the offsets' cancellation
        return logit_pair_rows(logits_p, logits_q)[2]
    if logz_p is None:
        logz_p = log_partition_rows(logits_p)
    if logz_q is None:
        logz_q = log_partition_rows(logits_q)
    blocks, rows = _blocks(logits_p.shape[0], logits_p.shape[1], logits_p.device)
    weights_buf = torch.empty(rows, logits_p.shape[1], dtype=torch.float64, device=logits_p.device)
    diff_buf = torch.empty_like(weights_buf)
    kl = logits_p.new_empty(logits_p.shape[0], dtype=torch.float64)
    for sl in blocks:
        z_p = weights_buf[: logits_p[sl].shape[0]].copy_(logits_p[sl])
        d = diff_buf[: z_p.shape[0]].copy_(logits_q[sl]).neg_().add_(z_p)
        weights = z_p.sub_(logz_p[sl, None]).exp_()  # p(y|x)
        kl[sl] = torch.linalg.vecdot(weights, d)
    return _at_least_zero_(kl - logz_p + logz_q)


def logit_pair_rows(logits_p: Tensor, logits_q: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(logZ_p, logZ_q, KL, squared logit distance)`` per row of two (N, K) logit matrices, float64, in one sweep
    over blocks of rows (three reused float64 block buffers): what a comparison needs per batch, with about ten passes
    over each block, as many as :func:`log_partition_rows` twice and :func:`kl_of_logit_rows` need for the first
    three alone; the fourth is the centred sum of squares of ``z_p - z_q`` (two passes: its row mean, then the squares
    of the centred row), so per-input offsets cancel to float64 round-off. The KL is assembled from offset-free parts,
    ``sum_y p_y (d_y - c) - ((m_p - m_q - c) + log S_p - log S_q)`` (``d = z_p - z_q``, ``c`` its row mean, ``m`` the
    row maxima, ``S`` the shifted exponential sums), not as ``E_p[d] - logZ_p + logZ_q``: with logits offset by 100,
    nearly identical models keep 1e-9 relative accuracy (down to KL ~ 1e-6; a few ulps absolute below). A row with a
    non-finite logit in either model gets a non-finite KL or squared distance (an infinite logit makes the difference
    infinite or NaN), so one check per row suffices.

    Example:
        >>> import torch
        >>> z_p, z_q = torch.randn(2, 6, 5, dtype=torch.float64).unbind(0)
        >>> lz_p, lz_q, kl, sq = logit_pair_rows(z_p, z_q)
        >>> bool(torch.allclose(kl, kl_of_logit_rows(z_p, z_q))), bool(torch.allclose(lz_q, torch.logsumexp(z_q, 1)))
        (True, True)
    """
    n, k = logits_p.shape
    blocks, rows = _blocks(n, k, logits_p.device)
    p_buf = torch.empty(rows, k, dtype=torch.float64, device=logits_p.device)
    q_buf, d_buf = torch.empty_like(p_buf), torch.empty_like(p_buf)
    out = logits_p.new_empty(4, n, dtype=torch.float64)
    for sl in blocks:
        block_p, block_q = logits_p[sl], logits_q[sl]
        r = block_p.shape[0]
        m_p = block_p.amax(dim=1, keepdim=True).to(torch.float64)  # exact in the input dtype
        m_q = block_q.amax(dim=1, keepdim=True).to(torch.float64)
        z_p, z_q = p_buf[:r].copy_(block_p), q_buf[:r].copy_(block_q)  # (mixed-dtype arithmetic is slower)
        d = torch.sub(z_p, z_q, out=d_buf[:r])  # z_p - z_q in float64
        centre, out[3, sl] = _centre_rows_(d)
        u = z_p.sub_(m_p).exp_()  # p(y|x) * Z_p / exp(m_p)
        total = u.sum(dim=1)
        log_u = total.log()
        log_e = z_q.sub_(m_q).exp_().sum(dim=1).log_()
        m_p, m_q, centre = m_p.squeeze(1), m_q.squeeze(1), centre.squeeze(1)
        out[0, sl] = m_p + log_u
        out[1, sl] = m_q + log_e
        # KL = sum_y p_y (d_y - c) - (logZ_p - logZ_q - c), c = mean_y d_y: both parts free of the rows' offsets, so
        # nearly identical models keep their KL's relative accuracy even with logits offset by 100 (no cancellation
        # of logZ_p against logZ_q)
        out[2, sl] = torch.linalg.vecdot(u, d) / total - ((m_p - m_q - centre) + (log_u - log_e))
    lz_p, lz_q, kl, sq = out.unbind(0)
    return lz_p, lz_q, _at_least_zero_(kl), sq


def check_num_classes(k: int) -> None:
    if k < 1:
        raise ValueError(f"the logits must have at least one class (K >= 1) in their last dimension, got K={k}")


def mean_kl_divergence(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """``d_KL = mean_x KL(p(.|x) || q(.|x))``, a float64 scalar tensor.

    Logits of shape (N, K) or (..., K); any float dtype and device. This is the baseline that the
    paper shows can be arbitrarily small for models with very different representations.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[0.0, 1.0, 2.0], [2.0, 0.0, 0.0]])
        >>> float(mean_kl_divergence(logits, logits + 5.0))  # a per-input shift changes nothing
        0.0
        >>> round(float(mean_kl_divergence(logits, logits.flip(-1))), 4)
        1.2557
    """
    p, q = check_logit_pair(logits_p, logits_q)
    check_num_classes(p.shape[1])
    if p.shape[0] == 0:
        raise ValueError("mean_kl_divergence needs at least one input, got N=0")
    return kl_per_input(torch.log_softmax(p, -1), torch.log_softmax(q, -1)).mean()
