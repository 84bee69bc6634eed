"""The optimised input-set search of d_LLV (term 2): exact when every pivot is tried, never above the sampled
value, stable over seeds, distinct content only, reported; the restricted label search refines locally."""

from __future__ import annotations

import itertools

import pytest
import torch

from lightning_repsim.functional import llv_distance, llv_seed_spread
from lightning_repsim.functional.llv_terms import set_entries
from lightning_repsim.metrics import LLVDistance, SVDDissimilarity
from tests.conftest import REFERENCE_FILES, STREAM_RTOL, assert_close_dict, load_reference


def pair(n=200, k=6, seed=0, noise=0.5):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g, dtype=torch.float64)
    return z, z + noise * torch.randn(n, k, generator=g, dtype=torch.float64)


def test_repeated_inputs_never_share_a_set():
    """10 distinct inputs, each repeated 20 times (as the first token of every sequence is): the chosen set holds
    inputs of distinct content, for the functional core and the streaming metric (ids given, so the buffer keeps
    the repeats)."""
    base_p, base_q = pair(n=10, k=6, seed=1)
    z_p, z_q = base_p.repeat(20, 1), base_q.repeat(20, 1)
    for method in ("optimise", "sample"):
        res = llv_distance(z_p, z_q, rep_dim=2, input_set_search=method)
        assert len({int(i) % 10 for i in res.input_set.tolist()}) == 3, (method, res.input_set)
        assert res.search["distinct_candidates"] == 10
    metric = LLVDistance(rep_dim=2)
    metric.update(z_p, z_q, ids=torch.arange(200))
    res = metric.compute_result()
    assert len({int(i) % 10 for i in res.input_set.tolist()}) == 3
    # the optimum over distinct inputs equals the search on the distinct inputs alone
    assert float(res.t2) == pytest.approx(float(llv_distance(base_p, base_q, rep_dim=2).t2), rel=STREAM_RTOL)


def test_too_few_distinct_inputs_is_a_clear_error():
    base_p, base_q = pair(n=2, k=6)
    with pytest.raises(ValueError, match="only 2 candidate input.*distinct content.*M\\+1 = 3"):
        llv_distance(base_p.repeat(10, 1), base_q.repeat(10, 1), rep_dim=2)


