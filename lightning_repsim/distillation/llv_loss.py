"""The differentiable mini-batch d_LLV: entries from the batch's moments, aggregated and combined.

The moments come from :func:`~lightning_repsim.distillation.llv_moments.batch_moments` (label terms, the
all-pivots input terms, the rows of explicit or sampled input sets); the entries use the functional core's
formula (:func:`~lightning_repsim.functional.llv_terms.compared_variance`) with the loss's epsilon policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_repsim.distillation.base import DistillationLoss, check_number, no_autocast
from lightning_repsim.distillation.llv_moments import BatchMoments, batch_moments
from lightning_repsim.distillation.llv_sets import InputSetChoice, LabelChoice
from lightning_repsim.distillation.rows import LogitRows, check_values_finite
from lightning_repsim.functional._validation import check_choice, check_rep_dim
from lightning_repsim.functional.llv_terms import compared_variance

__all__ = ["LLVLoss", "LLVLossOptions", "LLVLossTerms"]

LLV_REDUCE = ("max", "mean", "softmax")
LLV_COMBINE = ("max", "sum", "softmax")


def soft_max(v: Tensor, temperature: float, dim: int = -1) -> Tensor:
    """Log-mean-exp ``tau * log(mean(exp(v / tau)))`` over ``dim``: in ``[mean(v), max(v)]``, tends to
    the max as ``tau -> 0`` and to the mean as ``tau -> inf``; 0 when every entry is 0."""
    return temperature * (torch.logsumexp(v / temperature, dim=dim) - math.log(v.shape[dim]))


def aggregate(v: Tensor, how: str, temperature: float, dim: int = -1) -> Tensor:
    if how == "max":
        return v.amax(dim=dim)
    if how == "mean":
        return v.mean(dim=dim)
    return soft_max(v, temperature, dim)


def smooth_abs(x: Tensor, eps: float) -> Tensor:
    """``sqrt(x^2 + eps^2) - eps``."""
    return torch.sqrt(x * x + eps * eps) - eps


def entries(s1sq: Tensor, delta: Tensor, compared: tuple[Tensor, ...], reference: tuple[Tensor, ...],
            eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(a, a_ref, scale)`` entries from the displacement moments, with the epsilon policy of :class:`LLVLoss`:
    floored normalisers ``sqrt(Var + eps^2)``, compared sds ``sqrt(Var + eps^2) - eps``, smoothed scale."""
    eps2 = eps * eps
    s_p = torch.sqrt(s1sq + eps2)
    s_q = torch.sqrt((s1sq + delta).clamp_min(0) + eps2)
    a = torch.sqrt(compared_variance(s_p, s_q, delta, *compared).clamp_min(0) + eps2) - eps
    a_ref = torch.sqrt(compared_variance(s_p, s_q, delta, *reference).clamp_min(0) + eps2) - eps
    return a, a_ref, smooth_abs(delta / (s_p + s_q), eps)


