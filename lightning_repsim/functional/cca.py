"""Mean canonical correlation (mCCA), the exact closed form (SPEC §4)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_repsim.functional._moments import add_gram_, centred_blocks, column_means, covariance_from_moments
from lightning_repsim.functional.cka import embedding_pair
from lightning_repsim.functional.subspace import pair_subspaces

__all__ = ["canonical_correlations", "canonical_correlations_from_cov", "joint_covariance", "mean_cca"]


def canonical_correlations_from_cov(cov: Tensor, dim_p: int) -> Tensor:
    """Canonical correlations from the joint covariance of ``[f_p; f_q]`` (first ``dim_p`` coordinates are
    ``f_p``): the singular values of ``C_pp^{-1/2} C_pq C_qq^{-1/2}``, in decreasing order, with each embedding
    whitened within the subspace it occupies (:mod:`~lightning_repsim.functional.subspace`): null directions
    (LayerNorm's constraint, a dead or constant unit) carry no information and are left out, so there are
    ``min(r_p, r_q)`` correlations for embeddings of ranks ``r_p``, ``r_q``. Any square root of the inverse gives the
    same singular values.
    """
    sub_p, sub_q = pair_subspaces(cov, dim_p)
    white_p = sub_p.basis / sub_p.variances.sqrt()
    white_q = sub_q.basis / sub_q.variances.sqrt()
    return torch.linalg.svdvals(white_p.T @ cov[:dim_p, dim_p:] @ white_q).clamp(max=1.0)


def check_cca_inputs(n: int, dim_p: int, dim_q: int) -> None:
    """Canonical correlations need N >= max(M_p, M_q) + 2 inputs (non-singular unbiased covariances need
    N - 1 > M, and the joint centring takes one more)."""
    need = max(dim_p, dim_q) + 2
    if n < need:
        raise ValueError(
            f"canonical correlations need N >= max(M_p, M_q) + 2 = {need} inputs for embedding dimensions "
            f"{dim_p} and {dim_q}, got N={n}"
        )


def joint_covariance(x: Tensor, y: Tensor) -> Tensor:
    """The unbiased covariance of ``[x; y]`` (rows of any float dtype) in two passes over blocks of rows: exact means,
    then the centred Gram of each float64 block added into one (D, D) matrix (no N x D float64 copy)."""
    mean_x, mean_y = column_means(x, "emb_p"), column_means(y, "emb_q")
    d = x.shape[1] + y.shape[1]
    m2 = mean_x.new_zeros(d, d)
    for block in centred_blocks([(x, mean_x), (y, mean_y)]):
        add_gram_(m2, block)
    return covariance_from_moments(m2.new_tensor(float(x.shape[0])), m2)


def canonical_correlations(emb_p: Tensor, emb_q: Tensor) -> Tensor:
    """All ``min(M_p, M_q)`` canonical correlations between two embeddings, decreasing, float64.

    Example:
        >>> import torch
        >>> f = torch.randn(200, 3, dtype=torch.float64)
        >>> a = torch.randn(3, 3, dtype=torch.float64)
        >>> canonical_correlations(f, f @ a.T + 1.0).sub(1).abs().max() < 1e-10
        tensor(True)
    """
    p, q = embedding_pair(emb_p, emb_q)
    check_cca_inputs(p.shape[0], p.shape[1], q.shape[1])
    return canonical_correlations_from_cov(joint_covariance(p, q), p.shape[1])


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
