"""Streaming mean canonical correlation (mCCA)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_repsim.functional.cca import canonical_correlations_from_cov
from lightning_repsim.metrics._state import (
    StreamingMetric,
    finite_rows,
    flatten_rows,
    moments_add,
    moments_covariance,
    moments_size,
    row_selector,
    take_rows,
)

__all__ = ["MeanCCA"]


def embedding_rows(
    metric: StreamingMetric, emb_p: Tensor, emb_q: Tensor, mask: Tensor | None, ids: Tensor | None, same_dim: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Validated, masked, finite float64 (N, M) embeddings of both models (and their ids)."""
    p = flatten_rows(emb_p, "emb_p")
    q = flatten_rows(emb_q, "emb_q")
    if same_dim and p.shape != q.shape:
        raise ValueError(f"`emb_p` and `emb_q` must have the same shape, got {tuple(p.shape)} and {tuple(q.shape)}")
    if p.shape[0] != q.shape[0]:
        raise ValueError(f"`emb_p` and `emb_q` must hold the same inputs, got {p.shape[0]} and {q.shape[0]} rows")
    if emb_p.shape[:-1] != emb_q.shape[:-1]:
        raise ValueError(
            f"`emb_p` and `emb_q` must have the same leading shape, got {tuple(emb_p.shape[:-1])} and {tuple(emb_q.shape[:-1])}"
        )
    keep, ids = row_selector(emb_p.shape[:-1], mask, ids, p.device)
    if keep is not None:
        p, q = take_rows(p, keep), take_rows(q, keep)
        ids = None if ids is None else take_rows(ids, keep)
    (p, q), ok, dropped = finite_rows([(p, "emb_p"), (q, "emb_q")], metric.nan_strategy)
    metric._drop(dropped)
    if ok is not None and ids is not None:
        ids = take_rows(ids, ok)
    return p, q, ids


class MeanCCA(StreamingMetric):
    r"""Streaming mean canonical correlation between two embeddings of the same inputs, equal to
    :func:`~lightning_repsim.functional.mean_cca` on the concatenated data (exact closed form).

    State: float64 count, mean and centred co-moment of ``[f_p; f_q]``: ``1 + D + D^2`` numbers with
    ``D = M_p + M_q`` (sized at the first update), merged exactly across processes.

    Args:
        nan_strategy: ``"error"`` (default) or ``"ignore"`` (drop rows with a non-finite value, counted in
            ``num_dropped``).
        kwargs: passed to :class:`torchmetrics.Metric`.

    ``update(emb_p, emb_q, mask=None)``: embeddings (B, M_p) and (B, M_q), or (B, T, .) with a (B, T)
    boolean ``mask`` (True = use). ``compute()`` returns the mean canonical correlation (float64 scalar);
    :meth:`canonical_correlations` returns all of them. ``forward`` only updates.

    Example:
        >>> import torch
        >>> from lightning_repsim.functional import mean_cca
        >>> f = torch.randn(200, 3, dtype=torch.float64)
        >>> g = f @ torch.randn(3, 3, dtype=torch.float64) + 0.5 * torch.randn(200, 3, dtype=torch.float64)
        >>> metric = MeanCCA()
        >>> for i in range(0, 200, 50):
        ...     metric.update(f[i : i + 50], g[i : i + 50])
        >>> bool(torch.isclose(metric.compute(), mean_cca(f, g), rtol=1e-12))
        True
    """

    higher_is_better = True

    def __init__(self, nan_strategy: str = "error", **kwargs: Any) -> None:
        super().__init__(nan_strategy=nan_strategy, **kwargs)
        self._add_moments("moments", None)
        self.add_state("dims", torch.zeros(2, dtype=torch.int64), dist_reduce_fx="max", persistent=True)

    def update(self, emb_p: Tensor, emb_q: Tensor, mask: Tensor | None = None) -> None:
        p, q, _ = embedding_rows(self, emb_p, emb_q, mask, None, same_dim=False)
        dims = torch.tensor([p.shape[1], q.shape[1]], device=self.dims.device)
        if int(self.dims.sum()) and not bool((self.dims == dims).all()):
            raise ValueError(f"MeanCCA: embedding dimensions changed from {self.dims.tolist()} to {dims.tolist()}; call reset()")
        self.dims = dims
        if p.shape[0]:
            d = p.shape[1] + q.shape[1]
            self.moments = moments_add(self._size_state("moments", (moments_size(d),)), torch.cat([p, q], dim=1))

    def canonical_correlations(self) -> Tensor:
        """All ``min(M_p, M_q)`` canonical correlations (decreasing) of the local (unsynced) state."""
        n = self.num_inputs
        dim_p, dim_q = (int(v) for v in self.dims)
        if n < max(dim_p, dim_q) + 2:
            raise ValueError(
                f"canonical correlations need more inputs than dimensions, got N={n} for dimensions {dim_p} and {dim_q}"
            )
        _, _, cov = moments_covariance(self.moments)
        return canonical_correlations_from_cov(cov, dim_p)

    def compute(self) -> Tensor:
        return self.canonical_correlations().mean()
