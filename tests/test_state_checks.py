"""States that no update could have produced are refused: a d_SVD state accumulated with another model's unembedding
(merged, loaded or synced), NaN or infinite statistics in a loaded ``state_dict``; and distances never below 0."""

from __future__ import annotations

import pytest
import torch

from lightning_repsim import metrics as M
from lightning_repsim.constructions import theorem31_pair
from lightning_repsim.functional import compare, mean_kl_divergence
from tests.conftest import STREAM_RTOL


def svd_metric(pair, unemb_p=None, rows=slice(None)) -> M.SVDDissimilarity:
    metric = M.SVDDissimilarity()
    metric.update(pair.emb_p[rows], pair.emb_q[rows], unemb_p=pair.unemb_p if unemb_p is None else unemb_p,
                  unemb_q=pair.unemb_q)
    return metric


def test_svd_merge_refuses_a_state_accumulated_with_another_unembedding():
    """``update`` refuses a changed unembedding (logZ of the earlier inputs used the old one); merging, loading or
    syncing such a state must refuse it too, or the statistics mix two models."""
    pair = theorem31_pair(rho=5.0, n_per_class=30, seed=0)
    first, second = slice(0, 100), slice(100, None)
    other = svd_metric(pair, unemb_p=pair.unemb_p * 2.0, rows=second)
    for incoming in (other, dict(other.metric_state)):
        metric = svd_metric(pair, rows=first)
        before = {k: v.clone() for k, v in metric.metric_state.items()}
        with pytest.raises(ValueError, match="other unembeddings"):
            metric.merge_state(incoming)
        assert all(torch.equal(before[k], v) for k, v in metric.metric_state.items())  # nothing merged
    other.persistent(True)
    metric = svd_metric(pair, rows=first)
    metric.persistent(True)
    with pytest.raises(ValueError, match="other unembeddings"):
        metric.load_state_dict(other.state_dict())

    # the same unembedding merges, and equals one metric over all inputs
    same = svd_metric(pair, rows=second)
    metric = svd_metric(pair, rows=first)
    metric.merge_state(same)
    whole = svd_metric(pair)
    assert float(metric.compute()) == pytest.approx(float(whole.compute()), rel=STREAM_RTOL, abs=1e-12)


def test_svd_fingerprint_follows_the_unembedding_not_its_dtype():
    from lightning_repsim.metrics.svd import unembedding_fingerprint

    g = torch.randn(50_257 // 16, 65)  # more entries than are hashed
    assert torch.equal(unembedding_fingerprint(g), unembedding_fingerprint(g.double()))
    changed = g.clone()
    changed[:, 0] += 1e-3
    assert not torch.equal(unembedding_fingerprint(g), unembedding_fingerprint(changed))
    assert bool((unembedding_fingerprint(g) > 0).all())


def _cases():
    pair = theorem31_pair(rho=5.0, n_per_class=20, seed=0)
    z_p, z_q = pair.emb_p @ pair.unemb_p.T, pair.emb_q @ pair.unemb_q.T
    return [
        (M.MeanKLDivergence, {}, (z_p, z_q)),
        (M.LogitDistance, {}, (z_p, z_q)),
        (M.LLVDistance, {"rep_dim": 2}, (z_p, z_q)),
        (M.SVDDissimilarity, {"unemb_p": pair.unemb_p, "unemb_q": pair.unemb_q}, (pair.emb_p, pair.emb_q)),
        (M.MeanCCA, {}, (pair.emb_p, pair.emb_q)),
        (M.LinearCKA, {}, (pair.emb_p, pair.emb_q)),
    ]


@pytest.mark.parametrize("position", [0, 1], ids=["count", "statistic"])
@pytest.mark.parametrize("case", range(6), ids=["kl", "logit", "llv", "svd", "cca", "cka"])
def test_loading_nan_states_fails_with_a_clear_message(case, position):
    """Before: the NaN count loaded and compute() failed with ``cannot convert float NaN to integer`` (or, with a NaN
    mean, returned a silently wrong value)."""
    cls, kwargs, args = _cases()[case]
    metric = cls(**kwargs)
    metric.persistent(True)
    metric.update(*args)
    state = metric.state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1 and k != "candidates")
    state[name] = state[name].clone()
    state[name].view(-1)[position] = float("nan")
    fresh = cls(**kwargs)
    fresh.persistent(True)
    with pytest.raises(ValueError, match=rf"state `{name}` of the loaded state_dict has .*(non-finite|count of nan)"):
        fresh.load_state_dict(state)
    fresh.update(*args)  # refused and reset: the metric is usable
    assert float(fresh.compute()) == pytest.approx(float(metric.compute()), rel=STREAM_RTOL, abs=1e-12)


def test_loading_a_nan_candidate_buffer_is_refused():
    cls, kwargs, args = _cases()[2]
    metric = cls(**kwargs)
    metric.persistent(True)
    metric.update(*args)
    state = metric.state_dict()
    state["candidates"] = state["candidates"].clone()
    state["candidates"][0, 3] = float("nan")
    with pytest.raises(ValueError, match="state `candidates`"):
        fresh = cls(**kwargs)
        fresh.persistent(True)
        fresh.load_state_dict(state)


def near_identical_logits() -> tuple[torch.Tensor, torch.Tensor]:
    """Two models whose predictions agree to float64 round-off (an embedding mapped by A and unembedding by A^-T, A
    within 1e-15 of the identity): per-input KLs of about +-1e-17 before clamping."""
    gen = torch.Generator().manual_seed(5)
    f = torch.randn(200, 3, dtype=torch.float64, generator=gen)
    g = torch.randn(8, 3, dtype=torch.float64, generator=gen)
    a = torch.eye(3, dtype=torch.float64) + 1e-15 * torch.randn(3, 3, dtype=torch.float64, generator=gen)
    return f @ g.T, (f @ a.T) @ (g @ torch.linalg.inv(a)).T


def test_distances_are_never_below_zero():
    """Before: the mean KL came out as -8.8e-18 (functional) and -9.7e-18 (metric) for models that agree to round-off
    (a distance below 0)."""
    z_p, z_q = near_identical_logits()
    assert float(mean_kl_divergence(z_p, z_q)) >= 0
    from lightning_repsim.functional.kl import kl_of_logit_rows, logit_pair_rows

    assert bool((logit_pair_rows(z_p, z_q)[2] >= 0).all())
    assert bool((kl_of_logit_rows(z_p, z_q, torch.logsumexp(z_p, 1), torch.logsumexp(z_q, 1)) >= 0).all())
    for metric in (M.MeanKLDivergence(), M.LogitDistance()):
        metric.update(z_p, z_q)
        assert float(metric.compute()) >= 0
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        f = torch.randn(200, 3, dtype=torch.float64, generator=gen)
        g = torch.randn(8, 4, dtype=torch.float64, generator=gen)
        report = compare(f, g, f.clone(), g.clone()).as_dict()
        negative = {k: v for k, v in report.items() if isinstance(v, float) and v < 0}
        assert not negative, negative
        for metric in (M.LinearCKA(), M.ProcrustesDistance()):
            metric.update(f, f @ torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=gen))[0])
            result = metric.compute_result()
            assert float(result.procrustes) >= 0 and float(result.cka) <= 1 + 1e-15
