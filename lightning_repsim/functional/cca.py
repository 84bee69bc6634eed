"""Mean canonical correlation (mCCA), the exact closed form (SPEC §4)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_repsim.functional._moments import batch_moments, covariance_from_moments
from lightning_repsim.functional._validation import as_matrix, check_finite

__all__ = ["mean_cca", "canonical_correlations", "canonical_correlations_from_cov"]


def _whitener(cov: Tensor, name: str) -> Tensor:
    """Lower Cholesky factor of ``cov``, with a clear error when it is singular."""
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info) != 0:
        rank = int(torch.linalg.matrix_rank(cov))
        raise ValueError(
            f"the covariance of `{name}` is singular (rank {rank} < {cov.shape[0]}): a coordinate is constant "
            "or a linear combination of the others, so canonical correlations are undefined. Drop constant "
            "coordinates (e.g. an appended bias 1) or reduce the dimension first."
        )
    return chol


def canonical_correlations_from_cov(cov: Tensor, dim_p: int) -> Tensor:
    """Canonical correlations from the joint covariance of ``[f_p; f_q]`` (first ``dim_p`` coordinates
    are ``f_p``): the singular values of ``C_pp^{-1/2} C_pq C_qq^{-1/2}``, in decreasing order.

    Any square root of the inverse gives the same singular values; the Cholesky factors are used.
    """
    c_pp, c_pq, c_qq = cov[:dim_p, :dim_p], cov[:dim_p, dim_p:], cov[dim_p:, dim_p:]
    l_p = _whitener(c_pp, "emb_p")
    l_q = _whitener(c_qq, "emb_q")
    t = torch.linalg.solve_triangular(l_p, c_pq, upper=False)
    t = torch.linalg.solve_triangular(l_q, t.T, upper=False).T
    return torch.linalg.svdvals(t).clamp(max=1.0)


def check_cca_inputs(n: int, dim_p: int, dim_q: int) -> None:
    """Canonical correlations need N >= max(M_p, M_q) + 2 inputs (non-singular unbiased covariances need
    N - 1 > M, and the joint centring takes one more)."""
    need = max(dim_p, dim_q) + 2
    if n < need:
        raise ValueError(
            f"canonical correlations need N >= max(M_p, M_q) + 2 = {need} inputs for embedding dimensions "
            f"{dim_p} and {dim_q}, got N={n}"
        )


def _embedding_pair(emb_p: Tensor, emb_q: Tensor) -> tuple[Tensor, Tensor]:
    p = as_matrix(emb_p, "emb_p")
    q = as_matrix(emb_q, "emb_q")
    if p.shape[0] != q.shape[0]:
        raise ValueError(
            f"`emb_p` and `emb_q` must hold the same inputs, got {p.shape[0]} and {q.shape[0]} rows"
        )
    check_finite(p, "emb_p")
    check_finite(q, "emb_q")
    check_cca_inputs(p.shape[0], p.shape[1], q.shape[1])
    return p, q


def canonical_correlations(emb_p: Tensor, emb_q: Tensor) -> Tensor:
    """All ``min(M_p, M_q)`` canonical correlations between two embeddings, decreasing, float64.

    Example:
        >>> import torch
        >>> f = torch.randn(200, 3, dtype=torch.float64)
        >>> a = torch.randn(3, 3, dtype=torch.float64)
        >>> canonical_correlations(f, f @ a.T + 1.0).sub(1).abs().max() < 1e-10
        tensor(True)
    """
    p, q = _embedding_pair(emb_p, emb_q)
    n, _, m2 = batch_moments(torch.cat([p, q], dim=1))
    return canonical_correlations_from_cov(covariance_from_moments(n, m2), p.shape[1])


def mean_cca(emb_p: Tensor, emb_q: Tensor) -> Tensor:
    """Mean canonical correlation between two embeddings of the same inputs (float64 scalar).

    Invariant to any invertible affine map applied to either embedding. Exact closed form; the
    iterative ``sklearn.cross_decomposition.CCA`` agrees to about 1e-6.

    Example:
        >>> import torch
        >>> f = torch.randn(100, 2, dtype=torch.float64)
        >>> round(float(mean_cca(f, 3 * f.flip(-1) - 1)), 8)
        1.0
    """
    return canonical_correlations(emb_p, emb_q).mean()
