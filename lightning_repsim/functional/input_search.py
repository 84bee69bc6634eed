"""Choosing the input set of d_LLV: the exact argmin of T2, whatever the seed (SPEC §3, term 2).

Term 2 is evaluated on an input set ``(x0; x1..xM)`` chosen as the argmin of T2. Its entries ``b(i)``, ``b_piv(i)``
depend only on the pair ``(x_i, x0)`` (the normalisers ``tau(i)`` too), so

    T2(set) = max_i e(x_i; x0),    e(x; x0) = max(b, b_piv) for the pair,

and for a fixed pivot ``x0`` the best set is exactly the ``M`` inputs with the smallest pair scores. The pair score is
symmetric (``e(x; x0) = e(x0; x)``: swapping the two inputs swaps ``b`` and ``b_piv``) and needs only the two rows,
through inner products of their log-probability vectors over labels. Those vectors span few dimensions for the model
family of SPEC §1 (``2M + 2`` at most from embeddings, the rank of the log-probabilities otherwise; K at worst), so the
search works on low-rank factors ``A``, ``S`` of both models' centred rows (R x D): one score costs O(D).

``input_set_search="optimise"`` (the default):

* **exhaustive** when scoring all ``R (R - 1) / 2`` pairs of the R distinct candidate inputs costs at most
  :data:`EXHAUSTIVE_BUDGET` (about ``R^2 (D + 20)`` operations: N = 10,000 inputs with D up to about 1,300). The pairs
  are scored in blocks (memory O(R L + block^2), never R x R), each row keeping its ``L`` best partners. The result is
  the argmin of T2 over all sets of distinct candidate inputs: it does not depend on ``seed`` at all;
* beyond the budget, a local search: the pivots of the best sampled sets, then the members of the best set found, round
  after round while that improves T2 (at most :data:`MAX_PIVOTS` pivots); never above the best sampled set, but
  seed-dependent (``result.search["exhaustive"]`` is False).

Ties within ``TIE_RTOL`` go to the smallest pivot (row position). Candidate inputs with identical content (identical
log-probabilities under both models, e.g. the first token of every sequence) count once: a set never holds two of them.
The chosen set's members must also be *diverse* (the diversity condition): their displacements from the pivot span, for
each model, as many dimensions as they can -- ``M``, or the model's own rank when that is lower (a smaller student) --
so when the ``M`` best partners are not, partners are taken in order of their score as long as they add a dimension.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_repsim.functional.llv_terms import TIE_RTOL
from lightning_repsim.functional.pair_scores import (
    PairStatistics,
    PivotTable,
    all_pivots,
    evaluate_pivots,
    exhaustive_cost,
    partner_width,
)

__all__ = [
    "EXHAUSTIVE_BUDGET",
    "MAX_PIVOTS",
    "PairStatistics",
    "PivotTable",
    "SearchInfo",
    "all_pivots",
    "distinct_contents",
    "evaluate_pivots",
    "is_exhaustive",
    "search_input_set",
    "set_scores",
]

#: Pair-scoring work (about ``R^2 / 2 * (2 D + 40)`` operations for R distinct candidates of dimension D) up to which the
#: search is exhaustive: N = 10,000 inputs with D up to about 1,350; the metrics' buffer of 1,024 inputs for any D below
#: 130,000. About 5 s of one CPU core at the limit, well under a second for D <= 100.
EXHAUSTIVE_BUDGET = 2**37
#: Pivots evaluated at most by the local search (beyond the budget).
MAX_PIVOTS = 32
_INITIAL_PIVOTS = 8
_MAX_ROUNDS = 8


@dataclass(frozen=True)
class SearchInfo:
    """What the input-set search did (``LLVResult.search``): the method, the sampled sets and the best of them, the
    pivots evaluated, whether the search was ``exhaustive`` (every pair of distinct candidates scored: the result does
    not depend on the seed; also reported as ``all_pivots``), the local search's rounds and whether it converged, and the
    number of distinct candidate inputs."""

    method: str
    sampled_sets: int
    sampled_best: float
    pivots_evaluated: int
    exhaustive: bool
    rounds: int
    converged: bool
    distinct_candidates: int

    def as_dict(self) -> dict[str, float | int | bool | str]:
        return {**self.__dict__, "all_pivots": self.exhaustive}


def _local_search(stats: PairStatistics, m: int, sampled_sets: Tensor,
                  sampled_scores: Tensor) -> tuple[PivotTable | None, int, bool]:
    """The pivots of the best sampled sets, then the members of the best set found, while that improves T2."""
    order = torch.argsort(sampled_scores.masked_fill(~torch.isfinite(sampled_scores), float("inf")), stable=True)
    start: list[int] = []
    for index in order.tolist():
        pivot = int(sampled_sets[index, 0])
        if pivot >= 0 and pivot not in start:
            start.append(pivot)
        if len(start) >= _INITIAL_PIVOTS:
            break
    if not start:
        return None, 0, True
    table = evaluate_pivots(stats, torch.tensor(start, device=stats.a.device), m)
    rounds = 0
    while rounds < _MAX_ROUNDS and table.pivots.numel() < MAX_PIVOTS:
        rounds += 1
        before, row = table.leader()
        if not math.isfinite(before):
            break
        seen = set(table.pivots.tolist())
        fresh = [p for p in table.partners[row, :m].tolist() if p not in seen][: MAX_PIVOTS - table.pivots.numel()]
        if fresh:
            table = table.cat(evaluate_pivots(stats, torch.tensor(fresh, device=stats.a.device), m))
        if not fresh or not table.leader()[0] < before - TIE_RTOL * abs(before):
            return table, rounds, True
    return table, rounds, False


def is_exhaustive(stats: PairStatistics, distinct: Tensor) -> bool:
    """Whether the search scores every pair of the distinct candidates (within :data:`EXHAUSTIVE_BUDGET`)."""
    return exhaustive_cost(int(distinct.sum()), stats.dim) <= EXHAUSTIVE_BUDGET


def set_scores(stats: PairStatistics, sets: Tensor) -> Tensor:
    """T2 of candidate sets (S, M+1; pivot first) from the pair scores (inf for an invalid pair): a cheap account of
    the sampled sets when the search is exhaustive and they decide nothing (their exact entries would cost a Gram
    matrix of every row they use). Each set's pivot is scored against its own members only."""
    if sets.shape[0] == 0:
        return sets.new_zeros(0, dtype=torch.float64)
    return stats.member_squared_scores(sets[:, 0], sets[:, 1:]).amax(dim=1).clamp_min(0).sqrt()


