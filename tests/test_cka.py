"""The CKA family and the logit distance: the streaming statistic against the O(N^2) Gram-matrix definitions (to
1e-9, float64, with large offsets and unequal widths), exactness under any batching and merge order, invariances,
bounded state, and clear errors. Two processes are checked in tests/test_metrics_ddp.py."""

from __future__ import annotations

import pytest
import torch

from lightning_repsim.functional import linear_cka, logit_distance, mean_kl_divergence, procrustes_distance
from lightning_repsim.functional.cka import cka_batch_state, cka_merge, cka_values
from lightning_repsim.functional.kl import logit_pair_rows
from lightning_repsim.losses import LogitDistanceLoss
from lightning_repsim.metrics import LinearCKA, LogitDistance, MeanKLDivergence, ProcrustesDistance
from tests.conftest import STREAM_RTOL

RTOL = STREAM_RTOL


def rel(a, b) -> float:
    a, b = float(a), float(b)
    return abs(a - b) / max(abs(b), 1e-300)


def hsic_biased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    n = k.shape[0]
    h = torch.eye(n, dtype=k.dtype) - 1.0 / n
    return torch.trace(k @ h @ l @ h) / (n - 1) ** 2


def hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Song et al. (2012), eq. (5), written from the definition."""
    n = k.shape[0]
    k, l = k.clone(), l.clone()
    k.fill_diagonal_(0)
    l.fill_diagonal_(0)
    one = torch.ones(n, dtype=k.dtype)
    return (torch.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3))


def gram_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool) -> torch.Tensor:
    """CKA from the Gram matrices K = X X^T, L = Y Y^T (the definition; O(N^2) memory)."""
    hsic = hsic_unbiased if debiased else hsic_biased
    k, l = x @ x.T, y @ y.T
    return hsic(k, l) / (hsic(k, k) * hsic(l, l)).sqrt()


def data(n=300, d_p=7, d_q=4, offset=1e4, scale=1e-2, seed=0):
    """Embeddings with large offsets and small spread (a hard case for raw sums of squares), unequal widths."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d_p, generator=g, dtype=torch.float64)
    x = offset + scale * base
    y = -0.5 * offset + scale * (torch.tanh(base @ torch.randn(d_p, d_q, generator=g, dtype=torch.float64))
                                 + 0.3 * torch.randn(n, d_q, generator=g, dtype=torch.float64))
    return x, y


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_linear_cka_equals_gram_definition(debiased, offset):
    x, y = data(offset=offset)
    # the Gram definition on exactly centred copies (HSIC is translation invariant; the raw Gram of data at 1e4
    # would lose every digit, which is the point of the streaming statistic)
    expected = gram_cka(x - x.mean(0), y - y.mean(0), debiased)
    assert rel(linear_cka(x, y, debiased=debiased), expected) < RTOL
    if offset == 0.0:
        assert rel(linear_cka(x, y, debiased=debiased), gram_cka(x, y, debiased)) < 1e-8


def test_procrustes_equals_svd_definition():
    x, y = data()
    xc, yc = x - x.mean(0), y - y.mean(0)
    xc, yc = xc / xc.norm(), yc / yc.norm()
    # min over orthogonal maps R (after zero-padding to a common width) of ||X R - Y||_F, from its SVD solution
    width = max(xc.shape[1], yc.shape[1])
    xp = torch.nn.functional.pad(xc, (0, width - xc.shape[1]))
    yp = torch.nn.functional.pad(yc, (0, width - yc.shape[1]))
    u, _, vh = torch.linalg.svd(xp.T @ yp)
    expected = (xp @ (u @ vh) - yp).norm()
    assert rel(procrustes_distance(x, y), expected) < RTOL


