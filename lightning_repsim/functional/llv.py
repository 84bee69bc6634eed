"""The log-likelihood variance distance d_LLV (SPEC §3).

Two routes feed the same formulas:

* label terms (T1, T3) and the (pivot, left-out) search come from the covariance of the
  ``2K``-vector ``w(x) = [l_p(.|x); l_q(.|x) - l_p(.|x)]`` (log-probabilities ``l``). Storing the
  *difference* of the two models rather than ``l_q`` keeps the terms accurate when the models are
  nearly identical (distillation): no difference of two large, almost equal numbers is formed.
  Any batch split gives the same covariance (``_moments``), which is what makes the streaming
  metrics exact;
* input terms (T2, T4) need the full label vectors at the inputs of each candidate input set and
  are computed directly from them, all candidate sets in one batched operation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from lightning_repsim.functional._moments import batch_moments, covariance_from_moments, merge_moments
from lightning_repsim.functional._validation import (
    check_choice,
    check_label_index,
    check_logit_pair,
    check_num_inputs,
    check_num_labels,
    check_rep_dim,
)

__all__ = ["LLVResult", "llv_distance", "log_probabilities", "draw_input_sets"]

REDUCTIONS = ("max", "mean")
COMBINATIONS = ("max", "sum")
# A standard deviation counts as zero when its square is below this many ulps of the variances it
# was computed from (covariance-route cancellation is of that order).
_ZERO_VAR_ULPS = 64.0
#: Scores within this relative distance of the minimum count as tied; ties go to the first index
#: (smallest pivot, then smallest left-out label; first candidate set). Exact ties are structural
#: (e.g. T1 entries are symmetric in the pivot and the label), so without a tolerance the choice
#: would depend on rounding, i.e. on batch order and process count.
TIE_RTOL = 1e-10


def first_argmin(scores: Tensor, rtol: float = TIE_RTOL) -> int:
    """Index of the first entry (row-major) within ``rtol`` (relative) of the minimum of ``scores``."""
    flat = scores.reshape(-1)
    best = flat.min()
    if not bool(torch.isfinite(best)):
        return int(torch.argmin(flat))
    within = flat <= best + rtol * best.abs()
    return int(torch.nonzero(within)[0])


@dataclass(frozen=True)
class LLVResult:
    """Everything ``llv_distance`` computed. Tensors are float64 scalars unless noted.

    Attributes:
        distance: d_LLV, ``max(T1, T2, lam*T3, lam*T4)`` (``combine="max"``) or
            ``T1 + T2 + lam*(T3 + T4)`` (``combine="sum"``).
        t1, t2, t3, t4: the four terms (``reduce`` of their entries; T2 is always a max).
        t1_terms: ``2(K-2)`` entries, ``a(y)`` for the kept labels in label order, then ``a_piv(y)``.
        t2_terms: ``2M`` entries, ``b(i)`` for ``i = 1..M`` then ``b_piv(i)``.
        t3_terms: ``|sigma_p(y) - sigma_q(y)|`` for the kept labels.  t4_terms: ``|tau_p(i) - tau_q(i)|``.
        label_pivot, leave_out: the label set (pivot ``y0`` and left-out label).
        kept_labels: the ``K-2`` labels compared (LongTensor, increasing).
        input_set: ``M+1`` input indices, the first is the pivot input ``x0`` (LongTensor).
        chosen_candidate: index of ``input_set`` among ``candidate_sets``.
        candidate_sets, candidate_scores: the candidate input sets and their T2 (``inf`` = invalid).
        label_search: ``"full"`` (all pivots and left-out labels searched), ``"given"`` (both given),
            ``"partial"`` (one given) or ``"restricted"`` (a bounded list of pivots searched).
        num_inputs, num_labels, rep_dim, lam, reduce, combine: the configuration.
    """

    distance: Tensor
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
    num_inputs: int
    num_labels: int
    rep_dim: int
    lam: float
    reduce: str
    combine: str

    def as_dict(self) -> dict[str, float]:
        """Scalar summary (Python floats/ints), handy for loggers."""
        return {
            "d_llv": float(self.distance),
            "t1": float(self.t1),
            "t2": float(self.t2),
            "t3": float(self.t3),
            "t4": float(self.t4),
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


# ----------------------------------------------------------------------------------------------
# Label terms (T1, T3) from the covariance of w = [l_p; l_q - l_p]
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelCov:
    """The parts of ``Cov(w)``, ``w = [X; D] = [l_p; l_q - l_p]``, that the label terms need for a
    set of pivot labels ``P``: three K-diagonals and four (P, K) row blocks. Building only these keeps
    a restricted pivot search O(P K) in memory, which is what makes K = 50,257 feasible.

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
class _LabelTable:
    """Term-1/term-3 entries for every (pivot p in ``pivots``, label y): shape (P, K)."""

    pivots: Tensor
    a: Tensor  # a(y) for pivot p; +inf where invalid
    a_piv: Tensor  # a_piv(y) for pivot p; +inf where invalid
    t3: Tensor  # |sigma_p - sigma_q|; +inf where invalid
    valid: Tensor  # bool; False on the diagonal and where a sigma is zero


