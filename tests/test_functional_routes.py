"""compare's two routes (logits: N x K log-probabilities and a 2K x 2K covariance; representation: the (2M+2)^2
covariance of [f_p, logZ_p, f_q - f_p, logZ_q - logZ_p]) give the same numbers, the reference cases included."""

from __future__ import annotations

import pytest
import torch

from lightning_repsim.functional import compare
from lightning_repsim.functional.compare import choose_route
from tests.conftest import STREAM_RTOL, assert_rel

RTOL = STREAM_RTOL


def assert_same_report(a, b, rtol=RTOL):
    assert (a.llv.label_pivot, a.llv.leave_out) == (b.llv.label_pivot, b.llv.leave_out)
    assert a.llv.input_set.tolist() == b.llv.input_set.tolist()
    for name in ("value", "t1", "t2", "t3", "t4", "t1_terms", "t2_terms", "t3_terms", "t4_terms", "candidate_scores"):
        assert_rel(getattr(a.llv, name), getattr(b.llv, name), rtol, name)
    for name in ("value", "f_part", "g_part", "msvd_f"):
        assert_rel(getattr(a.svd, name), getattr(b.svd, name), rtol, name)
    assert_rel(a.kl, b.kl, rtol, "kl")
    assert_rel(a.canonical_correlations, b.canonical_correlations, rtol, "canonical_correlations")


def test_representation_route_reproduces_the_reference_cases(reference_case):
    ref = reference_case
    rep = compare(ref["f1"], ref["g1"], ref["f2"], ref["g2"], input_sets=ref["candidate_sets"], route="representation")
    assert rep.llv.input_set.tolist() == ref["input_set"].tolist() and rep.llv.label_search == "full"
    for name, key in (("value", "distance_max"), ("t1", "t1"), ("t2", "t2"), ("t1_terms", "t1_terms"),
                      ("t2_terms", "t2_terms"), ("t3_terms", "t3_terms"), ("t4_terms", "t4_terms"),
                      ("candidate_scores", "candidate_scores")):
        assert_rel(getattr(rep.llv, name), ref[key], RTOL, name)
    assert_rel(rep.svd.value, ref["d_svd"], RTOL, "d_svd")
    assert_rel(rep.svd.msvd_f, ref["msvd_f"], RTOL, "msvd_f")
    assert_rel(rep.kl, ref["mean_kl"], RTOL, "mean_kl")
    assert_rel(rep.canonical_correlations, ref["canonical_correlations"], RTOL, "canonical_correlations")


@pytest.mark.parametrize("bias", [False, True])
def test_both_routes_agree_on_a_larger_vocabulary(bias):
    g = torch.Generator().manual_seed(1)
    n, k, m = 600, 300, 3
    f_p = torch.randn(n, m, generator=g, dtype=torch.float64)
    f_q = f_p @ torch.randn(m, m, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, m, generator=g, dtype=torch.float64)
    w_p = torch.randn(k, m + bias, generator=g, dtype=torch.float64)
    w_q = torch.randn(k, m + bias, generator=g, dtype=torch.float64)
    assert choose_route("auto", k, m) == "representation"
    kwargs = {"num_input_sets": 40, "max_label_subsets": 200}
    by_repr = compare(f_p, w_p, f_q, w_q, **kwargs)  # auto
    by_logits = compare(f_p, w_p, f_q, w_q, route="logits", **kwargs)
    assert by_repr.llv.label_search == "full" == by_logits.llv.label_search  # 300 pivots are cheap: all searched
    assert_same_report(by_repr, by_logits)


def test_route_choice_and_errors():
    assert choose_route("auto", 7, 2) == "logits" and choose_route("auto", 8192, 128) == "representation"
    assert choose_route("auto", 300, 100) == "logits"  # a (2M+2)^2 statistic would not be smaller
    with pytest.raises(ValueError, match="`route` must be one of"):
        choose_route("fast", 10, 2)
    f, w = torch.randn(50, 2, dtype=torch.float64), torch.randn(300, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="applies to the logits route"):
        compare(f, w, f, w, labels=[0, 1, 2])