def test_invariances_and_ranges():
    x, _ = data(d_p=5, offset=3.0)
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    y = 7.0 * x @ q - 2.0
    for debiased in (False, True):
        assert abs(float(linear_cka(x, y, debiased)) - 1.0) < 1e-10
    assert float(procrustes_distance(x, y)) < 1e-6
    # CKA is invariant to isotropic scaling but not to an anisotropic one
    assert float(linear_cka(x, x * torch.tensor([1.0, 1.0, 1.0, 1.0, 30.0], dtype=torch.float64))) < 0.99
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2000, 6, generator=g, dtype=torch.float64), torch.randn(2000, 3, generator=g, dtype=torch.float64)
    assert 0.0 <= float(linear_cka(a, b)) < 0.01
    assert abs(float(linear_cka(a, b, debiased=True))) < 0.005  # debiased: ~0 for independent embeddings
    assert 0.0 <= float(procrustes_distance(a, b)) <= 2**0.5


def test_logit_distance_definition_and_loss():
    g = torch.Generator().manual_seed(0)
    z_p = torch.randn(50, 9, generator=g, dtype=torch.float64) * 3 + 1e3
    z_q = torch.randn(50, 9, generator=g, dtype=torch.float64)
    c = lambda z: z - z.mean(-1, keepdim=True)  # noqa: E731
    expected = ((c(z_p) - c(z_q)) ** 2).sum(-1).mean().sqrt()
    assert rel(logit_distance(z_p, z_q), expected) < 1e-12
    # the loss trains on the same quantity (mean over inputs of the squared distance)
    loss = LogitDistanceLoss()(z_q, z_p)
    assert rel(loss, expected**2) < 1e-9


@pytest.mark.parametrize("cls", [LinearCKA, ProcrustesDistance])
def test_streaming_is_exact_for_any_batching(cls):
    x, y = data(n=300)
    values = []
    for bs in (1, 7, 128, 300):
        metric = cls()
        for i in range(0, 300, bs):
            metric.update(x[i : i + bs], y[i : i + bs])
        values.append(metric.compute_result())
    direct = {"cka": linear_cka(x, y), "cka_debiased": linear_cka(x, y, True), "procrustes": procrustes_distance(x, y)}
    for res in values:
        assert res.num_inputs == 300
        for key, expected in direct.items():
            assert rel(getattr(res, key), expected) < RTOL, (key, res)
        for key in ("cka", "cka_debiased", "procrustes"):
            assert rel(getattr(res, key), getattr(values[0], key)) < 1e-12


def test_debiased_headline_and_merge_state_with_other_shifts():
    x, y = data(n=200)
    a, b, whole = LinearCKA(debiased=True), LinearCKA(debiased=True), LinearCKA(debiased=True)
    a.update(x[:50] + 0.0, y[:50])  # a's shift is its first batch's mean, b's its own: they differ
    b.update(x[150:], y[150:])
    b.update(x[50:150], y[50:150])
    a.merge_state(b)
    whole.update(x, y)
    assert rel(a.compute(), linear_cka(x, y, debiased=True)) < RTOL
    assert rel(a.compute(), whole.compute()) < 1e-12
    # the functional merge is the same in any order
    parts = [cka_batch_state(x[i : i + 40], y[i : i + 40]) for i in range(0, 200, 40)]
    fwd, bwd = parts[0], parts[-1]
    for p in parts[1:]:
        fwd = cka_merge(fwd, p)
    for p in parts[-2::-1]:
        bwd = cka_merge(bwd, p)
    for key in ("cka", "cka_debiased", "procrustes"):
        assert rel(cka_values(fwd)[key], cka_values(bwd)[key]) < 1e-12


def test_masks_sequences_and_forward():
    x, y = data(n=64, d_p=3, d_q=5, offset=0.0)
    seq_x, seq_y = x.reshape(8, 8, 3), y.reshape(8, 8, 5)
    mask = torch.ones(8, 8, dtype=torch.int64)
    mask[:, 6:] = 0  # padding positions are not inputs
    metric = LinearCKA()
    batch_value = metric(seq_x, seq_y, mask=mask)
    keep = mask.reshape(-1).bool()
    assert rel(batch_value, linear_cka(x[keep], y[keep])) < RTOL
    assert rel(metric.compute(), linear_cka(x[keep], y[keep])) < RTOL
    assert metric.num_inputs == int(keep.sum())