def label_table(c: LabelCov) -> _LabelTable:
    """All term-1/term-3 entries for the pivot labels of ``c``.

    Writing ``X = l_p``, ``D = l_q - l_p``, ``u = X_y - X_p``, ``d = D_y - D_p``:
    ``sigma_p^2 = Var u``, ``sigma_q^2 = sigma_p^2 + Delta`` with ``Delta = 2 Cov(u, d) + Var d``, and
    ``X/sigma_p - (X + D)/sigma_q = gamma X - beta D`` with ``beta = 1/sigma_q`` and
    ``gamma = Delta / (sigma_p sigma_q (sigma_p + sigma_q))``. Cost O(P K).
    """
    p = c.pivots
    k = c.vx.shape[0]
    vx, vxd, vd = c.vx, c.vxd, c.vd
    vy = vx + 2 * vxd + vd  # Var l_q
    s1sq = vx[None, :] + vx[p, None] - 2 * c.sxx
    cov_ud = vxd[None, :] - c.sxd_yp - c.sxd_py + vxd[p, None]
    var_d = vd[None, :] + vd[p, None] - 2 * c.sdd
    delta = 2 * cov_ud + var_d
    s2sq = s1sq + delta

    eps = torch.finfo(torch.float64).eps * _ZERO_VAR_ULPS
    not_diag = p[:, None] != torch.arange(k, device=vx.device)[None, :]
    valid = (
        not_diag
        & (s1sq > eps * (vx[None, :] + vx[p, None]))
        & (s2sq > eps * (vy[None, :] + vy[p, None]))
        & (s1sq > 0)
        & (s2sq > 0)
    )
    one = torch.ones_like(s1sq)
    s1 = torch.where(valid, s1sq, one).sqrt()
    s2 = torch.where(valid, s2sq, one).sqrt()
    beta = 1.0 / s2
    gamma = delta / (s1 * s2 * (s1 + s2))
    a2 = gamma.square() * vx[None, :] - 2 * gamma * beta * vxd[None, :] + beta.square() * vd[None, :]
    ap2 = gamma.square() * vx[p, None] - 2 * gamma * beta * vxd[p, None] + beta.square() * vd[p, None]
    inf = torch.full_like(s1sq, float("inf"))
    a = torch.where(valid, a2.clamp_min(0).sqrt(), inf)
    a_piv = torch.where(valid, ap2.clamp_min(0).sqrt(), inf)
    t3 = torch.where(valid, delta.abs() / (s1 + s2), inf)
    return _LabelTable(pivots=p, a=a, a_piv=a_piv, t3=t3, valid=valid)


def _leave_out_scores(table: _LabelTable, reduce: str) -> Tensor:
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


