"""Streaming mean KL divergence."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_repsim.functional.kl import kl_per_input
from lightning_repsim.functional.llv import log_probabilities
from lightning_repsim.metrics._state import StreamingMetric, logit_rows, moments_add

__all__ = ["MeanKLDivergence"]


class MeanKLDivergence(StreamingMetric):
    r"""Streaming ``d_KL = mean_x KL(p(.|x) || q(.|x))`` (SPEC §2), equal to
    :func:`~lightning_repsim.functional.mean_kl_divergence` on the concatenated data.

    State: a float64 Welford/Chan triple (count, mean, centred second moment) of the per-input KL,
    3 numbers, merged exactly across processes.

    Args:
        nan_strategy: ``"error"`` (default) or ``"ignore"`` (drop rows with a non-finite logit, counted in
            ``num_dropped``).
        kwargs: passed to :class:`torchmetrics.Metric`.

    ``update(logits_p, logits_q, mask=None)``: logits (B, K) or (B, T, K), any float dtype and device;
    ``mask`` (B,) or (B, T) boolean, True = use the input. ``forward`` returns the batch's mean KL.

    Example:
        >>> import torch
        >>> from lightning_repsim.functional import mean_kl_divergence
        >>> logits_p, logits_q = torch.randn(2, 100, 5).unbind(0)
        >>> metric = MeanKLDivergence()
        >>> metric.update(logits_p[:30], logits_q[:30])
        >>> metric.update(logits_p[30:], logits_q[30:])
        >>> bool(torch.isclose(metric.compute(), mean_kl_divergence(logits_p, logits_q), rtol=1e-12))
        True
    """

    _forward_computes = True

    def __init__(self, nan_strategy: str = "error", **kwargs: Any) -> None:
        super().__init__(nan_strategy=nan_strategy, **kwargs)
        self._add_moments("moments", 1)

    def update(self, logits_p: Tensor, logits_q: Tensor, mask: Tensor | None = None) -> None:
        p, q, _ = logit_rows(self, logits_p, logits_q, mask)
        if p.shape[0]:
            kl = kl_per_input(log_probabilities(p), log_probabilities(q))
            self.moments = moments_add(self.moments, kl[:, None])

    def compute(self) -> Tensor:
        if int(self.moments[0]) == 0:
            raise ValueError("mean_kl_divergence needs at least one input, got N=0")
        return self.moments[1].clone()


