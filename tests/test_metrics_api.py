"""The metrics as torchmetrics citizens: scalar compute(), compute_result(), forward, masks, plot, persistence,
Lightning's self.log / self.log_dict, MetricTracker, memory budgets and clear errors for incompatible states.

This file is also run against the lowest torchmetrics release pyproject.toml allows
(tests/test_torchmetrics_lowest.py), so it touches only the public API."""

from __future__ import annotations

import time
import warnings

import matplotlib
import pytest
import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.wrappers import MetricTracker

from lightning_repsim.functional import compare, llv_distance, mean_cca, mean_kl_divergence
from lightning_repsim.metrics import LLVDistance, MeanCCA, MeanKLDivergence, SVDDissimilarity
from tests.conftest import STREAM_RTOL

matplotlib.use("Agg")

RTOL = STREAM_RTOL


def rel(a, b) -> float:
    a, b = float(a), float(b)
    return abs(a - b) / max(abs(b), 1e-300)


def pair(n=240, k=6, m=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    f_p = torch.randn(n, m, generator=g, dtype=dtype)
    f_q = f_p @ torch.randn(m, m, generator=g, dtype=dtype) + 0.3 * torch.randn(n, m, generator=g, dtype=dtype)
    w_p, w_q = torch.randn(2, k, m, generator=g, dtype=dtype).unbind(0)
    return f_p, f_q, w_p, w_q


def all_metrics(w_p, w_q):
    return {
        "llv": LLVDistance(rep_dim=2),
        "svd": SVDDissimilarity(unemb_p=w_p, unemb_q=w_q),
        "kl": MeanKLDivergence(),
        "mcca": MeanCCA(),
    }


def fresh(name, w_p, w_q):
    """A new metric like all_metrics()[name]."""
    return all_metrics(w_p, w_q)[name]


def feed(name, metric, f_p, f_q, w_p, w_q, ids=None, **kwargs):
    if ids is not None and name in ("llv", "svd"):
        kwargs["ids"] = ids
    if name in ("llv", "kl"):
        return metric(f_p @ w_p.T, f_q @ w_q.T, **kwargs)
    return metric(f_p, f_q, **kwargs)


# ----------------------------------------------------------------------------------------------
# compute(), compute_result(), forward
# ----------------------------------------------------------------------------------------------
def test_compute_is_a_scalar_tensor_and_compute_result_holds_everything():
    f_p, f_q, w_p, w_q = pair()
    z_p, z_q = f_p @ w_p.T, f_q @ w_q.T
    metrics = all_metrics(w_p, w_q)
    for start in range(0, 240, 50):
        sl = slice(start, start + 50)
        for name, metric in metrics.items():
            feed(name, metric, f_p[sl], f_q[sl], w_p, w_q, ids=torch.arange(240)[sl])
    for name, metric in metrics.items():
        value = metric.compute()
        assert isinstance(value, torch.Tensor) and value.ndim == 0 and value.dtype == torch.float64, name
        result = metric.compute_result()
        assert torch.equal(result.value, value), name
        assert metric.compute_result() is result  # cached until the next update
    rep = compare(f_p, w_p, f_q, w_q, input_sets=metrics["svd"].compute_result().llv.candidate_sets)
    assert rel(metrics["svd"].compute(), rep.svd.value) < RTOL
    assert rel(metrics["kl"].compute(), mean_kl_divergence(z_p, z_q)) < RTOL
    assert rel(metrics["mcca"].compute(), mean_cca(f_p, f_q)) < RTOL
    llv = metrics["llv"].compute_result()
    assert rel(llv.value, llv_distance(z_p, z_q, rep_dim=2, input_sets=llv.candidate_sets).value) < RTOL
    # an update invalidates the cached result
    feed("kl", metrics["kl"], f_p[:5], f_q[:5], w_p, w_q)
    assert metrics["kl"].compute_result().num_inputs == 245


def test_forward_returns_the_batch_value_and_accumulates():
    f_p, f_q, w_p, w_q = pair(n=300)
    metrics = all_metrics(w_p, w_q)
    for name, metric in metrics.items():
        batch_values = [feed(name, metric, f_p[i : i + 100], f_q[i : i + 100], w_p, w_q) for i in range(0, 300, 100)]
        for i, value in enumerate(batch_values):
            assert isinstance(value, torch.Tensor) and value.ndim == 0 and torch.isfinite(value), name
            alone = fresh(name, w_p, w_q)
            sl = slice(100 * i, 100 * i + 100)
            feed(name, alone, f_p[sl], f_q[sl], w_p, w_q)
            assert rel(value, alone.compute()) < RTOL, name  # the batch's own value
        whole = fresh(name, w_p, w_q)
        feed(name, whole, f_p, f_q, w_p, w_q)
        assert rel(metric.compute(), whole.compute()) < RTOL, name  # and everything was accumulated


def test_forward_on_a_batch_too_small_returns_the_running_value_with_a_warning():
    f_p, f_q, w_p, w_q = pair(n=100)
    metric = LLVDistance(rep_dim=2)
    first = metric(f_p[:90] @ w_p.T, f_q[:90] @ w_q.T)
    with pytest.warns(UserWarning, match="the batch alone does not define the value"):
        small = metric(f_p[90:92] @ w_p.T, f_q[90:92] @ w_q.T)  # 2 inputs < M + 2
    assert torch.isfinite(first) and rel(small, metric.compute()) < RTOL
    fresh = MeanCCA()
    with pytest.warns(UserWarning, match="returning NaN"):
        value = fresh(f_p[:2], f_q[:2])
    assert torch.isnan(value)


def test_integer_masks_are_accepted_everywhere():
    f_p, f_q, w_p, w_q = pair(n=120)
    mask = (torch.arange(120) % 3 != 0).to(torch.int64).reshape(12, 10)  # an attention_mask as tokenizers give it
    shape = (12, 10)
    for name, metric in all_metrics(w_p, w_q).items():
        reference = fresh(name, w_p, w_q)
        args = (f_p, f_q) if name in ("svd", "mcca") else (f_p @ w_p.T, f_q @ w_q.T)
        metric.update(*(a.reshape(*shape, -1) for a in args), mask=mask)
        reference.update(*(a.reshape(*shape, -1) for a in args), mask=mask.bool())
        assert rel(metric.compute(), reference.compute()) < RTOL, name
        assert metric.num_inputs == 80
    with pytest.raises(ValueError, match="only 0 and 1"):
        MeanKLDivergence().update(torch.randn(4, 3), torch.randn(4, 3), mask=torch.tensor([0, 1, 2, 1]))
    with pytest.raises(TypeError, match="boolean or 0/1 integers"):
        MeanKLDivergence().update(torch.randn(4, 3), torch.randn(4, 3), mask=torch.ones(4))


# ----------------------------------------------------------------------------------------------
# torchmetrics integration: collections, trackers, plots, persistence
# ----------------------------------------------------------------------------------------------
def test_metric_collection_and_tracker():
    f_p, f_q, w_p, w_q = pair(n=200)
    collection = MetricCollection(all_metrics(w_p, w_q), prefix="val/")
    tracker = MetricTracker(LLVDistance(rep_dim=2), maximize=False)
    for epoch in range(2):
        tracker.increment()
        collection.reset()
        for i in range(0, 200, 40):
            sl = slice(i, i + 40)
            kw = {"emb_p": f_p[sl], "emb_q": f_q[sl] * (1 + epoch), "logits_p": f_p[sl] @ w_p.T, "logits_q": f_q[sl] @ w_q.T}
            out = collection(**kw)
            tracker.update(kw["logits_p"], kw["logits_q"] + epoch * torch.randn(40, 6, dtype=torch.float64))
        assert sorted(out) == ["val/kl", "val/llv", "val/mcca", "val/svd"]
        values = collection.compute()
        assert all(v.ndim == 0 for v in values.values())
    history = tracker.compute_all()
    assert history.shape == (2,) and bool(torch.isfinite(history).all())
    best, which = tracker.best_metric(return_step=True)
    assert which == int(torch.argmin(history)) and float(best) == float(history.min())


def test_collection_compute_groups_keep_different_metrics_apart():
    """MetricCollection shares states between metrics whose states look equal (compute groups); metrics with
    other states or another configuration (seed, buffer) must not be merged (torchmetrics < 1.9 compares only
    the first state)."""
    f_p, f_q, w_p, w_q = pair(n=200)
    make = {
        "kl": MeanKLDivergence, "mcca": MeanCCA, "llv": lambda: LLVDistance(rep_dim=2),
        "llv_seed1": lambda: LLVDistance(rep_dim=2, seed=1, buffer_size=64),
        "llv_sum": lambda: LLVDistance(rep_dim=2, combine="sum"),
    }
    collection = MetricCollection({name: fn() for name, fn in make.items()})
    alone = {name: fn() for name, fn in make.items()}
    for i in range(0, 200, 50):
        kw = {"emb_p": f_p[i : i + 50], "emb_q": f_q[i : i + 50], "logits_p": f_p[i : i + 50] @ w_p.T,
              "logits_q": f_q[i : i + 50] @ w_q.T}
        collection.update(**kw)
        for name, metric in alone.items():
            metric.update(*((kw["emb_p"], kw["emb_q"]) if name == "mcca" else (kw["logits_p"], kw["logits_q"])))
    values = collection.compute()
    for name, metric in alone.items():
        assert torch.equal(values[name], metric.compute()), name


def test_plot_every_metric():
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    f_p, f_q, w_p, w_q = pair(n=120)
    for name, metric in all_metrics(w_p, w_q).items():
        values = [feed(name, metric, f_p[i : i + 60], f_q[i : i + 60], w_p, w_q) for i in (0, 60)]
        fig, ax = metric.plot()
        assert isinstance(fig, Figure) and isinstance(ax, Axes), name
        fig, ax = metric.plot(values)
        assert isinstance(fig, Figure) and isinstance(ax, Axes), name
    assert (LLVDistance.higher_is_better, SVDDissimilarity.higher_is_better) == (False, False)
    assert (MeanKLDivergence.higher_is_better, MeanCCA.higher_is_better) == (False, True)
    assert (MeanCCA.plot_lower_bound, MeanCCA.plot_upper_bound, SVDDissimilarity.plot_upper_bound) == (0.0, 1.0, 1.0)


def test_states_are_not_persistent_by_default():
    """A module owning an LLVDistance at K=500 checkpoints less than 100 kB; persistent(True) restores it all."""
    module = nn.Module()
    module.head = nn.Linear(8, 500)
    module.llv = LLVDistance(rep_dim=8)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(64, 500, generator=g)
    module.llv.update(z, z + torch.randn(64, 500, generator=g))
    nbytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    assert nbytes < 100_000, nbytes
    assert module.llv.state_nbytes() > 10_000_000  # the statistics themselves (16 MB) stay out
    module.llv.persistent(True)
    state = module.state_dict()
    restored = nn.Module()
    restored.head = nn.Linear(8, 500)
    restored.llv = LLVDistance(rep_dim=8)
    restored.llv.persistent(True)
    restored.load_state_dict(state)
    assert torch.equal(restored.llv.compute(), module.llv.compute())


def test_states_stay_float64_under_precision_casts():
    metric = LLVDistance(rep_dim=2)
    metric.update(torch.randn(20, 5), torch.randn(20, 5))
    metric.to(torch.float16)  # what Lightning's "16-true" does to the module
    metric.half()
    assert metric.moments.dtype == torch.float64 and metric.candidates.dtype == torch.float64


# ----------------------------------------------------------------------------------------------
# vocabulary scale
# ----------------------------------------------------------------------------------------------
def test_llv_distance_refuses_vocabulary_scale_with_a_clear_error_and_offers_a_label_subset():
    k = 50_257
    g = torch.Generator().manual_seed(4)
    z_p = torch.randn(40, k, generator=g)
    z_q = z_p + 0.5 * torch.randn(40, k, generator=g)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"K=50,257 labels would need about [\d.]+ GB.*SVDDissimilarity.*labels=") as err:
        LLVDistance(rep_dim=8).update(z_p, z_q)
    assert time.perf_counter() - start < 5
    assert "memory_budget_gb" in str(err.value)
    with pytest.raises(ValueError, match="would need about"):
        LLVDistance(rep_dim=8, num_labels=k)  # known at construction: refused there
    labels = torch.arange(0, k, 97)[:512]
    metric = LLVDistance(rep_dim=8, labels=labels, num_input_sets=20)
    metric.update(z_p[:20], z_q[:20])
    metric.update(z_p[20:], z_q[20:])
    res = metric.compute_result()
    assert torch.equal(res.labels, labels) and res.num_labels == k
    assert res.label_pivot in labels.tolist() and res.leave_out in labels.tolist()
    # the streaming estimate equals the functional core's on the same label subset (label terms; the candidate
    # input sets are drawn from the buffer here, from all rows there)
    whole = llv_distance(z_p, z_q, rep_dim=8, labels=labels, num_input_sets=20)
    assert torch.equal(whole.labels, labels) and whole.label_pivot == res.label_pivot and whole.leave_out == res.leave_out
    assert rel(whole.t1, res.t1) < RTOL and rel(whole.t3, res.t3) < 1e-6