def reference_moments(x: Tensor, d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(Var x, Cov(x, d), Var d)`` (unbiased) of two vectors."""
    xc, dc = x - x.mean(), d - d.mean()
    scale = 1.0 / (x.shape[0] - 1)
    return (xc * xc).sum() * scale, (xc * dc).sum() * scale, (dc * dc).sum() * scale


def label_entries(m: BatchMoments, index: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """T1 entries ``[a, a_piv]`` and T3 entries of the compared labels (variances over the batch's rows)."""
    moments = m.label if index is None else tuple(v.index_select(0, index) for v in m.label)
    vx, cxd, vd, vu, delta = moments
    a, a_piv, t3 = entries(vu, delta, (vx, cxd, vd), reference_moments(m.x_ref, m.d_ref), eps)
    return torch.cat([a, a_piv.expand_as(a)]), t3


def mean_input_entries(m: BatchMoments, eps: float) -> tuple[Tensor, Tensor]:
    """All-pivots input entries, one set holding every kept row: ``(1, 2n)`` b/b_piv and ``(1, n)`` T4."""
    vx, cxd, vd, vu, delta = m.rows
    col_x, col_d = m.col_x, m.col_d
    reference = reference_moments(col_x - col_x.mean(), col_d - col_d.mean())
    b, b_piv, t4 = entries(vu, delta, (vx, cxd, vd), reference, eps)
    return torch.cat([b, b_piv])[None], t4[None]


def set_rows(positions: Tensor) -> tuple[Tensor, Tensor]:
    """For candidate sets ``(S, M+1)`` of row positions (first = pivot input): the (compared, pivot) row pairs
    ``(2, S M)`` and the rows whose own moments the entries need (``S (M+1)``)."""
    s, m1 = positions.shape
    pairs = torch.stack([positions[:, 1:].reshape(-1), positions[:, :1].expand(s, m1 - 1).reshape(-1)])
    return pairs, positions.reshape(-1)


def set_entries(m: BatchMoments, num_sets: int, eps: float) -> tuple[Tensor, Tensor]:
    """Input entries of candidate sets from their pair and own moments (:func:`set_rows`): ``(S, 2M)`` b/b_piv and
    ``(S, M)`` T4 (variances over labels; the first row of a set is its pivot input)."""
    s1sq, delta = (x.reshape(num_sets, -1) for x in m.pairs)
    own = [x.reshape(num_sets, -1) for x in m.own]
    compared, reference = tuple(x[:, 1:] for x in own), tuple(x[:, :1] for x in own)
    b, b_piv, t4 = entries(s1sq, delta, compared, reference, eps)
    return torch.cat([b, b_piv], dim=-1), t4


@dataclass(frozen=True)
class LLVLossOptions:
    """The options of :class:`LLVLoss` besides ``rep_dim`` and the common ones, passed to it as keyword arguments
    (see its docstring for their meaning); validated by :class:`LLVLoss`."""

    label_pivot: int | str = "mean"
    leave_out: int | None = None
    input_set_search: str = "sample"
    input_sets: Tensor | list[int] | None = None
    input_terms: bool = True
    lam: float = 1e-5
    reduce: str = "max"
    combine: str = "max"
    softmax_temperature: float = 0.05
    num_input_sets: int = 16
    seed: int = 0
    eps: float = 1e-6


class LLVLossTerms(NamedTuple):
    """Everything :meth:`LLVLoss.terms` computed (compute dtype; differentiable).

    Attributes:
        loss: the combined loss (what ``forward`` returns for ``reduction="mean"``).
        t1, t2, t3, t4: the four terms (``reduce`` of their entries, unweighted; T2 = T4 = 0 when
            ``input_terms=False``).
        t1_entries: ``a(y)`` for the compared labels, then ``a_piv(y)``.
        t2_entries: ``b(i)`` for the compared inputs, then ``b_piv(i)`` (empty without input terms).
        t3_entries: ``|sigma_p(y) - sigma_q(y)|``.  t4_entries: ``|tau_p(i) - tau_q(i)|``.
    """

    loss: Tensor
    t1: Tensor
    t2: Tensor
    t3: Tensor
    t4: Tensor
    t1_entries: Tensor
    t2_entries: Tensor
    t3_entries: Tensor
    t4_entries: Tensor


class LLVLoss(DistillationLoss):
    r"""Differentiable mini-batch estimate of d_LLV (SPEC §3) between student (``p``) and teacher (``q``).

    Called as ``loss(student_logits, teacher_logits, mask=None, input_sets=None)`` (like a torch loss's
    ``(input, target)``: the student receives the gradient, the teacher is detached).

    With ``l_p(y|x) = log_softmax(student)``, ``l_q`` the teacher's, all standard deviations
    unbiased (``n - 1``) and taken over the kept rows of the batch (label terms) or over all K
    labels (input terms):

    **Label terms (T1, T3; variances over the batch's inputs).** For a label reference ``r(x)`` and
    the compared labels ``Y'``:

    * ``sigma_p(y) = sd_x[l_p(y|x) - r_p(x)]``                       (normaliser)
    * ``a(y)     = sd_x[l_p(y|x)/sigma_p(y) - l_q(y|x)/sigma_q(y)]``  for ``y`` in ``Y'``
    * ``a_piv(y) = sd_x[r_p(x)/sigma_p(y)   - r_q(x)/sigma_q(y)]``
    * T3 entries ``|sigma_p(y) - sigma_q(y)|``.

    ``label_pivot=y0`` (an int) is the definition: ``r(x) = l(y0|x)``, ``Y'`` = all labels but ``y0``
    and ``leave_out`` (if given); O(B K). ``label_pivot="mean"`` (default) is the **all-pivots
    mode**: ``r(x) = mean_y0 l(y0|x)``, so that ``l(y|x) - r(x) = mean_y0 [l(y|x) - l(y0|x)]`` is the
    log-odds of ``y`` averaged over *every* pivot ``y0`` (= the centred logit ``z_y - mean_y' z_y'``),
    and ``Y'`` = all K labels (but ``leave_out``); O(B K), symmetric in the labels. It is exactly the
    label part of d_LLV with a virtual pivot label whose log-probability is the mean
    log-probability. It is *not* the paper's min over real pivots (and left-out labels): that
    needs every pair covariance ``Cov(l(y), l(y0))``, O(B K^2), and is not offered. To use the
    paper's searched labels, run :func:`lightning_repsim.functional.llv_distance` once on a
    held-out batch and pass its ``label_pivot``/``leave_out`` here.

    **Input terms (T2, T4; variances over labels).** For an input set with reference ``r(y)`` and
    compared inputs ``x_i``:

    * ``tau_p(i) = sd_y[l_p(y|x_i) - r_p(y)]``
    * ``b(i)     = sd_y[l_p(y|x_i)/tau_p(i) - l_q(y|x_i)/tau_q(i)]``
    * ``b_piv(i) = sd_y[r_p(y)/tau_p(i)     - r_q(y)/tau_q(i)]``
    * T4 entries ``|tau_p(i) - tau_q(i)|``.

    A set of ``M+1`` rows ``(x0, x1..xM)`` is the definition (``r(y) = l(y|x0)``). Explicit ``input_sets``
    (``M+1`` row indices, first = pivot ``x0``, or an ``(S, M+1)`` array of candidate sets: argmin of T2
    over them, first on ties, like the functional's ``input_sets``) are used when given; otherwise
    ``input_set_search``:

    * ``"sample"`` (default, needs ``rep_dim``): as the reference does it, ``T2 = min`` over
      ``num_input_sets`` candidate sets of M+1 distinct batch rows of the set's ``reduce`` of its
      entries; T4 comes from the chosen set. The candidate row positions are drawn once per batch
      size with a seeded generator (``seed``) and reused, so with a shuffling loader they are fresh
      random rows every step. O(S M K), and compile-friendly apart from the (cached) draw;
    * ``"first"``: kept rows ``0..M`` (needs ``rep_dim``);
    * ``"mean"``: the all-pivots mode for inputs: ``r(y) = mean_x l(y|x)`` over the batch and *every*
      kept row is a compared input, O(B K). Caveat: a row close to the batch-mean profile has a small
      ``tau`` and so a large, noisy ``b``; with ``reduce="max"`` that row dominates. Pair it with
      ``reduce="mean"`` or ``"softmax"``.

    ``forward(..., input_sets=...)`` gives explicit sets for one call. With tiny
    batches the input terms are noisy; ``input_terms=False`` drops T2 and T4.

    **Aggregation.** ``T_k = reduce(entries of term k)`` with ``reduce`` = ``"max"`` (the paper),
    ``"mean"`` or ``"softmax"``: ``tau * log(mean(exp(v / tau)))`` with ``tau = softmax_temperature``
    (between mean and max; -> max as ``tau -> 0``, -> mean as ``tau -> inf``; 0 when all entries
    are 0). Unlike the functional, where T2 is always a max, ``reduce`` applies to all four terms
    (identical for ``"max"``). ``loss = combine(T1, T2, lam*T3, lam*T4)`` with ``combine`` = ``"max"``
    (the paper), ``"sum"`` (``T1 + T2 + lam (T3 + T4)``) or ``"softmax"`` (of those four values; of
    ``(T1, lam*T3)`` without input terms).

    **Exactness.** With ``label_pivot``, ``leave_out`` and the input set(s) fixed, ``reduce="max"``,
    a tiny ``eps`` and the whole data set as one batch, the loss equals
    ``functional.llv_distance(student, teacher, rep_dim=M, label_pivot=..., leave_out=...,
    input_sets=..., lam=..., combine=...).value`` (tested to 1e-10 in float64).

    **Scale.** As in the paper the scale terms have weight ``lam = 1e-5``, so LLV barely constrains
    the overall logit scale: a student can reduce d_LLV while its KL to the teacher grows. For
    distillation, raise ``lam`` or add :class:`KDLoss`/cross-entropy. For training, smooth
    aggregation (``reduce="softmax"`` or ``"mean"``, ``combine="sum"``) usually optimises more
    easily than the hard max, whose gradient reaches only the largest entry.

    **Epsilon policy** (``eps > 0``, default ``1e-6``, in units of log-probability sds): compared
    standard deviations (``a``, ``a_piv``, ``b``, ``b_piv``) are ``sqrt(Var + eps^2) - eps`` (at most
    ``eps`` below the sd; exactly 0 with zero gradient at identical distributions); the T3/T4
    entries are ``sqrt(d^2 + eps^2) - eps``; the normalisers ``sigma``, ``tau`` are
    ``sqrt(Var + eps^2) >= eps``. Nothing is ever divided by zero and no NaN arises: a column
    whose log-odds are constant over the batch (e.g. a student with constant logits) gets
    ``sigma = eps``, and the loss stays finite but can be as large as ``sd / eps`` (d_LLV itself is
    undefined there and :func:`~lightning_repsim.functional.llv_distance` raises). Since LLV
    compares normalised log-probabilities it cannot move a student whose logits are constant
    over the batch; combine it with cross-entropy/KD or start from a normally initialised student.

    **Reduction.** The loss is one statistic per batch, not a mean of per-input losses: ``"mean"``
    (default) and ``"sum"`` both return it; ``"none"`` returns the four values that are combined,
    ``[T1, T2, lam*T3, lam*T4]`` (shape (4,)). :meth:`terms` returns every entry.

    **Rows.** ``(B, K)``, or ``(B, T, K)`` flattened to ``B*T`` rows; with a ``mask`` only the kept
    rows are used (explicit ``input_sets`` indices refer to the kept rows, in flattened order). At
    least 2 kept rows are needed (``ValueError`` otherwise), M+1 for an input set.

    **Students narrower than their teacher.** The loss reads only logits, so the student's and the teacher's
    representation widths need not agree (distilling into a smaller student is the usual case). ``rep_dim``
    sets the input-set size ``rep_dim + 1``: use the teacher's representation dimension, i.e. the larger of
    the two models' ranks (the width of the last hidden layer, minus one when it ends in a LayerNorm, whose
    outputs lie in a hyperplane), so that the input sets can span the teacher's representation.

    **Memory and time.** The label terms come from column moments of the log-probabilities taken in two passes
    over blocks of rows (:mod:`~lightning_repsim.distillation.llv_moments`) with a hand-written backward;
    besides the gradient, only a few blocks of at most ``chunk_size`` rows are held (default: about 1 MB each on the
    CPU, the leanest and the fastest there; all rows at once on an accelerator, where ``chunk_size`` bounds them).

    Args:
        rep_dim: M, the (teacher's) representation dimension; input sets have M+1 rows. Needed for
            ``input_set_search="sample"`` (default) and ``"first"`` (unless ``input_terms=False`` or
            ``input_sets`` are given); checked against explicit sets.
        options: keyword arguments (:class:`LLVLossOptions` and the common options):
        label_pivot: ``"mean"`` (default, all-pivots mode) or a label index ``y0``.
        leave_out: optional label excluded from the compared labels (the reference leaves one out).
        input_set_search: ``"sample"`` (default), ``"first"`` or ``"mean"``, when ``input_sets`` is None.
        input_sets: explicit M+1 row indices or (S, M+1) candidate sets (default None).
        input_terms: include T2 and T4 (default True).
        lam: weight of the scale terms T3, T4 (default 1e-5, the paper's).
        reduce: ``"max"`` (default), ``"mean"`` or ``"softmax"``, over each term's entries.
        combine: ``"max"`` (default), ``"sum"`` or ``"softmax"``, over the four terms.
        softmax_temperature: ``tau`` of the soft maxima (default 0.05, in the units of d_LLV).
        num_input_sets: candidate sets for ``input_set_search="sample"`` (default 16).
        seed: seed of the candidate draw (default 0).
        eps: see the epsilon policy above.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (see above); ``dtype``, ``check_finite``,
            ``chunk_size`` (see **Memory and time**): as for every loss
            (:class:`~lightning_repsim.distillation.base.DistillationLoss`).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> teacher = torch.randn(64, 7, generator=g, dtype=torch.float64)
        >>> LLVLoss(rep_dim=2)(teacher - 2.0, teacher).item()  # same log-probabilities
        0.0
        >>> student = teacher + 0.3 * torch.randn(64, 7, generator=g, dtype=torch.float64)
        >>> leaf = student.clone().requires_grad_()
        >>> loss = LLVLoss(rep_dim=2, reduce="softmax", combine="sum")(leaf, teacher)
        >>> loss.backward(); bool(loss > 0), leaf.grad.shape
        (True, torch.Size([64, 7]))

        The paper's d_LLV on a full batch, with the label and input sets fixed:

        >>> from lightning_repsim.functional import llv_distance
        >>> sets = torch.tensor([[3, 10, 20], [7, 1, 40]])
        >>> exact = llv_distance(student, teacher, rep_dim=2, label_pivot=0, leave_out=6, input_sets=sets)
        >>> mini = LLVLoss(rep_dim=2, label_pivot=0, leave_out=6, input_sets=sets, eps=1e-12)
        >>> abs(float(mini(student, teacher)) - float(exact.value)) < 1e-10
        True
    """

    def __init__(self, rep_dim: int | None = None, **options: Any) -> None:
        own = {key: options.pop(key) for key in [f.name for f in fields(LLVLossOptions)] if key in options}
        super().__init__(**options)  # the options every loss has; an unknown option is a TypeError naming it
        opts = LLVLossOptions(**own)
        self.rep_dim = None if rep_dim is None else check_rep_dim(rep_dim)
        self.labels = LabelChoice(opts.label_pivot, opts.leave_out)
        self.input_terms = bool(opts.input_terms)
        self.inputs = InputSetChoice(self.rep_dim, opts.input_set_search, opts.input_sets, opts.num_input_sets,
                                     opts.seed, self.input_terms)
        self.lam = check_number(opts.lam, "lam", allow_zero=True)
        self.reduce = check_choice(opts.reduce, "reduce", LLV_REDUCE)
        self.combine = check_choice(opts.combine, "combine", LLV_COMBINE)
        self.softmax_temperature = check_number(opts.softmax_temperature, "softmax_temperature")
        self.eps = check_number(opts.eps, "eps")

    # the options as attributes, under their constructor names
    label_pivot = property(lambda self: self.labels.label_pivot)
    leave_out = property(lambda self: self.labels.leave_out)
    input_set_search = property(lambda self: self.inputs.search)
    input_sets = property(lambda self: self.inputs.input_sets)
    num_input_sets = property(lambda self: self.inputs.num_input_sets)
    seed = property(lambda self: self.inputs.seed)

    def _rows(self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None) -> LogitRows:
        rows = self.logit_rows(student_logits, teacher_logits, mask, host_runs=True)
        n = rows.num_kept()
        if n < 2:
            raise ValueError(f"LLVLoss needs at least 2 (kept) rows to estimate variances over inputs, got {n}")
        return rows

    def _input_part(self, m: BatchMoments, sets: Tensor | None):
        """``(t2, t4, t2_entries, t4_entries)`` of the candidate set with the smallest T2 (first on ties)."""
        how, temp = self.reduce, self.softmax_temperature
        if sets is None:
            t2_all, t4_all = mean_input_entries(m, self.eps)
        else:
            t2_all, t4_all = set_entries(m, sets.shape[0], self.eps)
        t2_per_set = aggregate(t2_all, how, temp)
        best = torch.argmin(t2_per_set.detach()).reshape(1)  # index_select keeps the choice in the graph
        t2_entries, t4_entries = t2_all.index_select(0, best).squeeze(0), t4_all.index_select(0, best).squeeze(0)
        return t2_per_set.index_select(0, best).squeeze(0), aggregate(t4_entries, how, temp), t2_entries, t4_entries

    def terms(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        mask: Tensor | None = None,
        input_sets: Tensor | list[int] | None = None,
    ) -> LLVLossTerms:
        """The loss and all its terms and entries (differentiable), see :class:`LLVLossTerms`."""
        with no_autocast(student_logits):
            rows = self._rows(student_logits, teacher_logits, mask)
            dev, how, temp = rows.student.device, self.reduce, self.softmax_temperature
            compared = self.labels.compared(rows.num_classes, dev)
            index = rows.kept_index()
            sets = self.inputs.candidates(input_sets, index.numel(), dev) if self.input_terms else None
            mean_rows = self.input_terms and sets is None
            pairs, own = set_rows(index[sets] if sets is not None else index[:0].reshape(0, 2))
            m = batch_moments(rows, self.labels.pivot, mean_rows, pairs, own)
            check_values_finite(torch.cat([m.x_ref, m.d_ref, m.col_x, m.col_d]).detach(), rows, self.check_finite)
            t1_entries, t3_entries = label_entries(m, compared, self.eps)
            t1, t3 = aggregate(t1_entries, how, temp), aggregate(t3_entries, how, temp)
            if self.input_terms:
                t2, t4, t2_entries, t4_entries = self._input_part(m, sets)
                parts = torch.stack([t1, t2, self.lam * t3, self.lam * t4])
            else:
                t2_entries = t4_entries = t1.new_zeros(0)
                t2 = t4 = t1.new_zeros(())
                parts = torch.stack([t1, self.lam * t3])
            if self.combine == "max":
                loss = parts.amax()
            elif self.combine == "sum":
                loss = parts.sum()
            else:
                loss = soft_max(parts, temp)
            return LLVLossTerms(loss, t1, t2, t3, t4, t1_entries, t2_entries, t3_entries, t4_entries)

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        mask: Tensor | None = None,
        input_sets: Tensor | list[int] | None = None,
    ) -> Tensor:
        """The loss of the student's logits against the teacher's (see the class docstring)."""
        out = self.terms(student_logits, teacher_logits, mask, input_sets)
        if self.reduction == "none":
            return torch.stack([out.t1, out.t2, self.lam * out.t3, self.lam * out.t4])
        return out.loss

    def extra_repr(self) -> str:
        return (
            f"rep_dim={self.rep_dim}, label_pivot={self.label_pivot!r}, leave_out={self.leave_out}, "
            f"{self.inputs!r}, input_terms={self.input_terms}, lam={self.lam}, reduce={self.reduce!r}, "
            f"combine={self.combine!r}, eps={self.eps}, " + super().extra_repr()
        )