def test_state_size_is_independent_of_n():
    sizes = []
    for n in (16, 4096):
        x, y = data(n=n)
        metric = LinearCKA()
        for i in range(0, n, 16):
            metric.update(x[i : i + 16], y[i : i + 16])
        sizes.append(metric.state_nbytes())
    assert sizes[0] == sizes[1] <= 8 * (3 + 11 + 13 + 13 * 13) + 64


def test_logit_distance_metric_streams_exactly():
    g = torch.Generator().manual_seed(3)
    z_p, z_q = torch.randn(2, 4, 25, 11, generator=g, dtype=torch.float64).unbind(0)
    metric = LogitDistance()
    for i in range(4):
        metric.update(z_p[i], z_q[i])
    flat_p, flat_q = z_p.reshape(-1, 11), z_q.reshape(-1, 11)
    assert rel(metric.compute(), logit_distance(flat_p, flat_q)) < 1e-12
    assert metric.compute_result().num_inputs == 100
    seq = LogitDistance()
    seq.update(z_p, z_q, mask=torch.ones(4, 25, dtype=torch.bool))
    assert rel(seq.compute(), metric.compute()) < 1e-12
    # the per-input values computed together with the KL (one pass, as the callback does) give the same value
    _, _, kl, sq = logit_pair_rows(flat_p, flat_q)
    given, kl_metric = LogitDistance(), MeanKLDivergence()
    given.update(z_p, z_q, per_input=sq.reshape(4, 25))
    kl_metric.update(z_p, z_q, per_input=kl.reshape(4, 25))
    assert rel(given.compute(), metric.compute()) < 1e-12
    assert rel(kl_metric.compute(), mean_kl_divergence(flat_p, flat_q)) < 1e-12
    offset = flat_q + 1e4 * torch.arange(100, dtype=torch.float64)[:, None]  # per-input offsets cancel
    assert rel(logit_pair_rows(flat_p, offset)[3].mean().sqrt(), metric.compute()) < 1e-9


def test_errors_are_clear():
    x, y = data(n=20)
    with pytest.raises(ValueError, match="at least 4 inputs"):
        linear_cka(x[:3], y[:3])
    with pytest.raises(ValueError, match="same inputs"):
        linear_cka(x, y[:10])
    with pytest.raises(ValueError, match="constant"):
        linear_cka(x, torch.ones(20, 2, dtype=torch.float64))
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="finite|NaN|nan"):
        linear_cka(bad, y)
    metric = LinearCKA(nan_strategy="ignore")
    metric.update(bad, y)
    assert metric.compute_result().num_inputs == 19 and int(metric.num_dropped) == 1
    metric = LinearCKA()
    metric.update(x, y)
    with pytest.raises(ValueError, match="changed size"):
        metric.update(x[:, :3], y)
    with pytest.warns(UserWarning, match="before the ``update``"), pytest.raises(ValueError, match="at least 4 inputs"):
        LinearCKA().compute()
    with pytest.raises(ValueError, match="memory_budget_gb"):
        LinearCKA(memory_budget_gb=1e-6).update(x, y)
    with pytest.raises(ValueError, match="debiased"):
        LinearCKA(debiased="yes")
    with pytest.raises(ValueError, match="same shape|shape"):
        LogitDistance().update(torch.randn(4, 3), torch.randn(4, 5))


