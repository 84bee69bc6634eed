"""Streaming mean canonical correlation (mCCA)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_repsim.functional.cca import canonical_correlations_from_cov, check_cca_inputs
from lightning_repsim.functional.inputs import embedding_rows
from lightning_repsim.metrics.base import DEFAULT_MEMORY_BUDGET_GB, MetricResult, StreamingMetric
from lightning_repsim.metrics.moment_state import moments_covariance, moments_dim
from lightning_repsim.metrics.state_kinds import Dims, Moments

__all__ = ["CCAResult", "MeanCCA"]


@dataclass(frozen=True)
class CCAResult(MetricResult):
    """What :class:`MeanCCA` computed: ``value`` = the mean canonical correlation (float64 scalar), all
    ``canonical_correlations`` (decreasing) and ``num_inputs``."""

    canonical_correlations: Tensor
    key: ClassVar[str] = "mcca"


class MeanCCA(StreamingMetric):
    r"""Streaming mean canonical correlation between two embeddings of the same inputs, equal to
    :func:`~lightning_repsim.functional.mean_cca` on the concatenated data (exact closed form).

    As input to ``forward`` and ``update``: ``emb_p`` (B, M_p) and ``emb_q`` (B, M_q), or (B, T, .), any float
    dtype and device; ``mask`` (optional, boolean or 0/1 integers, 1 = use the input).

    As output of ``forward`` and ``compute``: the mean canonical correlation as a float64 scalar tensor
    (``forward``: of the batch, which needs at least ``max(M_p, M_q) + 2`` inputs; its cost is one small
    eigen/SVD problem). :meth:`compute_result` returns all canonical correlations (:class:`CCAResult`).

    State: float64 count, mean and centred co-moment of ``[f_p; f_q]``: ``1 + D + D^2`` numbers with
    ``D = M_p + M_q`` (sized at the first update), merged exactly across processes.

    Args:
        nan_strategy: ``"error"`` (default) or ``"ignore"`` (drop rows with a non-finite value, counted in
            ``num_dropped``).
        kwargs: passed to :class:`torchmetrics.Metric`.

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
        >>> metric.compute_result().canonical_correlations.shape
        torch.Size([3])
    """

    higher_is_better = True
    plot_upper_bound = 1.0

    _count_state = "cca_moments"

    def __init__(self, nan_strategy: str = "error", memory_budget_gb: float | None = DEFAULT_MEMORY_BUDGET_GB,
                 **kwargs: Any) -> None:
        super().__init__(nan_strategy=nan_strategy, memory_budget_gb=memory_budget_gb, **kwargs)
        self._add_state_kind("cca_moments", Moments(), torch.zeros(0, dtype=torch.float64))
        self._add_state_kind("dims", Dims(), torch.zeros(2, dtype=torch.int64))

    def _describe(self, name: str, shape: tuple[int, ...]) -> str:
        if name == "dims":
            return f"embedding dimensions {list(shape)}"
        if name == "cca_moments":
            return f"embedding dimensions summing to {moments_dim(shape[0])}"
        return super()._describe(name, shape)

    def update(self, emb_p: Tensor, emb_q: Tensor, mask: Tensor | None = None) -> None:
        """Accumulate a batch of both models' embeddings (see the class docstring)."""
        p, q, _, dropped = embedding_rows(emb_p, emb_q, mask, None, self.nan_strategy, same_dim=False)
        d = p.shape[1] + q.shape[1]
        self._check_memory(8.0 * (1 + d + d * d), 8.0 * 6 * d * d, f"with embedding dimensions {p.shape[1]} + {q.shape[1]}",
                           "Reduce the embedding dimension first.")
        contributions: dict[str, Any] = {"dims": torch.tensor([p.shape[1], q.shape[1]], dtype=torch.int64)}
        if dropped:
            contributions["num_dropped"] = dropped
        if p.shape[0]:
            contributions["cca_moments"] = torch.cat([p, q], dim=1)
        self._accumulate(contributions)

    def _result_from(self, states: dict[str, Tensor]) -> CCAResult:
        moments = states["cca_moments"]
        n = int(moments[0]) if moments.numel() else 0
        dim_p, dim_q = (int(v) for v in states["dims"])
        check_cca_inputs(n, dim_p, dim_q)
        _, _, cov = moments_covariance(moments)
        ccs = canonical_correlations_from_cov(cov, dim_p)
        return CCAResult(value=ccs.mean(), canonical_correlations=ccs, num_inputs=n)

    def compute_result(self) -> CCAResult:
        """The :class:`CCAResult` (``.value`` is what ``compute()`` returns)."""
        return super().compute_result()