def label_part(
    label_cov: Callable[[Tensor], LabelCov],
    num_labels: int,
    device: torch.device,
    reduce: str = "max",
    label_pivot: int | None = None,
    leave_out: int | None = None,
    pivot_candidates: Tensor | None = None,
) -> LabelPart:
    """Choose ``(y0, lo)`` (unless given) and compute T1/T3.

    ``label_cov(pivots)`` returns the :class:`LabelCov` for those pivots: from the full covariance
    (``functools.partial(label_cov_from_full, cov)``) or from a representation statistic.

    The search is the argmin over pivots and left-out labels of T1 (``reduce`` of its entries), ties
    (within ``TIE_RTOL`` relative) broken by the smallest pivot, then the smallest left-out label. ``pivot_candidates`` restricts
    the pivots searched (for very large K).
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
    table = label_table(label_cov(pivots))
    scores = _leave_out_scores(table, reduce)
    if leave_out is not None:
        lo_mask = torch.ones_like(scores, dtype=torch.bool)
        lo_mask[:, leave_out] = False
        scores = scores.masked_fill(lo_mask, float("inf"))
    row, lo = divmod(first_argmin(scores), k)
    y0 = int(pivots[row])
    keep = torch.ones(k, dtype=torch.bool, device=device)
    keep[[y0, lo]] = False
    kept = torch.nonzero(keep).flatten()
    if not torch.isfinite(scores[row, lo]):
        bad = kept[~table.valid[row, kept]].tolist()
        raise ValueError(_zero_variance_message(y0, bad))
    t1_terms = torch.cat([table.a[row, kept], table.a_piv[row, kept]])
    t3_terms = table.t3[row, kept]
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
    )


# ----------------------------------------------------------------------------------------------
# Input terms (T2, T4) from the label vectors at candidate input sets
# ----------------------------------------------------------------------------------------------
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


def _sd_terms(lp: Tensor, lq: Tensor, lp_piv: Tensor, lq_piv: Tensor) -> tuple[Tensor, ...]:
    """The (b, b_piv, |tau_p - tau_q|, valid) entries over the last dimension (labels)."""
    tau_p = (lp - lp_piv).std(dim=-1, keepdim=True)
    tau_q = (lq - lq_piv).std(dim=-1, keepdim=True)
    eps = torch.finfo(torch.float64).eps * _ZERO_VAR_ULPS
    scale_p = lp.abs().amax(dim=-1, keepdim=True) + lp_piv.abs().amax(dim=-1, keepdim=True)
    scale_q = lq.abs().amax(dim=-1, keepdim=True) + lq_piv.abs().amax(dim=-1, keepdim=True)
    valid = (tau_p > eps * scale_p) & (tau_q > eps * scale_q)
    one = torch.ones_like(tau_p)
    tp, tq = torch.where(valid, tau_p, one), torch.where(valid, tau_q, one)
    b = (lp / tp - lq / tq).std(dim=-1, keepdim=True)
    b_piv = (lp_piv / tp - lq_piv / tq).std(dim=-1, keepdim=True)
    return b.squeeze(-1), b_piv.squeeze(-1), (tau_p - tau_q).abs().squeeze(-1), valid.squeeze(-1)


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


def input_part(lp_sets: Tensor, lq_sets: Tensor, candidate_sets: Tensor, reduce: str = "max") -> InputPart:
    """T2/T4 for every candidate set and the argmin of T2 (first on ties).

    ``lp_sets``/``lq_sets``: log-probabilities at the candidate sets, shape (S, M+1, K); the first
    input of each set is its pivot ``x0``. ``candidate_sets``: (S, M+1) input ids, reported back.
    """
    b, b_piv, t4, valid = _sd_terms(lp_sets[:, 1:], lq_sets[:, 1:], lp_sets[:, :1], lq_sets[:, :1])
    return select_input_set(b, b_piv, t4, valid, candidate_sets, reduce)


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


def check_input_sets(input_sets: Tensor, num_inputs: int, rep_dim: int) -> Tensor:
    sets = torch.as_tensor(input_sets).to(torch.long)
    if sets.ndim == 1:
        sets = sets[None]
    if sets.ndim != 2 or sets.shape[1] != rep_dim + 1:
        raise ValueError(
            f"`input_sets` must have shape (S, M+1) = (S, {rep_dim + 1}), got {tuple(sets.shape)}"
        )
    if sets.numel() == 0:
        raise ValueError("`input_sets` is empty")
    if bool((sets < 0).any()) or bool((sets >= num_inputs).any()):
        raise ValueError(f"`input_sets` holds indices outside [0, {num_inputs})")
    ordered = sets.sort(dim=1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        raise ValueError("`input_sets`: every candidate set must hold M+1 distinct inputs")
    return sets


def _covariance_blocks(lp: Tensor, lq: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Two-pass centred ``Cov(X)``, ``Cov(X, D)``, ``Cov(D)`` for ``X = l_p``, ``D = l_q - l_p``: the
    three distinct blocks of the 2K x 2K covariance, 3/4 of the cost of forming all of it."""
    xc = lp - lp.mean(dim=0)
    dc = lq - lp
    dc = dc - dc.mean(dim=0)
    scale = 1.0 / (lp.shape[0] - 1)
    return (xc.T @ xc) * scale, (xc.T @ dc) * scale, (dc.T @ dc) * scale


