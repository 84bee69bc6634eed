"""Rank-aware representations: the subspace the embeddings actually occupy.

Most trained networks end in a normalisation layer. A LayerNorm output ``f = gamma * (x - mean(x)) / sd(x) + beta``
satisfies ``sum_i (f_i - beta_i) / gamma_i = 0`` for every input: the embeddings lie in an affine hyperplane, and
their covariance over inputs has a null direction. A dead unit or a constant feature does the same. Such a null
direction carries no information about the input, so it is not part of the representation.

**Which quantity is invariant.** Everything we report is a function of the log-probabilities (d_LLV, KL) or of
the *log-odds* ``(g(y) - g(y0))^T f(x)`` over inputs and ``(f(x_i) - f(x0))^T g(y)`` over labels (d_SVD), or of
the canonical correlations of the embeddings (mCCA). If the embeddings of a model lie in an affine subspace
``f = f0 + V z`` (``V`` an orthonormal M x r basis of the range of their covariance), the model is exactly the model
with embedding ``z`` (r-dimensional), unembedding ``W V`` and bias ``W f0 + b``: same logits, same log-odds. So the
representation dimension that the identifiability theory (and the diversity condition) is about is ``r``, not M.

**Why the reduction is exact.** The log-odds and the log-probabilities are linear in ``f``; the dropped directions
have (numerically) zero variance, so restricting to the range changes none of them. What changes is only what
depended on M: the size of the label subsets of d_SVD's f-part and of the input sets of d_LLV and d_SVD's g-part
(``r`` and ``r + 1``), the conditioning of the diversity matrices (``L V`` and ``N V`` instead of ``L`` and ``N``,
which are singular for every LayerNorm-final model), and mCCA, which whitens each embedding within its range.
Appending a constant coordinate or a linear combination of existing coordinates to the embeddings (with a zero
unembedding column) leaves every reported value unchanged.

**The threshold.** A direction is null when its variance is at most :data:`RANK_RTOL` (1e-10) times the largest
variance of that model's embeddings, i.e. its standard deviation is below 1e-5 of the largest. Structural nulls
are far below it (a LayerNorm constraint holds to the float32 rounding of its output, a variance ratio of about
1e-14), genuine directions of trained networks far above it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RANK_RTOL", "Subspace", "embedding_subspace", "pair_subspaces", "restricted_cond"]

#: Variance ratio (to the largest) at or below which a direction of the embeddings counts as null.
RANK_RTOL = 1e-10


@dataclass(frozen=True)
class Subspace:
    """The range of a model's embedding covariance: an orthonormal basis (M x r) and the variances along it."""

    basis: Tensor
    variances: Tensor

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])


def embedding_subspace(cov: Tensor, rtol: float = RANK_RTOL, name: str = "the embeddings") -> Subspace:
    """The non-degenerate subspace of an embedding covariance (M x M): eigenvectors whose eigenvalue exceeds ``rtol``
    times the largest.

    Example:
        >>> import torch
        >>> f = torch.randn(200, 3, dtype=torch.float64)
        >>> f = torch.cat([f, f[:, :1] + f[:, 1:2], torch.ones(200, 1, dtype=torch.float64)], 1)  # 2 redundant columns
        >>> embedding_subspace(torch.cov(f.T)).rank
        3
    """
    values, vectors = torch.linalg.eigh(cov)
    top = values[-1]
    if not bool(top > 0):
        raise ValueError(f"{name} are constant over the inputs (zero covariance): there is no representation to compare")
    keep = values > rtol * top
    return Subspace(basis=vectors[:, keep], variances=values[keep])


def pair_subspaces(cov_f: Tensor, dim_p: int, rtol: float = RANK_RTOL) -> tuple[Subspace, Subspace]:
    """The subspaces of both models from the joint covariance of ``[f_p; f_q]`` (the first ``dim_p`` coordinates are
    ``f_p``)."""
    return (
        embedding_subspace(cov_f[:dim_p, :dim_p], rtol, "the embeddings of model p"),
        embedding_subspace(cov_f[dim_p:, dim_p:], rtol, "the embeddings of model q"),
    )


def restricted_cond(matrix: Tensor, subspace: Subspace) -> Tensor:
    """Condition number of a diversity matrix (r rows = displaced unembeddings or embeddings, M columns) restricted to
    the subspace the embeddings occupy: ``cond(matrix @ V)``, the ratio of its largest to its smallest singular value.
    For a model whose embeddings have a lower rank than r (a smaller student) the restriction has fewer columns than
    rows, and the condition number says whether its rows span the model's whole subspace (diversity within its own
    rank); with fewer rows than the rank (a ``rep_dim`` below it), whether the rows are independent. A restriction of
    lower rank than ``min(rows, columns)`` has condition number inf."""
    restricted = matrix @ subspace.basis
    values = torch.linalg.svdvals(restricted)
    return values[0] / values[-1] if bool(values[-1] > 0) else restricted.new_tensor(float("inf"))
