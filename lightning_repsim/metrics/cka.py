"""Streaming linear CKA (biased and debiased) and orthogonal Procrustes distance.

The CKA family is computed from the shifted statistic of :mod:`lightning_repsim.functional.cka`: the count, mean
and centred co-moment of ``u = [x - c_x, y - c_y, |x - c_x|^2, |y - c_y|^2]`` relative to a shift ``c`` (the first
batch's mean). Each update adds its batch relative to the state's own shift (no re-shift); states of other
processes or of ``merge_state`` are re-shifted exactly (an O(D^2) affine map) and Chan-merged, so the values do not
depend on batching or on the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_repsim.functional import cka as statistic  # the shifted CKA statistic and its exact merge
from lightning_repsim.functional.inputs import embedding_rows
from lightning_repsim.metrics.base import DEFAULT_MEMORY_BUDGET_GB, StreamingMetric
from lightning_repsim.metrics.state_kinds import Statistic

__all__ = ["CKAResult", "LinearCKA", "ProcrustesDistance"]


@dataclass(frozen=True)
class CKAResult:
    """What :class:`LinearCKA` / :class:`ProcrustesDistance` computed from one statistic: ``value`` (the metric's
    headline), ``cka`` (biased linear CKA), ``cka_debiased``, ``procrustes`` (float64 scalars) and ``num_inputs``."""

    value: Tensor
    cka: Tensor
    cka_debiased: Tensor
    procrustes: Tensor
    num_inputs: int

    def as_dict(self) -> dict[str, float]:
        return {"cka": float(self.cka), "cka_debiased": float(self.cka_debiased), "procrustes": float(self.procrustes)}


class LinearCKA(StreamingMetric):
    r"""Streaming linear CKA between two embeddings of the same inputs, exact over the whole data set:
    equal to :func:`~lightning_repsim.functional.linear_cka` on the concatenated data for any batching and any
    number of processes.

    As input to ``forward`` and ``update``: ``emb_p`` (B, d_p) and ``emb_q`` (B, d_q) (the widths may differ), or
    (B, T, .) (every position is an input), any float dtype and device; ``mask`` (optional, boolean or 0/1
    integers over the leading dimensions, 1 = use the input).

    As output of ``forward`` and ``compute``: linear CKA (``debiased=False``, Kornblith et al. 2019) or debiased
    linear CKA (``debiased=True``, the unbiased HSIC of Song et al. 2012 as in Nguyen et al. 2021) as a float64
    scalar tensor; ``forward`` gives the batch's own value (which needs at least 4 inputs).
    :meth:`compute_result` gives both CKAs and the Procrustes distance of the same statistic (:class:`CKAResult`).

    State: ``2 + (d_p + d_q) + 1 + D + D^2`` float64 numbers with ``D = d_p + d_q + 2`` (independent of the number
    of inputs; sized at the first update), merged exactly across processes.

    Args:
        debiased: report debiased CKA instead of the (biased) linear CKA.
        nan_strategy: ``"error"`` (default) or ``"ignore"`` (drop rows with a non-finite value, counted in
            ``num_dropped``).
        memory_budget_gb: refuse (before allocating) widths whose state and compute need more than this.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from lightning_repsim.functional import linear_cka
        >>> x = torch.randn(300, 6, dtype=torch.float64)
        >>> y = torch.tanh(x @ torch.randn(6, 4, dtype=torch.float64)) + 100.0
        >>> metric = LinearCKA()
        >>> for i in range(0, 300, 64):
        ...     metric.update(x[i : i + 64], y[i : i + 64])
        >>> bool(torch.isclose(metric.compute(), linear_cka(x, y), rtol=1e-10))
        True
        >>> sorted(metric.compute_result().as_dict())
        ['cka', 'cka_debiased', 'procrustes']
    """

    higher_is_better = True
    plot_upper_bound = 1.0
    _headline = "cka"

    def __init__(self, debiased: bool = False, nan_strategy: str = "error",
                 memory_budget_gb: float | None = DEFAULT_MEMORY_BUDGET_GB, **kwargs: Any) -> None:
        if not isinstance(debiased, bool):
            raise ValueError(f"`debiased` must be a bool, got {debiased!r}")
        super().__init__(nan_strategy=nan_strategy, memory_budget_gb=memory_budget_gb, **kwargs)
        self.debiased = debiased
        self._add_state_kind("cka_state", Statistic(statistic.cka_merge), torch.zeros(0, dtype=torch.float64))

    @property
    def num_inputs(self) -> int:
        state = self.cka_state
        return 0 if statistic.cka_shift(state) is None else int(statistic._unpack(state)[3])

    def _describe(self, name: str, shape: tuple[int, ...]) -> str:
        if name == "cka_state":
            return f"a statistic of {shape[0]} numbers"
        return super()._describe(name, shape)

    def update(self, emb_p: Tensor, emb_q: Tensor, mask: Tensor | None = None) -> None:
        """Accumulate a batch of both models' embeddings (see the class docstring)."""
        p, q, _, dropped = embedding_rows(emb_p, emb_q, mask, None, self.nan_strategy, same_dim=False)
        dim_p, dim_q = p.shape[1], q.shape[1]
        d = dim_p + dim_q + 2
        self._check_memory(8.0 * statistic.cka_state_size(dim_p, dim_q), 8.0 * (3 * d * d + p.shape[0] * d),
                           f"with embedding widths {dim_p} + {dim_q}",
                           "Pool or project the embeddings to a smaller width first.")
        state = self.cka_state
        if state.numel() and (int(state[0]), int(state[1])) != (dim_p, dim_q):
            raise ValueError(
                f"{type(self).__name__}: the inputs changed size between updates (embedding widths "
                f"{int(state[0])} + {int(state[1])} so far, {dim_p} + {dim_q} now); call reset() first"
            )
        contributions: dict[str, Any] = {}
        if dropped:
            contributions["num_dropped"] = dropped
        if p.shape[0]:
            shift = statistic.cka_shift(state)
            contributions["cka_state"] = statistic.cka_batch_state(p, q, None if shift is None else shift.to(p.device))
        self._accumulate(contributions)

    def _result_from(self, states: dict[str, Tensor]) -> CKAResult:
        state = states["cka_state"]
        if statistic.cka_shift(state) is None:
            raise ValueError(f"{type(self).__name__} needs at least 4 inputs, got N=0")
        statistic.check_cka_state(state)
        values = statistic.cka_values(state)
        headline = "cka_debiased" if self._headline == "cka" and self.debiased else self._headline
        return CKAResult(value=values[headline], num_inputs=int(statistic._unpack(state)[3]), **values)

    def compute_result(self) -> CKAResult:
        """The :class:`CKAResult` (``.value`` is what ``compute()`` returns)."""
        return super().compute_result()


