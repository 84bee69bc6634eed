"""Pair scores of the input-set search (SPEC §3, term 2): ``e(x_i; x0)`` for every pair of candidate inputs.

The entries of term 2 for an input ``x_i`` and a pivot input ``x0`` need only the two inputs' log-probability vectors
over labels, through inner products: :class:`PairStatistics` holds low-rank factors of both models' centred rows
(their span has at most ``M_p + M_q + 2`` dimensions for the model family of SPEC §1, K at worst) and each row's own
moments, and scores blocks of pairs with a few matrix products and about twenty element-wise passes.
:func:`all_pivots` scores every pair once (the score is symmetric) and keeps each row's ``M`` best partners;
:func:`evaluate_pivots` scores chosen pivots against every row. The search itself is
:mod:`~lightning_repsim.functional.input_search`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_repsim.functional.llv_terms import TIE_RTOL, ZERO_VAR_ULPS

__all__ = ["FACTOR_RTOL", "PAIR_BLOCK", "PairStatistics", "PivotTable", "all_pivots",
           "evaluate_pivots", "exhaustive_cost", "partner_width"]

#: Rows (and columns) of a block of pair scores: 2 MB of float64, so its element-wise passes stay in cache.
PAIR_BLOCK = 512
#: Eigenvalues of the rows' Gram matrix below this fraction of the largest are dropped by the low-rank factorisation
#: (the inner products the scores need then change by about this much relative to the largest).
FACTOR_RTOL = 1e-13
#: The rows are projected on their joint span only when there are at least this many rows per column: the Gram and
#: its eigendecomposition cost about ``4 R D^2 + 10 D^3`` and save at most ``2 R^2 (D - D')`` in the pair scores, which
#: pays only for ``R`` above about ``3.4 D`` even when the rows span few dimensions (``D' << D``).
FACTOR_MIN_ROWS_PER_DIM = 4


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
    if rows < FACTOR_MIN_ROWS_PER_DIM * dim:  # the factorisation would cost more than it can save
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
    #: per model, (a lower bound of the affine rank, whether it is the rank itself): see :meth:`affine_ranks`
    _rank_known: list[tuple[int, bool]] = field(default_factory=lambda: [(0, False), (0, False)], repr=False)

    def __post_init__(self) -> None:
        self.norm_a = (self.a * self.a).sum(1)
        self.norm_s = (self.s * self.s).sum(1)
        self.var_q = self.var_x + 2 * self.cov_xd + self.var_d
        ones = torch.ones_like(self.norm_a)[:, None]
        # tau^2(z, i) = |a_z|^2 + |a_i|^2 - 2 a_z . a_i as one product of augmented factors (no element-wise passes)
        pairs = ((self.a, self.norm_a), (self.s, self.norm_s))
        self._left = tuple(torch.cat([x, norm[:, None], ones], 1) for x, norm in pairs)
        self._right = tuple(torch.cat([-2 * x, ones, norm[:, None]], 1) for x, norm in pairs)
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
            self.directions_q[rows], self.center_directions,
        )

    def squared_scores(self, z: Tensor | slice, i: Tensor | slice) -> Tensor:
        """``e(x_i; x_z)^2`` for pivots ``z`` (rows) and inputs ``i`` (columns), ``inf`` where a normaliser is zero.

        With ``t = Delta / (tau_p (tau_p + tau_q))`` (``= tau_q / tau_p - 1``, written without cancellation), the compared
        quantity ``gamma X - beta D`` is ``(t X - D) / tau_q``, so ``b^2 = (Var X t^2 - 2 Cov(X, D) t + Var D) / tau_q^2``
        from the input's own moments, and ``b_piv^2`` the same with the pivot's: about twenty element-wise passes per
        block, the normalisers from two matrix products of the factors."""
        tp2 = torch.mm(self._left[0][z], self._right[0][i].T)
        tq2 = torch.mm(self._left[1][z], self._right[1][i].T)
        positions = torch.arange(self.num_rows, device=tq2.device)
        return self._scores(tp2, tq2, positions[z][:, None], positions[i][None, :])

    def member_squared_scores(self, pivots: Tensor, members: Tensor) -> Tensor:
        """``e(x_i; x_z)^2`` of each pivot ``z = pivots[j]`` and its own members ``i in members[j]`` (S, M): each pivot
        against every row by one matrix product (O(S R D), no gathered factor rows), then its members taken, in chunks
        of pivots of at most 2^21 scores."""
        out = []
        step = max(1, 2**21 // max(self.num_rows, 1))
        for z, i in zip(pivots.split(step), members.split(step)):
            tp2 = torch.mm(self._left[0][z], self._right[0].T).gather(1, i)
            tq2 = torch.mm(self._left[1][z], self._right[1].T).gather(1, i)
            out.append(self._scores(tp2, tq2, z[:, None], i))
        return torch.cat(out) if out else members.new_zeros(members.shape, dtype=torch.float64)

    def _scores(self, tp2: Tensor, tq2: Tensor, z: Tensor, i: Tensor) -> Tensor:
        """The squared scores from the squared normalisers ``tp2``, ``tq2`` of pivots ``z`` and inputs ``i`` (row
        positions, broadcast to the normalisers' shape); ``tp2``, ``tq2`` are overwritten."""
        suspect = (tp2 <= self._coarse[0]) | (tq2 <= self._coarse[1])  # a zero normaliser is possible only here
        delta = torch.sub(tq2, tp2)
        tp = tp2.sqrt_()
        t = delta.div_(tq2.sqrt().add_(tp).mul_(tp))
        vx, c2, vd = self.var_x, 2 * self.cov_xd, self.var_d
        score = torch.mul(t, vx[i]).sub_(c2[i]).mul_(t).add_(vd[i])
        pivot = torch.mul(t, vx[z]).sub_(c2[z]).mul_(t).add_(vd[z])
        score = torch.maximum(score, pivot, out=score).div_(tq2)
        if bool(suspect.any()):  # the exact test of :func:`~lightning_repsim.functional.llv_terms.normalisers`
            where = suspect.nonzero(as_tuple=True)
            zr, ic = z.expand_as(score)[where], i.expand_as(score)[where]
            eps = torch.finfo(torch.float64).eps * ZERO_VAR_ULPS
            tp2_exact = tp[where].square()
            invalid = (tp2_exact <= eps * (vx[zr] + vx[ic])) | (tq2[where] <= eps * (self.var_q[zr] + self.var_q[ic]))
            invalid |= ~(tp2_exact > 0) | ~(tq2[where] > 0)
            score[tuple(w[invalid] for w in where)] = float("inf")
        return score

    def affine_ranks(self, at_most: int | None = None) -> tuple[int, int]:
        """The dimension of the affine span of the rows, for each model: the most dimensions a set's displacements can
        span for that model. ``at_most``: only ``min(rank, at_most)`` is needed (the capacity of a set of that many
        partners); the first ``2 at_most + 8`` rows are tried first (a subset's affine rank is a lower bound), the
        whole rows only when they fall short. Cached."""
        out = []
        for model, directions in enumerate((self.directions_p, self.directions_q)):
            floor, exact = self._rank_known[model]
            head = 2 * at_most + 8 if at_most is not None else 0
            if not exact and floor < (at_most or 0) and head < directions.shape[0]:
                floor = max(floor, self._affine_rank(directions[:head]))
            if not exact and (at_most is None or floor < at_most):
                floor, exact = self._affine_rank(directions), True
            self._rank_known[model] = (floor, exact)
            out.append(floor if at_most is None else min(floor, at_most))
        return out[0], out[1]

    def _affine_rank(self, directions: Tensor) -> int:
        centred = directions - directions.mean(0, keepdim=True)
        if self.center_directions:
            centred = centred - centred.mean(1, keepdim=True)
        return int(torch.linalg.matrix_rank(centred))

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
        for moved, rank in zip(self.displaced(pivot, members), self.affine_ranks(members.numel())):
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