def test_the_search_is_the_exact_argmin_when_every_pivot_is_tried():
    """Brute force over every set of 3 distinct inputs (each as pivot) of 9 inputs."""
    z_p, z_q = pair(n=9, k=5, seed=2)
    res = llv_distance(z_p, z_q, rep_dim=2, num_input_sets=3)
    assert res.search["all_pivots"]
    lp, lq = torch.log_softmax(z_p, -1), torch.log_softmax(z_q, -1)
    sets = torch.tensor([[p, *others] for p in range(9) for others in itertools.combinations([i for i in range(9) if i != p], 2)])
    b, b_piv, _, valid = set_entries(lp, lq, sets)
    t2 = torch.where(valid.all(1), torch.maximum(b.amax(1), b_piv.amax(1)), torch.inf)
    assert float(res.t2) == pytest.approx(float(t2.min()), rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_never_above_the_sampled_value(seed, monkeypatch):
    """Exhaustive (within the budget) and local search (beyond it: the budget is lowered here) are never above the
    best sampled set."""
    from lightning_repsim.functional import input_search

    z_p, z_q = pair(n=3000, k=40, seed=seed)
    sampled = llv_distance(z_p, z_q, rep_dim=4, seed=seed, input_set_search="sample")
    exhaustive = llv_distance(z_p, z_q, rep_dim=4, seed=seed)
    assert exhaustive.search["exhaustive"] and exhaustive.search["pivots_evaluated"] == 3000
    monkeypatch.setattr(input_search, "EXHAUSTIVE_BUDGET", 10**6)
    local = llv_distance(z_p, z_q, rep_dim=4, seed=seed)
    assert not local.search["exhaustive"] and 0 < local.search["pivots_evaluated"] <= input_search.MAX_PIVOTS
    for optimised in (exhaustive, local):
        assert float(optimised.t2) <= float(sampled.t2) + 1e-12
        assert optimised.search["sampled_best"] == pytest.approx(float(sampled.t2), rel=1e-12)
    assert float(exhaustive.t2) <= float(local.t2) + 1e-12


@pytest.mark.parametrize("shape", [(2500, 12, 3), (4000, 100, 6)])
def test_exhaustive_search_is_seed_free(shape):
    """Every pair scored: T2, d_LLV and the chosen set do not depend on the seed of the sampled sets."""
    n, k, m = shape
    z_p, z_q = pair(n=n, k=k, seed=5)
    results = [llv_distance(z_p, z_q, rep_dim=m, seed=seed) for seed in range(3)]
    for res in results:
        assert res.search["exhaustive"]
        assert float(res.t2) == pytest.approx(float(results[0].t2), rel=1e-12)
        assert float(res.value) == pytest.approx(float(results[0].value), rel=1e-12)
        assert res.input_set.tolist() == results[0].input_set.tolist()  # the same argmin: no seed enters the search


def test_exhaustive_search_equals_brute_force_over_pivots():
    """The blocked all-pairs scoring equals scoring each pivot against every input (the local search's path)."""
    from lightning_repsim.functional.input_search import PairStatistics, all_pivots, evaluate_pivots

    z_p, z_q = pair(n=1300, k=7, seed=4)  # more than two blocks of 512
    lp, lq = torch.log_softmax(z_p, -1), torch.log_softmax(z_q, -1)
    stats = PairStatistics.from_log_probabilities(lp, lq)
    table = all_pivots(stats, 3)
    direct = evaluate_pivots(stats, torch.arange(1300), 3)
    assert torch.equal(table.pivots, direct.pivots)
    torch.testing.assert_close(table.scores, direct.scores[:, :3], rtol=1e-9, atol=1e-12)  # the exhaustive scan keeps M
    torch.testing.assert_close(table.t2, direct.t2, rtol=1e-9, atol=1e-12)
    # the factors' scores equal the entry formula on the log-probabilities
    sets = torch.cat([table.pivots[:, None], table.partners[:, :3]], 1)[:50]
    b, b_piv, _, _ = set_entries(lp, lq, sets)
    torch.testing.assert_close(torch.maximum(b, b_piv), table.scores[:50, :3], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("path", REFERENCE_FILES, ids=[p.stem for p in REFERENCE_FILES])
def test_t2_is_stable_over_seeds_on_the_reference_cases(path):
    ref = load_reference(path)
    optimised = llv_seed_spread(ref["logits1"], ref["logits2"], rep_dim=int(ref["rep_dim"]))
    sampled = llv_seed_spread(ref["logits1"], ref["logits2"], rep_dim=int(ref["rep_dim"]), input_set_search="sample")
    assert optimised["t2_relative_spread"] <= 0.05
    assert optimised["t2_mean"] <= sampled["t2_mean"] + 1e-12


def test_streaming_search_is_independent_of_batching_and_route():
    g = torch.Generator().manual_seed(3)
    f_p = torch.randn(500, 3, generator=g, dtype=torch.float64)
    f_q = f_p + 0.4 * torch.randn(500, 3, generator=g, dtype=torch.float64)
    w_p, w_q = torch.randn(2, 9, 3, generator=g, dtype=torch.float64).unbind(0)
    results = []
    for size in (1, 64, 500):
        llv, svd = LLVDistance(rep_dim=3), SVDDissimilarity(unemb_p=w_p, unemb_q=w_q)
        for i in range(0, 500, size):
            sl = slice(i, i + size)
            llv.update(f_p[sl] @ w_p.T, f_q[sl] @ w_q.T, ids=torch.arange(500)[sl])
            svd.update(f_p[sl], f_q[sl], ids=torch.arange(500)[sl])
        results.append((llv.compute_result(), svd.compute_result().llv))
    for llv_res, svd_res in results:
        assert llv_res.input_set.tolist() == results[0][0].input_set.tolist() == svd_res.input_set.tolist()
        assert float(llv_res.t2) == pytest.approx(float(svd_res.t2), rel=STREAM_RTOL)
        # the search report holds floats (e.g. the best sampled T2), summed in another order per batching
        assert_close_dict(llv_res.search, results[0][0].search, STREAM_RTOL, "search")


def test_independent_members_greedy_matches_rank_checks_and_skips_impossible_sets():
    """The incremental orthogonalisation keeps exactly the partners a rank check per candidate would keep; a set
    larger than the rows' affine dimension spans it (diversity within the model's own rank)."""
    from lightning_repsim.functional.input_search import PairStatistics, _independent_members

    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(30, 8, generator=g, dtype=torch.float64), 1)
    lq = torch.log_softmax(torch.randn(30, 8, generator=g, dtype=torch.float64), 1)
    v, w = torch.randn(2, 8, generator=g, dtype=torch.float64).unbind(0)
    for i, t in enumerate((0.5, 1.0, 1.5, 2.0), start=1):  # partners 1..4 lie on one line from the pivot (row 0)
        lp[i], lq[i] = lp[0] + t * v, lq[0] + t * w
    lp[5], lq[5] = lp[0] + 0.7 * v + 1e-12 * w, lq[0] + 0.7 * w  # numerically on the line too
    stats = PairStatistics.from_log_probabilities(lp, lq)
    order = torch.arange(1, 30)
    values = torch.arange(29, dtype=torch.float64)
    for m in (2, 3, 5):
        expected: list[int] = []
        for index in order.tolist():  # the reference: one rank computation per candidate
            if stats.rank_ok(0, torch.tensor([*expected, index])):
                expected.append(index)
                if len(expected) == m:
                    break
        assert order[_independent_members(stats, 0, order, values, m)].tolist() == expected
    assert expected[:2] == [1, 6]
    assert stats.affine_ranks() == (7, 7)  # K = 8 log-probabilities: 7 dimensions
    # a set larger than the rows' affine dimension: 7 members span it, the 8th is the next by score
    members = order[_independent_members(stats, 0, order, values, 8)]
    assert stats.rank_ok(0, members) and members.numel() == 8
    assert int(torch.linalg.matrix_rank(stats.displaced(0, members)[0])) == 7


def test_tied_pivots_resolve_to_the_smallest_whatever_the_rounding():
    """Two pivots whose best sets tie (here their T2 is decided by the same pair of inputs) differ by a few ulps that
    depend on a per-input offset of the logits; the tie must go to the smallest pivot either way (found by the
    offset-invariance property test, seed 1335)."""
    gen = torch.Generator().manual_seed(1335)
    lp = torch.randn(200, 6, generator=gen, dtype=torch.float64)
    lq = lp + 0.3 * torch.randn(200, 6, generator=gen, dtype=torch.float64)
    shift = torch.randn(200, 1, generator=gen, dtype=torch.float64)
    base = llv_distance(lp, lq, rep_dim=2, num_input_sets=30)
    moved = llv_distance(lp + shift, lq - shift, rep_dim=2, num_input_sets=30)
    assert base.input_set.tolist() == moved.input_set.tolist() == [18, 135, 71]
    assert float(moved.t2) == pytest.approx(float(base.t2), rel=1e-12)


def test_sampled_sets_scored_from_pair_statistics_equal_their_exact_entries():
    """When the search is exhaustive the sampled sets are scored from the pair statistics (each pivot against its own
    members): the same T2 as their exact entries, inf for a set with an invalid pair."""
    from lightning_repsim.functional.input_search import set_scores
    from lightning_repsim.functional.pair_scores import PairStatistics

    z_p, z_q = pair(n=300, k=7, seed=5)
    z_p[9], z_q[9] = z_p[8] + 1.0, z_q[8] - 3.0  # inputs 8 and 9: the same log-probabilities (zero normalisers)
    lp, lq = torch.log_softmax(z_p, -1), torch.log_softmax(z_q, -1)
    sets = torch.stack([torch.randperm(300, generator=torch.Generator().manual_seed(s))[:4] for s in range(50)])
    sets[0] = torch.tensor([8, 9, 1, 2])
    b, b_piv, _, valid = set_entries(lp, lq, sets)
    exact = torch.where(valid.all(1), torch.maximum(b.amax(1), b_piv.amax(1)), torch.inf)
    scores = set_scores(PairStatistics.from_log_probabilities(lp, lq), sets)
    assert bool(torch.isinf(exact[0])) and torch.equal(torch.isinf(scores), torch.isinf(exact))
    finite = torch.isfinite(exact)
    torch.testing.assert_close(scores[finite], exact[finite], rtol=1e-9, atol=0)


def test_affine_rank_capped_from_the_first_rows_equals_the_capped_rank():
    """``affine_ranks(at_most)`` tries the first rows before all of them: the same ``min(rank, at_most)`` whether the
    first rows reach the cap or not (here they span 2 dimensions, all the rows 5)."""
    from lightning_repsim.functional.pair_scores import PairStatistics

    g = torch.Generator().manual_seed(3)
    emb = torch.zeros(60, 8, dtype=torch.float64)
    emb[:30, :2] = torch.randn(30, 2, generator=g, dtype=torch.float64)  # the first 30 rows: a plane
    emb[30:, :5] = torch.randn(30, 5, generator=g, dtype=torch.float64)
    for at_most in (1, 2, 3, 5, 7):
        stats = PairStatistics(*(torch.zeros(60, 1, dtype=torch.float64) for _ in range(2)),
                               *(torch.ones(60, dtype=torch.float64) for _ in range(3)), emb, 2 * emb,
                               center_directions=False)
        assert stats.affine_ranks(at_most) == (min(5, at_most),) * 2, at_most
        assert stats.affine_ranks() == (5, 5)


def test_llv_distance_default_buffer_is_seed_free_up_to_its_size():
    """LLVDistance's default buffer is sized from K (10,049 inputs at K = 7): 3,000 inputs all fit, so T2 and d_LLV
    are the exhaustive search's over all of them whatever the seed, and equal the functional core's."""
    z_p, z_q = pair(n=3000, k=7, seed=11)
    expected = llv_distance(z_p, z_q, rep_dim=2)
    for seed in (0, 1, 2):
        metric = LLVDistance(rep_dim=2, seed=seed)
        for i in range(0, 3000, 700):
            metric.update(z_p[i : i + 700], z_q[i : i + 700])
        res = metric.compute_result()
        assert metric.buffer_size == 10049 and res.search["exhaustive"]
        assert float(res.t2) == pytest.approx(float(expected.t2), rel=STREAM_RTOL)
        assert float(res.value) == pytest.approx(float(expected.value), rel=STREAM_RTOL)