def test_llv_distance_label_subset_of_all_labels_is_the_full_distance():
    g = torch.Generator().manual_seed(5)
    z_p = torch.randn(200, 7, generator=g, dtype=torch.float64)
    z_q = z_p + torch.randn(200, 7, generator=g, dtype=torch.float64)
    full = llv_distance(z_p, z_q, rep_dim=2)
    every = llv_distance(z_p, z_q, rep_dim=2, labels=torch.arange(7))
    assert rel(every.value, full.value) < RTOL and every.label_pivot == full.label_pivot
    sub = llv_distance(z_p, z_q, rep_dim=2, labels=[1, 3, 4, 6])
    assert set(sub.kept_labels.tolist()) < {1, 3, 4, 6} and sub.label_pivot in (1, 3, 4, 6)
    # its T2 entries are standard deviations over the subset's labels only
    lp, lq = torch.log_softmax(z_p, -1)[:, [1, 3, 4, 6]], torch.log_softmax(z_q, -1)[:, [1, 3, 4, 6]]
    i0, i1 = sub.input_set[0], sub.input_set[1]
    tau_p, tau_q = (lp[i1] - lp[i0]).std(), (lq[i1] - lq[i0]).std()
    assert rel(sub.t2_terms[0], (lp[i1] / tau_p - lq[i1] / tau_q).std()) < 1e-9
    with pytest.raises(ValueError, match="not among the `labels`"):
        llv_distance(z_p, z_q, rep_dim=2, labels=[1, 3, 4, 6], label_pivot=0)
    with pytest.raises(ValueError, match="at least 3 label indices"):
        llv_distance(z_p, z_q, rep_dim=2, labels=[1, 3])


