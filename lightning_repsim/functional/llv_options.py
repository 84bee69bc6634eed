"""The options and the result of d_LLV (SPEC §3), defined and validated once for every layer that computes it."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any

import torch
from torch import Tensor

from lightning_repsim.functional.inputs import (
    check_choice,
    check_input_sets,
    check_label_index,
    check_positive_int,
)

__all__ = ["COMBINATIONS", "INPUT_SET_SEARCHES", "LLVOptions", "LLVResult", "REDUCTIONS", "ResolvedLabels"]

REDUCTIONS = ("max", "mean")
COMBINATIONS = ("max", "sum")
INPUT_SET_SEARCHES = ("optimise", "sample")


@dataclass(frozen=True, eq=False)
class LLVOptions:
    """The options of d_LLV, defined and validated once for every layer that computes it:
    :func:`llv_distance`, :func:`~lightning_repsim.functional.compare`, the metrics
    :class:`~lightning_repsim.metrics.LLVDistance` and :class:`~lightning_repsim.metrics.SVDDissimilarity`, and
    the ``metric_kwargs`` of :class:`~lightning_repsim.ReferenceComparison`. They are passed as keyword arguments.

    Attributes:
        lam: weight of the scale terms T3, T4 (1e-5 in the paper).
        reduce: ``"max"`` (paper) or ``"mean"`` over the entries of T1, T3, T4 (T2 is always a max).
        combine: ``"max"`` (paper: ``max(T1, T2, lam*T3, lam*T4)``) or ``"sum"`` (``T1 + T2 + lam*(T3 + T4)``).
        label_pivot, leave_out: fix the label set (label indices); otherwise both are searched (SPEC §3).
        labels: optional subset of label indices (at least 3). d_LLV is then computed for the models
            restricted to these labels (log-probabilities still normalised over all K): an *estimate* for
            vocabularies too large for the full ``2K x 2K`` statistic, reported in ``result.labels``.
        pivot_candidates: optional labels to search as pivots (default: see ``max_pivot_candidates``).
        max_pivot_candidates: search at most this many pivots, the labels with the largest mean
            log-probability over both models (ties: smaller label); the left-out label is still searched
            over all labels. None (default) is the route's default: all K pivots on the logits route
            (:func:`llv_distance`, :class:`~lightning_repsim.metrics.LLVDistance`; O(K^2) time, in chunks);
            on the representation route (:class:`~lightning_repsim.metrics.SVDDissimilarity`, ``compare`` at
            large K; O(P K M) time) all K while that costs under about 2^31 flops, else as many as that
            allows but at least 128 (K = 8,192, M = 128: 128). A restricted search is reported as
            ``label_search == "restricted"`` with ``num_pivots_searched``.
        input_sets: optional (S, M+1) candidate input sets, first column the pivot input ``x0``: row
            indices for the functional core, input ids (``update(..., ids=...)``) for the metrics. The
            chosen set is the true argmin of T2 over them.
        num_input_sets: candidate sets drawn (seeded) when ``input_sets`` is None (default 200).
        input_set_search: how the input set is chosen when ``input_sets`` is None: ``"optimise"`` (default) starts
            from the sampled sets and finds, for a set of pivots (all candidate inputs when that is cheap), the exact
            best partners of each, which only ever lowers T2 (:mod:`~lightning_repsim.functional.input_search`);
            ``"sample"`` keeps the best sampled set (the authors' procedure). Either way, sets whose inputs repeat a
            content are never chosen, and ``result.search`` says what the search did.
        seed: seed of the draws (candidate sets, label subsets for d_SVD, the metrics' hash).

    Example:
        >>> LLVOptions(reduce="mean").reduce
        'mean'
        >>> LLVOptions(lam=-1.0)
        Traceback (most recent call last):
        ...
        ValueError: `lam` must be a finite number >= 0, got -1.0
    """

    lam: float = 1e-5
    reduce: str = "max"
    combine: str = "max"
    label_pivot: int | None = None
    leave_out: int | None = None
    labels: Tensor | None = field(default=None, repr=False)
    pivot_candidates: Tensor | None = field(default=None, repr=False)
    max_pivot_candidates: int | None = None
    input_sets: Tensor | None = field(default=None, repr=False)
    num_input_sets: int = 200
    input_set_search: str = "optimise"
    seed: int = 0

    def __post_init__(self) -> None:
        set_ = partial(object.__setattr__, self)
        lam = float(self.lam) if isinstance(self.lam, (int, float)) and not isinstance(self.lam, bool) else float("nan")
        if not (lam >= 0 and lam < float("inf")):
            raise ValueError(f"`lam` must be a finite number >= 0, got {self.lam!r}")
        set_("lam", lam)
        check_choice(self.reduce, "reduce", REDUCTIONS)
        check_choice(self.combine, "combine", COMBINATIONS)
        set_("label_pivot", check_label_index(self.label_pivot, "label_pivot"))
        set_("leave_out", check_label_index(self.leave_out, "leave_out"))
        if self.label_pivot is not None and self.label_pivot == self.leave_out:
            raise ValueError(f"`label_pivot` and `leave_out` must differ, both are {self.label_pivot}")
        set_("labels", _label_list(self.labels, "labels", minimum=3))
        set_("pivot_candidates", _label_list(self.pivot_candidates, "pivot_candidates", minimum=1))
        if self.max_pivot_candidates is not None:
            check_positive_int(self.max_pivot_candidates, "max_pivot_candidates")
        if self.input_sets is not None:
            set_("input_sets", check_input_sets(self.input_sets))
        check_positive_int(self.num_input_sets, "num_input_sets")
        check_choice(self.input_set_search, "input_set_search", INPUT_SET_SEARCHES)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"`seed` must be an int, got {self.seed!r}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names (the keyword arguments every d_LLV entry point accepts)."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def split(cls, kwargs: dict[str, Any]) -> tuple[LLVOptions, dict[str, Any]]:
        """``(LLVOptions of the d_LLV keywords in kwargs, the other keywords)``."""
        names = set(cls.names())
        return cls(**{k: v for k, v in kwargs.items() if k in names}), {k: v for k, v in kwargs.items() if k not in names}

    def replace(self, **changes: Any) -> LLVOptions:
        return LLVOptions(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})

    def resolve(self, k: int) -> ResolvedLabels:
        """The label options checked against K and expressed as positions among the compared labels."""
        labels = self.labels
        if labels is not None:
            if int(labels.max()) >= k:
                raise ValueError(f"`labels` must be label indices in [0, {k}), got {int(labels.max())}")
            position = torch.full((k,), -1, dtype=torch.long)
            position[labels] = torch.arange(labels.numel())
        else:
            position = None

        def locate(value: int | None, name: str) -> int | None:
            if value is None:
                return None
            check_label_index(value, name, k)
            if position is None:
                return value
            if int(position[value]) < 0:
                raise ValueError(f"`{name}`={value} is not among the `labels` the distance is computed on")
            return int(position[value])

        pivots = self.pivot_candidates
        if pivots is not None:
            if int(pivots.max()) >= k:
                raise ValueError(f"`pivot_candidates` must be label indices in [0, {k}), got {int(pivots.max())}")
            if position is not None:
                if bool((position[pivots] < 0).any()):
                    raise ValueError("`pivot_candidates` must be among the `labels` the distance is computed on")
                pivots = position[pivots]
        return ResolvedLabels(labels, locate(self.label_pivot, "label_pivot"), locate(self.leave_out, "leave_out"), pivots)


def _label_list(value: Any, name: str, minimum: int) -> Tensor | None:
    """Distinct non-negative label indices as a sorted CPU LongTensor (None stays None)."""
    if value is None:
        return None
    t = torch.as_tensor(value)
    if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"`{name}` must hold integer label indices, got dtype {t.dtype}")
    t = t.detach().to("cpu", torch.long).flatten()
    if t.numel() and bool((t < 0).any()):
        raise ValueError(f"`{name}` must hold non-negative label indices")
    unique = torch.unique(t)
    if unique.numel() != t.numel():
        raise ValueError(f"`{name}` must hold distinct label indices")
    if unique.numel() < minimum:
        raise ValueError(f"`{name}` must hold at least {minimum} label indices, got {unique.numel()}")
    return unique


@dataclass(frozen=True)
class ResolvedLabels:
    """:meth:`LLVOptions.resolve`: ``labels`` (None = all K) and positions among them."""

    labels: Tensor | None
    label_pivot: int | None
    leave_out: int | None
    pivot_candidates: Tensor | None

    def original(self, positions: Tensor | int) -> Tensor | int:
        """Label indices of positions among the compared labels."""
        if self.labels is None:
            return positions
        if isinstance(positions, int):
            return int(self.labels[positions])
        return self.labels.to(positions.device)[positions]


@dataclass(frozen=True)
class LLVResult:
    """Everything d_LLV computed (:func:`llv_distance`, ``LLVDistance.compute_result()``, the ``llv`` of the
    d_SVD results). Tensors are float64 scalars unless noted.

    Attributes:
        value: d_LLV, ``max(T1, T2, lam*T3, lam*T4)`` (``combine="max"``) or
            ``T1 + T2 + lam*(T3 + T4)`` (``combine="sum"``).
        t1, t2, t3, t4: the four terms (``reduce`` of their entries; T2 is always a max).
        t1_terms: ``2(K-2)`` entries, ``a(y)`` for the kept labels in label order, then ``a_piv(y)``.
        t2_terms: ``2M`` entries, ``b(i)`` for ``i = 1..M`` then ``b_piv(i)``.
        t3_terms: ``|sigma_p(y) - sigma_q(y)|`` for the kept labels.  t4_terms: ``|tau_p(i) - tau_q(i)|``.
        label_pivot, leave_out: the label set (pivot ``y0`` and left-out label), label indices.
        kept_labels: the labels compared besides the pivot (LongTensor, increasing).
        input_set: ``M+1`` inputs, the first is the pivot input ``x0`` (LongTensor): row indices, or input
            ids / buffer positions for the metrics.
        chosen_candidate: index of ``input_set`` among ``candidate_sets``.
        candidate_sets, candidate_scores: the candidate input sets and their T2 (``inf`` = invalid).
        label_search: ``"full"`` (all pivots and left-out labels searched), ``"given"`` (both given),
            ``"partial"`` (one given) or ``"restricted"`` (a bounded list of pivots searched).
        num_pivots_searched: how many pivots the label search evaluated.
        labels: the label subset the distance was computed on (an estimate), or None for all K labels.
        search: how the input set was chosen (a dict: ``method`` "optimise"/"sample"/"given", the sampled sets and
            the best sampled T2, pivots evaluated, whether all were, rounds, whether it converged, the number of
            distinct candidate inputs). An optimised set better than every sampled one is the last candidate set.
        num_inputs, num_labels, rep_dim, lam, reduce, combine: the configuration (``num_labels`` = K of
            the models, whatever ``labels``).
    """

    value: Tensor
    t1: Tensor
    t2: Tensor
    t3: Tensor
    t4: Tensor
    t1_terms: Tensor
    t2_terms: Tensor
    t3_terms: Tensor
    t4_terms: Tensor
    label_pivot: int
    leave_out: int
    kept_labels: Tensor
    input_set: Tensor
    chosen_candidate: int
    candidate_sets: Tensor = field(repr=False)
    candidate_scores: Tensor = field(repr=False)
    label_search: str
    num_pivots_searched: int
    labels: Tensor | None
    search: dict = field(repr=False)
    num_inputs: int
    num_labels: int
    rep_dim: int
    lam: float
    reduce: str
    combine: str

    def as_dict(self) -> dict[str, float | int]:
        """Scalar summary under the keys the callback logs: floats, and the label set as ints."""
        return {
            "d_llv": float(self.value),
            "llv_t1": float(self.t1),
            "llv_t2": float(self.t2),
            "llv_t3": float(self.t3),
            "llv_t4": float(self.t4),
            "label_pivot": self.label_pivot,
            "leave_out": self.leave_out,
        }
