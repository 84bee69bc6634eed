"""The label terms of d_LLV (T1, T3) and the search for the label set (SPEC §3).

The label terms are variances over inputs of linear functions of ``w(x) = [l_p(.|x); l_q(.|x) - l_p(.|x)]``: every
entry for a (pivot ``y0``, label ``y``) pair needs the variances of the two labels and their covariances
(:class:`LabelCov`, read from the covariance of ``w`` or from a representation statistic), and follows the shared
entry formula of :mod:`~lightning_repsim.functional.llv_terms`. The label set ``(y0, lo)`` minimises T1 over pivots and
left-out labels (:func:`label_part`), evaluated in chunks of pivots so that memory stays O(chunk K) for any K.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_repsim.functional.llv_terms import (
    CHUNK_NUMBERS,
    TABLE_NUMBERS_CPU,
    TIE_RTOL,
    entries,
    first_argmin,
    normalisers,
)

__all__ = ["LabelCov", "LabelPart", "LabelTable", "label_cov_from_blocks", "label_cov_from_full", "label_part", "label_table"]


@dataclass(frozen=True)
class LabelCov:
    """The parts of ``Cov(w)``, ``w = [X; D] = [l_p; l_q - l_p]``, that the label terms need for a
    set of pivot labels ``P``: three K-diagonals and four (P, K) row blocks. Building only these keeps
    a restricted or chunked pivot search O(P K) in memory, which is what makes large K feasible.

    Attributes:
        pivots: (P,) pivot labels.
        vx, vxd, vd: ``Var X_y``, ``Cov(X_y, D_y)``, ``Var D_y`` for every label y, shape (K,).
        sxx: ``Cov(X_p, X_y)``; sxd_py: ``Cov(X_p, D_y)``; sxd_yp: ``Cov(X_y, D_p)``;
        sdd: ``Cov(D_p, D_y)``; each (P, K).
    """

    pivots: Tensor
    vx: Tensor
    vxd: Tensor
    vd: Tensor
    sxx: Tensor
    sxd_py: Tensor
    sxd_yp: Tensor
    sdd: Tensor


def label_cov_from_full(cov: Tensor, pivots: Tensor) -> LabelCov:
    """:class:`LabelCov` read out of the full ``2K x 2K`` covariance of ``[l_p; l_q - l_p]``."""
    k = cov.shape[0] // 2
    return label_cov_from_blocks(cov[:k, :k], cov[:k, k:], cov[k:, k:], pivots)


def label_cov_from_blocks(sxx: Tensor, sxd: Tensor, sdd: Tensor, pivots: Tensor) -> LabelCov:
    """:class:`LabelCov` from the three distinct K x K blocks ``Cov(X)``, ``Cov(X, D)``, ``Cov(D)``."""
    return LabelCov(
        pivots=pivots,
        vx=sxx.diagonal(),
        vxd=sxd.diagonal(),
        vd=sdd.diagonal(),
        sxx=sxx[pivots, :],
        sxd_py=sxd[pivots, :],
        sxd_yp=sxd[:, pivots].T,
        sdd=sdd[pivots, :],
    )


@dataclass(frozen=True)
class LabelTable:
    """Term-1/term-3 entries for every (pivot p in ``pivots``, label y): shape (P, K)."""

    pivots: Tensor
    a: Tensor  # a(y) for pivot p; +inf where invalid
    a_piv: Tensor  # a_piv(y) for pivot p; +inf where invalid
    t3: Tensor  # |sigma_p - sigma_q|; +inf where invalid
    valid: Tensor  # bool; False on the diagonal and where a sigma is zero


def label_table(c: LabelCov) -> LabelTable:
    """All term-1/term-3 entries for the pivot labels of ``c``: with ``u = X_y - X_p``, ``d = D_y - D_p``,
    ``sigma_p^2 = Var u`` and ``Delta = 2 Cov(u, d) + Var d`` (:func:`compared_variance`). Cost O(P K)."""
    p = c.pivots
    k = c.vx.shape[0]
    vx, vxd, vd = c.vx, c.vxd, c.vd
    vy = vx + 2 * vxd + vd  # Var l_q
    s1sq = vx[None, :] + vx[p, None] - 2 * c.sxx
    cov_ud = vxd[None, :] - c.sxd_yp - c.sxd_py + vxd[p, None]
    var_d = vd[None, :] + vd[p, None] - 2 * c.sdd
    delta = 2 * cov_ud + var_d
    valid, s1, s2 = normalisers(s1sq, delta, vx[None, :] + vx[p, None], vy[None, :] + vy[p, None])
    valid = valid & (p[:, None] != torch.arange(k, device=vx.device)[None, :])
    compared, pivot = (vx[None, :], vxd[None, :], vd[None, :]), (vx[p, None], vxd[p, None], vd[p, None])
    a, a_piv, t3 = entries(valid, s1, s2, delta, compared, pivot)
    return LabelTable(pivots=p, a=a, a_piv=a_piv, t3=t3, valid=valid)


def _leave_out_scores(table: LabelTable, reduce: str) -> Tensor:
    """T1 for every (pivot, left-out) pair, shape (P, K); +inf for invalid pairs. O(P K)."""
    k = table.a.shape[1]
    n_kept = 2 * (k - 2)
    diag = ~(table.pivots[:, None] != torch.arange(k, device=table.a.device)[None, :])
    if reduce == "max":
        entry = torch.maximum(table.a, table.a_piv).masked_fill(diag, float("-inf"))
        top = entry.topk(2, dim=1).values  # largest and second largest over y != p
        v1, v2 = top[:, :1], top[:, 1:]
        # leaving out lo removes entry[p, lo]; the max of the rest is v2 if entry[p, lo] is the max.
        scores = torch.where(entry >= v1, v2.expand_as(entry), v1.expand_as(entry))
    else:
        invalid = ~table.valid & ~diag
        entry = torch.where(table.valid, table.a + table.a_piv, torch.zeros_like(table.a))
        total = entry.sum(dim=1, keepdim=True)
        scores = (total - entry) / n_kept
        still_invalid = (invalid.sum(dim=1, keepdim=True) - invalid.to(torch.int64)) > 0
        scores = scores.masked_fill(still_invalid, float("inf"))
    return scores.masked_fill(diag, float("inf"))


def _zero_variance_message(pivot: int, labels: list[int]) -> str:
    return (
        f"zero variance: the log-odds l(y|x) - l(y0|x) of label(s) {labels} against pivot y0={pivot} "
        "are constant over the inputs for at least one model (sigma = 0), so d_LLV is undefined for this "
        "label set. Check for duplicated or dead output units, or give other `label_pivot`/`leave_out`."
    )


@dataclass(frozen=True)
class LabelPart:
    label_pivot: int
    leave_out: int
    kept_labels: Tensor
    t1_terms: Tensor
    t3_terms: Tensor
    t1: Tensor
    t3: Tensor
    search: str
    num_pivots: int
    refined_pivots: int = 0


#: Labels tried per round, and rounds at most, when a restricted pivot search is refined locally.
REFINE_PIVOTS = 32
REFINE_ROUNDS = 3


def _pivot_rows(cov: LabelCov, rows: slice) -> LabelCov:
    """The :class:`LabelCov` of a slice of its pivots (views, no copy)."""
    return LabelCov(pivots=cov.pivots[rows], vx=cov.vx, vxd=cov.vxd, vd=cov.vd, sxx=cov.sxx[rows],
                    sxd_py=cov.sxd_py[rows], sxd_yp=cov.sxd_yp[rows], sdd=cov.sdd[rows])


class _LabelSearch:
    """The (pivot, left-out) search over chunks of pivots: ``label_cov(pivots)`` gives the covariance rows of a chunk
    (:class:`LabelCov`), :meth:`scores` turns them into T1 for every (pivot, left-out) pair, :meth:`row_minima` keeps
    each pivot's best score. Memory O(chunk K) for any K."""

    def __init__(self, label_cov: Callable[[Tensor], LabelCov], num_labels: int, device: torch.device, reduce: str,
                 leave_out: int | None) -> None:
        self.label_cov, self.k, self.reduce, self.leave_out = label_cov, num_labels, reduce, leave_out
        self.chunk = max(1, CHUNK_NUMBERS // max(num_labels, 1))
        # entry tables in sub-blocks of pivots: element-wise passes over a few MB stay in cache (same values)
        self.table_rows = max(1, (TABLE_NUMBERS_CPU if device.type == "cpu" else CHUNK_NUMBERS) // max(num_labels, 1))

    def scores(self, cov: LabelCov) -> tuple[LabelTable, Tensor]:
        """The entry table of the pivots of ``cov`` and T1 of every (pivot, left-out) pair (P, K)."""
        table = label_table(cov)
        scores = _leave_out_scores(table, self.reduce)
        if self.leave_out is not None:
            fixed = torch.ones_like(scores, dtype=torch.bool)
            fixed[:, self.leave_out] = False
            scores = scores.masked_fill(fixed, float("inf"))
        return table, scores

    def scores_of(self, pivots: Tensor) -> tuple[LabelTable, Tensor]:
        return self.scores(self.label_cov(pivots))

    def row_minima(self, pivots: Tensor) -> Tensor:
        """Each pivot's best score: the covariance rows of a chunk at once (fewer, larger products), the entries in
        sub-blocks of pivots."""
        parts = []
        for chunk in pivots.split(self.chunk):
            cov = self.label_cov(chunk)
            parts += [self.scores(_pivot_rows(cov, slice(i, i + self.table_rows)))[1].amin(dim=1)
                      for i in range(0, chunk.numel(), self.table_rows)]
        return torch.cat(parts)

    def refine(self, pivots: Tensor, row_min: Tensor) -> tuple[Tensor, Tensor, int]:
        """Local search after a restricted search: try as pivots the labels whose T1 entries against the best pivot so
        far are smallest (its nearest labels), round after round while that lowers T1. Returns the pivots and their
        best scores, extended, and how many were added."""
        added = 0
        evaluated = torch.zeros(self.k, dtype=torch.bool, device=pivots.device)
        evaluated[pivots] = True
        if self.leave_out is not None:
            evaluated[self.leave_out] = True
        for _ in range(REFINE_ROUNDS):
            best = row_min.min()
            if not bool(torch.isfinite(best)):
                break
            row = first_argmin(row_min)
            table, _ = self.scores_of(pivots[row : row + 1])
            closeness = torch.maximum(table.a[0], table.a_piv[0]).masked_fill(evaluated, float("inf"))
            order = torch.argsort(closeness, stable=True)[:REFINE_PIVOTS]
            neighbours = order[torch.isfinite(closeness[order])]
            if neighbours.numel() == 0:
                break
            evaluated[neighbours] = True
            new_min = self.row_minima(neighbours)
            pivots, row_min = torch.cat([pivots, neighbours]), torch.cat([row_min, new_min])
            added += int(neighbours.numel())
            if not bool(new_min.min() < best - TIE_RTOL * best.abs()):
                break
        return pivots, row_min, added


def _pivots_to_search(k: int, device: torch.device, label_pivot: int | None, leave_out: int | None,
                      pivot_candidates: Tensor | None) -> tuple[Tensor, str]:
    """The pivots the search evaluates and how the result calls the search (full, partial, given, restricted)."""
    if label_pivot is not None:
        pivots, search = torch.tensor([label_pivot], device=device), "given" if leave_out is not None else "partial"
    elif pivot_candidates is not None:
        pivots = torch.unique(pivot_candidates.to(device=device, dtype=torch.long))
        search = "partial" if leave_out is not None else ("restricted" if pivots.numel() < k else "full")
    else:
        pivots, search = torch.arange(k, device=device), "full" if leave_out is None else "partial"
    if leave_out is not None:
        pivots = pivots[pivots != leave_out]
        if pivots.numel() == 0:
            raise ValueError(f"`label_pivot` and `leave_out` must differ, both are {leave_out}")
    return pivots, search


def label_part(
    label_cov: Callable[[Tensor], LabelCov],
    num_labels: int,
    device: torch.device,
    reduce: str = "max",
    given: tuple[int | None, int | None] = (None, None),
    pivot_candidates: Tensor | None = None,
    refine: bool = False,
) -> LabelPart:
    """Choose ``(y0, lo)`` (unless ``given`` as ``(label_pivot, leave_out)``) and compute T1/T3 (label indices are
    positions ``0..K-1``).

    ``label_cov(pivots)`` returns the :class:`LabelCov` for those pivots: from the covariance blocks
    (:class:`~lightning_repsim.functional.llv_route.LogitsRoute`) or from a representation statistic.

    The search is the argmin over pivots and left-out labels of T1 (``reduce`` of its entries), ties (within
    ``TIE_RTOL`` relative) broken by the smallest pivot, then the smallest left-out label. ``pivot_candidates``
    restricts the pivots searched; with ``refine`` (a restriction that only bounds the cost), a local search then tries
    the labels nearest to the best pivot. Pivots are evaluated in chunks of about :data:`CHUNK_NUMBERS` / K, keeping
    only each pivot's best score, so memory is O(chunk K) for any K; the chosen pivot's row is then evaluated again to
    find its left-out label.
    """
    k = num_labels
    label_pivot, leave_out = given
    pivots, search = _pivots_to_search(k, device, label_pivot, leave_out, pivot_candidates)
    searcher = _LabelSearch(label_cov, k, device, reduce, leave_out)
    row_min = searcher.row_minima(pivots)
    refined = 0
    if search == "restricted" and refine:
        pivots, row_min, refined = searcher.refine(pivots, row_min)
    # the first (row-major) entry within TIE_RTOL of the minimum, exactly as first_argmin on the whole table
    row = first_argmin(row_min)
    table, scores = searcher.scores_of(pivots[row : row + 1])
    # the row is evaluated again on its own; its rounding may differ from the chunked pass (a different matmul
    # shape), so its left-out label is the first within TIE_RTOL of this row's own minimum, not of the chunked one
    lo = first_argmin(scores[0])
    y0 = int(pivots[row])
    keep = torch.ones(k, dtype=torch.bool, device=device)
    keep[[y0, lo]] = False
    kept = torch.nonzero(keep).flatten()
    if not torch.isfinite(scores[0, lo]):
        raise ValueError(_zero_variance_message(y0, kept[~table.valid[0, kept]].tolist()))
    t1_terms = torch.cat([table.a[0, kept], table.a_piv[0, kept]])
    t3_terms = table.t3[0, kept]
    red = torch.amax if reduce == "max" else torch.mean
    return LabelPart(
        label_pivot=y0, leave_out=lo, kept_labels=kept, t1_terms=t1_terms, t3_terms=t3_terms, t1=red(t1_terms),
        t3=red(t3_terms), search=search, num_pivots=int(pivots.numel()), refined_pivots=refined,
    )