def search_input_set(
    stats: PairStatistics, set_size: int, sampled_sets: Tensor, sampled_scores: Tensor, distinct: Tensor,
) -> tuple[Tensor | None, SearchInfo]:
    """``(best set or None, info)``: the best set (row positions, pivot first) found by the search of the module
    docstring; None when the local search found nothing better than the best sampled set (``sampled_scores``: T2 of
    ``sampled_sets``, inf for invalid or repeated-content sets). ``distinct``: a mask of the first row of each
    content; only those rows take part."""
    m = set_size - 1
    rows = torch.nonzero(distinct).flatten()
    local = stats.select(rows)
    sampled_best = float(sampled_scores.min()) if sampled_scores.numel() else float("inf")
    exhaustive = is_exhaustive(stats, distinct)
    rounds, converged = 0, True
    if exhaustive:
        table: PivotTable | None = all_pivots(local, m)
    else:  # the sampled sets' pivots as positions among the distinct rows (-1: not a first row of its content)
        position = torch.full((stats.num_rows,), -1, dtype=torch.long, device=rows.device)
        position[rows] = torch.arange(rows.numel(), device=rows.device)
        table, rounds, converged = _local_search(local, m, position[sampled_sets], sampled_scores)
    info = SearchInfo(
        method="optimise", sampled_sets=int(sampled_sets.shape[0]), sampled_best=sampled_best,
        pivots_evaluated=0 if table is None else int(table.pivots.numel()), exhaustive=exhaustive, rounds=rounds,
        converged=converged, distinct_candidates=int(rows.numel()),
    )
    best = None if table is None else _best_diverse_set(local, table, m)
    if best is None:
        return None, info
    chosen = rows[best[1]]
    if exhaustive:  # the argmin over every set: the sampled sets do not enter (the result is seed-free)
        return chosen, info
    if not best[0] < sampled_best - TIE_RTOL * abs(sampled_best):
        return None, info
    return chosen, info


