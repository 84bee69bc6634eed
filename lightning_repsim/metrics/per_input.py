"""``PerInputMean``: the streaming mean over inputs of a per-input quantity of two models' logits.

:class:`~lightning_repsim.metrics.MeanKLDivergence` (the per-input KL) and :class:`~lightning_repsim.metrics.LogitDistance`
(the per-input squared distance of the centred logits) are thin subclasses: they say how a block of logit rows gives
its per-input values and what their result holds. Everything else is here, once: input preparation (shapes, masks,
values given by the caller as ``per_input``), the handling of non-finite values, and the state -- an exact float64
Welford/Chan triple (count, mean, centred second moment: 3 numbers) of the per-input values, and K.

Non-finite values follow ``nan_strategy`` whatever their source: ``"error"`` raises (naming the logits when they are
the cause, with the functional layer's message), ``"ignore"`` drops the inputs and counts them in ``num_dropped``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_repsim.functional.inputs import check_finite, given_per_input, logit_rows
from lightning_repsim.functional.kl import check_num_classes
from lightning_repsim.metrics.base import DEFAULT_MEMORY_BUDGET_GB, StreamingMetric
from lightning_repsim.metrics.moment_state import empty_moments
from lightning_repsim.metrics.state_kinds import Dims, Moments

__all__ = ["PerInputMean"]


class PerInputMean(StreamingMetric):
    """Base class of the per-input means (see the module docstring).

    Subclasses set ``_count_state`` (the name of their moment state), ``_function`` (the functional counterpart, named
    in errors) and ``_quantity`` (what a value is, for messages); their ``update`` calls :meth:`_accumulate_rows` with
    a function of the masked (N, K) logit rows; their ``_result_from`` builds the result from :meth:`_summary`.
    """

    _function = "per_input_mean"
    _quantity = "value"

    def __init__(self, nan_strategy: str = "error", memory_budget_gb: float | None = DEFAULT_MEMORY_BUDGET_GB,
                 **kwargs: Any) -> None:
        super().__init__(nan_strategy=nan_strategy, memory_budget_gb=memory_budget_gb, **kwargs)
        self._add_state_kind(self._count_state, Moments(), empty_moments(1))
        self._add_state_kind("num_classes", Dims(), torch.zeros(1, dtype=torch.int64))

    def _describe(self, name: str, shape: tuple[int, ...]) -> str:
        return f"K={shape[0]} classes" if name == "num_classes" else super()._describe(name, shape)

    def _accumulate_rows(self, logits_p: Tensor, logits_q: Tensor, mask: Tensor | None, per_input: Tensor | None,
                         rows: Callable[[Tensor, Tensor], Tensor]) -> None:
        """Accumulate one batch: the per-input values are ``per_input`` when given (the logits' leading shape, masked
        like them; the logits are then only checked for shape), else ``rows(p, q)`` of the masked logit rows."""
        p, q, _, _ = logit_rows(logits_p, logits_q, mask, None, None)
        check_num_classes(p.shape[1])
        contributions: dict[str, Any] = {"num_classes": torch.tensor([p.shape[1]], dtype=torch.int64)}
        if p.shape[0]:
            if per_input is None:
                values = rows(p, q)
            else:
                values = given_per_input(per_input, "per_input", logits_p.shape[:-1], mask, p.device)
            ok = torch.isfinite(values)
            if not bool(ok.all()):
                if self.nan_strategy == "error":
                    self._refuse_non_finite(values, None if per_input is not None else (p, q))
                contributions["num_dropped"] = int((~ok).sum())
                values = values[ok]
            contributions[self._count_state] = values[:, None]
        self._accumulate(contributions)

    def _refuse_non_finite(self, values: Tensor, logits: tuple[Tensor, Tensor] | None) -> None:
        """The ``nan_strategy="error"`` error: the functional layer's when a logit is not finite, else one naming the
        values."""
        if logits is not None:
            check_finite(logits[0], "logits_p")
            check_finite(logits[1], "logits_q")
        source = "`per_input`" if logits is None else f"the per-input {self._quantity} (finite logits)"
        count = int((~torch.isfinite(values)).sum())
        raise ValueError(f"{source} has {count} non-finite value(s) (nan_strategy='error'; 'ignore' drops those inputs)")

    def _summary(self, states: dict[str, Tensor]) -> tuple[int, Tensor, Tensor]:
        """``(n, mean, unbiased standard deviation)`` of the per-input values accumulated in ``states``."""
        moments = states[self._count_state]
        n = int(moments[0])
        if n == 0:
            raise ValueError(f"{self._function} needs at least one input, got N=0")
        std = (moments[2] / (n - 1)).sqrt() if n > 1 else torch.zeros_like(moments[2])
        return n, moments[1].clone(), std
