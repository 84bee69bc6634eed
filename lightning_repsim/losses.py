"""Distillation losses: a differentiable mini-batch d_LLV, the centred logit distance, and Hinton KD.

All three are ``nn.Module`` s called as ``loss(student_logits, teacher_logits, mask=None)``:

* the **student** (model ``p`` of SPEC §3) comes first and receives the gradient; the **teacher**
  (model ``q``) is detached inside, so no gradient ever reaches it;
* logits have shape ``(B, K)`` or ``(B, T, K)`` (any leading dimensions; they are flattened to
  rows). ``mask`` has the leading shape (``(B,)`` or ``(B, T)``), bool (or 0/1 integers),
  ``True`` = keep the row; masked rows contribute nothing and receive zero gradient, and their
  logits may hold anything, even NaN;
* the computation runs in ``float32``, or ``float64`` when either input is ``float64`` (``dtype=``
  forces one), with autocast disabled inside, so the losses are safe under ``torch.autocast``
  (bf16/fp16 logits are upcast) and work under ``torch.compile``;
* ``reduction``: ``"mean"`` (over kept rows), ``"sum"`` or ``"none"`` (per row, leading shape,
  masked rows 0). :class:`LLVLoss` is a batch statistic; see its docstring for what the
  reductions mean there.

Bad input raises ``ValueError`` (shape mismatch, fewer than 2 labels, non-finite values in kept
rows, too few rows for :class:`LLVLoss`). The finiteness check reads a value on the host (one
sync per call); it is skipped while ``torch.compile`` traces and can be switched off with
``check_finite=False`` (non-finite logits then give a non-finite loss). With a ``mask``,
:class:`LLVLoss` selects the kept rows (a data-dependent shape: a graph break under compile);
the per-row losses use ``torch.where`` and keep static shapes.

Example:
    >>> import torch
    >>> from lightning_repsim.losses import KDLoss, LLVLoss, LogitDistanceLoss
    >>> teacher = torch.randn(32, 10, generator=torch.Generator().manual_seed(0))
    >>> student = teacher + 3.0  # same predictive distribution: every loss is zero
    >>> [round(float(loss(student, teacher)), 6) for loss in (LLVLoss(rep_dim=2), LogitDistanceLoss(), KDLoss())]
    [0.0, 0.0, 0.0]
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lightning_repsim.functional._validation import check_finite as _check_finite_values
from lightning_repsim.functional._validation import check_input_sets, check_mask
from lightning_repsim.functional.llv_terms import compared_variance, displacement_moments

__all__ = ["KDLoss", "LLVLoss", "LLVLossTerms", "LogitDistanceLoss"]

REDUCTIONS = ("mean", "sum", "none")
LLV_REDUCE = ("max", "mean", "softmax")
LLV_COMBINE = ("max", "sum", "softmax")
INPUT_SET_SEARCH = ("sample", "first", "mean")


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------
def _check_choice(value: str, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}")
    return value


def _check_positive(value: float, name: str, allow_zero: bool = False) -> float:
    value = float(value)
    ok = value >= 0 if allow_zero else value > 0
    if not (ok and math.isfinite(value)):
        raise ValueError(f"`{name}` must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return value


def _check_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    if dtype not in (None, torch.float32, torch.float64):
        raise ValueError(f"`dtype` (the compute dtype) must be None, torch.float32 or torch.float64, got {dtype!r}")
    return dtype


def _compiling() -> bool:
    return bool(torch.compiler.is_compiling())


def _compute_dtype(student: Tensor, teacher: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    return torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32


def _prepare(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None,
    dtype: torch.dtype | None,
    check_finite: bool,
) -> tuple[Tensor, Tensor, Tensor | None, torch.Size]:
    """Validate and flatten to ``(N, K)`` rows in the compute dtype; the teacher is detached.

    Returns ``(s, t, keep, lead_shape)`` where ``keep`` is the flattened bool mask (or None) and the
    masked rows of ``s``/``t`` have been replaced by zeros (gradient-safe ``torch.where``).
    """
    for x, name in ((student, "student_logits"), (teacher, "teacher_logits")):
        if not isinstance(x, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {x.dtype}")
        if x.ndim < 2:
            raise ValueError(f"`{name}` must have shape (B, K) or (B, T, K), got shape {tuple(x.shape)}")
    if student.shape != teacher.shape:
        raise ValueError(
            "`student_logits` and `teacher_logits` must have the same shape, "
            f"got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    k = student.shape[-1]
    if k < 2:
        raise ValueError(f"need at least K = 2 labels (classes), got K = {k}")
    lead = student.shape[:-1]
    cdt = _compute_dtype(student, teacher, dtype)
    s = student.reshape(-1, k).to(cdt)
    t = teacher.detach().reshape(-1, k).to(cdt)
    keep = check_mask(mask, lead, s.device)
    if keep is not None:
        s = torch.where(keep[:, None], s, torch.zeros_like(s))
        t = torch.where(keep[:, None], t, torch.zeros_like(t))
    if check_finite and not _compiling():
        _check_finite_values(s.detach(), "student_logits")
        _check_finite_values(t, "teacher_logits")
    return s, t, keep, lead


def _reduce_rows(per_row: Tensor, keep: Tensor | None, lead: torch.Size, reduction: str) -> Tensor:
    """Apply ``reduction`` to a per-row loss of shape (N,) (masked rows already hold 0)."""
    if keep is not None:
        per_row = per_row * keep.to(per_row.dtype)
    if reduction == "none":
        return per_row.reshape(lead)
    total = per_row.sum()
    if reduction == "sum":
        return total
    count = per_row.new_tensor(float(per_row.shape[0])) if keep is None else keep.sum().to(per_row.dtype)
    return total / count.clamp_min(1.0)


def _smooth_abs(x: Tensor, eps: float) -> Tensor:
    """``sqrt(x^2 + eps^2) - eps`` (``|x|`` when ``eps = 0``)."""
    if eps == 0:
        return x.abs()
    return torch.sqrt(x * x + eps * eps) - eps


def _soft_max(v: Tensor, temperature: float, dim: int = -1) -> Tensor:
    """Log-mean-exp ``tau * log(mean(exp(v / tau)))`` over ``dim``: in ``[mean(v), max(v)]``, tends to
    the max as ``tau -> 0`` and to the mean as ``tau -> inf``; 0 when every entry is 0."""
    return temperature * (torch.logsumexp(v / temperature, dim=dim) - math.log(v.shape[dim]))


def _aggregate(v: Tensor, how: str, temperature: float, dim: int = -1) -> Tensor:
    if how == "max":
        return v.amax(dim=dim)
    if how == "mean":
        return v.mean(dim=dim)
    return _soft_max(v, temperature, dim)


def _no_autocast(x: Tensor) -> torch.autocast:
    """Autocast switched off for the device of ``x``: the maths runs in float32/float64."""
    return torch.autocast(device_type=x.device.type, enabled=False)


# ----------------------------------------------------------------------------------------------
# Centred logit distance
# ----------------------------------------------------------------------------------------------
class LogitDistanceLoss(nn.Module):
    r"""Logit distance between student and teacher, the distillation loss of the follow-up paper
    (Nielsen et al., "Logit Distance Bounds Representational Similarity", arXiv 2602.15438).

    Per row (input) ``x``, with ``d = s(x) - t(x)`` and ``c(v) = v - mean_y v_y`` (centring over classes):

    * ``p=2, centered=True`` (default): ``sum_y (c(s) - c(t))_y^2 = ||c(d)||_2^2``;
    * ``p=1, centered=True``: ``sum_y |c(d)_y|`` (smoothed, see ``eps``);
    * ``centered=False``: the same on the raw difference ``d`` (not invariant to per-input shifts
      of the logits, i.e. not a function of the predictive distributions).

    The centred loss is zero exactly when student and teacher logits differ by a per-input
    constant, i.e. when their log-probabilities coincide; ``2 K T^2 KL_T`` of :class:`KDLoss` tends to
    the ``p=2`` centred value as the temperature ``T`` grows.

    At language-model vocabularies the sum over classes grows with K (about ``2 K`` for independent standard
    normal logits: 16,400 at K = 8,192, swamping a cross-entropy of weight 1); ``class_reduction="mean"``
    divides by K, so the scale does not depend on the vocabulary.

    Args:
        p: 1 or 2.
        centered: subtract the mean over classes first (default True).
        class_reduction: ``"sum"`` over classes (default, the follow-up paper's d_logit^2 per input) or
            ``"mean"`` (divided by K).
        eps: only for ``p=1``: ``|u|`` is replaced by ``sqrt(u^2 + eps^2) - eps`` (within ``eps`` of
            ``|u|``, smooth, gradient 0 at 0). ``eps=0`` gives the exact L1 norm (subgradient 0 at 0).
        reduction: ``"mean"`` over kept rows (default), ``"sum"``, or ``"none"`` (per row, shape
            ``(B,)`` / ``(B, T)``, masked rows 0).
        dtype: compute dtype; default float32, or float64 when an input is float64.
        check_finite: raise on non-finite values in kept rows (a host sync; skipped under compile).

    Example:
        >>> import torch
        >>> s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 3.0]])
        >>> t = torch.tensor([[11.0, 12.0, 13.0], [0.0, 0.0, 0.0]])  # row 0: a per-input shift
        >>> LogitDistanceLoss(reduction="none")(s, t)  # row 1: c(d) = (-1, -1, 2)
        tensor([0., 6.])
        >>> LogitDistanceLoss(p=1, eps=0.0, reduction="sum")(s, t)
        tensor(4.)
        >>> LogitDistanceLoss(centered=False, reduction="none")(s, t)
        tensor([300.,   9.])
        >>> LogitDistanceLoss(class_reduction="mean", reduction="none")(s, t)  # divided by K = 3
        tensor([0., 2.])
    """

    def __init__(
        self,
        p: int = 2,
        centered: bool = True,
        class_reduction: str = "sum",
        eps: float = 1e-6,
        reduction: str = "mean",
        dtype: torch.dtype | None = None,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        if p not in (1, 2) or isinstance(p, bool):
            raise ValueError(f"`p` must be 1 or 2, got {p!r}")
        self.p = int(p)
        self.centered = bool(centered)
        self.class_reduction = _check_choice(class_reduction, "class_reduction", ("sum", "mean"))
        self.eps = _check_positive(eps, "eps", allow_zero=True)
        self.reduction = _check_choice(reduction, "reduction", REDUCTIONS)
        self.dtype = _check_dtype(dtype)
        self.check_finite = bool(check_finite)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None) -> Tensor:
        with _no_autocast(student_logits):
            s, t, keep, lead = _prepare(student_logits, teacher_logits, mask, self.dtype, self.check_finite)
            d = s - t
            if self.centered:
                d = d - d.mean(dim=-1, keepdim=True)
            per_class = d.square() if self.p == 2 else _smooth_abs(d, self.eps)
            per_row = per_class.sum(-1) if self.class_reduction == "sum" else per_class.mean(-1)
            return _reduce_rows(per_row, keep, lead, self.reduction)

    def extra_repr(self) -> str:
        return (f"p={self.p}, centered={self.centered}, class_reduction={self.class_reduction!r}, eps={self.eps}, "
                f"reduction={self.reduction!r}")


# ----------------------------------------------------------------------------------------------
# Hinton knowledge distillation
# ----------------------------------------------------------------------------------------------
class KDLoss(nn.Module):
    r"""Hinton knowledge distillation: ``T^2 * KL(p_t^T || p_s^T)`` per input, with
    ``p^T = softmax(logits / T)`` (teacher ``t``, student ``s``).

    **Cross-entropy convention.** This module returns *only* the distillation term, already scaled
    by ``T^2`` (so its gradient magnitude does not shrink as ``T`` grows). It takes no ``alpha`` and
    no labels: the usual objective ``alpha * KDLoss + (1 - alpha) * CE(student, labels)`` (Hinton et
    al. 2015) is assembled by the caller, with whatever weights.

    As ``T -> inf``, ``2 K T^2 KL_T -> ||c(s) - c(t)||^2`` (the centred :class:`LogitDistanceLoss`,
    ``c`` = subtract the mean over the ``K`` classes); at ``T = 100`` with logits of order 1 the two
    agree to well under 1 %.

    Args:
        temperature: ``T > 0`` (default 4.0).
        reduction: ``"mean"`` over kept rows (default; i.e. the ``"batchmean"`` KL convention),
            ``"sum"``, or ``"none"`` (per row, masked rows 0).
        dtype: compute dtype; default float32, or float64 when an input is float64.
        check_finite: raise on non-finite values in kept rows (a host sync; skipped under compile).

    Example:
        >>> import torch
        >>> s = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64)
        >>> t = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
        >>> round(float(KDLoss(temperature=1.0)(s, t)), 4)  # KL(p_t || p_s)
        1.1504
        >>> kd = float(KDLoss(temperature=100.0)(s, t))
        >>> l2 = float(LogitDistanceLoss()(s, t))  # ||c(s) - c(t)||^2 = 8
        >>> round(2 * 3 * kd / l2, 3)
        1.0
    """

    def __init__(
        self,
        temperature: float = 4.0,
        reduction: str = "mean",
        dtype: torch.dtype | None = None,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        self.temperature = _check_positive(temperature, "temperature")
        self.reduction = _check_choice(reduction, "reduction", REDUCTIONS)
        self.dtype = _check_dtype(dtype)
        self.check_finite = bool(check_finite)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None) -> Tensor:
        with _no_autocast(student_logits):
            s, t, keep, lead = _prepare(student_logits, teacher_logits, mask, self.dtype, self.check_finite)
            temp = self.temperature
            log_ps = torch.log_softmax(s / temp, dim=-1)
            log_pt = torch.log_softmax(t / temp, dim=-1)
            per_row = (log_pt.exp() * (log_pt - log_ps)).sum(-1) * (temp * temp)
            return _reduce_rows(per_row, keep, lead, self.reduction)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}"


# ----------------------------------------------------------------------------------------------
# Mini-batch d_LLV
# ----------------------------------------------------------------------------------------------
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


class LLVLoss(nn.Module):
    r"""Differentiable mini-batch estimate of d_LLV (SPEC §3) between student (``p``) and teacher (``q``).

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

    Args:
        rep_dim: M, the representation dimension; input sets have M+1 rows. Needed for
            ``input_set_search="sample"`` (default) and ``"first"`` (unless ``input_terms=False`` or
            ``input_sets`` are given); checked against explicit sets.
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
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (see above).
        dtype: compute dtype; default float32, or float64 when an input is float64.
        check_finite: raise on non-finite values in kept rows (a host sync; skipped under compile).

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

    def __init__(
        self,
        rep_dim: int | None = None,
        label_pivot: int | str = "mean",
        leave_out: int | None = None,
        input_set_search: str = "sample",
        input_sets: Tensor | list[int] | None = None,
        input_terms: bool = True,
        lam: float = 1e-5,
        reduce: str = "max",
        combine: str = "max",
        softmax_temperature: float = 0.05,
        num_input_sets: int = 16,
        seed: int = 0,
        eps: float = 1e-6,
        reduction: str = "mean",
        dtype: torch.dtype | None = None,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        if rep_dim is not None and (isinstance(rep_dim, bool) or not isinstance(rep_dim, int) or rep_dim < 1):
            raise ValueError(f"`rep_dim` must be a positive int (the representation dimension M) or None, got {rep_dim!r}")
        self.rep_dim = rep_dim
        if isinstance(label_pivot, str):
            if label_pivot != "mean":
                raise ValueError(f"`label_pivot` must be 'mean' or a label index, got {label_pivot!r}")
        elif isinstance(label_pivot, bool) or not isinstance(label_pivot, int) or label_pivot < 0:
            raise ValueError(f"`label_pivot` must be 'mean' or a non-negative label index, got {label_pivot!r}")
        if leave_out is not None:
            if isinstance(leave_out, bool) or not isinstance(leave_out, int) or leave_out < 0:
                raise ValueError(f"`leave_out` must be None or a non-negative label index, got {leave_out!r}")
            if leave_out == label_pivot:
                raise ValueError(f"`label_pivot` and `leave_out` must differ, both are {leave_out}")
        self.label_pivot = label_pivot
        self.leave_out = leave_out
        if isinstance(num_input_sets, bool) or not isinstance(num_input_sets, int) or num_input_sets < 1:
            raise ValueError(f"`num_input_sets` must be a positive int, got {num_input_sets!r}")
        self.num_input_sets = num_input_sets
        self.seed = int(seed)
        self._draw_cache: dict[tuple[int, str], Tensor] = {}
        self._index_cache: dict[tuple[int, str], Tensor] = {}
        self.input_terms = bool(input_terms)
        self.input_set_search = _check_choice(input_set_search, "input_set_search", INPUT_SET_SEARCH)
        if input_set_search in ("first", "sample") and self.rep_dim is None and self.input_terms and input_sets is None:
            raise ValueError(f"`input_set_search={input_set_search!r}` needs `rep_dim` (input sets have M+1 rows)")
        self.input_sets = None if input_sets is None else self._check_sets(input_sets)
        self.lam = _check_positive(lam, "lam", allow_zero=True)
        self.reduce = _check_choice(reduce, "reduce", LLV_REDUCE)
        self.combine = _check_choice(combine, "combine", LLV_COMBINE)
        self.softmax_temperature = _check_positive(softmax_temperature, "softmax_temperature")
        self.eps = _check_positive(eps, "eps")
        self.reduction = _check_choice(reduction, "reduction", REDUCTIONS)
        self.dtype = _check_dtype(dtype)
        self.check_finite = bool(check_finite)

    # -- configuration checks ------------------------------------------------------------------
    def _check_sets(self, input_sets) -> tuple[tuple[int, ...], ...]:
        """Explicit sets as a tuple of row-index tuples (built into a tensor per call: compile-friendly)."""
        sets = check_input_sets(input_sets, self.rep_dim)
        return tuple(tuple(int(i) for i in row) for row in sets.tolist())

    def _labels(self, k: int, device: torch.device) -> tuple[int | None, Tensor | None]:
        """(pivot, or None for the mean pivot; index of the compared labels, or None for all K)."""
        pivot = None if self.label_pivot == "mean" else int(self.label_pivot)
        for value, name in ((pivot, "label_pivot"), (self.leave_out, "leave_out")):
            if value is not None and value >= k:
                raise ValueError(f"`{name}` must be a label index in [0, {k}), got {value}")
        drop = [v for v in (pivot, self.leave_out) if v is not None]
        if not drop:
            return pivot, None
        if k - len(drop) < 1:
            raise ValueError(f"no label left to compare with K = {k}, label_pivot={pivot}, leave_out={self.leave_out}")
        return pivot, self._label_index(k, tuple(drop), device)

    @torch.compiler.disable
    def _label_index(self, k: int, drop: tuple[int, ...], device: torch.device) -> Tensor:
        """The compared labels (all but ``drop``) as an index tensor, cached per K and device."""
        key = (k, str(device))
        if key not in self._index_cache:
            keep = torch.ones(k, dtype=torch.bool)
            keep[list(drop)] = False
            self._index_cache[key] = torch.nonzero(keep).flatten().to(device)
        return self._index_cache[key]

    # -- the computation ---------------------------------------------------------------------
    def _entries(self, x: Tensor, d: Tensor, x_ref: Tensor, d_ref: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(a, a_ref, scale)`` entries along ``dim`` with the functional core's formula
        (:func:`~lightning_repsim.functional.llv_terms.compared_variance`) and the epsilon policy."""
        eps2 = self.eps * self.eps
        s1sq, delta, compared, reference = displacement_moments(x, d, x_ref, d_ref, dim)
        s_p = torch.sqrt(s1sq + eps2)  # floored normalisers: never a division by zero
        s_q = torch.sqrt((s1sq + delta).clamp_min(0) + eps2)
        a = torch.sqrt(compared_variance(s_p, s_q, delta, *compared).clamp_min(0) + eps2) - self.eps
        a_ref = torch.sqrt(compared_variance(s_p, s_q, delta, *reference).clamp_min(0) + eps2) - self.eps
        return a, a_ref, _smooth_abs(delta / (s_p + s_q), self.eps)

    def _label_entries(self, lp: Tensor, lq: Tensor, pivot: int | None, index: Tensor | None):
        """T1 entries ``[a, a_piv]`` and T3 entries of the compared labels: variances over the batch's rows."""
        if pivot is None:
            rp, rq = lp.mean(dim=1, keepdim=True), lq.mean(dim=1, keepdim=True)
        else:
            rp, rq = lp[:, pivot : pivot + 1], lq[:, pivot : pivot + 1]
        xp, xq = (lp, lq) if index is None else (lp.index_select(1, index), lq.index_select(1, index))
        a, a_piv, t3 = self._entries(xp, xq - xp, rp, rq - rp, dim=0)
        return torch.cat([a, a_piv.expand_as(a)]), t3

    def _input_entries(self, lp: Tensor, lq: Tensor, sets: Tensor | None):
        """Entries per candidate set: ``(S, 2m)`` b/b_piv and ``(S, m)`` T4 (``S = 1``, ``m = N`` for the mean mode)."""
        if sets is None:
            rp, rq = lp.mean(dim=0, keepdim=True)[None], lq.mean(dim=0, keepdim=True)[None]
            xp, xq = lp[None], lq[None]
        else:
            sp, sq = lp[sets], lq[sets]  # (S, M+1, K)
            rp, rq, xp, xq = sp[:, :1], sq[:, :1], sp[:, 1:], sq[:, 1:]
        b, b_piv, t4 = self._entries(xp, xq - xp, rp, rq - rp, dim=-1)
        return torch.cat([b, b_piv], dim=-1), t4

    @torch.compiler.disable
    def _drawn_sets(self, n: int, device: torch.device) -> Tensor:
        """``num_input_sets`` seeded sets of M+1 distinct row positions for a batch of ``n`` rows (cached)."""
        key = (n, str(device))
        if key not in self._draw_cache:
            gen = torch.Generator().manual_seed(self.seed)
            order = torch.rand(self.num_input_sets, n, generator=gen).argsort(dim=1)
            self._draw_cache[key] = order[:, : self.rep_dim + 1].to(device)
        return self._draw_cache[key]

    def _candidate_sets(self, input_sets, n: int, device: torch.device) -> Tensor | None:
        chosen = self.input_sets if input_sets is None else self._check_sets(input_sets)
        if chosen is None:
            if self.input_set_search == "mean":
                return None
            if n < self.rep_dim + 1:
                raise ValueError(
                    f"`input_set_search={self.input_set_search!r}` needs M+1 = {self.rep_dim + 1} (kept) rows, the batch has {n}"
                )
            if self.input_set_search == "first":
                return torch.arange(self.rep_dim + 1, device=device)[None]
            return self._drawn_sets(n, device)
        top = max(max(row) for row in chosen)
        if top >= n:
            raise ValueError(f"`input_sets` needs {top + 1} (kept) rows, the batch has {n}")
        return torch.tensor(chosen, device=device)

    def terms(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        mask: Tensor | None = None,
        input_sets: Tensor | list[int] | None = None,
    ) -> LLVLossTerms:
        """The loss and all its terms and entries (differentiable), see :class:`LLVLossTerms`."""
        with _no_autocast(student_logits):
            s, t, keep, _ = _prepare(student_logits, teacher_logits, mask, self.dtype, self.check_finite)
            if keep is not None:
                s, t = s[keep], t[keep]
            n, k = s.shape
            if n < 2:
                raise ValueError(
                    f"LLVLoss needs at least 2 (kept) rows to estimate variances over inputs, got {n}"
                )
            pivot, index = self._labels(k, s.device)
            lp, lq = torch.log_softmax(s, dim=-1), torch.log_softmax(t, dim=-1)
            t1_entries, t3_entries = self._label_entries(lp, lq, pivot, index)
            how, temp = self.reduce, self.softmax_temperature
            t1, t3 = _aggregate(t1_entries, how, temp), _aggregate(t3_entries, how, temp)
            if self.input_terms:
                sets = self._candidate_sets(input_sets, n, lp.device)
                t2_all, t4_all = self._input_entries(lp, lq, sets)
                t2_per_set = _aggregate(t2_all, how, temp)
                # the reference's argmin over candidate sets (first on ties); index_select keeps it in-graph
                best = torch.argmin(t2_per_set.detach()).reshape(1)
                t2 = t2_per_set.index_select(0, best).squeeze(0)
                t2_entries = t2_all.index_select(0, best).squeeze(0)
                t4_entries = t4_all.index_select(0, best).squeeze(0)
                t4 = _aggregate(t4_entries, how, temp)
                parts = torch.stack([t1, t2, self.lam * t3, self.lam * t4])
            else:
                t2_entries = t4_entries = lp.new_zeros(0)
                t2 = t4 = lp.new_zeros(())
                parts = torch.stack([t1, self.lam * t3])
            if self.combine == "max":
                loss = parts.amax()
            elif self.combine == "sum":
                loss = parts.sum()
            else:
                loss = _soft_max(parts, temp)
            return LLVLossTerms(loss, t1, t2, t3, t4, t1_entries, t2_entries, t3_entries, t4_entries)

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        mask: Tensor | None = None,
        input_sets: Tensor | list[int] | None = None,
    ) -> Tensor:
        out = self.terms(student_logits, teacher_logits, mask, input_sets)
        if self.reduction == "none":
            return torch.stack([out.t1, out.t2, self.lam * out.t3, self.lam * out.t4])
        return out.loss

    def extra_repr(self) -> str:
        return (
            f"rep_dim={self.rep_dim}, label_pivot={self.label_pivot!r}, leave_out={self.leave_out}, "
            f"input_set_search={self.input_set_search!r}, input_sets={self.input_sets!r}, input_terms={self.input_terms}, "
            f"lam={self.lam}, reduce={self.reduce!r}, "
            f"combine={self.combine!r}, eps={self.eps}, reduction={self.reduction!r}"
        )
