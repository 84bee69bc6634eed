"""Streaming mean KL divergence (a :class:`~lightning_repsim.metrics.per_input.PerInputMean`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from lightning_repsim.functional.inputs import given_log_partitions
from lightning_repsim.functional.kl import kl_of_logit_rows
from lightning_repsim.metrics.base import MetricResult
from lightning_repsim.metrics.per_input import PerInputMean

__all__ = ["KLResult", "MeanKLDivergence"]


@dataclass(frozen=True)
class KLResult(MetricResult):
    """What :class:`MeanKLDivergence` computed: ``value`` = mean KL(p || q) (float64 scalar), its unbiased
    standard deviation over inputs ``std``, and ``num_inputs``."""

    std: Tensor
    key: ClassVar[str] = "kl"


class MeanKLDivergence(PerInputMean):
    r"""Streaming ``d_KL = mean_x KL(p(.|x) || q(.|x))`` (SPEC §2), equal to
    :func:`~lightning_repsim.functional.mean_kl_divergence` on the concatenated data.

    As input to ``forward`` and ``update``: ``logits_p``, ``logits_q`` (B, K) or (B, T, K), any float dtype and
    device; ``mask`` (optional, boolean or 0/1 integers, 1 = use the input).

    As output of ``forward`` and ``compute``: the mean KL as a float64 scalar tensor (``forward``: of the batch
    alone). :meth:`compute_result` adds the standard deviation over inputs (:class:`KLResult`).

    State: a float64 Welford/Chan triple (count, mean, centred second moment) of the per-input KL,
    3 numbers, merged exactly across processes, and K (which must not change until ``reset()``).

    Args:
        nan_strategy: ``"error"`` (default: a non-finite logit or ``per_input`` value raises) or ``"ignore"`` (drop
            inputs whose KL is not finite, counted in ``num_dropped``).
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from lightning_repsim.functional import mean_kl_divergence
        >>> logits_p, logits_q = torch.randn(2, 100, 5).unbind(0)
        >>> metric = MeanKLDivergence()
        >>> batch_kl = metric(logits_p[:30], logits_q[:30])  # forward: the batch's mean KL
        >>> metric.update(logits_p[30:], logits_q[30:])
        >>> bool(torch.isclose(metric.compute(), mean_kl_divergence(logits_p, logits_q), rtol=1e-12))
        True
    """

    _count_state = "kl_moments"
    _function = "mean_kl_divergence"
    _quantity = "KL"

    def update(self, logits_p: Tensor, logits_q: Tensor, mask: Tensor | None = None, logz_p: Tensor | None = None,
               logz_q: Tensor | None = None, per_input: Tensor | None = None) -> None:
        """Accumulate a batch of both models' logits (see the class docstring). ``logz_p``/``logz_q`` (the logits'
        leading shape, optional): each input's ``logsumexp`` of the logits when the caller already has it (as
        :class:`~lightning_repsim.ReferenceComparison` does for d_SVD); saves two passes over the logits.
        ``per_input`` (the logits' leading shape, optional): each input's KL when the caller already computed it
        (e.g. with :func:`~lightning_repsim.functional.kl.logit_pair_rows`); the logits are then only
        checked for shape."""

        def kl_rows(p: Tensor, q: Tensor) -> Tensor:  # non-finite exactly for the rows with a non-finite logit
            return kl_of_logit_rows(p, q, *given_log_partitions(logz_p, logz_q, logits_p.shape[:-1], mask, p.device))

        self._accumulate_rows(logits_p, logits_q, mask, per_input, kl_rows)

    def _result_from(self, states: dict[str, Tensor]) -> KLResult:
        n, mean, std = self._summary(states)
        return KLResult(value=mean, std=std, num_inputs=n)

    def compute_result(self) -> KLResult:
        """The :class:`KLResult` (``.value`` is what ``compute()`` returns)."""
        return super().compute_result()
