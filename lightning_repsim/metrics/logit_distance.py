"""Streaming logit distance (a :class:`~lightning_repsim.metrics.per_input.PerInputMean`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from lightning_repsim.functional.cka import logit_distance_rows
from lightning_repsim.metrics.base import MetricResult
from lightning_repsim.metrics.per_input import PerInputMean

__all__ = ["LogitDistance", "LogitDistanceResult"]


@dataclass(frozen=True)
class LogitDistanceResult(MetricResult):
    """What :class:`LogitDistance` computed: ``value`` = d_logit (float64 scalar), ``mean_squared`` = d_logit^2,
    its standard deviation over inputs ``std_squared`` and ``num_inputs``."""

    mean_squared: Tensor
    std_squared: Tensor
    key: ClassVar[str] = "d_logit"


class LogitDistance(PerInputMean):
    r"""Streaming logit distance of Nielsen et al. (2026), ``d_logit = sqrt(mean_x sum_y (c(z_p)_y - c(z_q)_y)^2)``
    with ``c`` the centring over classes: 0 exactly when the two models' log-probabilities coincide (it ignores
    each input's log-partition). Equal to :func:`~lightning_repsim.functional.logit_distance` on the concatenated
    data; the quantity :class:`~lightning_repsim.losses.LogitDistanceLoss` trains on.

    As input to ``forward`` and ``update``: ``logits_p``, ``logits_q`` (B, K) or (B, T, K), any float dtype and
    device (cast to float64 in blocks of rows); ``mask`` (optional, 1 = use the input).

    As output of ``forward`` and ``compute``: d_logit as a float64 scalar tensor (``forward``: of the batch alone).
    :meth:`compute_result` adds d_logit^2 and the standard deviation of the per-input squared distance
    (:class:`LogitDistanceResult`).

    State: a float64 Welford/Chan triple of the per-input squared distance (3 numbers) and K.

    Args:
        nan_strategy: ``"error"`` (default: a non-finite logit or ``per_input`` value raises) or ``"ignore"`` (drop
            inputs whose squared distance is not finite, counted in ``num_dropped``).
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from lightning_repsim.functional import logit_distance
        >>> z_p, z_q = torch.randn(2, 100, 7, dtype=torch.float64).unbind(0)
        >>> metric = LogitDistance()
        >>> metric.update(z_p[:40], z_q[:40] + 3.0)  # a shift per input changes nothing
        >>> metric.update(z_p[40:], z_q[40:] - 1.0)
        >>> bool(torch.isclose(metric.compute(), logit_distance(z_p, z_q), rtol=1e-12))
        True
    """

    _count_state = "logit_moments"
    _function = "logit_distance"
    _quantity = "squared logit distance"

    def update(self, logits_p: Tensor, logits_q: Tensor, mask: Tensor | None = None,
               per_input: Tensor | None = None) -> None:
        """Accumulate a batch of both models' logits (see the class docstring). ``per_input`` (the logits' leading
        shape, optional): each input's squared distance when the caller already computed it (e.g. together with the
        KL by :func:`~lightning_repsim.functional.kl.logit_pair_rows`); the logits are then only checked
        for shape."""
        self._accumulate_rows(logits_p, logits_q, mask, per_input, logit_distance_rows)

    def _result_from(self, states: dict[str, Tensor]) -> LogitDistanceResult:
        n, mean, std = self._summary(states)
        mean = mean.clamp_min(0)
        return LogitDistanceResult(value=mean.sqrt(), mean_squared=mean, std_squared=std, num_inputs=n)

    def compute_result(self) -> LogitDistanceResult:
        """The :class:`LogitDistanceResult` (``.value`` is what ``compute()`` returns)."""
        return super().compute_result()