def test_logit_pair_rows_kl_keeps_its_relative_accuracy_under_large_offsets():
    """Nearly identical models whose logits are offset by 100: the per-input KL (1e-7 to 1e-4) must not lose digits to
    the cancellation of logZ_p against logZ_q (it lost up to 4e-8 relative). Checked against an extended-precision
    (long double) computation."""
    import numpy as np

    gen = torch.Generator().manual_seed(0)
    z_p = 5 * torch.randn(300, 1000, generator=gen)
    z_q = z_p + 0.01 * torch.randn(300, 1000, generator=gen) + 100
    lz_p, lz_q, kl, _ = logit_pair_rows(z_p, z_q)
    p, q = z_p.numpy().astype(np.longdouble), z_q.numpy().astype(np.longdouble)

    def logsumexp(x):
        top = x.max(1, keepdims=True)
        return top[:, 0] + np.log(np.exp(x - top).sum(1))

    log_p, log_q = p - logsumexp(p)[:, None], q - logsumexp(q)[:, None]
    exact = (np.exp(log_p) * (log_p - log_q)).sum(1)
    # 1e-9 relative, or a few float64 ulps of the O(1) log-sums for the rows whose KL is below 1e-6
    assert bool((np.abs(kl.numpy() - exact) <= 1e-9 * exact + 1e-15).all())
    assert float(np.abs(lz_p.numpy() - logsumexp(p)).max()) < 1e-12 and float(np.abs(lz_q.numpy() - logsumexp(q)).max()) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_blocked_statistics_equal_one_block_and_the_definitions(monkeypatch, dtype):
    """The functional calls read their inputs in blocks of rows (no float64 copy of the whole inputs): with blocks of
    64 rows, many blocks give the one-block values and the Gram-matrix definitions, offsets of 1e4 included, for
    float32 inputs too (converted one block at a time)."""
    from lightning_repsim.functional import _moments, mean_cca
    from lightning_repsim.functional.cca import joint_covariance

    x, y = data(n=1000, offset=1e4 if dtype == torch.float64 else 1e2)
    x, y = x.to(dtype), y.to(dtype)
    calls = {"cka": lambda: linear_cka(x, y), "debiased": lambda: linear_cka(x, y, debiased=True),
             "procrustes": lambda: procrustes_distance(x, y), "mcca": lambda: mean_cca(x, y)}
    whole = {name: call() for name, call in calls.items()}  # one block: 1000 rows x 13 columns < BLOCK_NUMBERS
    monkeypatch.setattr(_moments, "BLOCK_NUMBERS", 64 * 13)
    assert len(_moments.row_blocks(1000, 13)) == 16
    xd, yd = x.double(), y.double()
    expected = {"cka": gram_cka(xd - xd.mean(0), yd - yd.mean(0), False),
                "debiased": gram_cka(xd - xd.mean(0), yd - yd.mean(0), True)}
    for name, call in calls.items():
        value = call()
        assert value.dtype == torch.float64
        assert rel(value, whole[name]) < 1e-12, name
        if name in expected:
            assert rel(value, expected[name]) < RTOL, name
    cov = joint_covariance(x, y)
    assert float((cov - torch.cov(torch.cat([xd, yd], 1).T)).abs().max() / cov.abs().max()) < 1e-12
    # the metrics' statistic relative to another shift (a later batch) is built the same way
    shift = torch.cat([xd[:5].mean(0), yd[:5].mean(0)])
    state = cka_batch_state(x, y, shift)
    assert torch.equal(state[2:13], shift)  # [d_p, d_q, shift (11), ...]
    reference = cka_values(cka_batch_state(xd, yd))
    for key, value in cka_values(state).items():
        assert rel(value, reference[key]) < 1e-10, key


def test_blocked_means_refuse_non_finite_and_overflowing_inputs():
    from lightning_repsim.functional._moments import column_means

    x = torch.randn(200, 3, dtype=torch.float64)
    x[150, 2] = float("inf")
    with pytest.raises(ValueError, match="`emb_p` contains 1 non-finite value"):
        column_means(x, "emb_p")
    big = torch.full((4, 2), 1e308, dtype=torch.float64)
    with pytest.raises(ValueError, match="overflow float64"):
        column_means(big, "emb_q")
