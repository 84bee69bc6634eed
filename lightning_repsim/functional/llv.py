"""The log-likelihood variance distance d_LLV (SPEC §3): options, result and the functional entry point.

Two routes feed the same formulas (:mod:`~lightning_repsim.functional.llv_terms`):

* label terms (T1, T3) and the (pivot, left-out) search come from the covariance of the
  ``2K``-vector ``w(x) = [l_p(.|x); l_q(.|x) - l_p(.|x)]`` (log-probabilities ``l``). Storing the
  *difference* of the two models rather than ``l_q`` keeps the terms accurate when the models are
  nearly identical (distillation). Any batch split gives the same covariance (``_moments``), which is
  what makes the streaming metrics exact;
* input terms (T2, T4) need the full label vectors at the inputs of each candidate input set and
  are computed directly from them, all candidate sets in a few batched operations.

The representation route (:mod:`~lightning_repsim.functional.llv_representation`) computes the same
terms from embeddings and unembeddings for large vocabularies.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any

import torch
from torch import Tensor

from lightning_repsim.functional._validation import (
    check_choice,
    check_input_sets,
    check_label_index,
    check_logit_pair,
    check_num_inputs,
    check_num_labels,
    check_positive_int,
    check_rep_dim,
)
from lightning_repsim.functional.input_search import PairStatistics, SearchInfo, choose_input_set
from lightning_repsim.functional.llv_terms import (
    TIE_RTOL,
    InputPart,
    LabelPart,
    input_part,
    label_cov_from_blocks,
    label_part,
    set_entries,
)

__all__ = [
    "LLVOptions",
    "LLVResult",
    "TIE_RTOL",
    "choose_pivots",
    "draw_input_sets",
    "llv_distance",
    "llv_seed_spread",
    "log_probabilities",
]

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

    def as_dict(self) -> dict[str, float]:
        """Scalar summary (Python floats/ints) under the keys the callback logs."""
        return {
            "d_llv": float(self.value),
            "llv_t1": float(self.t1),
            "llv_t2": float(self.t2),
            "llv_t3": float(self.t3),
            "llv_t4": float(self.t4),
            "label_pivot": self.label_pivot,
            "leave_out": self.leave_out,
        }


def log_probabilities(logits: Tensor) -> Tensor:
    """``log softmax`` in float64 over the last dimension (the model's ``l(y|x)``).

    Example:
        >>> import torch
        >>> log_probabilities(torch.tensor([[0.0, 0.0]], dtype=torch.float16)).exp()
        tensor([[0.5000, 0.5000]], dtype=torch.float64)
    """
    return torch.log_softmax(logits.to(torch.float64), dim=-1)


def draw_input_sets(num_inputs: int, set_size: int, count: int, seed: int = 0) -> Tensor:
    """``count`` random sets of ``set_size`` distinct input indices (a seeded CPU generator, so the
    draw is the same on every run and device). Rows with a repeated index are redrawn.

    Example:
        >>> sets = draw_input_sets(100, 3, 5, seed=0)
        >>> sets.shape, bool((sets.sort(1).values.diff(dim=1) > 0).all())
        (torch.Size([5, 3]), True)
    """
    if num_inputs < set_size:
        raise ValueError(f"cannot draw sets of {set_size} distinct inputs from {num_inputs} inputs")
    if count < 1:
        raise ValueError(f"`num_input_sets` must be >= 1, got {count}")
    gen = torch.Generator().manual_seed(int(seed))
    if set_size * (set_size - 1) > 2 * num_inputs:
        # rejection below would almost never accept (e.g. M = 768 from a buffer of 1024): sample
        # without replacement instead (seeded, first element of each row is its pivot input)
        return torch.stack([torch.randperm(num_inputs, generator=gen)[:set_size] for _ in range(count)])
    sets = torch.randint(num_inputs, (count, set_size), generator=gen)
    while True:
        ordered = sets.sort(dim=1).values
        dup = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
        n_dup = int(dup.sum())
        if n_dup == 0:
            return sets
        sets[dup] = torch.randint(num_inputs, (n_dup, set_size), generator=gen)


def choose_pivots(mean_lp: Tensor, mean_lq: Tensor, resolved: ResolvedLabels, max_pivot_candidates: int | None) -> Tensor | None:
    """Pivots to search (positions among the compared labels): the given candidates, else (when there are
    more labels than ``max_pivot_candidates``) the labels with the largest mean log-probability averaged
    over both models (ties: smaller label), else all (None)."""
    k = mean_lp.numel()
    if resolved.pivot_candidates is not None:
        return resolved.pivot_candidates.to(mean_lp.device)
    if max_pivot_candidates is None or k <= max_pivot_candidates:
        return None
    score = mean_lp + mean_lq
    return torch.argsort(-score, stable=True)[:max_pivot_candidates].sort().values


def combine_terms(t1: Tensor, t2: Tensor, t3: Tensor, t4: Tensor, lam: float, combine: str) -> Tensor:
    if combine == "max":
        return torch.stack([t1, t2, lam * t3, lam * t4]).amax()
    return t1 + t2 + lam * (t3 + t4)


def llv_result(labels: LabelPart, inputs: InputPart, resolved: ResolvedLabels, n: int, k: int, m: int,
               options: LLVOptions, search: SearchInfo | None = None) -> LLVResult:
    """Assemble an :class:`LLVResult` from its label and input parts (shared with the streaming metrics);
    label positions are mapped back to label indices."""
    return LLVResult(
        value=combine_terms(labels.t1, inputs.t2, labels.t3, inputs.t4, options.lam, options.combine),
        t1=labels.t1,
        t2=inputs.t2,
        t3=labels.t3,
        t4=inputs.t4,
        t1_terms=labels.t1_terms,
        t2_terms=inputs.t2_terms,
        t3_terms=labels.t3_terms,
        t4_terms=inputs.t4_terms,
        label_pivot=resolved.original(labels.label_pivot),
        leave_out=resolved.original(labels.leave_out),
        kept_labels=resolved.original(labels.kept_labels),
        input_set=inputs.input_set,
        chosen_candidate=inputs.chosen_candidate,
        candidate_sets=inputs.candidate_sets,
        candidate_scores=inputs.candidate_scores,
        label_search=labels.search,
        num_pivots_searched=labels.num_pivots,
        labels=resolved.labels,
        search={"method": "given", **({} if search is None else search.as_dict()), "label_pivots_refined": labels.refined_pivots},
        num_inputs=n,
        num_labels=k,
        rep_dim=m,
        lam=options.lam,
        reduce=options.reduce,
        combine=options.combine,
    )


def _covariance_blocks(lp: Tensor, lq: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Two-pass centred ``Cov(X)``, ``Cov(X, D)``, ``Cov(D)`` for ``X = l_p``, ``D = l_q - l_p``: the
    three distinct blocks of the 2K x 2K covariance, 3/4 of the cost of forming all of it."""
    xc = lp - lp.mean(dim=0)
    dc = lq - lp
    dc = dc - dc.mean(dim=0)
    scale = 1.0 / (lp.shape[0] - 1)
    return (xc.T @ xc) * scale, (xc.T @ dc) * scale, (dc.T @ dc) * scale


def llv_distance(logits_p: Tensor, logits_q: Tensor, rep_dim: int, **options: Any) -> LLVResult:
    """Log-likelihood variance distance d_LLV between two models' predictive distributions.

    Args:
        logits_p, logits_q: logits of the two models on the same inputs, shape (N, K) or (..., K)
            (leading dimensions are flattened). Any float dtype and device; computed in float64.
        rep_dim: the representation dimension M; input sets have M+1 inputs.
        options: the d_LLV options of :class:`LLVOptions`: ``lam``, ``reduce``, ``combine``,
            ``label_pivot``, ``leave_out``, ``labels``, ``pivot_candidates``, ``max_pivot_candidates``,
            ``input_sets`` (row indices), ``num_input_sets``, ``seed``.

    Returns:
        :class:`LLVResult` (``.value`` is d_LLV).

    Cost: O(N K^2) for the label covariance and O(K^2) for the (pivot, left-out) search (all pairs, in
    chunks of pivots), O(S M K) for S candidate input sets; memory O(N K + K^2).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> logits = torch.randn(500, 7, generator=g, dtype=torch.float64)
        >>> shifted = logits + torch.randn(500, 1, generator=g, dtype=torch.float64)  # same p(y|x)
        >>> float(llv_distance(logits, shifted, rep_dim=2).value) < 1e-12
        True
        >>> res = llv_distance(logits, logits.flip(-1), rep_dim=2)
        >>> round(float(res.value), 3) > 0, res.input_set.shape
        (True, torch.Size([3]))
    """
    opts = LLVOptions(**options)
    rep_dim = check_rep_dim(rep_dim)
    p, q = check_logit_pair(logits_p, logits_q)
    n, k = p.shape
    resolved = opts.resolve(k)
    lp, lq = log_probabilities(p), log_probabilities(q)
    if resolved.labels is not None:
        index = resolved.labels.to(lp.device)
        lp, lq = lp.index_select(1, index), lq.index_select(1, index)
    kk = lp.shape[1]
    check_num_labels(kk)
    check_num_inputs(n, rep_dim)
    pivots = choose_pivots(lp.mean(0), lq.mean(0), resolved, opts.max_pivot_candidates)
    labels = label_part(
        partial(label_cov_from_blocks, *_covariance_blocks(lp, lq)), kk, lp.device, opts.reduce,
        resolved.label_pivot, resolved.leave_out, pivots, refine=resolved.pivot_candidates is None,
    )
    if opts.input_sets is None:
        sampled = draw_input_sets(n, rep_dim + 1, opts.num_input_sets, opts.seed).to(lp.device)
        inputs, search, _ = choose_input_set(
            partial(set_entries, lp, lq), partial(PairStatistics.from_log_probabilities, lp, lq), sampled,
            lambda positions: positions, torch.cat([lp, lq], 1), opts.input_set_search, opts.reduce,
        )
    else:
        sets = check_input_sets(opts.input_sets, rep_dim, n).to(lp.device)
        inputs, search = input_part(lp, lq, sets, sets, opts.reduce), None
    return llv_result(labels, inputs, resolved, n, k, rep_dim, opts, search)


def llv_seed_spread(logits_p: Tensor, logits_q: Tensor, rep_dim: int, seeds: Iterable[int] = range(10),
                    **options: Any) -> dict[str, float | list[float]]:
    """How much d_LLV moves with the seed of the candidate draw: :func:`llv_distance` for each seed (the other options
    as given), and the mean, standard deviation, minimum, maximum and relative spread ``(max - min) / mean`` of d_LLV
    and of T2 (the term the input set decides). With the default ``input_set_search="optimise"`` the spread is 0
    whenever every candidate input is tried as a pivot; compare with ``input_set_search="sample"``.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> z = torch.randn(300, 6, generator=g, dtype=torch.float64)
        >>> spread = llv_seed_spread(z, z + torch.randn(300, 6, generator=g, dtype=torch.float64), rep_dim=2, seeds=range(3))
        >>> spread["t2_relative_spread"]
        0.0
    """
    results = [llv_distance(logits_p, logits_q, rep_dim, **{**options, "seed": int(seed)}) for seed in seeds]
    out: dict[str, float | list[float]] = {}
    for name, values in (("d_llv", [float(r.value) for r in results]), ("t2", [float(r.t2) for r in results])):
        t = torch.tensor(values, dtype=torch.float64)
        out.update({
            f"{name}_values": values, f"{name}_mean": float(t.mean()), f"{name}_std": float(t.std()) if t.numel() > 1 else 0.0,
            f"{name}_min": float(t.min()), f"{name}_max": float(t.max()),
            f"{name}_relative_spread": float((t.max() - t.min()) / t.mean()) if float(t.mean()) else 0.0,
        })
    return out
