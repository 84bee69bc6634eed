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
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_repsim.functional.llv_terms import TIE_RTOL, ZERO_VAR_ULPS

__all__ = [
    "EXHAUSTIVE_BUDGET",
    "MAX_PIVOTS",
    "PairStatistics",
    "PivotTable",
    "SearchInfo",
    "distinct_contents",
    "search_input_set",
]

#: Pair-scoring work (about ``R^2 / 2 * (2 D + 40)`` operations for R distinct candidates of dimension D) up to which the
#: search is exhaustive: N = 10,000 inputs with D up to about 1,350; the metrics' buffer of 1,024 inputs for any D below
#: 130,000. About 5 s of one CPU core at the limit, well under a second for D <= 100.
EXHAUSTIVE_BUDGET = 2**37
#: Pivots evaluated at most by the local search (beyond the budget).
MAX_PIVOTS = 32
#: Rows (and columns) of a block of pair scores: 2 MB of float64, so its element-wise passes stay in cache.
PAIR_BLOCK = 512
#: Eigenvalues of the rows' Gram matrix below this fraction of the largest are dropped by the low-rank factorisation
#: (the inner products the scores need then change by about this much relative to the largest).
FACTOR_RTOL = 1e-13
_INITIAL_PIVOTS = 8
_MAX_ROUNDS = 8