def _best_diverse_set(stats: PairStatistics, table: PivotTable, m: int) -> tuple[float, Tensor] | None:
    """The evaluated pivot whose best diverse set has the smallest T2: pivots in order of their unconstrained T2 (a
    lower bound), until that bound exceeds the best found. Ties within TIE_RTOL go to the smallest pivot, whatever the
    rounding of the two values (a per-input offset of the logits must not change the chosen set)."""
    best: tuple[float, Tensor] | None = None
    best_pivot = -1
    order = torch.argsort(table.pivots)  # by pivot, then stably by T2
    order = order[torch.argsort(table.t2[order], stable=True)]
    t2s, pivots = table.t2[order].tolist(), table.pivots[order].tolist()
    for row, value, pivot in zip(order.tolist(), t2s, pivots):
        if not value < float("inf") or (best is not None and value > best[0] + TIE_RTOL * abs(best[0])):
            break
        partners, scores = table.partners[row], table.scores[row]
        members = partners[:m]
        if not stats.rank_ok(pivot, members):
            if partners.numel() < partner_width(m, stats.num_rows):  # the exhaustive scan kept only the M best
                more = evaluate_pivots(stats, partners.new_tensor([pivot]), m)
                partners, scores = more.partners[0], more.scores[0]
            chosen = _independent_members(stats, pivot, partners, scores, m)
            if chosen is None:
                continue
            members = partners[chosen]
            value = float(scores[chosen].max())
        tol = TIE_RTOL * abs(best[0]) if best is not None else 0.0
        if best is None or value < best[0] - tol or (value <= best[0] + tol and pivot < best_pivot):
            best, best_pivot = (value, torch.cat([partners.new_tensor([pivot]), members])), pivot
    return best


def _independent_members(stats: PairStatistics, pivot: int, order: Tensor, values: Tensor, m: int) -> Tensor | None:
    """Positions (into ``order``) of ``m`` partners taken in order of their score, each kept when it adds a dimension to
    the displacements of every model that can still gain one (a model's displacements span at most its affine rank),
    among the first 4 M + 8. Incremental: each candidate's displacement is orthogonalised against the kept ones (twice,
    for stability) and adds a dimension when a relative residual above ``1e-9`` remains, O(M D) per candidate; the
    chosen set is confirmed by :meth:`PairStatistics.rank_ok` (one rank computation per model)."""
    limit = min(order.numel(), 4 * m + 8)
    finite = [i for i in range(limit) if float(values[i]) < float("inf")]
    if len(finite) < m:
        return None
    index = order[finite]
    spaces = stats.displaced(pivot, index)
    capacity = list(stats.affine_ranks(m))
    bases = [torch.empty(c, space.shape[1], dtype=torch.float64, device=order.device) for c, space in zip(capacity, spaces)]
    filled = [0, 0]
    chosen: list[int] = []
    for row, position in enumerate(finite):
        residuals: list[Tensor | None] = []
        for model, space in enumerate(spaces):
            if filled[model] >= capacity[model]:
                residuals.append(None)  # saturated: any member will do for this model
                continue
            v = space[row].clone()
            norm = float(v.norm())
            if filled[model]:
                q = bases[model][: filled[model]]
                for _ in range(2):
                    v -= q.T @ (q @ v)
            rest = float(v.norm())
            if not (norm > 0 and rest > 1e-9 * norm):
                break
            residuals.append(v / rest)
        if len(residuals) < 2:
            continue
        for model, v in enumerate(residuals):
            if v is not None:
                bases[model][filled[model]] = v
                filled[model] += 1
        chosen.append(position)
        if len(chosen) == m:
            picked = torch.tensor(chosen, dtype=torch.long, device=order.device)
            return picked if stats.rank_ok(pivot, order[picked]) else None
    return None


def distinct_contents(content: Tensor) -> tuple[Tensor, Tensor, int]:
    """``(ids, first, count)``: a content id per row (equal rows, equal ids), a mask of the first row of each content,
    and the number of distinct contents. Rows are compared through two seeded random projections (float64): equal
    rows always match; different rows match only if both projections coincide exactly."""
    gen = torch.Generator().manual_seed(0)
    projection = torch.randn(content.shape[1], 2, generator=gen, dtype=torch.float64).to(content.device)
    _, ids = torch.unique(content.to(torch.float64) @ projection, dim=0, return_inverse=True)
    count = int(ids.max()) + 1 if ids.numel() else 0
    first = torch.full((count,), content.shape[0], dtype=torch.long, device=content.device)
    first.scatter_reduce_(0, ids, torch.arange(content.shape[0], device=content.device), reduce="amin")
    mask = torch.zeros(content.shape[0], dtype=torch.bool, device=content.device)
    mask[first] = True
    return ids, mask, count
