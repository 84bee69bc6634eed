"""The entry formula of d_LLV and its input terms (T2, T4), from second moments (SPEC §3, §6).

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

The label terms (T1, T3) and the label-set search live in :mod:`~lightning_repsim.functional.llv_labels`; the input
set minimises T2 over candidate sets (:func:`select_input_set`; the search over all sets is
:mod:`~lightning_repsim.functional.input_search`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "TIE_RTOL",
    "InputPart",
    "compared_variance",
    "displacement_moments",
    "entries",
    "first_argmin",
    "normalisers",
    "select_input_set",
    "set_entries",
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
# input terms (T2, T4): variances over labels, from the log-probabilities at candidate input sets
# ----------------------------------------------------------------------------------------------
def displacement_moments(x: Tensor, d: Tensor, x_ref: Tensor, d_ref: Tensor, dim: int = -1) -> tuple[Tensor, ...]:
    """Unbiased moments along ``dim`` that one entry needs: ``Var u`` and ``Delta = 2 Cov(u, v) + Var v`` for the
    displacement ``u = x - x_ref``, ``v = d - d_ref``, then ``(Var x, Cov(x, d), Var d)`` and the same for the
    reference. ``dim=-1``: over labels (the input terms of given rows); ``dim=0``: over inputs. Differentiable;
    references broadcast."""
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
