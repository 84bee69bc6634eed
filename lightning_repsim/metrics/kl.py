"""Streaming mean KL divergence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_repsim.functional._validation import check_finite
from lightning_repsim.functional.kl import check_num_classes, kl_of_logit_rows
from lightning_repsim.metrics.base import DEFAULT_MEMORY_BUDGET_GB, StreamingMetric
from lightning_repsim.metrics.inputs import given_log_partitions, given_per_input, logit_rows
from lightning_repsim.metrics.moment_state import empty_moments

__all__ = ["KLResult", "MeanKLDivergence"]


@dataclass(frozen=True)
class KLResult:
    """What :class:`MeanKLDivergence` computed: ``value`` = mean KL(p || q) (float64 scalar), its unbiased
    standard deviation over inputs ``std``, and ``num_inputs``."""

    value: Tensor
    std: Tensor
    num_inputs: int

    def as_dict(self) -> dict[str, float]:
        return {"kl": float(self.value)}


class MeanKLDivergence(StreamingMetric):
    r"""Streaming ``d_KL = mean_x KL(p(.|x) || q(.|x))`` (SPEC §2), equal to
    :func:`~lightning_repsim.functional.mean_kl_divergence` on the concatenated data.

    As input to ``forward`` and ``update``: ``logits_p``, ``logits_q`` (B, K) or (B, T, K), any float dtype and
    device; ``mask`` (optional, boolean or 0/1 integers, 1 = use the input).

    As output of ``forward`` and ``compute``: the mean KL as a float64 scalar tensor (``forward``: of the batch,
    at no extra cost). :meth:`compute_result` adds the standard deviation over inputs (:class:`KLResult`).

    State: a float64 Welford/Chan triple (count, mean, centred second moment) of the per-input KL,
    3 numbers, merged exactly across processes, and K (which must not change until ``reset()``).

    Args:
        nan_strategy: ``"error"`` (default) or ``"ignore"`` (drop rows with a non-finite logit, counted in
            ``num_dropped``).
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

    def __init__(self, nan_strategy: str = "error", memory_budget_gb: float | None = DEFAULT_MEMORY_BUDGET_GB,
                 **kwargs: Any) -> None:
        super().__init__(nan_strategy=nan_strategy, memory_budget_gb=memory_budget_gb, **kwargs)
        self._add_state_kind("kl_moments", "moments", empty_moments(1))
        self._add_state_kind("num_classes", "dims", torch.zeros(1, dtype=torch.int64))

    def _describe(self, name: str, shape: tuple[int, ...]) -> str:
        return f"K={shape[0]} classes" if name == "num_classes" else super()._describe(name, shape)

    def update(self, logits_p: Tensor, logits_q: Tensor, mask: Tensor | None = None, logz_p: Tensor | None = None,
               logz_q: Tensor | None = None, per_input: Tensor | None = None) -> None:
        """Accumulate a batch of both models' logits (see the class docstring). ``logz_p``/``logz_q`` (the logits'
        leading shape, optional): each input's ``logsumexp`` of the logits when the caller already has it (as
        :class:`~lightning_repsim.ReferenceComparison` does for d_SVD); saves two passes over the logits.
        ``per_input`` (the logits' leading shape, optional): each input's KL when the caller already computed it
        (e.g. with :func:`~lightning_repsim.functional.kl.logit_pair_rows`); the logits are then only
        checked for shape."""
        p, q, _, _ = logit_rows(logits_p, logits_q, mask, None, None)
        check_num_classes(p.shape[1])
        contributions: dict[str, Any] = {"num_classes": torch.tensor([p.shape[1]], dtype=torch.int64)}
        if p.shape[0]:
            if per_input is not None:
                kl = given_per_input(per_input, "per_input", logits_p.shape[:-1], mask, p.device)
            else:
                logz = given_log_partitions(logz_p, logz_q, logits_p.shape[:-1], mask, p.device)
                kl = kl_of_logit_rows(p, q, *logz)  # non-finite exactly for the rows with a non-finite logit
            ok = torch.isfinite(kl)
            if not bool(ok.all()):
                if self.nan_strategy == "error":
                    check_finite(p, "logits_p")
                    check_finite(q, "logits_q")
                contributions["num_dropped"] = int((~ok).sum())
                kl = kl[ok]
            contributions["kl_moments"] = kl[:, None]
        self._accumulate(contributions)

    def _result_from(self, states: dict[str, Tensor]) -> KLResult:
        moments = states["kl_moments"]
        n = int(moments[0])
        if n == 0:
            raise ValueError("mean_kl_divergence needs at least one input, got N=0")
        std = (moments[2] / (n - 1)).sqrt() if n > 1 else torch.zeros_like(moments[2])
        return KLResult(value=moments[1].clone(), std=std, num_inputs=n)

    def compute_result(self) -> KLResult:
        """The :class:`KLResult` (``.value`` is what ``compute()`` returns)."""
        return super().compute_result()