class ProcrustesDistance(LinearCKA):
    r"""Streaming orthogonal Procrustes distance (Williams et al. 2021) between two embeddings of the same inputs:
    ``sqrt(2 - 2 ||X^T Y||_* / (||X||_F ||Y||_F))`` on the embeddings centred over inputs, in ``[0, sqrt(2)]``; 0 when
    one is a rotation (or reflection) of the other times a scale, plus an offset. Equal to
    :func:`~lightning_repsim.functional.procrustes_distance` on the concatenated data.

    Same inputs, state and exactness as :class:`LinearCKA` (of which it is the other headline:
    :meth:`compute_result` carries both CKAs too).

    Example:
        >>> import torch
        >>> x = torch.randn(200, 3, dtype=torch.float64)
        >>> q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
        >>> metric = ProcrustesDistance()
        >>> metric.update(x, 2 * x @ q + 1)
        >>> float(metric.compute()) < 1e-6
        True
    """

    higher_is_better = False
    plot_upper_bound = 2**0.5
    _headline = "procrustes"

    def __init__(self, nan_strategy: str = "error", memory_budget_gb: float | None = DEFAULT_MEMORY_BUDGET_GB,
                 **kwargs: Any) -> None:
        super().__init__(debiased=False, nan_strategy=nan_strategy, memory_budget_gb=memory_budget_gb, **kwargs)