def llv_result(labels: LabelPart, inputs: InputPart, n: int, k: int, m: int, lam: float, reduce: str, combine: str) -> LLVResult:
    """Assemble an :class:`LLVResult` from its label and input parts (shared with the streaming metrics)."""
    return LLVResult(
        distance=combine_terms(labels.t1, inputs.t2, labels.t3, inputs.t4, lam, combine),
        t1=labels.t1,
        t2=inputs.t2,
        t3=labels.t3,
        t4=inputs.t4,
        t1_terms=labels.t1_terms,
        t2_terms=inputs.t2_terms,
        t3_terms=labels.t3_terms,
        t4_terms=inputs.t4_terms,
        label_pivot=labels.label_pivot,
        leave_out=labels.leave_out,
        kept_labels=labels.kept_labels,
        input_set=inputs.input_set,
        chosen_candidate=inputs.chosen_candidate,
        candidate_sets=inputs.candidate_sets,
        candidate_scores=inputs.candidate_scores,
        label_search=labels.search,
        num_inputs=n,
        num_labels=k,
        rep_dim=m,
        lam=float(lam),
        reduce=reduce,
        combine=combine,
    )


def combine_terms(t1: Tensor, t2: Tensor, t3: Tensor, t4: Tensor, lam: float, combine: str) -> Tensor:
    if combine == "max":
        return torch.stack([t1, t2, lam * t3, lam * t4]).amax()
    return t1 + t2 + lam * (t3 + t4)


def llv_distance(
    logits_p: Tensor,
    logits_q: Tensor,
    rep_dim: int,
    lam: float = 1e-5,
    reduce: str = "max",
    combine: str = "max",
    label_pivot: int | None = None,
    leave_out: int | None = None,
    input_sets: Tensor | None = None,
    num_input_sets: int = 200,
    seed: int = 0,
) -> LLVResult:
    """Log-likelihood variance distance d_LLV between two models' predictive distributions.

    Args:
        logits_p, logits_q: logits of the two models on the same inputs, shape (N, K) or (..., K)
            (leading dimensions are flattened). Any float dtype and device; computed in float64.
        rep_dim: the representation dimension M; input sets have M+1 inputs.
        lam: weight of the scale terms T3, T4 (1e-5 in the paper).
        reduce: ``"max"`` (paper) or ``"mean"`` over the entries of T1, T3, T4 (T2 is always a max).
        combine: ``"max"`` (paper) or ``"sum"`` of the four (weighted) terms.
        label_pivot, leave_out: fix the label set; otherwise the argmin search of SPEC §3.
        input_sets: optional (S, M+1) candidate input sets (first column = pivot input x0). The
            chosen set is the true argmin of T2 over them.
        num_input_sets: how many candidate sets to draw when ``input_sets`` is None.
        seed: seed of the draw of candidate sets.

    Returns:
        :class:`LLVResult`.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> logits = torch.randn(500, 7, generator=g, dtype=torch.float64)
        >>> shifted = logits + torch.randn(500, 1, generator=g, dtype=torch.float64)  # same p(y|x)
        >>> float(llv_distance(logits, shifted, rep_dim=2).distance) < 1e-12
        True
        >>> res = llv_distance(logits, logits.flip(-1), rep_dim=2)
        >>> round(float(res.distance), 3) > 0, res.input_set.shape
        (True, torch.Size([3]))
    """
    rep_dim = check_rep_dim(rep_dim)
    check_choice(reduce, "reduce", REDUCTIONS)
    check_choice(combine, "combine", COMBINATIONS)
    p, q = check_logit_pair(logits_p, logits_q)
    n, k = p.shape
    check_num_labels(k)
    check_num_inputs(n, rep_dim)
    label_pivot = check_label_index(label_pivot, "label_pivot", k)
    leave_out = check_label_index(leave_out, "leave_out", k)
    if label_pivot is not None and label_pivot == leave_out:
        raise ValueError(f"`label_pivot` and `leave_out` must differ, both are {label_pivot}")

    lp, lq = log_probabilities(p), log_probabilities(q)
    labels = label_part(partial(label_cov_from_blocks, *_covariance_blocks(lp, lq)), k, lp.device, reduce, label_pivot, leave_out)

    if input_sets is None:
        sets = draw_input_sets(n, rep_dim + 1, num_input_sets, seed)
    else:
        sets = check_input_sets(input_sets, n, rep_dim)
    sets = sets.to(lp.device)
    inputs = input_part(lp[sets], lq[sets], sets, reduce)
    return llv_result(labels, inputs, n, k, rep_dim, lam, reduce, combine)


