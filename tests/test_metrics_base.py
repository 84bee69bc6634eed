"""The metrics' torchmetrics plumbing (metrics/base.py, metrics/state_kinds.py, metrics/per_input.py): the public API
it rests on, the one private override and its reason, the result cache, merging and loading, forward, and one
behaviour for non-finite per-input values in both per-input means.

Run against the installed torchmetrics and, by tests/test_torchmetrics_lowest.py, the lowest release allowed."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
from torchmetrics import Metric, MetricCollection

import lightning_repsim.metrics as M
from lightning_repsim.functional import logit_distance, mean_kl_divergence
from lightning_repsim.metrics.base import StreamingMetric
from lightning_repsim.metrics.per_input import PerInputMean
from lightning_repsim.metrics.state_kinds import Buffer, Config, Count, Dims, Moments, Statistic

METRICS_DIR = Path(M.__file__).parent

#: The private torchmetrics names a metric class may override, each with a one-line "# Reason:" in its body.
ALLOWED_PRIVATE_OVERRIDES = {"_apply"}


def metric_classes() -> list[type]:
    return [obj for obj in vars(M).values() if isinstance(obj, type) and issubclass(obj, Metric)] + [StreamingMetric]


def rel(a, b) -> float:
    a, b = float(a), float(b)
    return abs(a - b) / max(abs(b), 1e-300)


# ----------------------------------------------------------------------------------------------
# torchmetrics' public API only, one justified private override
# ----------------------------------------------------------------------------------------------
def test_only_justified_private_torchmetrics_overrides():
    torchmetrics_names = set(dir(Metric))
    for cls in metric_classes():
        for name, value in vars(cls).items():
            if not name.startswith("_") or (name.startswith("__") and name.endswith("__")):
                continue
            if name not in torchmetrics_names or not callable(value):
                continue  # the package's own helpers (and ABC bookkeeping)
            assert name in ALLOWED_PRIVATE_OVERRIDES, f"{cls.__name__} overrides torchmetrics' private {name}"
            source = inspect.getsource(value)
            assert re.search(r"^\s*# Reason: \S", source, re.M), f"{cls.__name__}.{name} lacks its one-line reason"


def test_no_private_torchmetrics_attribute_is_written():
    private = r"\._(update_count|forward_cache|computed|defaults|reductions|persistent|is_synced|to_sync|should_unsync|" \
              r"enable_grad|dtype_convert|device|dtype|cache)\b"
    for path in sorted(METRICS_DIR.glob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not re.search(private, line), f"{path.name}:{number} touches a torchmetrics internal: {line.strip()}"


def test_every_state_has_a_kind_and_its_reduction_is_registered():
    metrics = [M.LLVDistance(rep_dim=2), M.SVDDissimilarity(), M.MeanKLDivergence(), M.LogitDistance(), M.MeanCCA(),
               M.LinearCKA(), M.ProcrustesDistance()]
    kinds = (Moments, Buffer, Statistic, Count, Dims, Config)
    for metric in metrics:
        assert set(metric.metric_state) == set(metric._kinds), type(metric).__name__
        assert all(isinstance(kind, kinds) for kind in metric._kinds.values())
        assert type(metric).full_state_update is True


def test_apply_keeps_float64_states_and_honours_exclude_state():
    metric = M.LLVDistance(rep_dim=2)
    metric.update(torch.randn(30, 5), torch.randn(30, 5))
    before = metric.compute()
    for cast in (lambda m: m.to(torch.float16), lambda m: m.to(dtype=torch.bfloat16), lambda m: m.half(),
                 lambda m: m.set_dtype(torch.float16), lambda m: m.float()):
        cast(metric)
        assert metric.moments.dtype == torch.float64 and metric.candidates.dtype == torch.float64
    assert metric.compute() == before
    # a caller's exclude_state is passed on: those states are left to the caller
    metric._apply(lambda t: t.to("meta"), exclude_state=("num_dropped",))
    assert metric.num_dropped.device.type == "cpu" and metric.moments.device.type == "meta"


# ----------------------------------------------------------------------------------------------
# one result cache
# ----------------------------------------------------------------------------------------------
def test_one_result_cache_follows_every_state_change():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 60, 6, generator=g, dtype=torch.float64)
    metric, other = M.MeanKLDivergence(), M.MeanKLDivergence()
    metric.update(z[0], z[1])
    first = metric.compute_result()
    assert metric.compute_result() is first and metric.compute() == first.value  # cached
    other.update(z[1], z[2])
    metric.merge_state(other)  # merged in place: the cache sees the state's new version
    merged = metric.compute_result()
    assert merged is not first and merged.num_inputs == 120
    assert rel(merged.value, mean_kl_divergence(torch.cat([z[0], z[1]]), torch.cat([z[1], z[2]]))) < 1e-12
    metric.persistent(True)
    other.persistent(True)
    metric.load_state_dict(other.state_dict())
    assert metric.compute_result().num_inputs == 60
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"), pytest.raises(ValueError, match="N=0"):
        metric.compute_result()


def test_compute_groups_sharing_states_never_read_a_stale_cache():
    """MetricCollection updates only the first metric of a compute group and shares its state tensors with the
    others: their cached results must follow the in-place changes."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 90, 5, generator=g, dtype=torch.float64)
    collection = MetricCollection({"a": M.MeanKLDivergence(), "b": M.MeanKLDivergence()})
    collection.update(z[0, :30], z[1, :30])
    assert collection.compute_groups == {0: ["a", "b"]}
    first = collection.compute()
    collection.update(z[0, 30:], z[1, 30:])
    second = collection.compute()
    expected = mean_kl_divergence(z[0], z[1])
    assert rel(second["a"], expected) < 1e-12 and rel(second["b"], expected) < 1e-12
    assert first["b"] != second["b"]


