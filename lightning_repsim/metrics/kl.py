"""Streaming mean KL divergence."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_repsim.functional._validation import check_same_shape
from lightning_repsim.functional.kl import kl_per_input
from lightning_repsim.functional.llv import log_probabilities
from lightning_repsim.metrics._state import StreamingMetric, finite_rows, flatten_rows, moments_add, row_selector, take_rows

__all__ = ["MeanKLDivergence"]


def logit_rows(metric: StreamingMetric, logits_p: Tensor, logits_q: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Validated, masked, finite float64 (N, K) logits of both models (non-finite rows dropped and
    counted under ``nan_strategy="ignore"``)."""
    p = flatten_rows(logits_p, "logits_p")
    q = flatten_rows(logits_q, "logits_q")
    check_same_shape(logits_p, logits_q, "logits_p", "logits_q")
    keep, _ = row_selector(logits_p.shape[:-1], mask, None, p.device)
    if keep is not None:
        p, q = take_rows(p, keep), take_rows(q, keep)
    (p, q), _, dropped = finite_rows([(p, "logits_p"), (q, "logits_q")], metric.nan_strategy)
    metric._drop(dropped)
    return p, q


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
        p, q = logit_rows(self, logits_p, logits_q, mask)
        if p.shape[0]:
            kl = kl_per_input(log_probabilities(p), log_probabilities(q))
            self.moments = moments_add(self.moments, kl[:, None])

    def compute(self) -> Tensor:
        if int(self.moments[0]) == 0:
            raise ValueError("mean_kl_divergence needs at least one input, got N=0")
        return self.moments[1].clone()