# ----------------------------------------------------------------------------------------------
# Representation route (SPEC §6): the same terms from embeddings + unembeddings, never K x K
# ----------------------------------------------------------------------------------------------
#: Layout of the streamed representation vector ``u(x)`` (length ``2M + 2``). It is an invertible
#: linear map of ``[f_p, logZ_p, f_q, logZ_q]`` (SPEC §6); storing the *differences* keeps nearly
#: identical models accurate, exactly as ``[l_p; l_q - l_p]`` does for the logits route.
REPRESENTATION_LAYOUT = "[f_p, logZ_p, f_q - f_p, logZ_q - logZ_p]"
_LABEL_CHUNK = 4096


def _label_coefficients(w_p: Tensor, w_q: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Rows ``alpha_y``, ``delta_y`` of the linear maps ``u -> X_y = l_p(y|x)`` and
    ``u -> D_y = l_q(y|x) - l_p(y|x)`` (up to constants, which covariances ignore):
    ``X_y = W_p[y] f_p - logZ_p + b``, ``D_y = (W_q - W_p)[y] f_p + W_q[y] (f_q - f_p) - (logZ_q - logZ_p) + b'``."""
    wp, wq = w_p[rows], w_q[rows]
    c, m = wp.shape
    zero, one = wp.new_zeros(c, 1), wp.new_ones(c, 1)
    alpha = torch.cat([wp, -one, wp.new_zeros(c, m + 1)], dim=1)
    delta = torch.cat([wq - wp, zero, wq, -one], dim=1)
    return alpha, delta


def label_cov_from_representation(
    cov_u: Tensor, w_p: Tensor, w_q: Tensor, pivots: Tensor, chunk_size: int = _LABEL_CHUNK
) -> LabelCov:
    """:class:`LabelCov` from the ``(2M+2) x (2M+2)`` covariance of ``u(x)`` (layout
    :data:`REPRESENTATION_LAYOUT`) and the unembedding weights ``w_p``, ``w_q`` (K x M; biases shift
    log-probabilities by constants and do not enter). ``Cov(w) = B Cov(u) B^T`` is never formed:
    cost O(K M^2 + P K M), memory O(P K + chunk_size M), so K = 50,257 is fine.
    """
    k, m = w_p.shape
    a_piv, d_piv = _label_coefficients(w_p, w_q, pivots)
    a_piv_s, d_piv_s = a_piv[:, : m + 1] @ cov_u[: m + 1], d_piv @ cov_u
    vx, vxd, vd = (cov_u.new_empty(k) for _ in range(3))
    sxx, sxd_py, sxd_yp, sdd = (cov_u.new_empty(pivots.numel(), k) for _ in range(4))
    for start in range(0, k, chunk_size):
        sl = slice(start, min(k, start + chunk_size))
        a, d = _label_coefficients(w_p, w_q, torch.arange(sl.start, sl.stop, device=w_p.device))
        a_s, d_s = a[:, : m + 1] @ cov_u[: m + 1], d @ cov_u
        vx[sl], vxd[sl], vd[sl] = (a_s * a).sum(1), (a_s * d).sum(1), (d_s * d).sum(1)
        sxx[:, sl], sxd_py[:, sl] = a_piv_s @ a.T, a_piv_s @ d.T
        sxd_yp[:, sl], sdd[:, sl] = d_piv_s @ a.T, d_piv_s @ d.T
    return LabelCov(pivots=pivots, vx=vx, vxd=vxd, vd=vd, sxx=sxx, sxd_py=sxd_py, sxd_yp=sxd_yp, sdd=sdd)


def label_means_from_representation(
    mean_u: Tensor, w_p: Tensor, b_p: Tensor | None, w_q: Tensor, b_q: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Mean log-probability of every label under each model, ``E_x l_p(y|x)`` and ``E_x l_q(y|x)``."""
    m = w_p.shape[1]
    f_p, lz_p, df, dlz = mean_u[:m], mean_u[m], mean_u[m + 1 : 2 * m + 1], mean_u[2 * m + 1]
    mean_p = w_p @ f_p - lz_p
    mean_q = w_q @ (f_p + df) - (lz_p + dlz)
    return (mean_p if b_p is None else mean_p + b_p), (mean_q if b_q is None else mean_q + b_q)


def input_terms_from_representation(
    f_p_rows: Tensor,
    f_q_rows: Tensor,
    w_p: Tensor,
    b_p: Tensor | None,
    w_q: Tensor,
    b_q: Tensor | None,
    sets: Tensor,
    chunk_size: int = _LABEL_CHUNK,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Term-2/term-4 entries ``(b, b_piv, |tau_p - tau_q|, valid)``, each (S, M), for candidate sets
    (S, M+1) of row indices into the embeddings ``f_p_rows``/``f_q_rows`` (R x M), without forming any
    (M+1) x K matrix of log-probabilities.

    Over labels, ``l_p(y|x) = h_y . [f_p(x), 1, 0, 0] + const`` and ``l_q(y|x) - l_p(y|x) =
    h_y . [f_q - f_p, 0, f_q, 1] + const`` with ``h_y = [W_p[y], b_p[y], (W_q - W_p)[y], (b_q - b_p)[y]]``,
    so every standard deviation over labels is a quadratic form in the ``(2M+2)^2`` label covariance
    of ``h`` (cost O(K M^2)); pairwise differences of inputs come from Gram matrices of the centred
    rows (O(R^2 M)). Same algebra as :func:`label_table`: ``tau_q^2 = tau_p^2 + Delta`` and
    ``l_p/tau_p - l_q/tau_q = gamma l_p - beta (l_q - l_p)``.
    """
    k, m = w_p.shape
    b_p = w_p.new_zeros(k) if b_p is None else b_p
    b_q = w_q.new_zeros(k) if b_q is None else b_q
    count = mean = m2 = None
    for start in range(0, k, chunk_size):
        sl = slice(start, min(k, start + chunk_size))
        h = torch.cat([w_p[sl], b_p[sl, None], w_q[sl] - w_p[sl], (b_q[sl] - b_p[sl])[:, None]], dim=1)
        part = batch_moments(h)
        count, mean, m2 = part if count is None else merge_moments(count, mean, m2, *part)
    sigma = covariance_from_moments(count, m2)

    fp, fq = f_p_rows, f_q_rows
    df = fq - fp
    r = fp.shape[0]
    zero, one = fp.new_zeros(r, 1), fp.new_ones(r, 1)
    x = torch.cat([fp, one, fp.new_zeros(r, m + 1)], dim=1)
    e = torch.cat([df, zero, fq, one], dim=1)
    x_s, e_s = x @ sigma, e @ sigma
    vx, cxe, ve = (x_s * x).sum(1), (x_s * e).sum(1), (e_s * e).sum(1)
    vq = vx + 2 * cxe + ve
    ac = torch.cat([fp - fp.mean(0), fp.new_zeros(r, m + 2)], dim=1)
    dc = torch.cat([df - df.mean(0), zero, fq - fq.mean(0), zero], dim=1)
    ac_s = ac @ sigma
    gaa, gad, gdd = ac_s @ ac.T, ac_s @ dc.T, (dc @ sigma) @ dc.T

    z, i = sets[:, :1], sets[:, 1:]
    tp2 = gaa[i, i] + gaa[z, z] - 2 * gaa[i, z]
    cad = gad[i, i] - gad[i, z] - gad[z, i] + gad[z, z]
    vdd = gdd[i, i] + gdd[z, z] - 2 * gdd[i, z]
    delta = 2 * cad + vdd
    tq2 = tp2 + delta
    eps = torch.finfo(torch.float64).eps * _ZERO_VAR_ULPS
    valid = (tp2 > eps * (vx[i] + vx[z])) & (tq2 > eps * (vq[i] + vq[z])) & (tp2 > 0) & (tq2 > 0)
    one_ = torch.ones_like(tp2)
    tp, tq = torch.where(valid, tp2, one_).sqrt(), torch.where(valid, tq2, one_).sqrt()
    gamma = delta / (tp * tq * (tp + tq))
    beta = 1.0 / tq
    b2 = gamma.square() * vx[i] - 2 * gamma * beta * cxe[i] + beta.square() * ve[i]
    bp2 = gamma.square() * vx[z] - 2 * gamma * beta * cxe[z] + beta.square() * ve[z]
    return b2.clamp_min(0).sqrt(), bp2.clamp_min(0).sqrt(), delta.abs() / (tp + tq), valid