# ----------------------------------------------------------------------------------------------
# forward, merge_state, load_state_dict
# ----------------------------------------------------------------------------------------------
def test_forward_leaves_no_graph_and_refused_batches_change_nothing():
    z_p = torch.randn(40, 6, requires_grad=True)
    z_q = torch.randn(40, 6)
    metric = M.MeanKLDivergence()
    value = metric(z_p, z_q)
    assert not metric.kl_moments.requires_grad and metric.update_count == 1
    assert rel(value, mean_kl_divergence(z_p.detach(), z_q)) < 1e-12
    with pytest.raises(ValueError, match="K=6 classes so far, K=5 classes now"):
        metric(torch.randn(10, 5), torch.randn(10, 5))
    assert metric.num_inputs == 40 and rel(metric.compute(), value) < 1e-12


def test_merge_state_with_never_updated_metrics_and_clear_refusals():
    x = torch.randn(50, 3, dtype=torch.float64)
    full, empty = M.LinearCKA(), M.LinearCKA()
    full.update(x, x[:, :2] ** 2)
    empty.merge_state(full)  # a lazily sized state takes the other's size
    full.merge_state(M.LinearCKA())  # and an unsized one is the identity
    assert rel(empty.compute(), full.compute()) < 1e-12
    narrow = M.MeanCCA()
    narrow.update(x[:, :2], x[:, 1:])
    wide = M.MeanCCA()
    wide.update(x, x)
    message = "cannot combine with the incoming state: it has embedding dimensions summing to 6, this metric embedding"
    with pytest.raises(ValueError, match=message):
        narrow.merge_state(wide)
    with pytest.raises(ValueError, match="Expected incoming state to be an instance of MeanCCA"):
        narrow.merge_state(M.LinearCKA())


def test_load_state_dict_refuses_unfit_states_and_never_shares_the_callers_tensors():
    z_p, z_q = torch.randn(2, 40, 6).unbind(0)
    source = M.LLVDistance(rep_dim=2)
    source.update(z_p, z_q)
    source.persistent(True)
    state = source.state_dict()
    target = M.LLVDistance(rep_dim=2)
    target.persistent(True)
    target.load_state_dict(state)
    kept = state["moments"].clone()
    target.update(z_p, z_q)  # in place on the metric's own copy
    assert torch.equal(state["moments"], kept) and target.num_inputs == 80
    other = M.LLVDistance(rep_dim=3)
    other.persistent(True)
    with pytest.raises(ValueError, match=r"loaded state_dict, configured differently: rep_dim=2 \(this metric: 3\)"):
        other.load_state_dict(state)
    assert other.num_inputs == 0  # refused: the metric is reset
    fixed = M.LLVDistance(rep_dim=2, num_labels=5)  # sized at construction: K=6 states do not fit
    fixed.persistent(True)
    with pytest.raises(ValueError, match="K=6 labels"):
        fixed.load_state_dict(state)


# ----------------------------------------------------------------------------------------------
# the per-input means: one class, one behaviour for non-finite values
# ----------------------------------------------------------------------------------------------
PER_INPUT = {
    "kl": (M.MeanKLDivergence, mean_kl_divergence),
    "d_logit": (M.LogitDistance, lambda p, q: logit_distance(p, q) ** 2),
}


def test_kl_and_logit_distance_are_thin_per_input_means():
    for cls, _ in PER_INPUT.values():
        assert issubclass(cls, PerInputMean)
        assert cls.__module__ != "lightning_repsim.metrics.cka"
        assert len(inspect.getsource(cls).splitlines()) < 90


@pytest.mark.parametrize("name", sorted(PER_INPUT))
def test_non_finite_per_input_values_raise_under_error_and_are_dropped_under_ignore(name):
    cls, functional = PER_INPUT[name]
    g = torch.Generator().manual_seed(2)
    z_p, z_q = torch.randn(2, 30, 5, generator=g, dtype=torch.float64).unbind(0)
    given = torch.rand(30, generator=g, dtype=torch.float64)
    bad = given.clone()
    bad[[3, 11]] = float("nan")
    bad[20] = float("inf")
    with pytest.raises(ValueError, match=r"`per_input` has 3 non-finite value\(s\) \(nan_strategy='error'"):
        cls().update(z_p, z_q, per_input=bad)
    metric = cls(nan_strategy="ignore")
    metric.update(z_p, z_q, per_input=bad)
    keep = torch.isfinite(bad)
    assert int(metric.num_dropped) == 3 and metric.num_inputs == 27
    mean = metric.compute_result()
    assert rel(getattr(mean, "mean_squared", mean.value), given[keep].mean()) < 1e-12
    # non-finite logits: the functional layer's error, or dropped and counted
    nan_p = z_p.clone()
    nan_p[7, 1] = float("nan")
    with pytest.raises(ValueError, match="`logits_p` contains 1 non-finite"):
        cls().update(nan_p, z_q)
    metric = cls(nan_strategy="ignore")
    metric.update(nan_p, z_q)
    rows = torch.arange(30) != 7
    assert int(metric.num_dropped) == 1
    value = metric.compute_result()
    assert rel(getattr(value, "mean_squared", value.value), functional(z_p[rows], z_q[rows])) < 1e-12
