"""One d_LLV pipeline for both routes (SPEC §3, §6).

A *route* is where d_LLV's statistics come from: the **logits route** (:class:`LogitsRoute`: log-probabilities and
the covariance of ``[l_p; l_q - l_p]``, O(K^2)) or the **representation route**
(:class:`~lightning_repsim.functional.llv_representation.RepresentationRoute`: embeddings, unembeddings and an
O((M_p + M_q)^2) covariance, any K). A route answers four questions, and :func:`llv_from_route` turns the answers
into an :class:`~lightning_repsim.functional.LLVResult` the same way for both, for the functional core and the
streaming metrics alike:

* ``label_cov(pivots)``: the parts of the label covariance the label terms T1, T3 need
  (:class:`~lightning_repsim.functional.llv_terms.LabelCov`), for a chunk of pivot labels;
* ``label_means()``: every label's mean log-probability under both models (which pivots a bounded search tries);
* ``set_entries(positions)``: the term-2/term-4 entries of candidate input sets (row positions of the candidate rows);
* ``pair_statistics()``: what the input-set search needs (:class:`~lightning_repsim.functional.input_search.PairStatistics`),

plus ``content``, the candidate rows' content (inputs with the same content count once). Which sets are tried is
decided once, in :func:`select_or_search`: the given ``input_sets`` as they are, else the search of
:mod:`~lightning_repsim.functional.input_search`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from lightning_repsim.functional.input_search import (
    PairStatistics,
    SearchInfo,
    distinct_contents,
    is_exhaustive,
    search_input_set,
    set_scores,
)
from lightning_repsim.functional.llv_labels import LabelCov, LabelPart, label_cov_from_blocks, label_part
from lightning_repsim.functional.llv_options import LLVOptions, LLVResult, ResolvedLabels
from lightning_repsim.functional.llv_terms import InputPart, select_input_set, set_entries

__all__ = ["Candidates", "LLVRoute", "LLVSizes", "LogitsRoute", "choose_pivots", "llv_from_route", "select_or_search"]


class LLVRoute:
    """What d_LLV needs from a route (see the module docstring). ``num_labels``: the labels compared (K, or the size
    of ``labels``); ``pivot_budget``: the route's default ``max_pivot_candidates``."""

    num_labels: int
    device: torch.device
    content: Tensor
    pivot_budget: int | None = None

    def label_cov(self, pivots: Tensor) -> LabelCov:
        raise NotImplementedError

    def label_means(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def set_entries(self, positions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def pair_statistics(self) -> PairStatistics:
        raise NotImplementedError


class LogitsRoute(LLVRoute):
    """The logits route: the three K x K blocks ``Cov(X)``, ``Cov(X, D)``, ``Cov(D)`` of ``X = l_p``,
    ``D = l_q - l_p`` over the inputs, the mean log-probabilities, and the candidate inputs' log-probability rows."""

    def __init__(self, blocks: tuple[Tensor, Tensor, Tensor], means: tuple[Tensor, Tensor], lp_rows: Tensor,
                 lq_rows: Tensor) -> None:
        self.blocks, self.means = blocks, means
        self.lp_rows, self.lq_rows = lp_rows, lq_rows
        self.num_labels = int(blocks[0].shape[0])
        self.device = blocks[0].device
        self.content = torch.cat([lp_rows, lq_rows], 1)

    @classmethod
    def from_log_probabilities(cls, lp: Tensor, lq: Tensor) -> LogitsRoute:
        """All N inputs' log-probabilities (N, K): two-pass centred covariance blocks; every input is a candidate."""
        mean_p, diff = lp.mean(dim=0), lq - lp
        xc, dc = lp - mean_p, diff - diff.mean(dim=0)
        scale = 1.0 / (lp.shape[0] - 1)
        blocks = ((xc.T @ xc) * scale, (xc.T @ dc) * scale, (dc.T @ dc) * scale)
        return cls(blocks, (mean_p, lq.mean(dim=0)), lp, lq)

    @classmethod
    def from_moments(cls, mean: Tensor, cov: Tensor, lp_rows: Tensor, lq_rows: Tensor) -> LogitsRoute:
        """The streamed mean and covariance of ``[l_p; l_q - l_p]`` (2K) and the buffered candidates' rows."""
        k = cov.shape[0] // 2
        blocks = (cov[:k, :k], cov[:k, k:], cov[k:, k:])
        return cls(blocks, (mean[:k], mean[:k] + mean[k:]), lp_rows, lq_rows)

    def label_cov(self, pivots: Tensor) -> LabelCov:
        return label_cov_from_blocks(*self.blocks, pivots)

    def representation_dim(self) -> int:
        """``max(r_p, r_q)``: the larger rank over inputs of the two models' log-probabilities centred over labels
        (``l(y|x) - mean_y l(y|x) = c(W) f(x) + c(b)``: the log-partition cancels), i.e. the rank of their embeddings
        as their logits see them (:mod:`~lightning_repsim.functional.subspace`'s threshold)."""
        from lightning_repsim.functional.subspace import RANK_RTOL

        sxx, sxd, sdd = self.blocks
        ranks = []
        for cov in (sxx, sxx + sxd + sxd.T + sdd):
            centred = cov - cov.mean(0, keepdim=True)
            centred = centred - centred.mean(1, keepdim=True)
            values = torch.linalg.eigvalsh(centred)
            top = values[-1]
            ranks.append(int((values > RANK_RTOL * top).sum()) if bool(top > 0) else 0)
        if max(ranks) < 1:
            raise ValueError("the log-probabilities are constant over the inputs for both models: there is no "
                             "representation to compare (rep_dim cannot be inferred)")
        return max(ranks)

    def label_means(self) -> tuple[Tensor, Tensor]:
        return self.means

    def set_entries(self, positions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return set_entries(self.lp_rows, self.lq_rows, positions)

    def pair_statistics(self) -> PairStatistics:
        return PairStatistics.from_log_probabilities(self.lp_rows, self.lq_rows)


@dataclass(frozen=True)
class Candidates:
    """Candidate input sets: ``sets`` (S, M+1) of row positions of the route's candidate rows (pivot first), given
    (``given``: evaluated as they are) or drawn; ``row_ids`` say how the result reports rows (input ids), None for
    row positions."""

    sets: Tensor
    given: bool = False
    row_ids: Tensor | None = None

    def report(self, positions: Tensor) -> Tensor:
        return positions if self.row_ids is None else self.row_ids[positions]


@dataclass(frozen=True)
class LLVSizes:
    """``num_inputs`` N, ``num_labels`` K of the models (whatever ``labels``), ``rep_dim`` M."""

    num_inputs: int
    num_labels: int
    rep_dim: int


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


def select_or_search(route: LLVRoute, candidates: Candidates, options: LLVOptions) -> tuple[InputPart, SearchInfo | None, Tensor]:
    """``(InputPart, SearchInfo or None, chosen set as row positions)``: the given sets evaluated as they are, or the
    input-set search (``options.input_set_search``) started from the drawn sets. Sets whose members repeat a content
    are not diversity sets and are never chosen."""
    sets = candidates.sets
    if candidates.given:
        inputs = select_input_set(*route.set_entries(sets), candidates.report(sets), options.reduce)
        return inputs, None, sets[inputs.chosen_candidate]
    set_size = sets.shape[1]
    ids, first, count = distinct_contents(route.content)
    if count < set_size:
        raise ValueError(
            f"only {count} candidate input(s) with distinct content (log-probabilities or embeddings), but an input set "
            f"needs M+1 = {set_size} distinct inputs: update() with more distinct inputs (repeated rows, e.g. the first "
            "token of every sequence, count once)"
        )
    member_ids = ids[sets].sort(dim=1).values
    repeated = (member_ids[:, 1:] == member_ids[:, :-1]).any(dim=1)
    stats = route.pair_statistics() if options.input_set_search == "optimise" else None
    exhaustive = None  # the exhaustive search's report, when it ran and found no diverse set
    if stats is not None and is_exhaustive(stats, first):  # the argmin over all sets: the sampled sets decide nothing
        scores = set_scores(stats, sets).masked_fill(repeated, float("inf"))
        best, exhaustive = search_input_set(stats, set_size, sets, scores, first)
        if best is not None:
            found = select_input_set(*route.set_entries(best[None]), candidates.report(best[None]), options.reduce)
            positions = torch.cat([sets, best[None]])
            inputs = replace(found, chosen_candidate=int(sets.shape[0]), candidate_sets=candidates.report(positions),
                             candidate_scores=torch.cat([scores, found.candidate_scores]))
            return inputs, exhaustive, best
    b, b_piv, t4, valid = route.set_entries(sets)  # the exact entries of the sampled sets
    valid = valid & ~repeated[:, None]
    scores = torch.where(valid.all(1), torch.maximum(b.amax(1), b_piv.amax(1)), torch.full_like(b[:, 0], float("inf")))
    info = SearchInfo(method="sample", sampled_sets=int(sets.shape[0]), sampled_best=float(scores.min()),
                      pivots_evaluated=0, exhaustive=False, rounds=0, converged=True, distinct_candidates=count)
    positions = sets
    if exhaustive is not None:  # no diverse set among all of them: the best sampled set, not a second search
        info = replace(exhaustive, sampled_best=info.sampled_best)
    elif stats is not None:
        best, info = search_input_set(stats, set_size, sets, scores, first)
        if best is not None:  # strictly better than every sampled set: appended as the last candidate
            extra = route.set_entries(best[None])
            positions = torch.cat([sets, best[None]])
            b, b_piv, t4, valid = (torch.cat([x, y]) for x, y in zip((b, b_piv, t4, valid), extra))
    inputs = select_input_set(b, b_piv, t4, valid, candidates.report(positions), options.reduce)
    return inputs, info, positions[inputs.chosen_candidate]


def combine_terms(t1: Tensor, t2: Tensor, t3: Tensor, t4: Tensor, lam: float, combine: str) -> Tensor:
    if combine == "max":
        return torch.stack([t1, t2, lam * t3, lam * t4]).amax()
    return t1 + t2 + lam * (t3 + t4)


def llv_result(labels: LabelPart, inputs: InputPart, resolved: ResolvedLabels, sizes: LLVSizes, options: LLVOptions,
               search: SearchInfo | None = None) -> LLVResult:
    """Assemble an :class:`LLVResult` from its label and input parts; label positions are mapped back to label
    indices."""
    from_labels = {name: getattr(labels, name) for name in ("t1", "t3", "t1_terms", "t3_terms")}
    from_inputs = {name: getattr(inputs, name) for name in ("t2", "t4", "t2_terms", "t4_terms", "input_set",
                                                             "chosen_candidate", "candidate_sets", "candidate_scores")}
    label_set = {name: resolved.original(getattr(labels, name)) for name in ("label_pivot", "leave_out", "kept_labels")}
    report = {"method": "given", **({} if search is None else search.as_dict()), "label_pivots_refined": labels.refined_pivots}
    return LLVResult(
        value=combine_terms(labels.t1, inputs.t2, labels.t3, inputs.t4, options.lam, options.combine),
        **from_labels, **from_inputs, **label_set, label_search=labels.search, num_pivots_searched=labels.num_pivots,
        labels=resolved.labels, search=report, num_inputs=sizes.num_inputs, num_labels=sizes.num_labels,
        rep_dim=sizes.rep_dim, lam=options.lam, reduce=options.reduce, combine=options.combine,
    )


def llv_from_route(route: LLVRoute, candidates: Candidates, options: LLVOptions, resolved: ResolvedLabels,
                   sizes: LLVSizes) -> tuple[LLVResult, Tensor]:
    """d_LLV from a route: the label set (searched unless given), the input set (:func:`select_or_search`), the terms.
    Returns the result and the chosen input set as row positions of the candidate rows."""
    budget = options.max_pivot_candidates if options.max_pivot_candidates is not None else route.pivot_budget
    pivots = choose_pivots(*route.label_means(), resolved, budget)
    labels = label_part(route.label_cov, route.num_labels, route.device, options.reduce,
                        (resolved.label_pivot, resolved.leave_out), pivots, refine=resolved.pivot_candidates is None)
    inputs, search, chosen = select_or_search(route, candidates, options)
    return llv_result(labels, inputs, resolved, sizes, options, search), chosen