def _low_rank_factors(a: Tensor, s: Tensor, weight: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """Factors ``A``, ``S`` (R x D') with ``A_i . A_j = scale * a_i W a_j^T`` (same for ``s``), ``W`` PSD (identity when
    None), D' the rank of the rows in the weighted inner product: the search's Grams then cost O(R^2 D')."""
    if weight is not None:  # W = V diag(lam) V^T: x -> x V sqrt(lam), on the range of W
        lam, vec = torch.linalg.eigh(weight)
        keep = lam > FACTOR_RTOL * lam.abs().max().clamp_min(torch.finfo(lam.dtype).tiny)
        root = vec[:, keep] * lam[keep].sqrt()
        a, s = a @ root, s @ root
    a, s = a * math.sqrt(scale), s * math.sqrt(scale)
    rows, dim = a.shape
    if 2 * rows <= dim:  # fewer rows than columns: the rows' own span, through the (2R x 2R) Gram
        return a, s
    gram = a.T @ a + s.T @ s  # the joint row space of both models' rows
    lam, vec = torch.linalg.eigh(gram)
    keep = lam > FACTOR_RTOL * lam.abs().max().clamp_min(torch.finfo(lam.dtype).tiny)
    if int(keep.sum()) >= dim:
        return a, s
    basis = vec[:, keep]
    return a @ basis, s @ basis


@dataclass
class PairStatistics:
    """What the pair scores ``e(x_i; x0)`` need for R candidate inputs.

    ``a``, ``s``: (R, D) factors whose dot products are the covariances over labels of two inputs' log-probabilities
    under model p (``a``) and model q (``s``); ``var_x``, ``cov_xd``, ``var_d``: each input's own variances over labels
    of ``l_p`` and ``l_q - l_p`` and their covariance (exact, not from the factors); ``directions_p``,
    ``directions_q``: (R, D') vectors whose differences span the diversity matrices of each model (log-probabilities,
    compared up to a constant over labels: ``center_directions``; or embeddings), for the rank checks.
    """

    a: Tensor
    s: Tensor
    var_x: Tensor
    cov_xd: Tensor
    var_d: Tensor
    directions_p: Tensor
    directions_q: Tensor
    center_directions: bool = True
    _affine_ranks: tuple[int, int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.norm_a = (self.a * self.a).sum(1)
        self.norm_s = (self.s * self.s).sum(1)
        self.var_q = self.var_x + 2 * self.cov_xd + self.var_d
        ones = torch.ones_like(self.norm_a)[:, None]
        # tau^2(z, i) = |a_z|^2 + |a_i|^2 - 2 a_z . a_i as one product of augmented factors (no element-wise passes)
        self._left = (torch.cat([self.a, self.norm_a[:, None], ones], 1), torch.cat([self.s, self.norm_s[:, None], ones], 1))
        self._right = (torch.cat([-2 * self.a, ones, self.norm_a[:, None]], 1), torch.cat([-2 * self.s, ones, self.norm_s[:, None]], 1))
        eps = torch.finfo(torch.float64).eps * ZERO_VAR_ULPS
        top = (float(v.max()) if v.numel() else 0.0 for v in (self.var_x, self.var_q))
        self._coarse = tuple(eps * 2 * max(v, 0.0) for v in top)

    @classmethod
    def from_log_probabilities(cls, lp: Tensor, lq: Tensor) -> PairStatistics:
        """For log-probability rows (R, K) of both models (the logits route)."""
        scale = 1.0 / (lp.shape[1] - 1)
        xc = lp - lp.mean(1, keepdim=True)
        d = lq - lp
        dc = d - d.mean(1, keepdim=True)
        var_x, cov_xd, var_d = (xc * xc).sum(1) * scale, (xc * dc).sum(1) * scale, (dc * dc).sum(1) * scale
        a, s = _low_rank_factors(xc, xc + dc, None, scale)
        return cls(a, s, var_x, cov_xd, var_d, lp, lq, center_directions=True)

    @classmethod
    def from_weighted(cls, a: Tensor, d: Tensor, weight: Tensor, row_moments: tuple[Tensor, Tensor, Tensor],
                      directions: tuple[Tensor, Tensor]) -> PairStatistics:
        """For coefficient rows ``a`` (model p) and ``d`` (the difference) whose covariances over labels are
        ``a_i W a_j^T`` (the representation route: ``W`` the label covariance of the unembeddings)."""
        a_f, s_f = _low_rank_factors(a, a + d, weight, 1.0)
        return cls(a_f, s_f, *row_moments, *directions, center_directions=False)

    @property
    def num_rows(self) -> int:
        return int(self.a.shape[0])

    @property
    def dim(self) -> int:
        return int(self.a.shape[1])

    def select(self, rows: Tensor) -> PairStatistics:
        """The statistics of a subset of the rows."""
        return PairStatistics(
            self.a[rows], self.s[rows], self.var_x[rows], self.cov_xd[rows], self.var_d[rows], self.directions_p[rows],
            self.directions_q[rows], self.center_directions, None,
        )

    def squared_scores(self, z: Tensor | slice, i: Tensor | slice) -> Tensor:
        """``e(x_i; x_z)^2`` for pivots ``z`` (rows) and inputs ``i`` (columns), ``inf`` where a normaliser is zero.

        With ``t = Delta / (tau_p (tau_p + tau_q))`` (``= tau_q / tau_p - 1``, written without cancellation), the compared
        quantity ``gamma X - beta D`` is ``(t X - D) / tau_q``, so ``b^2 = (Var X t^2 - 2 Cov(X, D) t + Var D) / tau_q^2``
        from the input's own moments, and ``b_piv^2`` the same with the pivot's: about twenty element-wise passes per
        block, the normalisers from two matrix products of the factors."""
        tp2 = torch.mm(self._left[0][z], self._right[0][i].T)
        tq2 = torch.mm(self._left[1][z], self._right[1][i].T)
        suspect = (tp2 <= self._coarse[0]) | (tq2 <= self._coarse[1])  # a zero normaliser is possible only here
        delta = torch.sub(tq2, tp2)
        tp = tp2.sqrt_()
        t = delta.div_(tq2.sqrt().add_(tp).mul_(tp))
        vx, c2, vd = self.var_x, 2 * self.cov_xd, self.var_d
        score = torch.mul(t, vx[i]).sub_(c2[i]).mul_(t).add_(vd[i])
        pivot = torch.mul(t, vx[z][:, None]).sub_(c2[z][:, None]).mul_(t).add_(vd[z][:, None])
        score = torch.maximum(score, pivot, out=score).div_(tq2)
        if bool(suspect.any()):  # the exact test of :func:`~lightning_repsim.functional.llv_terms.normalisers`
            rows, cols = suspect.nonzero(as_tuple=True)
            zr = torch.arange(self.num_rows, device=tq2.device)[z][rows]
            ic = torch.arange(self.num_rows, device=tq2.device)[i][cols]
            eps = torch.finfo(torch.float64).eps * ZERO_VAR_ULPS
            tp2_exact = tp[rows, cols].square()
            invalid = (tp2_exact <= eps * (vx[zr] + vx[ic])) | (tq2[rows, cols] <= eps * (self.var_q[zr] + self.var_q[ic]))
            invalid |= ~(tp2_exact > 0) | ~(tq2[rows, cols] > 0)
            score[rows[invalid], cols[invalid]] = float("inf")
        return score

    def affine_ranks(self) -> tuple[int, int]:
        """The dimension of the affine span of the rows, for each model (cached): the most dimensions a set's
        displacements can span for that model."""
        if self._affine_ranks is None:
            ranks = []
            for directions in (self.directions_p, self.directions_q):
                centred = directions - directions.mean(0, keepdim=True)
                if self.center_directions:
                    centred = centred - centred.mean(1, keepdim=True)
                ranks.append(int(torch.linalg.matrix_rank(centred)))
            self._affine_ranks = (ranks[0], ranks[1])
        return self._affine_ranks

    def displaced(self, pivot: int, members: Tensor) -> tuple[Tensor, Tensor]:
        """The members' displacements from the pivot, for each model (up to a constant over labels for
        log-probabilities)."""
        out = []
        for directions in (self.directions_p, self.directions_q):
            moved = directions[members] - directions[pivot]
            if self.center_directions:
                moved = moved - moved.mean(1, keepdim=True)
            out.append(moved.to(torch.float64))
        return out[0], out[1]

    def rank_ok(self, pivot: int, members: Tensor) -> bool:
        """Whether the members' displacements from the pivot span, for each model, ``len(members)`` dimensions, or the
        model's own affine rank when that is lower."""
        for moved, rank in zip(self.displaced(pivot, members), self.affine_ranks()):
            if int(torch.linalg.matrix_rank(moved)) < min(members.numel(), rank):
                return False
        return True


@dataclass(frozen=True)
class PivotTable:
    """Evaluated pivots (row positions), each with its ``L`` best partners in increasing score (ties: row position),
    their scores, and ``t2``: the ``M``-th best score (T2 of the pivot's best set, before the diversity check)."""

    pivots: Tensor
    partners: Tensor
    scores: Tensor
    t2: Tensor

    @staticmethod
    def from_candidates(pivots: Tensor, partners: Tensor, squared: Tensor, m: int, width: int) -> PivotTable:
        """The ``width`` best of candidate partners (P, C) with squared scores: sorted by row position, then stably
        by score, so that ties keep the smaller row first."""
        order = torch.argsort(partners, dim=1)
        partners, squared = partners.gather(1, order), squared.gather(1, order)
        order = torch.argsort(squared, dim=1, stable=True)[:, :width]
        partners, squared = partners.gather(1, order), squared.gather(1, order)
        scores = squared.clamp_min(0).sqrt()
        t2 = scores[:, m - 1] if scores.shape[1] >= m else scores.new_full((scores.shape[0],), float("inf"))
        return PivotTable(pivots, partners, scores, t2)

    def cat(self, other: PivotTable) -> PivotTable:
        return PivotTable(*(torch.cat([x, y]) for x, y in zip(
            (self.pivots, self.partners, self.scores, self.t2), (other.pivots, other.partners, other.scores, other.t2))))

    def leader(self) -> tuple[float, int]:
        """``(T2, row)`` of the best evaluated pivot; ties within ``TIE_RTOL`` go to the smallest pivot."""
        value = float(self.t2.min())
        if not math.isfinite(value):
            return value, -1
        tied = self.t2 <= value + TIE_RTOL * abs(value)
        return value, int(torch.nonzero(tied).flatten()[torch.argmin(self.pivots[tied])])


def partner_width(m: int, rows: int) -> int:
    """Partners kept per pivot: the M best and room for the diversity check (4 M + 8 in all)."""
    return max(1, min(rows - 1, 4 * m + 8))


def evaluate_pivots(stats: PairStatistics, pivots: Tensor, m: int) -> PivotTable:
    """The :class:`PivotTable` of some pivots, scored against every row (P x R scores, in chunks of pivots)."""
    width = partner_width(m, stats.num_rows)
    cols = torch.arange(stats.num_rows, device=stats.a.device)
    parts = []
    for z in pivots.split(PAIR_BLOCK):
        squared = stats.squared_scores(z, cols)
        squared[torch.arange(z.numel(), device=z.device), z] = float("inf")
        top = torch.topk(squared, min(width + 8, squared.shape[1]), dim=1, largest=False)
        parts.append(PivotTable.from_candidates(z, top.indices, top.values, m, width))
    table = parts[0]
    for part in parts[1:]:
        table = table.cat(part)
    return table


class _BestPartners:
    """Each row's ``width`` smallest squared scores seen so far (unordered, and their columns), the largest of them as a
    threshold: a block of scores is filtered against the thresholds (one comparison per score) and only the few
    entries below them are merged, instead of a top-k of every block."""

    def __init__(self, rows: int, width: int, device: torch.device) -> None:
        self.values = torch.full((rows, width), float("inf"), dtype=torch.float64, device=device)
        self.columns = torch.full((rows, width), -1, dtype=torch.long, device=device)
        self.threshold = torch.full((rows,), float("inf"), dtype=torch.float64, device=device)

    def offer(self, first_row: int, block: Tensor, first_col: int) -> None:
        span = slice(first_row, first_row + block.shape[0])
        if block.shape[1] >= self.values.shape[1] and bool(torch.isinf(self.values[span]).all()):  # nothing seen yet
            top = torch.topk(block, self.values.shape[1], dim=1, largest=False, sorted=False)
            self.values[span], self.columns[span] = top.values, top.indices + first_col
            self.threshold[span] = top.values.amax(1)
            return
        rows, cols = (block < self.threshold[span, None]).nonzero(as_tuple=True)
        if rows.numel():
            self._merge(rows + first_row, cols + first_col, block[rows, cols])

    def _merge(self, rows: Tensor, cols: Tensor, values: Tensor) -> None:
        """Merge candidate ``(row, col, value)`` triples (rows in increasing order) into the rows' best lists."""
        owners, counts = torch.unique_consecutive(rows, return_counts=True)
        slot = torch.repeat_interleave(torch.arange(owners.numel(), device=rows.device), counts)
        start = torch.cumsum(counts, 0) - counts
        position = torch.arange(rows.numel(), device=rows.device) - start[slot]
        width = int(counts.max())
        new_values = values.new_full((owners.numel(), width), float("inf"))
        new_cols = cols.new_full((owners.numel(), width), -1)
        new_values[slot, position], new_cols[slot, position] = values, cols
        all_values = torch.cat([self.values[owners], new_values], 1)
        all_cols = torch.cat([self.columns[owners], new_cols], 1)
        top = torch.topk(all_values, self.values.shape[1], dim=1, largest=False, sorted=False)
        self.values[owners] = top.values
        self.columns[owners] = all_cols.gather(1, top.indices)
        self.threshold[owners] = top.values.amax(1)


def all_pivots(stats: PairStatistics, m: int) -> PivotTable:
    """The :class:`PivotTable` of every row with its ``M`` best partners, from all pairs scored once each (the score is
    symmetric) in blocks of :data:`PAIR_BLOCK` rows: memory O(R M + block^2)."""
    r = stats.num_rows
    width = min(m, r - 1)  # the M best partners; a pivot whose best set is not diverse is re-scored for more
    best = _BestPartners(r, width, stats.a.device)
    starts = list(range(0, r, PAIR_BLOCK))
    for bi, zi in enumerate(starts):
        z = slice(zi, min(r, zi + PAIR_BLOCK))
        for ci in starts[bi:]:
            block = stats.squared_scores(z, slice(ci, min(r, ci + PAIR_BLOCK)))
            if ci == zi:
                block.fill_diagonal_(float("inf"))
            best.offer(zi, block, ci)
            if ci != zi:
                best.offer(ci, block.T, zi)
    return PivotTable.from_candidates(torch.arange(r, device=stats.a.device), best.columns, best.values, m, width)


def exhaustive_cost(rows: int, dim: int) -> int:
    """The work of scoring all pairs of ``rows`` candidates of dimension ``dim`` (compared with
    :data:`EXHAUSTIVE_BUDGET`)."""
    return rows * (rows - 1) // 2 * (2 * dim + 40)


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


def _local_search(stats: PairStatistics, m: int, sampled_sets: Tensor, sampled_scores: Tensor) -> tuple[PivotTable | None, int, bool]:
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
    exhaustive = exhaustive_cost(local.num_rows, local.dim) <= EXHAUSTIVE_BUDGET
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
    capacity = [min(m, rank) for rank in stats.affine_ranks()]
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