# ----------------------------------------------------------------------------------------------
# incompatible states and bad configurations: clear errors naming the argument
# ----------------------------------------------------------------------------------------------
def test_merge_state_refuses_incompatible_metrics():
    g = torch.Generator().manual_seed(6)
    z6, z5 = torch.randn(50, 6, generator=g), torch.randn(50, 5, generator=g)

    def updated(metric, z):
        metric.update(z, z.flip(0))
        return metric

    def llv(z, **kwargs):
        return updated(LLVDistance(**{"rep_dim": 2, **kwargs}), z)

    cases = [
        (llv(z6), llv(z5), r"K=5 labels.*K=6 labels"),
        (llv(z6), llv(z6, rep_dim=3), r"rep_dim=3 \(this metric: 2\)"),
        (llv(z6), llv(z6, buffer_size=16), r"buffer_size=16 \(this metric: default\)"),
        (llv(z6, buffer_size=16), llv(z6), r"buffer_size=default \(this metric: 16\)"),
        (llv(z6), llv(z6, seed=1), r"seed=1 \(this metric: 0\)"),
        (updated(MeanKLDivergence(), z6), updated(MeanKLDivergence(), z5), r"K=5 classes.*K=6 classes"),
    ]
    for mine, theirs, message in cases:
        before = mine.compute()
        with pytest.raises(ValueError, match=message):
            mine.merge_state(theirs)
        with pytest.raises(ValueError, match=message):
            mine.merge_state(dict(theirs.metric_state))
        assert mine.compute() == before  # nothing was merged
    f = torch.randn(50, 2, generator=g, dtype=torch.float64)
    w = torch.randn(6, 2, generator=g, dtype=torch.float64)
    w3 = torch.randn(6, 3, generator=g, dtype=torch.float64)
    a, b = SVDDissimilarity(unemb_p=w, unemb_q=w), SVDDissimilarity(unemb_p=w3, unemb_q=w3)
    a.update(f, f)
    b.update(torch.randn(50, 3, dtype=torch.float64), torch.randn(50, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"M_p \+ M_q = 6.*M_p \+ M_q = 4"):
        a.merge_state(b)


def test_load_state_dict_refuses_a_different_buffer_size():
    small, big = LLVDistance(rep_dim=2, buffer_size=16), LLVDistance(rep_dim=2)
    big.update(torch.randn(50, 6), torch.randn(50, 6))
    big.persistent(True)
    small.persistent(True)
    with pytest.raises(ValueError, match=r"buffer_size=default \(this metric: 16\)"):
        small.load_state_dict(big.state_dict())


def test_update_refuses_changed_sizes_and_unembeddings():
    kl = MeanKLDivergence()
    kl.update(torch.randn(10, 6), torch.randn(10, 6))
    with pytest.raises(ValueError, match=r"K=6 classes so far, K=5 classes now"):
        kl.update(torch.randn(10, 5), torch.randn(10, 5))
    assert kl.num_inputs == 10
    f_p, f_q, w_p, w_q = pair(n=60)
    svd = SVDDissimilarity(unemb_p=w_p, unemb_q=w_q)
    svd.update(f_p[:30], f_q[:30])
    svd.update(f_p[30:35], f_q[30:35], unemb_p=w_p.clone())  # the same values: fine
    w_p.mul_(2.0)  # an in-place change of the tensor the inputs were computed with (e.g. an optimizer step)
    with pytest.raises(ValueError, match="`unemb_p` changed"):
        svd.update(f_p[35:40], f_q[35:40])
    w_p.div_(2.0)
    svd.reset()
    svd.update(f_p[30:40], f_q[30:40])
    with pytest.raises(ValueError, match="`unemb_q` changed while inputs were being accumulated"):
        svd.update(f_p[40:], f_q[40:], unemb_q=w_q + 0.1)
    svd.reset()
    svd.update(f_p[40:], f_q[40:], unemb_q=w_q + 0.1)  # a new accumulation may use a new unembedding
    assert svd.num_inputs == 20


def test_bad_configurations_are_refused_at_construction():
    with pytest.raises(ValueError, match=r"`buffer_size`=2 cannot hold an input set of M\+1 = 3 inputs"):
        LLVDistance(rep_dim=2, buffer_size=2)
    with pytest.raises(ValueError, match=r"`buffer_size`=3 cannot hold an input set of M\+1 = 4 inputs"):
        SVDDissimilarity(rep_dim=3, buffer_size=3)
    with pytest.raises(ValueError, match=r"would need about 9.6 GB \(states 9.2 GB.*memory_budget_gb=1`"):
        LLVDistance(rep_dim=2, num_labels=10, buffer_size=50_000_000, memory_budget_gb=1)
    with pytest.raises(ValueError, match="`buffer_size` must be an int >= 1"):
        LLVDistance(rep_dim=2, buffer_size=1e7)
    with pytest.raises(ValueError, match="dist_sync_on_step"):
        MeanKLDivergence(dist_sync_on_step=True)
    with pytest.raises(ValueError, match="Unexpected keyword arguments"):
        LLVDistance(rep_dim=2, lamda=1.0)
    with pytest.raises(ValueError, match="`lam` must be a finite number >= 0"):
        SVDDissimilarity(lam=-1)


def test_functional_errors_for_bad_inputs():
    f = torch.randn(30, 2, dtype=torch.float64)
    w = torch.randn(5, 2, dtype=torch.float64)
    bad = f.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(ValueError, match="`emb_p` contains 1 non-finite"):
        compare(bad, w, f, w)
    with pytest.raises(ValueError, match="at least one class"):
        mean_kl_divergence(torch.randn(4, 0), torch.randn(4, 0))
    meta = torch.empty(10, 5, device="meta")
    for fn in (lambda: llv_distance(meta, meta, rep_dim=2), lambda: mean_kl_divergence(meta, meta),
               lambda: mean_cca(meta, meta), lambda: LLVDistance(rep_dim=2).update(meta, meta)):
        with pytest.raises(ValueError, match="`meta` device"):
            fn()
    with pytest.raises(ValueError, match=r"N >= max\(M_p, M_q\) \+ 2 = 4 inputs.*got N=3"):
        mean_cca(torch.randn(3, 2), torch.randn(3, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete, valid pipeline warns about nothing
        f_p, f_q, w_p, w_q = pair(n=100)
        MeanCCA().update(f_p, f_q)


# ----------------------------------------------------------------------------------------------
# Lightning: self.log(name, metric), self.log_dict(collection), logging forward's value
# ----------------------------------------------------------------------------------------------
def test_lightning_module_logs_the_metrics_idiomatically():
    """The torchmetrics idiom in a LightningModule: metrics owned by the module, updated with an int64 mask,
    logged as objects (self.log / self.log_dict) and through forward; the logged epoch values are compute()
    over all the validation data."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(7)
    b, t, d, k = 24, 5, 4, 6
    x = torch.randn(b, t, d, generator=g)
    mask = (torch.rand(b, t, generator=g) > 0.25).to(torch.int64)  # an attention_mask: int64 0/1

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.student = nn.Linear(d, k)
            self.reference = nn.Linear(d, k).requires_grad_(False)
            self.llv = LLVDistance(rep_dim=2)
            self.kl = MeanKLDivergence()
            self.collection = MetricCollection({"d_llv": LLVDistance(rep_dim=2), "kl": MeanKLDivergence()}, prefix="col/")
            self.kl_forward = MeanKLDivergence()

        def validation_step(self, batch, batch_idx):
            inputs, attention = batch
            z_p, z_q = self.reference(inputs), self.student(inputs)
            self.llv.update(z_p, z_q, mask=attention)
            self.log("val/d_llv", self.llv)
            self.kl.update(z_p, z_q, mask=attention)
            self.log("val/kl", self.kl)
            self.collection.update(logits_p=z_p, logits_q=z_q, mask=attention)
            self.log_dict(self.collection)
            batch_value = self.kl_forward(z_p, z_q, mask=attention)
            assert batch_value.ndim == 0 and torch.isfinite(batch_value)
            self.log("val/kl_forward", self.kl_forward, on_step=True, on_epoch=True)

    module = Module()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    (logged,) = trainer.validate(module, DataLoader(TensorDataset(x, mask), batch_size=8), verbose=False)

    keep = mask.bool()
    with torch.no_grad():
        z_p, z_q = module.reference(x)[keep], module.student(x)[keep]
    whole_llv = LLVDistance(rep_dim=2)
    whole_llv.update(z_p, z_q)
    expected = {"val/d_llv": whole_llv.compute(), "col/d_llv": whole_llv.compute()}
    for key in ("val/kl", "col/kl", "val/kl_forward_epoch"):
        expected[key] = mean_kl_divergence(z_p, z_q)
    for key, value in expected.items():
        assert rel(logged[key], value) < 1e-6, (key, logged[key], float(value))  # loggers receive float32
    assert module.llv.update_count == 0  # Lightning reset the metrics after the epoch
