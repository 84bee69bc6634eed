"""Bad input gets a clear error naming the argument and the problem, never a silent NaN."""

from __future__ import annotations

import pytest
import torch

from lightning_repsim.functional import (
    DiversityWarning,
    compare,
    llv_distance,
    mean_cca,
    mean_kl_divergence,
    svd_dissimilarity,
)
from tests.conftest import near_collinear_unembedding


def logits(n=50, k=5, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_shape_mismatch():
    with pytest.raises(ValueError, match=r"`logits_p` and `logits_q` must have the same shape.*\(50, 5\).*\(50, 6\)"):
        llv_distance(logits(), logits(k=6), rep_dim=2)
    with pytest.raises(ValueError, match="same shape"):
        mean_kl_divergence(logits(), logits(n=49))


def test_non_finite_reports_count_and_rows():
    bad = logits()
    bad[3, 1] = float("nan")
    bad[7, 0] = float("inf")
    bad[7, 2] = float("-inf")
    with pytest.raises(ValueError, match=r"`logits_q` contains 3 non-finite value\(s\).*2 row\(s\).*\[3, 7\]"):
        llv_distance(logits(), bad, rep_dim=2)
    with pytest.raises(ValueError, match="`logits_p` contains 3 non-finite"):
        mean_kl_divergence(bad, logits())
    emb = torch.randn(30, 2, dtype=torch.float64)
    emb[0, 0] = float("nan")
    with pytest.raises(ValueError, match="`emb_q` contains 1 non-finite"):
        mean_cca(torch.randn(30, 2, dtype=torch.float64), emb)


def test_too_few_labels_and_inputs():
    with pytest.raises(ValueError, match="K=2 is too small"):
        llv_distance(logits(k=2), logits(k=2), rep_dim=1)
    with pytest.raises(ValueError, match=r"at least M \+ 2 = 4 inputs.*N=3"):
        llv_distance(logits(n=3), logits(n=3), rep_dim=2)
    f = torch.randn(40, 3, dtype=torch.float64)
    g = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"d_SVD needs K >= M \+ 2.*K=4 and M=3"):
        svd_dissimilarity(f, g, f, g, label_pivot=0, leave_out=1, input_set=torch.arange(4))


def test_bad_arguments():
    with pytest.raises(ValueError, match="`reduce` must be one of"):
        llv_distance(logits(), logits(), rep_dim=2, reduce="median")
    with pytest.raises(ValueError, match="`combine` must be one of"):
        llv_distance(logits(), logits(), rep_dim=2, combine="min")
    with pytest.raises(ValueError, match="`rep_dim` must be a positive int"):
        llv_distance(logits(), logits(), rep_dim=0)
    with pytest.raises(ValueError, match=r"`label_pivot` must be a label index in \[0, 5\)"):
        llv_distance(logits(), logits(), rep_dim=2, label_pivot=5)
    with pytest.raises(ValueError, match="must differ"):
        llv_distance(logits(), logits(), rep_dim=2, label_pivot=1, leave_out=1)
    with pytest.raises(ValueError, match=r"`input_sets` must have shape \(S, M\+1\)"):
        llv_distance(logits(), logits(), rep_dim=2, input_sets=torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="distinct"):
        llv_distance(logits(), logits(), rep_dim=2, input_sets=torch.tensor([[0, 1, 1]]))
    with pytest.raises(ValueError, match="outside"):
        llv_distance(logits(), logits(), rep_dim=2, input_sets=torch.tensor([[0, 1, 50]]))
    with pytest.raises(TypeError, match="floating-point"):
        llv_distance(torch.ones(10, 4, dtype=torch.long), torch.ones(10, 4, dtype=torch.long), rep_dim=1)


def test_zero_variance_of_log_odds_is_an_error():
    constant = logits(n=1).expand(50, 5).clone()  # the same prediction for every input
    with pytest.raises(ValueError, match="zero variance"):
        llv_distance(constant, logits(), rep_dim=2)
    # labels 1 and 2 carry identical information: fine unless the user forces a set that needs it
    dup = logits()
    dup[:, 2] = dup[:, 1] + 3.0
    res = llv_distance(dup, logits(seed=1), rep_dim=2)
    assert {res.label_pivot, res.leave_out} & {1, 2}
    with pytest.raises(ValueError, match=r"label\(s\) \[2\] against pivot y0=1"):
        llv_distance(dup, logits(seed=1), rep_dim=2, label_pivot=1, leave_out=0)


def test_zero_variance_over_labels_is_an_error():
    lp = logits()
    lp[1] = lp[0] + 2.0  # input 1 predicts exactly like input 0
    with pytest.raises(ValueError, match=r"zero variance.*\(tau = 0\)"):
        llv_distance(lp, logits(seed=1), rep_dim=2, input_sets=torch.tensor([[0, 1, 2]]))
    # a valid candidate next to it is chosen instead
    res = llv_distance(lp, logits(seed=1), rep_dim=2, input_sets=torch.tensor([[0, 1, 2], [3, 4, 5]]))
    assert res.chosen_candidate == 1
    assert torch.isinf(res.candidate_scores[0])


def test_never_nan():
    for seed in range(5):
        res = llv_distance(logits(seed=seed), logits(seed=seed + 10), rep_dim=2, num_input_sets=5)
        values = torch.cat([res.t1_terms, res.t2_terms, res.t3_terms, res.t4_terms, res.value[None]])
        assert bool(torch.isfinite(values).all())


def test_near_singular_diversity_matrix_warns():
    f, g_bad = near_collinear_unembedding()
    with pytest.warns(DiversityWarning, match="condition number"):
        res = svd_dissimilarity(f, g_bad, f, g_bad, label_pivot=0, leave_out=1, input_set=torch.tensor([0, 1, 2]))
    assert float(res.cond_l.max()) > 1e8
    assert res.label_pivot == 0 and res.input_set.tolist() == [0, 1, 2]


def test_constant_embeddings_in_cca():
    """A constant coordinate is left out (rank-aware CCA); embeddings that are constant altogether have nothing to
    compare."""
    f = torch.randn(100, 2, dtype=torch.float64)
    f_const = torch.cat([f, torch.ones(100, 1, dtype=torch.float64)], dim=1)
    assert float(mean_cca(f, f_const)) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="embeddings of model q are constant"):
        mean_cca(f, torch.ones(100, 3, dtype=torch.float64))


def test_unembedding_width_checked():
    f = torch.randn(100, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"`unemb_p` must have shape \(K, M\) or \(K, M\+1\)"):
        compare(f, torch.randn(6, 4, dtype=torch.float64), f, torch.randn(6, 2, dtype=torch.float64))
