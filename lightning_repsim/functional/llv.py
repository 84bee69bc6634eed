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

from lightning_repsim.functional._moments import batch_moments, covariance_from_moments
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
    """``log softmax`` in float64 over the last dimension (the model's ``l(y|x)``)."""
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
    sxx, sxd, sdd = cov[:k, :k], cov[:k, k:], cov[k:, k:]
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
    broken by the smallest pivot, then the smallest left-out label. ``pivot_candidates`` restricts
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
    flat = int(torch.argmin(scores.reshape(-1)))
    row, lo = divmod(flat, k)
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
    set_valid = valid.all(dim=1)
    scores = torch.maximum(b.amax(dim=1), b_piv.amax(dim=1))
    scores = torch.where(set_valid, scores, torch.full_like(scores, float("inf")))
    chosen = int(torch.argmin(scores))
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
    count, _, m2 = batch_moments(torch.cat([lp, lq - lp], dim=1))
    cov = covariance_from_moments(count, m2)
    labels = label_part(partial(label_cov_from_full, cov), k, cov.device, reduce, label_pivot, leave_out)

    if input_sets is None:
        sets = draw_input_sets(n, rep_dim + 1, num_input_sets, seed)
    else:
        sets = check_input_sets(input_sets, n, rep_dim)
    sets = sets.to(lp.device)
    inputs = input_part(lp[sets], lq[sets], sets, reduce)
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
        rep_dim=rep_dim,
        lam=float(lam),
        reduce=reduce,
        combine=combine,
    )
