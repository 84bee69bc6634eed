"""Distillation losses (issue 5): LLVLoss, LogitDistanceLoss, KDLoss."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_repsim.functional import llv_distance, mean_kl_divergence
from lightning_repsim.losses import (
    HiddenStateKDLoss,
    HiddenStateLogitDistanceLoss,
    KDLoss,
    LLVLoss,
    LogitDistanceLoss,
)

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Every tensor here is tiny: one intra-op thread avoids OpenMP oversubscription on busy CPUs
    (with 2 threads on 2 shared cores a 1 ms step can take 30 ms)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def randn(*shape, seed=0, scale=1.0, dtype=F64):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def pair(n=24, k=5, seed=0, t=None):
    """A student/teacher pair of correlated random logits, shape (n, k) or (n, t, k)."""
    shape = (n, k) if t is None else (n, t, k)
    teacher = randn(*shape, seed=seed, scale=2.0)
    student = 0.7 * teacher + randn(*shape, seed=seed + 1000)
    return student, teacher


# Every configuration exercised below; the fixed-pivot ones follow the d_LLV definition exactly.
LLV_CONFIGS = {
    "default": dict(rep_dim=2),
    "mean_inputs_soft": dict(input_set_search="mean", reduce="softmax"),
    "pivot_first": dict(rep_dim=2, label_pivot=1, leave_out=3, input_set_search="first"),
    "pivot_idx_soft": dict(rep_dim=2, label_pivot=0, input_sets=[5, 2, 9], reduce="softmax", combine="softmax"),
    "mean_sum": dict(rep_dim=3, reduce="mean", combine="sum", lam=0.5),
    "no_input_terms": dict(input_terms=False, reduce="softmax", combine="sum"),
}
ALL_LOSSES = {
    **{f"llv_{name}": (LLVLoss, cfg) for name, cfg in LLV_CONFIGS.items()},
    "ld_p2": (LogitDistanceLoss, dict()),
    "ld_p1": (LogitDistanceLoss, dict(p=1, eps=1e-3)),
    "ld_p1_exact": (LogitDistanceLoss, dict(p=1, eps=0.0)),
    "ld_uncentred": (LogitDistanceLoss, dict(centered=False)),
    "kd": (KDLoss, dict(temperature=2.0)),
}
SHIFT_INVARIANT = [name for name in ALL_LOSSES if name not in ("ld_uncentred", "ld_p1_exact")]


def make(name, **overrides):
    cls, cfg = ALL_LOSSES[name]
    return cls(**{**cfg, **overrides})


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ALL_LOSSES))
def test_gradcheck_float64(name):
    student, teacher = pair(n=12, k=4, seed=3)
    loss = make(name)
    student = student.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda s: loss(s, teacher), (student,), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["llv_default", "llv_mean_inputs_soft", "ld_p2", "kd"])
def test_gradcheck_sequence_with_mask(name):
    student, teacher = pair(n=3, k=4, seed=4, t=5)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 0] = False
    loss = make(name)
    student = student.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda s: loss(s, teacher, mask=mask), (student,), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", SHIFT_INVARIANT)
@pytest.mark.parametrize("seq", [False, True])
def test_zero_loss_and_gradient_under_per_input_shift(name, seq):
    teacher = randn(32, 10, seed=5, scale=3.0) if not seq else randn(4, 8, 10, seed=5, scale=3.0)
    shift = randn(*teacher.shape[:-1], 1, seed=6, scale=5.0)
    student = (teacher + shift).requires_grad_()
    loss = make(name)(student, teacher)
    loss.backward()
    assert abs(float(loss.detach())) < 1e-12
    assert float(student.grad.abs().max()) < 1e-10


def test_uncentred_distance_sees_shifts():
    teacher = randn(8, 5, seed=7)
    student = teacher + 2.0
    assert float(LogitDistanceLoss(centered=False)(student, teacher)) == pytest.approx(5 * 4.0, rel=1e-12)
    assert float(LogitDistanceLoss(p=1, centered=False, eps=0.0)(student, teacher)) == pytest.approx(5 * 2.0, rel=1e-12)
    assert float(LogitDistanceLoss()(student, teacher)) < 1e-20


@pytest.mark.parametrize("name", list(ALL_LOSSES))
def test_teacher_receives_no_gradient(name):
    student, teacher = pair(n=10, k=4, seed=8)
    student = student.clone().requires_grad_()
    teacher = teacher.clone().requires_grad_()
    loss = make(name)(student, teacher)
    assert loss.requires_grad
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and float(student.grad.abs().sum()) > 0


# ----------------------------------------------------------------------------------------------
# LLVLoss against the exact functional d_LLV
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("combine", ["max", "sum"])
@pytest.mark.parametrize("lam", [1e-5, 1.0, 30.0])
def test_llv_loss_equals_functional_on_full_batch(seed, combine, lam):
    n, k, m = 40, 7, 2 + seed % 2
    student, teacher = pair(n=n, k=k, seed=10 + seed)
    gen = torch.Generator().manual_seed(seed)
    y0, lo = (seed * 3) % k, (seed * 3 + 2) % k
    input_set = torch.randperm(n, generator=gen)[: m + 1]
    exact = llv_distance(
        student, teacher, rep_dim=m, lam=lam, combine=combine, label_pivot=y0, leave_out=lo, input_sets=input_set[None]
    )
    loss = LLVLoss(rep_dim=m, label_pivot=y0, leave_out=lo, input_sets=input_set, lam=lam, combine=combine, eps=1e-13)
    out = loss.terms(student, teacher)
    tol = 1e-10 * max(1.0, lam)
    assert abs(float(out.loss - exact.value)) < tol
    for mine, ref in ((out.t1, exact.t1), (out.t2, exact.t2), (out.t3, exact.t3), (out.t4, exact.t4)):
        assert abs(float(mine - ref)) < 1e-10
    torch.testing.assert_close(out.t1_entries, exact.t1_terms, rtol=0, atol=1e-10)
    torch.testing.assert_close(out.t2_entries, exact.t2_terms, rtol=0, atol=1e-10)
    torch.testing.assert_close(out.t3_entries, exact.t3_terms, rtol=0, atol=1e-10)
    torch.testing.assert_close(out.t4_entries, exact.t4_terms, rtol=0, atol=1e-10)
    assert abs(float(loss(student, teacher)) - float(exact.value)) < tol


def test_llv_loss_equals_functional_on_flattened_sequence_with_forward_input_set():
    student, teacher = pair(n=6, k=5, seed=20, t=7)
    exact = llv_distance(student, teacher, rep_dim=3, label_pivot=2, leave_out=0, input_sets=torch.tensor([[4, 30, 11, 0]]))
    loss = LLVLoss(rep_dim=3, label_pivot=2, leave_out=0, eps=1e-13)
    assert abs(float(loss(student, teacher, input_sets=[4, 30, 11, 0])) - float(exact.value)) < 1e-10


@pytest.mark.parametrize("seed", range(3))
def test_llv_loss_candidate_sets_and_search_equal_functional_argmin(seed):
    n, k, m = 30, 6, 2
    student, teacher = pair(n=n, k=k, seed=40 + seed)
    gens = [torch.Generator().manual_seed(seed * 10 + j) for j in range(12)]
    candidates = torch.stack([torch.randperm(n, generator=gen)[: m + 1] for gen in gens])
    exact = llv_distance(student, teacher, rep_dim=m, label_pivot=1, leave_out=4, input_sets=candidates)
    loss = LLVLoss(rep_dim=m, label_pivot=1, leave_out=4, input_sets=candidates, eps=1e-13)
    out = loss.terms(student, teacher)
    assert abs(float(out.loss - exact.value)) < 1e-10
    torch.testing.assert_close(out.t2_entries, exact.t2_terms, rtol=0, atol=1e-10)
    torch.testing.assert_close(out.t4_entries, exact.t4_terms, rtol=0, atol=1e-10)
    # "search" draws its candidates as documented: a seeded uniform draw, argsort, first M+1 positions
    drawn = torch.rand(7, n, generator=torch.Generator().manual_seed(3)).argsort(dim=1)[:, : m + 1]
    exact_search = llv_distance(student, teacher, rep_dim=m, label_pivot=1, leave_out=4, input_sets=drawn)
    search = LLVLoss(rep_dim=m, label_pivot=1, leave_out=4, num_input_sets=7, seed=3, eps=1e-13)
    assert abs(float(search(student, teacher)) - float(exact_search.value)) < 1e-10
    assert abs(float(search.terms(student, teacher).t2) - float(exact_search.candidate_scores.min())) < 1e-10
    # the searched T2 is never above that of any single candidate
    single = LLVLoss(rep_dim=m, label_pivot=1, leave_out=4, eps=1e-13)
    t2_each = [float(single.terms(student, teacher, input_sets=row).t2) for row in drawn]
    assert float(search.terms(student, teacher).t2) == pytest.approx(min(t2_each), abs=1e-12)


def _naive_mean_mode(student, teacher, eps):
    """Loop implementation of the all-pivots ("mean") mode, straight from the docstring formulas."""
    lp, lq = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    n, k = lp.shape
    rp, rq = lp.mean(1), lq.mean(1)  # the mean pivot label, per input

    def sd(v):
        return math.sqrt(float(v.var()) + eps**2) - eps

    def norm(v):
        return math.sqrt(float(v.var()) + eps**2)

    a, a_piv, t3 = [], [], []
    for y in range(k):
        sp, sq = norm(lp[:, y] - rp), norm(lq[:, y] - rq)
        a.append(sd(lp[:, y] / sp - lq[:, y] / sq))
        a_piv.append(sd(rp / sp - rq / sq))
        t3.append(math.sqrt((sp - sq) ** 2 + eps**2) - eps)
    cp, cq = lp.mean(0), lq.mean(0)  # the mean pivot input, per label
    b, b_piv, t4 = [], [], []
    for i in range(n):
        tp, tq = norm(lp[i] - cp), norm(lq[i] - cq)
        b.append(sd(lp[i] / tp - lq[i] / tq))
        b_piv.append(sd(cp / tp - cq / tq))
        t4.append(math.sqrt((tp - tq) ** 2 + eps**2) - eps)
    return a + a_piv, b + b_piv, t3, t4


@pytest.mark.parametrize("eps", [1e-13, 1e-2])
def test_llv_all_pivots_mode_matches_loop_definition(eps):
    student, teacher = pair(n=15, k=6, seed=21)
    out = LLVLoss(input_set_search="mean", eps=eps, lam=2.0, combine="sum").terms(student, teacher)
    t1, t2, t3, t4 = (torch.tensor(v, dtype=F64) for v in _naive_mean_mode(student, teacher, eps))
    torch.testing.assert_close(out.t1_entries, t1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.t2_entries, t2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.t3_entries, t3, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.t4_entries, t4, rtol=1e-10, atol=1e-12)
    expected = t1.max() + t2.max() + 2.0 * (t3.max() + t4.max())
    assert abs(float(out.loss - expected)) < 1e-10


def test_llv_all_pivots_mode_is_label_and_input_permutation_invariant_fixed_pivot_is_not():
    student, teacher = pair(n=20, k=6, seed=22)
    perm_y = torch.tensor([3, 5, 0, 1, 4, 2])
    perm_x = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    loss = LLVLoss(input_set_search="mean")
    base = float(loss(student, teacher))
    permuted = float(loss(student[perm_x][:, perm_y], teacher[perm_x][:, perm_y]))
    assert permuted == pytest.approx(base, rel=1e-12)
    fixed = LLVLoss(label_pivot=0, input_terms=False)
    assert abs(float(fixed(student, teacher)) - float(fixed(student[:, perm_y], teacher[:, perm_y]))) > 1e-3


def test_llv_soft_maximum_lies_between_mean_and_max():
    student, teacher = pair(n=30, k=6, seed=23)
    t_max = LLVLoss(reduce="max", input_terms=False, lam=0.0).terms(student, teacher).t1
    t_mean = LLVLoss(reduce="mean", input_terms=False, lam=0.0).terms(student, teacher).t1
    softs = [
        float(LLVLoss(reduce="softmax", softmax_temperature=tau, input_terms=False).terms(student, teacher).t1)
        for tau in (1e-4, 0.05, 1, 1e4)
    ]
    assert softs[0] == pytest.approx(float(t_max), abs=1e-3)
    assert softs[-1] == pytest.approx(float(t_mean), rel=1e-4)
    assert float(t_mean) < softs[2] < softs[1] < float(t_max)


def test_llv_reduction_modes():
    student, teacher = pair(n=20, k=5, seed=24)
    terms = LLVLoss(rep_dim=2, lam=3.0).terms(student, teacher)
    mean = LLVLoss(rep_dim=2, lam=3.0)(student, teacher)
    assert float(LLVLoss(rep_dim=2, lam=3.0, reduction="sum")(student, teacher)) == float(mean) == float(terms.loss)
    parts = LLVLoss(rep_dim=2, lam=3.0, reduction="none")(student, teacher)
    assert parts.shape == (4,)
    torch.testing.assert_close(parts, torch.stack([terms.t1, terms.t2, 3.0 * terms.t3, 3.0 * terms.t4]))
    assert float(parts.max()) == float(mean)
    summed = LLVLoss(rep_dim=2, lam=3.0, combine="sum")(student, teacher)
    assert float(summed) == pytest.approx(float(parts.sum()), rel=1e-12)
    no_inputs = LLVLoss(lam=3.0, input_terms=False, reduction="none")(student, teacher)
    assert float(no_inputs[1]) == 0.0 and float(no_inputs[3]) == 0.0
    assert float(no_inputs[0]) == pytest.approx(float(terms.t1), rel=1e-12)


# ----------------------------------------------------------------------------------------------
# Zero variance and batch size
# ----------------------------------------------------------------------------------------------
def test_llv_constant_student_is_finite():
    teacher = randn(16, 5, seed=25)
    student = torch.zeros(16, 5, dtype=F64, requires_grad=True)
    for cfg in LLV_CONFIGS.values():
        loss = LLVLoss(**cfg)(student, teacher)
        loss.backward()
        assert math.isfinite(float(loss.detach())) and bool(torch.isfinite(student.grad).all())
        student.grad = None


def test_llv_zero_variance_column_uses_documented_eps():
    teacher = randn(16, 4, seed=26)
    teacher[:, 1] = teacher[:, 0] + 1.0  # log-odds of label 1 against pivot 0 constant: sigma = 0
    student = (teacher + 0.1 * randn(16, 4, seed=27)).requires_grad_()
    student_dup = student.detach().clone()
    student_dup[:, 1] = student_dup[:, 0] - 2.0
    student_dup.requires_grad_()
    for eps in (1e-6, 1e-3):
        loss = LLVLoss(label_pivot=0, input_terms=False, eps=eps)
        out = loss.terms(student_dup, teacher)
        out.loss.backward()
        assert bool(torch.isfinite(student_dup.grad).all())
        student_dup.grad = None
        # sigma_p = sigma_q = eps for label 1, so a(1) = sd(l_p(1) - l_q(1)) / eps (up to the smoothing)
        lp, lq = torch.log_softmax(student_dup.detach(), -1), torch.log_softmax(teacher, -1)
        expected = math.sqrt(float(((lp[:, 1] - lq[:, 1]) / eps).var()) + eps**2) - eps
        assert float(out.t1_entries[0].detach()) == pytest.approx(expected, rel=1e-8)
    with pytest.raises(ValueError, match="zero variance"):
        llv_distance(student_dup.detach(), teacher, rep_dim=1, label_pivot=0, leave_out=3)


def test_llv_needs_two_rows():
    teacher = randn(2, 5, seed=28)
    student = randn(2, 5, seed=29)
    losses = (LLVLoss(rep_dim=1), LLVLoss(input_set_search="mean"), LLVLoss(rep_dim=1, input_set_search="first", label_pivot=0))
    for loss in losses:
        with pytest.raises(ValueError, match="at least 2 \\(kept\\) rows"):
            loss(student[:1], teacher[:1])
        with pytest.raises(ValueError, match="at least 2 \\(kept\\) rows"):
            loss(student, teacher, mask=torch.tensor([True, False]))
        value = loss(student, teacher)
        assert math.isfinite(float(value)) and float(value) > 0
    # one row is fine for the per-row losses
    assert math.isfinite(float(KDLoss()(student[:1], teacher[:1])))


# ----------------------------------------------------------------------------------------------
# KD limit, masks, reductions
# ----------------------------------------------------------------------------------------------
def test_kd_tends_to_centred_l2():
    student, teacher = pair(n=50, k=8, seed=30)
    student, teacher = 0.5 * student, 0.5 * teacher  # logits of order 1
    l2 = float(LogitDistanceLoss()(student, teacher))
    errors = [abs(2 * 8 * float(KDLoss(temperature=temp)(student, teacher)) / l2 - 1) for temp in (3.0, 10.0, 100.0)]
    assert errors[2] < 0.01
    assert errors[0] > errors[1] > errors[2]
    per_row_kd = 2 * 8 * KDLoss(temperature=100.0, reduction="none")(student, teacher)
    per_row_l2 = LogitDistanceLoss(reduction="none")(student, teacher)
    torch.testing.assert_close(per_row_kd, per_row_l2, rtol=0.02, atol=0)


def test_kd_and_logit_distance_values():
    s = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]], dtype=F64)
    t = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 0.0]], dtype=F64)
    kl = (torch.softmax(t / 2, -1) * (torch.log_softmax(t / 2, -1) - torch.log_softmax(s / 2, -1))).sum(-1)
    torch.testing.assert_close(KDLoss(temperature=2.0, reduction="none")(s, t), 4.0 * kl)
    assert float(KDLoss(temperature=1.0, reduction="sum")(s, t)) == pytest.approx(
        float(mean_kl_divergence(t, s)) * 2, rel=1e-12
    )
    d = (s - t) - (s - t).mean(-1, keepdim=True)
    torch.testing.assert_close(LogitDistanceLoss(reduction="none")(s, t), d.square().sum(-1))
    torch.testing.assert_close(LogitDistanceLoss(p=1, eps=0.0, reduction="none")(s, t), d.abs().sum(-1))
    smooth = LogitDistanceLoss(p=1, eps=1e-3, reduction="none")(s, t)
    assert bool(((d.abs().sum(-1) - smooth) <= 3e-3).all()) and bool((smooth <= d.abs().sum(-1)).all())


@pytest.mark.parametrize("name", list(ALL_LOSSES))
def test_sequence_with_mask_equals_flattened_selection(name):
    student, teacher = pair(n=4, k=5, seed=31, t=6)
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(1)) > 0.3
    student, teacher = student.clone(), teacher.clone()
    student[~mask] = float("nan")  # padding may hold anything
    teacher[~mask] = float("inf")
    student.requires_grad_()
    loss = make(name)
    masked = loss(student, teacher, mask=mask)
    masked.backward()
    assert bool(torch.isfinite(student.grad).all()) and float(student.grad[~mask].abs().max()) == 0.0
    flat_student = student.detach()[mask].clone().requires_grad_()
    selected = loss(flat_student, teacher[mask])
    selected.backward()
    assert float(masked.detach()) == pytest.approx(float(selected.detach()), rel=1e-12, abs=1e-14)
    torch.testing.assert_close(student.grad[mask], flat_student.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("cls", [KDLoss, LogitDistanceLoss])
def test_per_row_reductions(cls):
    student, teacher = pair(n=3, k=4, seed=32, t=5)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 2:] = False
    none = cls(reduction="none")(student, teacher, mask=mask)
    assert none.shape == (3, 5)
    assert float(none[~mask].abs().max()) == 0.0 and bool((none[mask] > 0).all())
    total = cls(reduction="sum")(student, teacher, mask=mask)
    mean = cls(reduction="mean")(student, teacher, mask=mask)
    assert float(total) == pytest.approx(float(none.sum()), rel=1e-12)
    assert float(mean) == pytest.approx(float(none.sum()) / int(mask.sum()), rel=1e-12)
    unmasked = cls(reduction="none")(student[:, 0], teacher[:, 0])
    assert unmasked.shape == (3,)
    # an all-masked batch gives 0 for mean, not NaN
    assert float(cls()(student, teacher, mask=torch.zeros(3, 5, dtype=torch.bool))) == 0.0


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llv_default", "ld_p2", "kd"])
def test_bad_input_errors(name):
    loss = make(name)
    student, teacher = pair(n=6, k=4, seed=33)
    with pytest.raises(ValueError, match=r"same shape, got \(6, 4\) and \(6, 5\)"):
        loss(student, randn(6, 5))
    with pytest.raises(ValueError, match="shape \\(B, K\\) or \\(B, T, K\\)"):
        loss(student[0], teacher[0])
    with pytest.raises(ValueError, match="at least K = 2"):
        loss(student[:, :1], teacher[:, :1])
    bad = teacher.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="`teacher_logits` contains 1 non-finite"):
        loss(student, bad)
    with pytest.raises(ValueError, match="`student_logits` contains 1 non-finite"):
        loss(bad, teacher)
    with pytest.raises(ValueError, match="`mask` must have shape \\(6,\\) \\(the inputs' leading shape\\)"):
        loss(student, teacher, mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="`mask` must be boolean or 0/1 integers"):
        loss(student, teacher, mask=torch.ones(6))
    with pytest.raises(ValueError, match="`mask` must hold only 0 and 1"):
        loss(student, teacher, mask=torch.full((6,), 2))
    with pytest.raises(TypeError, match="floating-point"):
        loss(student.long(), teacher.long())
    # the finiteness check can be switched off (no host sync): NaN then propagates, as documented
    cls, cfg = ALL_LOSSES[name]
    assert math.isnan(float(cls(**cfg, check_finite=False)(student, bad)))


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="`reduction` must be one of"):
        KDLoss(reduction="batchmean")
    with pytest.raises(ValueError, match="`temperature` must be a finite number > 0"):
        KDLoss(temperature=0.0)
    with pytest.raises(ValueError, match="`dtype` \\(the compute dtype\\) must be"):
        KDLoss(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="`p` must be 1 or 2"):
        LogitDistanceLoss(p=3)
    with pytest.raises(ValueError, match="`eps` must be a finite number >= 0"):
        LogitDistanceLoss(eps=-1.0)
    with pytest.raises(ValueError, match="`eps` must be a finite number > 0"):
        LLVLoss(rep_dim=2, eps=0.0)
    with pytest.raises(ValueError, match="`reduce` must be one of"):
        LLVLoss(rep_dim=2, reduce="min")
    with pytest.raises(ValueError, match="`combine` must be one of"):
        LLVLoss(rep_dim=2, combine="mean")
    with pytest.raises(ValueError, match="`rep_dim` must be a positive int"):
        LLVLoss(rep_dim=0)
    with pytest.raises(ValueError, match="needs `rep_dim`"):
        LLVLoss(input_set_search="first")
    with pytest.raises(ValueError, match="`input_set_search='sample'` needs `rep_dim`"):
        LLVLoss()
    with pytest.raises(ValueError, match="`input_set_search` must be one of"):
        LLVLoss(input_set_search="all")
    with pytest.raises(ValueError, match="`num_input_sets` must be an int >= 1"):
        LLVLoss(rep_dim=2, num_input_sets=0)
    with pytest.raises(ValueError, match="\\(S, M\\+1\\) = \\(S, 3\\)"):
        LLVLoss(rep_dim=2, input_sets=[0, 1])
    with pytest.raises(ValueError, match="\\(S, M\\+1\\) = \\(S, 3\\)"):
        LLVLoss(rep_dim=2, input_sets=[[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="distinct"):
        LLVLoss(input_sets=[0, 1, 1])
    with pytest.raises(ValueError, match="must differ"):
        LLVLoss(label_pivot=2, leave_out=2)
    with pytest.raises(ValueError, match="'mean' or a label index"):
        LLVLoss(label_pivot="max")
    student, teacher = pair(n=6, k=4, seed=34)
    with pytest.raises(ValueError, match="`label_pivot` must be a label index in \\[0, 4\\)"):
        LLVLoss(label_pivot=4, rep_dim=1)(student, teacher)
    with pytest.raises(ValueError, match="needs 8 \\(kept\\) rows, the batch has 6"):
        LLVLoss(input_sets=[0, 7])(student, teacher)
    with pytest.raises(ValueError, match="needs 8 \\(kept\\) rows, the batch has 6"):
        LLVLoss(rep_dim=1)(student, teacher, input_sets=[[0, 1], [2, 7]])
    for mode in ("first", "sample"):
        with pytest.raises(ValueError, match="needs M\\+1 = 4 \\(kept\\) rows, the batch has 3"):
            LLVLoss(rep_dim=3, input_set_search=mode)(student[:3], teacher[:3])
    with pytest.raises(ValueError, match="no label left"):
        LLVLoss(label_pivot=0, leave_out=1, input_terms=False)(student[:, :2], teacher[:, :2])


# ----------------------------------------------------------------------------------------------
# Mixed precision and compilation
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llv_default", "llv_pivot_first", "ld_p2", "ld_p1", "kd"])
def test_bf16_autocast_is_finite_and_close_to_float32(name):
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    teacher_net, student_net = torch.nn.Linear(16, 6), torch.nn.Linear(16, 6)
    loss = make(name)
    with torch.no_grad():
        t32, s32 = teacher_net(x), student_net(x)
        reference = loss(s32, t32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t16 = teacher_net(x)
        s16 = student_net(x)
        assert s16.dtype == torch.bfloat16
        value = loss(s16, t16)
    assert value.dtype == torch.float32
    value.backward()
    value = value.detach()
    grad = student_net.weight.grad
    assert math.isfinite(float(value)) and bool(torch.isfinite(grad).all())
    # exactly the float32 computation on the bf16-rounded logits, and close to the float32 logits
    assert float(value) == pytest.approx(float(loss(s16.detach().float(), t16.float())), rel=1e-6)
    assert float(value) == pytest.approx(float(reference), rel=0.05)


@pytest.mark.slow  # a cold inductor cache costs ~20 s for the first compile of the session
@pytest.mark.parametrize("name", ["llv_default", "ld_p2", "kd"])
def test_torch_compile_matches_eager(name):
    """One inductor compile per loss. LLVLoss's default ``input_set="search"`` draws its (cached)
    candidate rows outside the graph (one graph break); the per-row losses compile as one graph."""
    student, teacher = pair(n=12, k=5, seed=35)
    student, teacher = student.float(), teacher.float()
    loss = make(name)
    leaf = student.clone().requires_grad_()
    try:
        compiled = torch.compile(loss, fullgraph=not name.startswith("llv"))
        value = compiled(leaf, teacher)
    except Exception as err:  # pragma: no cover - e.g. a platform without a C++ compiler for inductor
        text = str(err).lower()
        if "compiler" in text and ("c++" in text or "cxx" in text or "not found" in text):
            pytest.skip(f"torch.compile backend unavailable here: {err}")
        raise
    value.backward()
    eager_leaf = student.clone().requires_grad_()
    eager = loss(eager_leaf, teacher)
    eager.backward()
    value, eager = value.detach(), eager.detach()
    assert value.dtype == torch.float32
    assert float(value) == pytest.approx(float(eager), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(leaf.grad, eager_leaf.grad, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Training sanity: a student trained with each loss gets closer to the teacher
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,loss",
    [
        ("llv", LLVLoss(rep_dim=2)),
        ("llv_mean_inputs", LLVLoss(input_set_search="mean", reduce="mean", combine="sum")),
        ("logit_distance", LogitDistanceLoss()),
        ("kd", KDLoss()),
    ],
)
def test_training_brings_student_closer(name, loss):
    torch.manual_seed(0)
    dim, k = 6, 5
    teacher = torch.nn.Sequential(torch.nn.Linear(dim, 16), torch.nn.Tanh(), torch.nn.Linear(16, k))
    student = torch.nn.Linear(dim, k)
    x_test = torch.randn(800, dim)
    with torch.no_grad():
        t_test = teacher(x_test)
    sets = torch.randint(800, (20, 3), generator=torch.Generator().manual_seed(0))

    def held_out():
        with torch.no_grad():
            s_test = student(x_test)
        d_llv = llv_distance(s_test, t_test, rep_dim=2, input_sets=sets).value
        return float(d_llv), float(mean_kl_divergence(t_test, s_test)), float(loss(s_test, t_test))

    before = held_out()
    opt = torch.optim.Adam(student.parameters(), lr=0.05)
    for _ in range(300):
        x = torch.randn(64, dim)
        with torch.no_grad():
            t = teacher(x)
        value = loss(student(x), t)
        opt.zero_grad()
        value.backward()
        opt.step()
    after = held_out()
    assert after[0] < 0.5 * before[0], (before, after)  # d_LLV (exact, held out)
    assert after[2] < 0.5 * before[2], (before, after)  # the training loss itself, held out
    if name in ("logit_distance", "kd", "llv_mean_inputs"):
        assert after[1] < 0.1 * before[1], (before, after)  # mean KL(teacher || student)


# ----------------------------------------------------------------------------------------------
# Blocks and chunks (issue 23): every block size gives the same value and gradient
# ----------------------------------------------------------------------------------------------
def _value_and_grad(loss, student, teacher, mask=None):
    leaf = student.detach().clone().requires_grad_()
    value = loss(leaf, teacher, mask=mask)
    value.backward(torch.ones_like(value))
    return value.detach(), leaf.grad


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("name", list(ALL_LOSSES))
@pytest.mark.parametrize("chunk_size", [1, 3, 7])
def test_chunked_equals_unchunked(name, chunk_size):
    student, teacher = pair(n=4, k=9, seed=50, t=6)
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(2)) > 0.3
    reductions = ["mean"] if name.startswith("llv") else ["mean", "sum", "none"]
    for reduction in reductions:
        for m in (None, mask):
            plain = _value_and_grad(make(name, reduction=reduction), student, teacher, m)
            chunked = _value_and_grad(make(name, reduction=reduction, chunk_size=chunk_size), student, teacher, m)
            assert _rel(chunked[0], plain[0]) < 1e-12 and _rel(chunked[1], plain[1]) < 1e-12
    s32, t32 = student.float(), teacher.float()
    plain = _value_and_grad(make(name), s32, t32, mask)
    chunked = _value_and_grad(make(name, chunk_size=chunk_size), s32, t32, mask)
    assert _rel(chunked[0], plain[0]) < 1e-6 and _rel(chunked[1], plain[1]) < 1e-6


@pytest.mark.parametrize("name", ["ld_p2", "ld_p1", "ld_uncentred", "kd"])
def test_mask_inside_blocks_equals_kept_runs(name, monkeypatch):
    """Where the mask stays on the device (an accelerator, or torch.compile tracing), the masked rows are zeroed
    inside the blocks instead of skipped as runs: same values and gradients, NaN padding included."""
    import lightning_repsim.distillation.rows as rows_module

    student, teacher = pair(n=3, k=6, seed=51, t=5)
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(3)) > 0.4
    student[~mask], teacher[~mask] = float("nan"), float("inf")
    for reduction in ("mean", "none"):
        runs = _value_and_grad(make(name, reduction=reduction), student, teacher, mask)
        monkeypatch.setattr(rows_module, "compiling", lambda: True)
        inside = _value_and_grad(make(name, reduction=reduction, chunk_size=2), student, teacher, mask)
        monkeypatch.undo()
        assert _rel(inside[0], runs[0]) < 1e-12 and _rel(inside[1], runs[1]) < 1e-12
        assert float(inside[1][~mask].abs().max()) == 0.0


@pytest.mark.parametrize("name", ["ld_p2", "kd", "llv_default", "llv_mean_inputs_soft", "llv_pivot_first",
                                  "no_input_terms_recipe"])
def test_float32_is_within_1e5_of_float64(name):
    if name == "no_input_terms_recipe":
        loss = LLVLoss(rep_dim=4, input_terms=False, reduce="softmax", combine="sum", lam=0.01, softmax_temperature=0.1)
    else:
        loss = make(name)
    student, teacher = pair(n=6, k=300, seed=52, t=20)
    mask = torch.ones(6, 20, dtype=torch.bool)
    mask[:, :3] = False
    v64, g64 = _value_and_grad(loss, student, teacher, mask)
    v32, g32 = _value_and_grad(loss, student.float(), teacher.float(), mask)
    assert _rel(v32.double(), v64) < 1e-5
    assert float((g32.double() - g64).norm() / g64.norm()) < 1e-5


def test_low_precision_logits_give_a_gradient_of_their_dtype():
    student, teacher = pair(n=5, k=7, seed=53)
    leaf = student.to(torch.bfloat16).requires_grad_()
    for loss in (LogitDistanceLoss(chunk_size=2), KDLoss(chunk_size=2), LLVLoss(rep_dim=2, chunk_size=2)):
        loss(leaf, teacher.to(torch.bfloat16)).backward()
        assert leaf.grad.dtype == torch.bfloat16 and bool(torch.isfinite(leaf.grad).all())
        leaf.grad = None


def test_chunk_size_is_checked():
    for cls in (LogitDistanceLoss, KDLoss):
        with pytest.raises(ValueError, match="`chunk_size` must be an int >= 1"):
            cls(chunk_size=0)
    with pytest.raises(ValueError, match="`chunk_size` must be an int >= 1"):
        LLVLoss(rep_dim=2, chunk_size=1.5)


def test_llv_loss_student_narrower_than_teacher():
    """LLVLoss reads logits only: a student of width 2 against a teacher of width 5 works, with the teacher's
    representation dimension as rep_dim (input sets of 6 rows)."""
    g = torch.Generator().manual_seed(54)
    hs, ht = torch.randn(40, 2, generator=g, dtype=F64), torch.randn(40, 5, generator=g, dtype=F64)
    ws, wt = torch.randn(9, 2, generator=g, dtype=F64), torch.randn(9, 5, generator=g, dtype=F64)
    student = (hs @ ws.T).requires_grad_()
    loss = LLVLoss(rep_dim=5)(student, ht @ wt.T)
    loss.backward()
    assert math.isfinite(float(loss.detach())) and float(loss.detach()) > 0 and bool(torch.isfinite(student.grad).all())


# ----------------------------------------------------------------------------------------------
# Hidden-state variants (issue 23): equal to the losses on the heads' logits, gradients included
# ----------------------------------------------------------------------------------------------
def _heads(m_s, m_t, v, seed, dtype, bias=(True, True)):
    g = torch.Generator().manual_seed(seed)
    ws = torch.randn(v, m_s, generator=g, dtype=dtype) / math.sqrt(m_s)
    wt = torch.randn(v, m_t, generator=g, dtype=dtype) / math.sqrt(m_t)
    bs = torch.randn(v, generator=g, dtype=dtype) if bias[0] else None
    bt = torch.randn(v, generator=g, dtype=dtype) if bias[1] else None
    return ws, bs, wt, bt


def _hidden_and_logits(hidden_loss, logits_loss, lead, m_s, m_t, v, seed, dtype, mask=None, bias=(True, True)):
    g = torch.Generator().manual_seed(seed + 100)
    hs = torch.randn(*lead, m_s, generator=g, dtype=dtype)
    ht = torch.randn(*lead, m_t, generator=g, dtype=dtype)
    ws, bs, wt, bt = _heads(m_s, m_t, v, seed, dtype, bias)
    results = []
    for route in ("hidden", "logits"):
        leaves = [x.clone().requires_grad_() for x in (hs, ws) + ((bs,) if bs is not None else ())]
        h, w, b = leaves[0], leaves[1], leaves[2] if bs is not None else None
        if route == "hidden":
            value = hidden_loss(h, ht, (w, b), (wt, bt), mask=mask)
        else:
            zs = h @ w.T + (0 if b is None else b)
            zt = ht @ wt.T + (0 if bt is None else bt)
            value = logits_loss(zs, zt, mask=mask)
        value.backward(torch.ones_like(value))
        results.append((value.detach(), [x.grad for x in leaves]))
    return results


HIDDEN_CASES = {
    "ld": (lambda **kw: HiddenStateLogitDistanceLoss(**kw), lambda **kw: LogitDistanceLoss(**kw)),
    "ld_mean_uncentred": (lambda **kw: HiddenStateLogitDistanceLoss(centered=False, class_reduction="mean", **kw),
                          lambda **kw: LogitDistanceLoss(centered=False, class_reduction="mean", **kw)),
    "kd": (lambda **kw: HiddenStateKDLoss(temperature=2.0, chunk_size=5, **kw), lambda **kw: KDLoss(temperature=2.0, **kw)),
}


@pytest.mark.parametrize("case", list(HIDDEN_CASES))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("bias", [(True, True), (False, True), (False, False)])
def test_hidden_state_losses_equal_logit_losses(case, dtype, tol, bias):
    make_hidden, make_logits = HIDDEN_CASES[case]
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(4)) > 0.3
    for reduction in ("mean", "sum", "none"):
        for m in (None, mask):
            (vh, gh), (vl, gl) = _hidden_and_logits(make_hidden(reduction=reduction), make_logits(reduction=reduction),
                                                    (3, 7), 5, 8, 40, seed=60, dtype=dtype, mask=m, bias=bias)
            assert vh.dtype == dtype
            assert _rel(vh, vl) < tol
            for a, b in zip(gh, gl):  # student hidden states, head weight, head bias
                assert _rel(a, b) < tol


@pytest.mark.parametrize("case", list(HIDDEN_CASES))
def test_hidden_state_losses_gradcheck(case):
    make_hidden, _ = HIDDEN_CASES[case]
    loss = make_hidden()
    g = torch.Generator().manual_seed(61)
    hs, ht = torch.randn(2, 3, 3, generator=g, dtype=F64), torch.randn(2, 3, 4, generator=g, dtype=F64)
    ws, bs, wt, bt = _heads(3, 4, 6, 62, F64)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    args = tuple(x.clone().requires_grad_() for x in (hs, ws, bs))
    assert torch.autograd.gradcheck(lambda h, w, b: loss(h, ht, (w, b), (wt, bt), mask=mask), args, eps=1e-6,
                                    atol=1e-6, rtol=1e-5)


def test_hidden_state_losses_accept_linear_heads_and_cache_the_teacher_block():
    torch.manual_seed(0)
    student_head, teacher_head = torch.nn.Linear(3, 20), torch.nn.Linear(6, 20, bias=False)
    hs, ht = torch.randn(4, 3), torch.randn(4, 6)
    loss = HiddenStateLogitDistanceLoss()
    first = loss(hs, ht, student_head, teacher_head)
    reference = LogitDistanceLoss()(student_head(hs), teacher_head(ht))
    assert float(first.detach()) == pytest.approx(float(reference.detach()), rel=1e-6)
    first.backward()
    assert student_head.weight.grad is not None and teacher_head.weight.grad is None
    with torch.no_grad():
        teacher_head.weight.mul_(2.0)  # an in-place change of the teacher invalidates the cached block
    second = loss(hs, ht, student_head, teacher_head)
    expected = LogitDistanceLoss()(student_head(hs), teacher_head(ht)).detach()
    assert float(second.detach()) == pytest.approx(float(expected), rel=1e-6)


def test_hidden_state_losses_bad_input():
    loss = HiddenStateLogitDistanceLoss()
    hs, ht = torch.randn(4, 3), torch.randn(4, 6)
    ws, wt = torch.randn(20, 3), torch.randn(20, 6)
    with pytest.raises(ValueError, match="`student_hidden` has width 3 but its head expects 6"):
        loss(hs, ht, wt, wt)
    with pytest.raises(ValueError, match="same number of classes"):
        loss(hs, ht, ws, torch.randn(21, 6))
    with pytest.raises(ValueError, match="same leading shape"):
        loss(hs, ht[:3], ws, wt)
    with pytest.raises(TypeError, match="nn.Linear, a \\(weight, bias\\) pair or a weight tensor"):
        loss(hs, ht, "head", wt)
    bad = hs.clone()
    bad[1, 0] = float("nan")
    for lossfn in (loss, HiddenStateKDLoss()):
        with pytest.raises(ValueError, match="`student_hidden` contains 1 non-finite"):
            lossfn(bad, ht, ws, wt)


@pytest.mark.parametrize("name", ["llv_default", "llv_mean_inputs_soft", "ld_p2", "ld_p1", "kd"])
def test_gradcheck_chunked_with_mask(name):
    student, teacher = pair(n=3, k=4, seed=63, t=5)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, :2] = False
    loss = make(name, chunk_size=2)
    student = student.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda s: loss(s, teacher, mask=mask), (student,), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.slow  # one inductor compile per loss
@pytest.mark.parametrize("name", ["ld_p2", "kd"])
def test_torch_compile_with_mask_is_one_graph(name):
    """Under torch.compile the mask stays on the device (applied inside the blocks): one graph, eager's values."""
    student, teacher = pair(n=3, k=7, seed=64, t=5)
    student, teacher = student.float(), teacher.float()
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(5)) > 0.3
    loss = make(name)
    try:
        compiled = torch.compile(loss, fullgraph=True)
        value, grad = _value_and_grad(compiled, student, teacher, mask)
    except Exception as err:  # pragma: no cover - e.g. a platform without a C++ compiler for inductor
        text = str(err).lower()
        if "compiler" in text and ("c++" in text or "cxx" in text or "not found" in text):
            pytest.skip(f"torch.compile backend unavailable here: {err}")
        raise
    eager_value, eager_grad = _value_and_grad(loss, student, teacher, mask)
    assert float(value) == pytest.approx(float(eager_value), rel=1e-5)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-4, atol=1e-6)


def test_options_are_keywords_and_unknown_ones_are_named():
    with pytest.raises(TypeError, match="unexpected keyword argument 'lamda'"):
        LLVLoss(rep_dim=2, lamda=0.1)
    with pytest.raises(TypeError, match="chunksize"):
        KDLoss(chunksize=4)
    loss = LLVLoss(rep_dim=2, lam=0.5, reduction="sum", chunk_size=3, label_pivot=1)
    assert (loss.lam, loss.reduction, loss.chunk_size, loss.label_pivot) == (0.5, "sum", 3, 1)
    assert "chunk_size=3" in repr(loss) and "lam=0.5" in repr(loss)
