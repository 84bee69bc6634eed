"""Choosing the input set of d_LLV: an optimiser instead of a random draw (SPEC §3, term 2).

Term 2 is evaluated on an input set ``(x0; x1..xM)`` chosen as the argmin of T2. Its entries ``b(i)``, ``b_piv(i)``
depend only on the pair ``(x_i, x0)`` (the normalisers ``tau(i)`` too), so

    T2(set) = max_i e(x_i; x0),    e(x; x0) = max(b, b_piv) for the pair,

and for a fixed pivot ``x0`` the best set is exactly the ``M`` inputs with the smallest pair scores. The search
(``input_set_search="optimise"``, the default) therefore

1. evaluates the seeded random candidate sets (as ``"sample"`` does, and keeps the best of them);
2. for pivots -- every candidate input when that is cheap (R <= 1,024 candidate inputs and ``R^2 D <= 2^28`` for
   dimension D: the metrics' buffer), else the pivots of the best sampled sets -- takes the ``M`` best partners of
   each pivot (exact);
3. then tries the members of the best set found as pivots, round after round, while that improves T2 (at most
   :data:`MAX_PIVOTS` pivots in all);

and returns the set with the smallest T2 (ties within ``TIE_RTOL``: the first pivot in candidate order, then the
sampled sets). It is deterministic given the data and the seed, never above the best sampled set, and exact (the
argmin over all sets of distinct candidate inputs) when every pivot is evaluated. Candidate inputs with identical
content (identical log-probabilities under both models, e.g. the first token of every sequence) count once: a set
never holds two of them, and the result says how many distinct candidates there were. The chosen set's members
must also be linearly independent (the diversity condition): when the M best partners are not, partners are taken
in order of their score as long as they add a dimension.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_repsim.functional.llv_terms import CHUNK_NUMBERS, TIE_RTOL, InputPart, entries, normalisers, select_input_set

__all__ = ["MAX_PIVOTS", "PairStatistics", "SearchInfo", "choose_input_set", "distinct_contents", "search_input_set"]

#: Pivots evaluated at most by the search when not every candidate input is tried as a pivot.
MAX_PIVOTS = 32
#: Evaluate every candidate input as a pivot when there are at most ALL_PIVOTS_ROWS candidates (R) and ``R^2 D`` is at
#: most ALL_PIVOTS_BUDGET (dimension D): the metrics' buffer of 1,024 inputs for D up to 256.
ALL_PIVOTS_ROWS = 1024
ALL_PIVOTS_BUDGET = 2**28
_INITIAL_PIVOTS = 8
_MAX_ROUNDS = 8


@dataclass
class PairStatistics:
    """What the pair scores ``e(x_i; x0)`` need for R candidate inputs.

    ``a``, ``d``: (R, D) vectors whose weighted inner products ``<u, v> = u . v_w`` are the covariances over
    labels of ``l_p`` (``a``) and ``l_q - l_p`` (``d``) of two inputs (``a_w``, ``d_w``: the weighted vectors);
    ``var_x``, ``cov_xd``, ``var_d``: each input's own variances over labels of ``l_p`` and ``l_q - l_p`` and their
    covariance; ``directions_p``, ``directions_q``: (R, D') vectors whose differences span the diversity matrices
    of each model (log-probabilities, compared up to a constant over labels: ``center_directions``, or
    embeddings), for the rank check.
    """

    a: Tensor
    d: Tensor
    a_w: Tensor | None
    d_w: Tensor | None
    var_x: Tensor
    cov_xd: Tensor
    var_d: Tensor
    directions_p: Tensor
    directions_q: Tensor
    center_directions: bool = True
    scale: float = 1.0  # the weighting when ``a_w``/``d_w`` are None: ``<u, v> = scale * u . v``
    _affine_ranks: tuple[int, ...] | None = field(default=None, repr=False)  # cache of diverse_sets_exist

    @classmethod
    def from_log_probabilities(cls, lp: Tensor, lq: Tensor) -> PairStatistics:
        """For log-probability rows (R, K) of both models (the logits route)."""
        scale = 1.0 / (lp.shape[1] - 1)
        xc = lp - lp.mean(1, keepdim=True)
        d = lq - lp
        dc = d - d.mean(1, keepdim=True)
        var_x, cov_xd, var_d = (xc * xc).sum(1) * scale, (xc * dc).sum(1) * scale, (dc * dc).sum(1) * scale
        return cls(xc, dc, None, None, var_x, cov_xd, var_d, lp, lq, center_directions=True, scale=scale)

    @property
    def num_rows(self) -> int:
        return int(self.a.shape[0])

    @property
    def dim(self) -> int:
        return int(self.a.shape[1])

    def scores(self, pivots: Tensor) -> Tensor:
        """Pair scores ``e(x_i; x_z)`` (P, R) for pivots ``z``; ``inf`` where invalid (a zero normaliser) and on the
        pivot itself. Evaluated in chunks of pivots."""
        r = self.num_rows
        a_w = self.a if self.a_w is None else self.a_w
        d_w = self.d if self.d_w is None else self.d_w
        s = self.scale if self.a_w is None else 1.0
        diag_aa = (a_w * self.a).sum(1) * s
        diag_ad = (a_w * self.d).sum(1) * s
        diag_dd = (d_w * self.d).sum(1) * s
        var_q = self.var_x + 2 * self.cov_xd + self.var_d
        out = []
        step = max(1, CHUNK_NUMBERS // (8 * max(r, 1)))
        for z in pivots.split(step):
            gaa = (self.a[z] @ a_w.T).mul_(s)  # <a_z, a_i>
            gad = (self.d[z] @ a_w.T).mul_(s)  # <a_i, d_z>
            gda = (self.a[z] @ d_w.T).mul_(s)  # <d_i, a_z>
            gdd = (self.d[z] @ d_w.T).mul_(s)
            zc = z[:, None]
            tp2 = diag_aa[None, :] + diag_aa[zc] - 2 * gaa
            cad = diag_ad[None, :] - gad - gda + diag_ad[zc]
            vdd = diag_dd[None, :] + diag_dd[zc] - 2 * gdd
            delta = 2 * cad + vdd
            valid, tp, tq = normalisers(tp2, delta, self.var_x[None, :] + self.var_x[zc], var_q[None, :] + var_q[zc])
            compared = (self.var_x[None, :], self.cov_xd[None, :], self.var_d[None, :])
            reference = (self.var_x[zc], self.cov_xd[zc], self.var_d[zc])
            b, b_piv, _ = entries(valid, tp, tq, delta, compared, reference)
            score = torch.maximum(b, b_piv)
            score[torch.arange(z.numel(), device=z.device), z] = float("inf")
            out.append(score)
        return torch.cat(out) if out else self.a.new_zeros(0, r)

    def _displacement_space(self, directions: Tensor) -> Tensor:
        """The rows' displacements from their mean, as :meth:`rank_ok` compares them (centred over labels for
        log-probabilities): their rank is the dimension of the affine span of the rows, the same from every pivot."""
        centred = directions - directions.mean(0, keepdim=True)
        if self.center_directions:
            centred = centred - centred.mean(1, keepdim=True)
        return centred

    def diverse_sets_exist(self, m: int) -> bool:
        """Whether any pivot can have ``m`` partners with independent displacements for both models: the affine
        span of the rows must have dimension at least ``m`` (one rank computation per model, cached)."""
        if self._affine_ranks is None:
            spaces = (self._displacement_space(d) for d in (self.directions_p, self.directions_q))
            self._affine_ranks = tuple(int(torch.linalg.matrix_rank(space)) for space in spaces)
        return min(self._affine_ranks) >= m

    def rank_ok(self, pivot: int, members: Tensor) -> bool:
        """Whether the displacements of the members from the pivot are linearly independent for both models."""
        for directions in (self.directions_p, self.directions_q):
            displaced = directions[members] - directions[pivot]
            if self.center_directions:  # log-probabilities: displacements count up to a constant over labels
                displaced = displaced - displaced.mean(1, keepdim=True)
            if int(torch.linalg.matrix_rank(displaced)) < members.numel():
                return False
        return True


@dataclass(frozen=True)
class SearchInfo:
    """What the input-set search did (``LLVResult.search``)."""

    method: str
    sampled_sets: int
    sampled_best: float
    pivots_evaluated: int
    all_pivots: bool
    rounds: int
    converged: bool
    distinct_candidates: int

    def as_dict(self) -> dict[str, float | int | bool | str]:
        return dict(self.__dict__)


def search_input_set(
    stats: PairStatistics, set_size: int, sampled_sets: Tensor, sampled_scores: Tensor, distinct: Tensor, num_distinct: int,
) -> tuple[Tensor | None, float, SearchInfo]:
    """``(best set or None, its T2, info)``: the best set (row positions, pivot first) found by the search described
    in the module docstring, when it beats the best sampled set (``sampled_scores``: T2 of ``sampled_sets``, inf for
    invalid or repeated-content sets); None when the best sampled set is at least as good."""
    m = set_size - 1
    r = stats.num_rows
    sampled_best = float(sampled_scores.min()) if sampled_scores.numel() else float("inf")
    all_pivots = r <= ALL_PIVOTS_ROWS and r * r * stats.dim <= ALL_PIVOTS_BUDGET
    found: dict[int, tuple[float, Tensor, Tensor]] = {}  # pivot -> (T2 of its M best partners, sorted partners, scores)

    def evaluate(pivots: list[int]) -> None:
        pivots = [p for p in pivots if p not in found and bool(distinct[p])]
        if not pivots:
            return
        z = torch.tensor(pivots, dtype=torch.long, device=stats.a.device)
        scores = stats.scores(z).masked_fill(~distinct[None, :], float("inf"))
        t2 = torch.kthvalue(scores, m, dim=1).values.tolist()  # the M-th best partner; rows are sorted only when used
        for row, pivot in enumerate(pivots):
            found[pivot] = (t2[row], scores[row])

    def leader() -> tuple[float, int]:
        value, pivot = min(((v[0], p) for p, v in found.items()), default=(float("inf"), -1))
        ties = [p for p, v in found.items() if v[0] <= value + TIE_RTOL * abs(value)]
        return value, min(ties) if ties else pivot

    rounds, converged = 0, True
    if all_pivots:
        evaluate(torch.nonzero(distinct).flatten().tolist())
    else:
        finite = torch.isfinite(sampled_scores)
        order = torch.argsort(sampled_scores.masked_fill(~finite, float("inf")), stable=True)
        start: list[int] = []
        for index in order.tolist():
            pivot = int(sampled_sets[index, 0])
            if pivot not in start:
                start.append(pivot)
            if len(start) >= _INITIAL_PIVOTS:
                break
        evaluate(start)
        converged = False
        while found and rounds < _MAX_ROUNDS and len(found) < MAX_PIVOTS:
            rounds += 1
            before, pivot = leader()
            members = _sorted_partners(found, pivot)[0][:m].tolist()
            evaluate(members[: MAX_PIVOTS - len(found)])
            if not leader()[0] < before - TIE_RTOL * abs(before):
                converged = True
                break
    info = SearchInfo(
        method="optimise", sampled_sets=int(sampled_sets.shape[0]), sampled_best=sampled_best,
        pivots_evaluated=len(found), all_pivots=all_pivots, rounds=rounds, converged=converged,
        distinct_candidates=num_distinct,
    )
    best = _best_diverse_set(stats, found, m)
    if best is None or not best[0] < sampled_best - TIE_RTOL * abs(sampled_best):
        return None, sampled_best, info
    return best[1], best[0], info


def _sorted_partners(found: dict, pivot: int) -> tuple[Tensor, Tensor]:
    """``(partners, scores)`` of an evaluated pivot in increasing order of score (stable: ties by row position)."""
    ordered = torch.sort(found[pivot][1], stable=True)
    return ordered.indices, ordered.values


def _best_diverse_set(stats: PairStatistics, found: dict, m: int) -> tuple[float, Tensor] | None:
    """The evaluated pivot whose best diverse set (members with linearly independent displacements) has the
    smallest T2: pivots in order of their unconstrained T2 (a lower bound), until that bound exceeds the best."""
    best: tuple[float, Tensor] | None = None
    best_pivot = -1
    for value, pivot in sorted((v[0], p) for p, v in found.items()):
        if not value < float("inf") or (best is not None and value > best[0] + TIE_RTOL * abs(best[0])):
            break
        order, scores = _sorted_partners(found, pivot)
        members = order[:m]
        if not stats.rank_ok(pivot, members):
            if not stats.diverse_sets_exist(m):  # e.g. M above the rank of the logits: no pivot has a diverse set
                return best
            members = _independent_members(stats, pivot, order, scores, m)
            if members is None:
                continue
            pair_scores = torch.empty_like(scores).scatter_(0, order, scores)  # scores by row position
            value = float(pair_scores[members].max())
        # ties within TIE_RTOL go to the smallest pivot (row position), whatever the rounding of the two values: a
        # per-input offset of the logits must not change the chosen set
        tol = TIE_RTOL * abs(best[0]) if best is not None else 0.0
        if best is None or value < best[0] - tol or (value <= best[0] + tol and pivot < best_pivot):
            best, best_pivot = (value, torch.cat([torch.tensor([pivot], device=order.device), members])), pivot
    return best


def _independent_members(stats: PairStatistics, pivot: int, order: Tensor, values: Tensor, m: int) -> Tensor | None:
    """Partners in order of their score, each kept when it adds a dimension to the displacements of both models (at
    most 4 M + 8 tried). Incremental: each candidate's displacement is orthogonalised against the kept ones (twice,
    for stability) and kept when a relative residual above ``1e-9`` remains, O(M D) per candidate instead of a rank
    computation; the chosen set is confirmed by :meth:`PairStatistics.rank_ok` (one rank computation)."""
    candidates = [(i, v) for i, v in zip(order[: 4 * m + 8].tolist(), values[: 4 * m + 8].tolist()) if v < float("inf")]
    if len(candidates) < m:
        return None
    index = torch.tensor([i for i, _ in candidates], dtype=torch.long, device=order.device)
    spaces = []
    for directions in (stats.directions_p, stats.directions_q):
        displaced = directions[index] - directions[pivot]
        if stats.center_directions:
            displaced = displaced - displaced.mean(1, keepdim=True)
        spaces.append(displaced.to(torch.float64))
    bases = [torch.empty(m, d.shape[1], dtype=torch.float64, device=order.device) for d in spaces]
    chosen: list[int] = []
    for row in range(len(candidates)):
        residuals = []
        for basis, space in zip(bases, spaces):
            v = space[row].clone()
            norm = float(v.norm())
            if chosen:
                q = basis[: len(chosen)]
                for _ in range(2):
                    v -= q.T @ (q @ v)
            rest = float(v.norm())
            if not (norm > 0 and rest > 1e-9 * norm):
                break
            residuals.append(v / rest)
        if len(residuals) < 2:
            continue
        for basis, v in zip(bases, residuals):
            basis[len(chosen)] = v
        chosen.append(row)
        if len(chosen) == m:
            members = index[chosen]
            return members if stats.rank_ok(pivot, members) else None
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


def choose_input_set(
    entries_of: Callable[[Tensor], tuple[Tensor, Tensor, Tensor, Tensor]],
    stats: Callable[[], PairStatistics],
    sampled: Tensor,
    report: Callable[[Tensor], Tensor],
    content: Tensor,
    method: str,
    reduce: str = "max",
) -> tuple[InputPart, SearchInfo, Tensor]:
    """The input set by ``method`` (``"optimise"`` or ``"sample"``) among candidate rows with content ``content``
    (R, D): ``entries_of(positions)`` gives the term-2/term-4 entries of sets of row positions, ``stats()`` the pair
    statistics for the search, ``sampled`` the seeded random sets (S, M+1), ``report(positions)`` the sets as the
    result reports them. Sets whose members repeat a content are not diversity sets and are never chosen. Returns the
    chosen set as row positions too."""
    set_size = sampled.shape[1]
    ids, first, count = distinct_contents(content)
    if count < set_size:
        raise ValueError(
            f"only {count} candidate input(s) with distinct content (log-probabilities or embeddings), but an input set "
            f"needs M+1 = {set_size} distinct inputs: update() with more distinct inputs (repeated rows, e.g. the first "
            "token of every sequence, count once)"
        )
    b, b_piv, t4, valid = entries_of(sampled)
    member_ids = ids[sampled].sort(dim=1).values
    repeated = (member_ids[:, 1:] == member_ids[:, :-1]).any(dim=1)
    valid = valid & ~repeated[:, None]
    sampled_scores = torch.where(valid.all(1), torch.maximum(b.amax(1), b_piv.amax(1)), torch.full_like(b[:, 0], float("inf")))
    info = SearchInfo(method="sample", sampled_sets=int(sampled.shape[0]), sampled_best=float(sampled_scores.min()),
                      pivots_evaluated=0, all_pivots=False, rounds=0, converged=True, distinct_candidates=count)
    positions = sampled
    if method == "optimise":
        best, _, info = search_input_set(stats(), set_size, sampled, sampled_scores, first, count)
        if best is not None:  # strictly better than every sampled set: appended as the last candidate
            extra = entries_of(best[None])
            positions = torch.cat([sampled, best[None]])
            b, b_piv, t4, valid = (torch.cat([x, y]) for x, y in zip((b, b_piv, t4, valid), extra))
    inputs = select_input_set(b, b_piv, t4, valid, report(positions), reduce)
    return inputs, info, positions[inputs.chosen_candidate]
