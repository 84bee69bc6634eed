"""The four terms of d_LLV and the two set searches, from second moments (SPEC §3, §6).

Every entry of d_LLV has the same shape. Write ``X = l_p`` for a log-probability under model p and
``D = l_q - l_p`` for the difference of the two models, and let ``u = X - X_r``, ``d = D - D_r`` be the
displacement against a reference ``r``: the pivot label ``y0`` for the label terms (variances over
inputs), the pivot input ``x0`` for the input terms (variances over labels). The normalisers are
``s_p = sd(u)`` and ``s_q = sd(u + d)``, so ``s_q^2 = s_p^2 + Delta`` with ``Delta = 2 Cov(u, d) + Var d``,
and the compared quantity is

    X / s_p - (X + D) / s_q = gamma X - beta D,    beta = 1 / s_q,    gamma = Delta / (s_p s_q (s_p + s_q)),

whose variance :func:`compared_variance` is ``gamma^2 Var X - 2 gamma beta Cov(X, D) + beta^2 Var D``; the
scale entry (T3, T4) is ``s_q - s_p = Delta / (s_p + s_q)``. Written with ``Delta`` and ``D`` (never a
difference of two large, nearly equal variances), the terms stay accurate when the models are nearly
identical (distillation). This one formula serves the logits route (label terms from the covariance of
``[l_p; l_q - l_p]``, input terms from the candidate inputs' log-probabilities), the representation
route (:mod:`~lightning_repsim.functional.llv_representation`) and the differentiable
:class:`~lightning_repsim.losses.LLVLoss`.

Both searches are minimisations: the label set ``(y0, lo)`` minimises T1 over pivots and left-out labels
(:func:`label_part`, evaluated in chunks of pivots so that memory stays O(chunk K)), the input set
minimises T2 over candidate sets (:func:`input_part`, in chunks of sets).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "TIE_RTOL",
    "InputPart",
    "LabelCov",
    "LabelPart",
    "compared_variance",
    "displacement_moments",
    "first_argmin",
    "input_part",
    "label_cov_from_blocks",
    "label_cov_from_full",
    "label_part",
    "label_table",
    "select_input_set",
]

#: A variance counts as zero when it is below this many ulps of the variances it was computed from
#: (cancellation in the covariance route is of that order).
ZERO_VAR_ULPS = 64.0
#: Scores within this relative distance of the minimum count as tied; ties go to the first index
#: (smallest pivot, then smallest left-out label; first candidate set). Exact ties are structural
#: (e.g. T1 entries are symmetric in the pivot and the label), so without a tolerance the choice
#: would depend on rounding, i.e. on batch order and process count.
TIE_RTOL = 1e-10
#: Numbers per temporary array in the chunked searches (float64: 32 MB each, about a dozen alive).
CHUNK_NUMBERS = 1 << 22
#: Numbers per block of the (pivot, label) entry tables on CPU (2 MB: their dozens of element-wise passes stay in
#: cache, 2x faster than 32 MB blocks at K = 50,257).
TABLE_NUMBERS_CPU = 1 << 18


def first_argmin(scores: Tensor, rtol: float = TIE_RTOL) -> int:
    """Index of the first entry (row-major) within ``rtol`` (relative) of the minimum of ``scores``."""
    flat = scores.reshape(-1)
    best = flat.min()
    if not bool(torch.isfinite(best)):
        return int(torch.argmin(flat))
    within = flat <= best + rtol * best.abs()
    return int(torch.nonzero(within)[0])


# ----------------------------------------------------------------------------------------------
# the entry formula
# ----------------------------------------------------------------------------------------------
def compared_variance(s_p: Tensor, s_q: Tensor, delta: Tensor, var_x: Tensor, cov_xd: Tensor, var_d: Tensor) -> Tensor:
    """``Var[X / s_p - (X + D) / s_q]`` from ``Var X``, ``Cov(X, D)``, ``Var D`` and the normalisers, with
    ``delta = s_q^2 - s_p^2`` computed without cancellation (see the module docstring). Differentiable.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x, d = torch.randn(2, 1000, generator=g, dtype=torch.float64)
        >>> s_p, s_q = torch.tensor(1.5, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
        >>> direct = (x / s_p - (x + d) / s_q).var()
        >>> c = torch.cov(torch.stack([x, d]))
        >>> bool(torch.isclose(compared_variance(s_p, s_q, s_q**2 - s_p**2, c[0, 0], c[0, 1], c[1, 1]), direct))
        True
    """
    beta = 1.0 / s_q
    gamma = delta / (s_p * s_q * (s_p + s_q))
    return gamma.square() * var_x - 2 * gamma * beta * cov_xd + beta.square() * var_d


def normalisers(s1sq: Tensor, delta: Tensor, scale_p: Tensor, scale_q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(valid, s_p, s_q)`` from ``s_p^2`` and ``Delta``: an entry is valid when both normalisers are positive and
    not below :data:`ZERO_VAR_ULPS` ulps of ``scale_p`` / ``scale_q`` (sums of the variances they came from);
    invalid entries get normalisers 1 (their values are masked by the caller)."""
    s2sq = s1sq + delta
    eps = torch.finfo(torch.float64).eps * ZERO_VAR_ULPS
    valid = (s1sq > eps * scale_p) & (s2sq > eps * scale_q) & (s1sq > 0) & (s2sq > 0)
    one = torch.ones_like(s1sq)
    return valid, torch.where(valid, s1sq, one).sqrt(), torch.where(valid, s2sq, one).sqrt()


def entries(
    valid: Tensor, s_p: Tensor, s_q: Tensor, delta: Tensor, compared: tuple[Tensor, Tensor, Tensor],
    reference: tuple[Tensor, Tensor, Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """``(a, a_ref, scale)``: the compared standard deviations of the entry and of its reference, and
    ``|s_q - s_p|``; ``+inf`` where invalid. ``compared``/``reference`` are ``(Var X, Cov(X, D), Var D)``."""
    inf = torch.full_like(s_p, float("inf"))
    a = torch.where(valid, compared_variance(s_p, s_q, delta, *compared).clamp_min(0).sqrt(), inf)
    a_ref = torch.where(valid, compared_variance(s_p, s_q, delta, *reference).clamp_min(0).sqrt(), inf)
    scale = torch.where(valid, delta.abs() / (s_p + s_q), inf)
    return a, a_ref, scale


# ----------------------------------------------------------------------------------------------
# label terms (T1, T3): variances over inputs, from the covariance of w = [l_p; l_q - l_p]
# ----------------------------------------------------------------------------------------------
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


def label_part(
    label_cov: Callable[[Tensor], LabelCov],
    num_labels: int,
    device: torch.device,
    reduce: str = "max",
    label_pivot: int | None = None,
    leave_out: int | None = None,
    pivot_candidates: Tensor | None = None,
    refine: bool = False,
) -> LabelPart:
    """Choose ``(y0, lo)`` (unless given) and compute T1/T3 (label indices are positions ``0..K-1``).

    ``label_cov(pivots)`` returns the :class:`LabelCov` for those pivots: from the full covariance
    (``functools.partial(label_cov_from_full, cov)``) or from a representation statistic.

    The search is the argmin over pivots and left-out labels of T1 (``reduce`` of its entries), ties
    (within ``TIE_RTOL`` relative) broken by the smallest pivot, then the smallest left-out label.
    ``pivot_candidates`` restricts the pivots searched; with ``refine`` (a restriction that only bounds the cost), a
    local search then tries the labels nearest to the best pivot (:func:`_refine_pivots`). Pivots are evaluated in chunks of about
    :data:`CHUNK_NUMBERS` / K, keeping only each pivot's best score, so memory is O(chunk K) for any K;
    the chosen pivot's row is then evaluated again to find its left-out label.
    """
    k = num_labels
    if label_pivot is not None:
        pivots = torch.tensor([label_pivot], device=device)
        search = "given" if leave_out is not None else "partial"
    elif pivot_candidates is not None:
        pivots = torch.unique(pivot_candidates.to(device=device, dtype=torch.long))
        search = "restricted" if pivots.numel() < k else "full"
        if leave_out is not None:
            search = "partial"
    else:
        pivots = torch.arange(k, device=device)
        search = "full" if leave_out is None else "partial"
    if leave_out is not None:
        pivots = pivots[pivots != leave_out]
        if pivots.numel() == 0:
            raise ValueError(f"`label_pivot` and `leave_out` must differ, both are {leave_out}")

    def scores_from(cov: LabelCov) -> tuple[LabelTable, Tensor]:
        table = label_table(cov)
        scores = _leave_out_scores(table, reduce)
        if leave_out is not None:
            lo_mask = torch.ones_like(scores, dtype=torch.bool)
            lo_mask[:, leave_out] = False
            scores = scores.masked_fill(lo_mask, float("inf"))
        return table, scores

    def scores_of(chunk: Tensor) -> tuple[LabelTable, Tensor]:
        return scores_from(label_cov(chunk))

    table_rows = max(1, (TABLE_NUMBERS_CPU if device.type == "cpu" else CHUNK_NUMBERS) // max(k, 1))

    def row_minima(chunk: Tensor) -> Tensor:
        """Each pivot's best score: the covariance rows of the whole chunk at once (fewer, larger products), the
        entries in sub-blocks of pivots (element-wise passes over a few MB stay in cache; same values)."""
        cov = label_cov(chunk)
        return torch.cat([scores_from(_pivot_rows(cov, slice(i, i + table_rows)))[1].amin(dim=1)
                          for i in range(0, chunk.numel(), table_rows)])

    chunk_size = max(1, CHUNK_NUMBERS // max(k, 1))
    row_min = torch.cat([row_minima(chunk) for chunk in pivots.split(chunk_size)])
    refined = 0
    if search == "restricted" and refine:  # local search: the labels closest to the best pivot, as pivots, while that improves T1
        pivots, row_min, refined = _refine_pivots(pivots, row_min, scores_of, row_minima, leave_out, k)
    # the first (row-major) entry within TIE_RTOL of the minimum, exactly as first_argmin on the whole table
    row = first_argmin(row_min)
    table, scores = scores_of(pivots[row : row + 1])
    # the row is evaluated again on its own; its rounding may differ from the chunked pass (a different matmul
    # shape), so its left-out label is the first within TIE_RTOL of this row's own minimum, not of ``best``
    lo = first_argmin(scores[0])
    y0 = int(pivots[row])
    keep = torch.ones(k, dtype=torch.bool, device=device)
    keep[[y0, lo]] = False
    kept = torch.nonzero(keep).flatten()
    if not torch.isfinite(scores[0, lo]):
        bad = kept[~table.valid[0, kept]].tolist()
        raise ValueError(_zero_variance_message(y0, bad))
    t1_terms = torch.cat([table.a[0, kept], table.a_piv[0, kept]])
    t3_terms = table.t3[0, kept]
    red = torch.amax if reduce == "max" else torch.mean
    return LabelPart(
        label_pivot=y0,
        leave_out=lo,
        kept_labels=kept,
        t1_terms=t1_terms,
        t3_terms=t3_terms,
        t1=red(t1_terms),
        t3=red(t3_terms),
        search=search,
        num_pivots=int(pivots.numel()),
        refined_pivots=refined,
    )


#: Labels tried per round, and rounds at most, when a restricted pivot search is refined locally.
REFINE_PIVOTS = 32
REFINE_ROUNDS = 3


def _pivot_rows(cov: LabelCov, rows: slice) -> LabelCov:
    """The :class:`LabelCov` of a slice of its pivots (views, no copy)."""
    return LabelCov(pivots=cov.pivots[rows], vx=cov.vx, vxd=cov.vxd, vd=cov.vd, sxx=cov.sxx[rows],
                    sxd_py=cov.sxd_py[rows], sxd_yp=cov.sxd_yp[rows], sdd=cov.sdd[rows])


def _refine_pivots(pivots: Tensor, row_min: Tensor, scores_of: Callable, row_minima: Callable, leave_out: int | None,
                   k: int):
    """Local search over pivots after a restricted search: try as pivots the labels whose T1 entries against the best
    pivot so far are smallest (its nearest labels), round after round while that lowers T1. Returns the pivots and
    their best scores, extended, and how many were added."""
    added = 0
    evaluated = torch.zeros(k, dtype=torch.bool, device=pivots.device)
    evaluated[pivots] = True
    if leave_out is not None:
        evaluated[leave_out] = True
    for _ in range(REFINE_ROUNDS):
        best = row_min.min()
        if not bool(torch.isfinite(best)):
            break
        row = first_argmin(row_min)
        table, _ = scores_of(pivots[row : row + 1])
        closeness = torch.maximum(table.a[0], table.a_piv[0]).masked_fill(evaluated, float("inf"))
        order = torch.argsort(closeness, stable=True)[:REFINE_PIVOTS]
        neighbours = order[torch.isfinite(closeness[order])]
        if neighbours.numel() == 0:
            break
        evaluated[neighbours] = True
        new_min = row_minima(neighbours)
        pivots, row_min = torch.cat([pivots, neighbours]), torch.cat([row_min, new_min])
        added += int(neighbours.numel())
        if not bool(new_min.min() < best - TIE_RTOL * best.abs()):
            break
    return pivots, row_min, added


# ----------------------------------------------------------------------------------------------
# input terms (T2, T4): variances over labels, from the log-probabilities at candidate input sets
# ----------------------------------------------------------------------------------------------
def displacement_moments(x: Tensor, d: Tensor, x_ref: Tensor, d_ref: Tensor, dim: int = -1) -> tuple[Tensor, ...]:
    """Unbiased moments along ``dim`` that one entry needs: ``Var u`` and ``Delta = 2 Cov(u, v) + Var v`` for the
    displacement ``u = x - x_ref``, ``v = d - d_ref``, then ``(Var x, Cov(x, d), Var d)`` and the same for the
    reference. ``dim=-1``: over labels (input terms); ``dim=0``: over inputs (label terms of a batch, as
    :class:`~lightning_repsim.losses.LLVLoss` computes them). Differentiable; references broadcast."""
    scale = 1.0 / (x.shape[dim] - 1)
    xc, dc = x - x.mean(dim, keepdim=True), d - d.mean(dim, keepdim=True)
    x0c, d0c = x_ref - x_ref.mean(dim, keepdim=True), d_ref - d_ref.mean(dim, keepdim=True)
    uc, vc = xc - x0c, dc - d0c
    s1sq = (uc * uc).sum(dim) * scale
    delta = (2 * (uc * vc).sum(dim) + (vc * vc).sum(dim)) * scale
    compared = ((xc * xc).sum(dim) * scale, (xc * dc).sum(dim) * scale, (dc * dc).sum(dim) * scale)
    reference = ((x0c * x0c).sum(dim) * scale, (x0c * d0c).sum(dim) * scale, (d0c * d0c).sum(dim) * scale)
    return s1sq, delta, compared, reference


def input_entries(lp: Tensor, lq: Tensor, lp0: Tensor, lq0: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The term-2/term-4 entries ``(b, b_piv, |tau_p - tau_q|, valid)`` over the last dimension (labels) for
    compared inputs ``lp``/``lq`` (..., K) and their pivot ``lp0``/``lq0`` (broadcastable)."""
    s1sq, delta, compared, reference = displacement_moments(lp, lq - lp, lp0, lq0 - lp0)
    var_q = compared[0] + 2 * compared[1] + compared[2]
    var_q0 = reference[0] + 2 * reference[1] + reference[2]
    valid, s_p, s_q = normalisers(s1sq, delta, compared[0] + reference[0], var_q + var_q0)
    b, b_piv, t4 = entries(valid, s_p, s_q, delta, compared, reference)
    return b, b_piv, t4, valid


@dataclass(frozen=True)
class InputPart:
    input_set: Tensor
    chosen_candidate: int
    candidate_sets: Tensor
    candidate_scores: Tensor
    t2_terms: Tensor
    t4_terms: Tensor
    t2: Tensor
    t4: Tensor


def set_entries(lp_rows: Tensor, lq_rows: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Term-2/term-4 entries ``(b, b_piv, |tau_p - tau_q|, valid)``, each (S, M), of candidate sets ``positions``
    (S, M+1; first = the set's pivot input ``x0``) of rows of the log-probabilities ``lp_rows``/``lq_rows`` (R, K).
    Sets are evaluated in chunks (memory O(chunk M K))."""
    s, size = positions.shape
    k = lp_rows.shape[1]
    step = max(1, CHUNK_NUMBERS // (size * k))
    parts = []
    for chunk in positions.split(step):
        lp, lq = lp_rows[chunk], lq_rows[chunk]
        parts.append(input_entries(lp[:, 1:], lq[:, 1:], lp[:, :1], lq[:, :1]))
    return tuple(torch.cat(t) for t in zip(*parts))  # type: ignore[return-value]


def input_part(lp_rows: Tensor, lq_rows: Tensor, positions: Tensor, reported: Tensor, reduce: str = "max") -> InputPart:
    """T2/T4 for every candidate set (:func:`set_entries`) and the argmin of T2 (first on ties); ``reported``: the
    sets as the result reports them (row indices or input ids)."""
    return select_input_set(*set_entries(lp_rows, lq_rows, positions), reported, reduce)


def select_input_set(
    b: Tensor, b_piv: Tensor, t4: Tensor, valid: Tensor, candidate_sets: Tensor, reduce: str = "max"
) -> InputPart:
    """The argmin of T2 over candidate sets (first on ties) from their ``(S, M)`` term-2/term-4 entries
    ``b``, ``b_piv``, ``|tau_p - tau_q|`` and validity (``tau > 0`` for both models)."""
    set_valid = valid.all(dim=1)
    scores = torch.maximum(b.amax(dim=1), b_piv.amax(dim=1))
    scores = torch.where(set_valid, scores, torch.full_like(scores, float("inf")))
    chosen = first_argmin(scores)
    if not bool(torch.isfinite(scores[chosen])):
        raise ValueError(
            "zero variance: every candidate input set has an input x_i whose log-probability vector equals "
            "that of its pivot x0 up to a constant (tau = 0) for at least one model. Give `input_sets` "
            "with distinct, non-degenerate inputs or more candidates."
        )
    t2_terms = torch.cat([b[chosen], b_piv[chosen]])
    t4_terms = t4[chosen]
    red = torch.amax if reduce == "max" else torch.mean
    return InputPart(
        input_set=candidate_sets[chosen],
        chosen_candidate=chosen,
        candidate_sets=candidate_sets,
        candidate_scores=scores,
        t2_terms=t2_terms,
        t4_terms=t4_terms,
        t2=t2_terms.amax(),  # the reference always takes the max for term 2
        t4=red(t4_terms),
    )
