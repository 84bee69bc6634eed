"""Streaming metrics (issue 3): exact against the reference cases and the functional core for any
batching, bounded state, exact merges, bad input, composition in a MetricCollection."""

from __future__ import annotations

import dataclasses
import math
import pickle

import pytest
import torch
from torchmetrics import MetricCollection

from lightning_repsim.functional import compare, llv_distance, logits_from_representations, mean_cca, mean_kl_divergence
from lightning_repsim.functional.llv import LLVResult
from lightning_repsim.metrics import LLVDistance, MeanCCA, MeanKLDivergence, SVDDissimilarity
from lightning_repsim.metrics.moment_state import fold_moments
from lightning_repsim.metrics.sketch import bottom_k, buffer_content, fold_buffers, hash_keys
from tests.conftest import STREAM_RTOL, assert_close_dict, assert_rel

RTOL = STREAM_RTOL
FILE_FIELDS_LLV = ("t1", "t3", "t1_terms", "t3_terms")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Streaming updates are many small tensor operations: intra-op threads only add hand-off latency
    (tens of ms per operation when the cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def assert_same(a, b, rtol: float = RTOL, path: str = "result") -> None:
    """Every field equal: integers, strings and integer tensors exactly, floats (tensors, or inside dicts such as
    the search report) to ``rtol``."""
    if dataclasses.is_dataclass(a):
        assert type(a) is type(b), path
        for f in dataclasses.fields(a):
            if f.name == "search" and "given" in (a.search.get("method"), b.search.get("method")):
                continue  # provenance of the input set: a search on one side, the same sets given on the other
            if f.name == "llv" and None in (a.llv, b.llv):
                continue  # the streaming SVDResult carries its d_LLV result, the functional one not (compared apart)
            assert_same(getattr(a, f.name), getattr(b, f.name), rtol, f"{path}.{f.name}")
    elif isinstance(a, torch.Tensor):
        b = torch.as_tensor(b)
        assert a.shape == b.shape, f"{path}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        if a.is_floating_point():
            fin = torch.isfinite(b)
            assert torch.equal(torch.isfinite(a), fin), path
            assert torch.equal(a[~fin], b[~fin].to(a.dtype)), path
            if bool(fin.any()):
                assert_rel(a[fin], b[fin], rtol, path, atol=1e-14)  # m_SVD etc. live in [0, 1]
        else:
            assert torch.equal(a.cpu(), b.cpu()), f"{path}: {a} != {b}"
    elif isinstance(a, float):
        assert math.isclose(a, b, rel_tol=rtol), f"{path}: {a} != {b}"
    else:  # dicts and lists may hold floats
        assert_close_dict(a, b, rtol, path)


def batches(n: int, size: int, order: torch.Tensor | None = None):
    idx = torch.arange(n) if order is None else order
    for start in range(0, n, size):
        yield idx[start : start + size]


def reference_collection(ref, **kwargs) -> MetricCollection:
    m = int(ref["rep_dim"])
    return MetricCollection(
        {
            "llv": LLVDistance(rep_dim=m, lam=float(ref["lam"]), **kwargs),
            "svd": SVDDissimilarity(unemb_p=ref["g1"], unemb_q=ref["g2"], lam=float(ref["lam"]), **kwargs),
            "kl": MeanKLDivergence(),
            "mcca": MeanCCA(),
        }
    )


def stream(collection: MetricCollection, ref, size: int, order=None, with_ids: bool = False) -> dict:
    n = ref["f1"].shape[0]
    for idx in batches(n, size, order):
        sl = slice(int(idx[0]), int(idx[-1]) + 1) if order is None else idx  # slices: cheap for batch size 1
        extra = {"ids": idx} if with_ids else {}
        collection.update(
            logits_p=ref["logits1"][sl], logits_q=ref["logits2"][sl], emb_p=ref["f1"][sl], emb_q=ref["f2"][sl], **extra
        )
    return results(collection)


def results(collection: MetricCollection) -> dict:
    """Every metric's ``compute_result()``, after checking that ``collection.compute()`` gives their values."""
    values = collection.compute()
    out = {name: metric.compute_result() for name, metric in collection.items()}
    assert sorted(values) == sorted(out)
    for name, value in values.items():
        assert value.ndim == 0 and value.dtype == torch.float64
        assert torch.equal(value, out[name].value), name
    return out


def check_against_file(out: dict, ref) -> None:
    for res in (out["llv"], out["svd"].llv):
        assert (res.label_pivot, res.leave_out) == (int(ref["label_pivot"]), int(ref["leave_out"]))
        for name in FILE_FIELDS_LLV:
            assert_rel(getattr(res, name), ref[name], RTOL, name)
    assert_rel(out["kl"].value, ref["mean_kl"], RTOL, "mean_kl")
    assert_rel(out["mcca"].value, ref["mcca_exact"], RTOL, "mcca_exact")
    assert_rel(out["svd"].f_part, ref["d_svd_f"], RTOL, "d_svd_f")
    assert_rel(out["svd"].svd.msvd_f, ref["msvd_f"], RTOL, "msvd_f")


# ----------------------------------------------------------------------------------------------
# exactness
# ----------------------------------------------------------------------------------------------
def test_reference_cases_any_batching(reference_case):
    """Batches of 1, 7, 64, N and a shuffled order: the file's values, and every field identical."""
    ref = reference_case
    n = ref["f1"].shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    # a buffer smaller than every case, so that the sketch evicts inputs
    runs = {size: stream(reference_collection(ref, buffer_size=256), ref, size) for size in (1, 7, 64, n)}
    runs["shuffled"] = stream(reference_collection(ref, buffer_size=256), ref, 64, order)
    first = runs[1]
    check_against_file(first, ref)
    for key, out in runs.items():
        for name in ("llv", "svd", "kl", "mcca"):
            assert_same(out[name], first[name], path=f"{key}:{name}")
    assert first["llv"].num_inputs == n and first["svd"].llv.num_inputs == n


def test_reference_cases_equal_functional_on_the_same_candidate_sets(reference_case):
    """With per-row ids the candidate sets are global indices: the functional core on the concatenated
    data and those sets gives every field, for both routes."""
    ref = reference_case
    n = ref["f1"].shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(2))
    out = stream(reference_collection(ref), ref, 33, order, with_ids=True)
    check_against_file(out, ref)
    m = int(ref["rep_dim"])
    llv = out["llv"]
    assert llv.candidate_sets.shape[0] in (200, 201) and llv.candidate_sets.shape[1] == m + 1  # + the optimised set
    assert int(llv.candidate_sets.max()) < n
    expected = llv_distance(ref["logits1"], ref["logits2"], rep_dim=m, lam=float(ref["lam"]), input_sets=llv.candidate_sets)
    assert_same(llv, expected)
    svd = out["svd"]
    rep = compare(ref["f1"], ref["g1"], ref["f2"], ref["g2"], lam=float(ref["lam"]), input_sets=svd.llv.candidate_sets)
    assert_same(svd.llv, rep.llv)
    assert_same(svd.svd, rep.svd)
    assert_rel(svd.value, rep.svd.value, RTOL)


@pytest.mark.parametrize("combine", ["max", "sum"])
def test_given_candidate_sets_reproduce_every_reference_value(reference_case, combine):
    """``input_sets`` of ids pin those inputs in the buffer: every value in the file, both routes
    (the representation route's T2/T4 come from quadratic forms, never from log-probabilities)."""
    ref = reference_case
    n, m = ref["f1"].shape[0], int(ref["rep_dim"])
    kwargs = {"lam": float(ref["lam"]), "combine": combine, "input_sets": ref["candidate_sets"]}
    llv_metric = LLVDistance(rep_dim=m, **kwargs)
    svd_metric = SVDDissimilarity(unemb_p=ref["g1"], unemb_q=ref["g2"], **kwargs)
    assert llv_metric.state_nbytes() < 8 * (1 + 4 * 7 + 16 * 49) + 8 * ref["candidate_sets"].numel() * (2 * 7 + 3) + 8
    for idx in batches(n, 7):
        llv_metric.update(ref["logits1"][idx], ref["logits2"][idx], ids=idx)
        svd_metric.update(ref["f1"][idx], ref["f2"][idx], ids=idx)
    key = "distance_max" if combine == "max" else "distance_sum"
    for res in (llv_metric.compute_result(), svd_metric.compute_result().llv):
        assert res.input_set.tolist() == ref["input_set"].tolist()
        assert res.chosen_candidate == int(ref["chosen_candidate"])
        assert torch.equal(res.candidate_sets, ref["candidate_sets"])
        assert_rel(res.value, ref[key], RTOL, key)
        for name in FILE_FIELDS_LLV + ("t2", "t4", "t2_terms", "t4_terms", "candidate_scores"):
            assert_rel(getattr(res, name), ref[name], RTOL, name)
    svd = svd_metric.compute_result()
    for name, key in (("value", "d_svd"), ("f_part", "d_svd_f"), ("g_part", "d_svd_g")):
        assert_rel(getattr(svd, name), ref[key], RTOL, key)
    assert svd.svd.label_subsets.tolist() == ref["label_subsets"].tolist()


def test_large_offsets_match_two_pass_float64():
    """+1e4 on one model's logits and embeddings scaled until log-probabilities reach -1e3."""
    g = torch.Generator().manual_seed(3)
    n, k, m = 600, 9, 3
    f_p = torch.randn(n, m, generator=g, dtype=torch.float64)
    f_q = f_p @ torch.randn(m, m, generator=g, dtype=torch.float64) + 0.2 * torch.randn(n, m, generator=g, dtype=torch.float64)
    w_p = torch.randn(k, m, generator=g, dtype=torch.float64)
    w_q = torch.randn(k, m, generator=g, dtype=torch.float64)
    z_p, z_q = f_p @ w_p.T, f_q @ w_q.T + 1e4
    ids = torch.arange(n)
    metric = LLVDistance(rep_dim=m)
    kl = MeanKLDivergence()
    for idx in batches(n, 50):
        metric.update(z_p[idx], z_q[idx], ids=idx)
        kl.update(z_p[idx], z_q[idx])
    res = metric.compute_result()
    assert_same(res, llv_distance(z_p, z_q, rep_dim=m, input_sets=res.candidate_sets))
    assert_rel(kl.compute(), mean_kl_divergence(z_p, z_q), RTOL)

    scale = 1.1e3 / float(-torch.log_softmax(f_p @ w_p.T, -1).min())
    f_p, f_q = f_p * scale, f_q * scale
    assert float(torch.log_softmax(f_p @ w_p.T, -1).min()) < -1e3
    unemb_q = torch.cat([w_q, 1e4 * torch.ones(k, 1, dtype=torch.float64)], 1)  # bias: +1e4 on every logit
    svd_metric = SVDDissimilarity(unemb_p=w_p, unemb_q=unemb_q)
    for idx in batches(n, 50):
        svd_metric.update(f_p[idx], f_q[idx], ids=ids[idx])
    out = svd_metric.compute_result()
    rep = compare(f_p, w_p, f_q, unemb_q, input_sets=out.llv.candidate_sets)
    assert_same(out.llv, rep.llv)
    assert_same(out.svd, rep.svd)


def test_nearly_identical_models_keep_their_digits():
    """Representation route with f_q = f_p (1 + 1e-9): the terms are O(1e-9) and still relatively exact."""
    g = torch.Generator().manual_seed(4)
    n, k, m = 400, 8, 2
    f_p = torch.randn(n, m, generator=g, dtype=torch.float64)
    w = torch.randn(k, m, generator=g, dtype=torch.float64)
    f_q = f_p + 1e-9 * torch.randn(n, m, generator=g, dtype=torch.float64)
    metric = SVDDissimilarity(unemb_p=w, unemb_q=w)
    metric.update(f_p, f_q, ids=torch.arange(n))
    out = metric.compute_result()
    rep = compare(f_p, w, f_q, w, input_sets=out.llv.candidate_sets)
    assert 1e-12 < float(rep.llv.t1) < 1e-7
    assert out.llv.label_pivot == rep.llv.label_pivot and out.llv.leave_out == rep.llv.leave_out
    for name in ("t1", "t3", "t1_terms", "t2_terms"):
        assert_rel(getattr(out.llv, name), getattr(rep.llv, name), 1e-5, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_accumulate_in_float64(dtype):
    g = torch.Generator().manual_seed(5)
    z_p, z_q = torch.randn(2, 300, 6, generator=g).to(dtype).unbind(0)
    metric, kl = LLVDistance(rep_dim=2), MeanKLDivergence()
    metric.to(torch.float16)  # Lightning's "16-true" precision: states must stay float64
    metric.half()
    for idx in batches(300, 64):
        metric.update(z_p[idx], z_q[idx], ids=idx)
        kl.update(z_p[idx], z_q[idx])
    assert metric.moments.dtype == torch.float64 and metric.candidates.dtype == torch.float64
    res = metric.compute_result()
    assert_same(res, llv_distance(z_p.double(), z_q.double(), rep_dim=2, input_sets=res.candidate_sets))
    assert_rel(kl.compute(), mean_kl_divergence(z_p.double(), z_q.double()), RTOL)


def test_sequence_inputs_with_mask():
    g = torch.Generator().manual_seed(6)
    b, t, k, m = 12, 20, 7, 2
    z_p = torch.randn(b, t, k, generator=g, dtype=torch.float64)
    z_q = z_p + 0.5 * torch.randn(b, t, k, generator=g, dtype=torch.float64)
    mask = torch.rand(b, t, generator=g) > 0.3
    z_p[~mask] = float("nan")  # padding positions may hold anything
    ids = torch.arange(b * t).reshape(b, t)
    metric, kl = LLVDistance(rep_dim=m), MeanKLDivergence()
    for i in range(0, b, 5):
        metric.update(z_p[i : i + 5], z_q[i : i + 5], mask=mask[i : i + 5], ids=ids[i : i + 5])
        kl.update(z_p[i : i + 5], z_q[i : i + 5], mask=mask[i : i + 5])
    res = metric.compute_result()
    keep_p, keep_q = z_p[mask], z_q[mask]
    # candidate sets are ids; map them to positions among the kept rows
    pos = torch.full((b * t,), -1, dtype=torch.long)
    pos[ids[mask]] = torch.arange(int(mask.sum()))
    expected = llv_distance(keep_p, keep_q, rep_dim=m, input_sets=pos[res.candidate_sets])
    assert res.num_inputs == int(mask.sum())
    assert_same(dataclasses.replace(res, candidate_sets=pos[res.candidate_sets], input_set=pos[res.input_set]), expected)
    assert_rel(kl.compute(), mean_kl_divergence(keep_p, keep_q), RTOL)

    f_p = torch.randn(b, t, m, generator=g, dtype=torch.float64)
    f_q = f_p @ torch.randn(m, m, generator=g, dtype=torch.float64) + 0.1 * torch.randn(b, t, m, generator=g, dtype=torch.float64)
    w_p, w_q = torch.randn(2, k, m, generator=g, dtype=torch.float64).unbind(0)
    svd_metric, cca = SVDDissimilarity(unemb_p=w_p, unemb_q=w_q), MeanCCA()
    svd_metric.update(f_p, f_q, mask=mask, ids=ids)
    cca.update(f_p, f_q, mask=mask)
    out = svd_metric.compute_result()
    rep = compare(f_p[mask], w_p, f_q[mask], w_q, input_sets=pos[out.llv.candidate_sets])
    assert_rel(out.value, rep.svd.value, RTOL)
    assert_rel(out.llv.value, rep.llv.value, RTOL)
    assert_rel(cca.compute(), mean_cca(f_p[mask], f_q[mask]), RTOL)


# ----------------------------------------------------------------------------------------------
# state design
# ----------------------------------------------------------------------------------------------
def test_state_size_does_not_grow_with_inputs():
    g = torch.Generator().manual_seed(7)
    k, m, buf = 10, 4, 64
    w_p, w_q = torch.randn(2, k, m, generator=g).unbind(0)
    metrics = {
        "llv": LLVDistance(rep_dim=m, buffer_size=buf),
        "svd": SVDDissimilarity(unemb_p=w_p, unemb_q=w_q, buffer_size=buf),
        "kl": MeanKLDivergence(),
        "cca": MeanCCA(),
    }
    sizes = {}
    for total in (1_000, 100_000):
        for metric in metrics.values():
            metric.reset()
        for _ in range(total // 10_000 or 1):
            f_p = torch.randn(min(total, 10_000), m, generator=g)
            f_q = f_p + torch.randn(f_p.shape, generator=g)
            z_p, z_q = f_p @ w_p.T, f_q @ w_q.T
            metrics["llv"].update(z_p, z_q)
            metrics["kl"].update(z_p, z_q)
            metrics["svd"].update(f_p, f_q)
            metrics["cca"].update(f_p, f_q)
        assert metrics["llv"].num_inputs == total
        sizes[total] = {name: metric.state_nbytes() for name, metric in metrics.items()}
    assert sizes[1_000] == sizes[100_000]
    # the documented formulas (+ 8 bytes for the dropped-row counter, 8 per dimension and per configuration entry)
    assert sizes[1_000]["llv"] == 8 * (1 + 2 * k + 4 * k * k + buf * (2 * k + 3)) + 8 + 8 + 5 * 8
    # + widths (2 * 8) and the unembeddings' fingerprints (4 * 8)
    assert sizes[1_000]["svd"] == 8 * (1 + (2 * m + 2) + (2 * m + 2) ** 2 + buf * (2 * m + 3)) + 8 + 4 * 8 + 2 * 8 + 4 * 8
    assert sizes[1_000]["kl"] == 8 * 3 + 8 + 8
    assert sizes[1_000]["cca"] == 8 * (1 + 2 * m + 4 * m * m) + 8 + 16


def test_buffer_is_a_bottom_k_sketch_independent_of_batching_and_sharding():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(500, 5, generator=g, dtype=torch.float64)
    x[100] = x[7]  # a duplicate input is kept once
    metric_a = LLVDistance(rep_dim=2, buffer_size=32)
    metric_a.update(x, x.flip(-1))
    shards = [LLVDistance(rep_dim=2, buffer_size=32) for _ in range(3)]
    for j, idx in enumerate(torch.randperm(500, generator=g).split(37)):
        shards[j % 3].update(x[idx], x[idx].flip(-1))
    assert torch.equal(fold_buffers(torch.stack([s.candidates for s in shards])), metric_a.candidates)
    shards[0].merge_state(shards[1])
    shards[0].merge_state(shards[2])
    assert torch.equal(shards[0].candidates, metric_a.candidates)
    assert_same(shards[0].compute_result(), metric_a.compute_result())
    # the buffer holds exactly the 32 smallest keys of the distinct inputs
    key, key2 = hash_keys(torch.cat([x, x.flip(-1)], 1), seed=0)
    distinct = torch.unique(torch.stack([key, key2], 1), dim=0)
    assert distinct.shape[0] == 499
    assert torch.equal(buffer_content(metric_a.candidates)[:, 0], key.unique().sort().values[:32])
    # a different seed, a different sketch; float32 and float64 copies hash alike
    assert not torch.equal(hash_keys(x, seed=1)[0], hash_keys(x, seed=0)[0])
    assert torch.equal(hash_keys(x.float(), seed=0)[0], hash_keys(x.float().double(), seed=0)[0])
    assert bottom_k(metric_a.candidates, 32).shape == (32, 3 + 10)


def test_moment_fold_is_exact_chan_merge():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(300, 4, generator=g, dtype=torch.float64) * 100 + 1e6
    metric = MeanCCA()
    parts = []
    for idx in torch.arange(300).split([1, 120, 179]):
        part = MeanCCA()
        part.update(x[idx, :2], x[idx, 2:])
        parts.append(part.cca_moments)
    metric.update(x[:, :2], x[:, 2:])
    folded = fold_moments(torch.stack(parts))
    assert folded[0] == 300
    assert_rel(folded[1:5], metric.cca_moments[1:5], 1e-15)
    m2_a, m2_b = folded[5:].view(4, 4), metric.cca_moments[5:].view(4, 4)
    scale = m2_b.diagonal().sqrt()
    assert float(((m2_a - m2_b).abs() / (scale[:, None] * scale[None, :])).max()) < 1e-11  # offset/sd = 1e4


def test_merge_state_and_reset():
    g = torch.Generator().manual_seed(10)
    k, m = 6, 2
    f_p, f_q = torch.randn(2, 400, m, generator=g, dtype=torch.float64).unbind(0)
    w_p, w_q = torch.randn(2, k, m, generator=g, dtype=torch.float64).unbind(0)
    z_p, z_q = f_p @ w_p.T, f_q @ w_q.T
    for make, args in (
        (lambda: LLVDistance(rep_dim=m), (z_p, z_q)),
        (lambda: SVDDissimilarity(unemb_p=w_p, unemb_q=w_q), (f_p, f_q)),
        (MeanKLDivergence, (z_p, z_q)),
        (MeanCCA, (f_p, f_q)),
    ):
        whole, a, b, empty = make(), make(), make(), make()
        whole.update(*args)
        a.update(*(x[:150] for x in args))
        b.update(*(x[150:] for x in args))
        a.merge_state(b)
        a.merge_state(empty)  # a never-updated metric (lazily sized states) is the identity
        empty.merge_state(a)  # and can receive
        assert_same(a.compute_result(), whole.compute_result())
        assert_same(empty.compute_result(), whole.compute_result())
        whole.reset()
        for name, default in whole._defaults.items():
            assert torch.equal(getattr(whole, name), default)
        with pytest.warns(UserWarning, match="before the ``update``"), pytest.raises(ValueError, match="N=0"):
            whole.compute_result()


def test_checkpoint_round_trip():
    g = torch.Generator().manual_seed(11)
    z_p, z_q = torch.randn(2, 200, 5, generator=g, dtype=torch.float64).unbind(0)
    metric = LLVDistance(rep_dim=2, nan_strategy="ignore")
    metric.update(z_p, z_q)
    assert not set(metric.state_dict())  # torchmetrics' default: states are not persistent
    metric.persistent(True)
    state = metric.state_dict()
    assert {"moments", "candidates", "num_dropped", "config", "dims"} <= set(state)
    restored = LLVDistance(rep_dim=2, nan_strategy="ignore")
    restored.persistent(True)
    restored.load_state_dict(state)
    assert_same(restored.compute_result(), metric.compute_result())
    # pickling (Lightning's ddp_spawn) and clone() give independent, working copies
    svd = SVDDissimilarity(unemb_p=torch.randn(6, 2, generator=g), unemb_q=torch.randn(6, 2, generator=g))
    svd.update(torch.randn(50, 2, generator=g), torch.randn(50, 2, generator=g))
    for copy in (pickle.loads(pickle.dumps(svd)), svd.clone()):
        copy.update(torch.randn(20, 2, generator=g), torch.randn(20, 2, generator=g))
        assert copy.num_inputs == 70
        assert float(copy.compute_result().value) >= 0
    assert svd.num_inputs == 50
    lazy = pickle.loads(pickle.dumps(LLVDistance(rep_dim=2)))
    lazy.update(z_p, z_q)
    assert_same(lazy.compute_result(), metric.compute_result())


def test_metric_collection_composition():
    """The four metrics in one MetricCollection, updated with keyword arguments, equal the functional
    ``compare`` on the concatenated data; ``forward`` accumulates too."""
    from lightning_repsim.constructions import theorem31_pair

    pair = theorem31_pair(rho=5.0, n_per_class=40, seed=0)
    n = pair.emb_p.shape[0]
    collection = MetricCollection(
        {
            "svd": SVDDissimilarity(unemb_p=pair.unemb_p, unemb_q=pair.unemb_q),
            "llv": LLVDistance(rep_dim=2),
            "kl": MeanKLDivergence(),
            "mcca": MeanCCA(),
        }
    )
    for j, idx in enumerate(batches(n, 64)):
        f_p, f_q = pair.emb_p[idx], pair.emb_q[idx]
        kwargs = {
            "emb_p": f_p,
            "emb_q": f_q,
            "logits_p": logits_from_representations(f_p, pair.unemb_p),
            "logits_q": logits_from_representations(f_q, pair.unemb_q),
            "ids": idx,
        }
        if j % 2:
            collection.update(**kwargs)
        else:
            collection(**kwargs)
    out = results(collection)
    rep = compare(pair.emb_p, pair.unemb_p, pair.emb_q, pair.unemb_q, input_sets=out["llv"].candidate_sets)
    assert isinstance(out["llv"], LLVResult)
    assert_same(out["llv"], rep.llv)
    assert_same(out["svd"].llv, rep.llv)
    assert_same(out["svd"].svd, rep.svd)
    assert_rel(out["kl"].value, rep.kl, RTOL)
    assert_rel(out["mcca"].value, rep.mcca, RTOL)
    flat = out["svd"].as_dict()
    assert {"d_llv", "llv_t1", "d_svd", "d_svd_f", "d_svd_g"} <= set(flat)


def test_restricted_pivot_search_is_flagged():
    g = torch.Generator().manual_seed(12)
    n, k, m = 500, 40, 3
    f_p, f_q = torch.randn(2, n, m, generator=g, dtype=torch.float64).unbind(0)
    w_p, w_q = torch.randn(2, k, m, generator=g, dtype=torch.float64).unbind(0)
    b_p = torch.linspace(-2, 2, k, dtype=torch.float64)
    unemb_p = torch.cat([w_p, b_p[:, None]], 1)
    full = SVDDissimilarity(unemb_p=unemb_p, unemb_q=w_q, max_pivot_candidates=None, max_label_subsets=50)
    restricted = SVDDissimilarity(unemb_p=unemb_p, unemb_q=w_q, max_pivot_candidates=5, max_label_subsets=50)
    logits = LLVDistance(rep_dim=m, max_pivot_candidates=5)
    for metric in (full, restricted):
        metric.update(f_p, f_q)
    logits.update(logits_from_representations(f_p, unemb_p), logits_from_representations(f_q, w_q))
    out_full, out = full.compute_result(), restricted.compute_result()
    assert out_full.llv.label_search == "full"
    assert out.llv.label_search == "restricted" and logits.compute_result().label_search == "restricted"
    # the search starts from the 5 labels with the largest mean log-probability (over both models), then tries the
    # labels nearest to the best pivot (local search): never worse than the 5, never better than all pivots
    mean_lp = torch.log_softmax(logits_from_representations(f_p, unemb_p), -1).mean(0)
    mean_lq = torch.log_softmax(f_q @ w_q.T, -1).mean(0)
    top = torch.argsort(-(mean_lp + mean_lq))[:5]
    only_top = SVDDissimilarity(unemb_p=unemb_p, unemb_q=w_q, pivot_candidates=top, max_label_subsets=50)
    only_top.update(f_p, f_q)
    assert out.llv.num_pivots_searched > 5 and out.llv.search["label_pivots_refined"] > 0
    assert float(out_full.llv.t1) - 1e-12 <= float(out.llv.t1) <= float(only_top.compute_result().llv.t1) + 1e-12
    assert logits.compute_result().label_pivot == out.llv.label_pivot
    # explicit candidates override the default
    given = SVDDissimilarity(unemb_p=unemb_p, unemb_q=w_q, pivot_candidates=torch.tensor([3]), max_label_subsets=50)
    given.update(f_p, f_q)
    assert given.compute_result().llv.label_pivot == 3


def test_representation_route_large_vocabulary_smoke():
    """K = 5,000 labels, M = 8: the representation route never forms K x K (the logits route would
    need a 10,000^2 co-moment)."""
    g = torch.Generator().manual_seed(13)
    n, k, m = 300, 5000, 8
    f_p = torch.randn(n, m, generator=g)
    f_q = f_p + 0.1 * torch.randn(n, m, generator=g)
    w_p = torch.randn(k, m, generator=g) / 3
    w_q = w_p + 0.05 * torch.randn(k, m, generator=g)
    metric = SVDDissimilarity(unemb_p=w_p, unemb_q=w_q, max_label_subsets=64, num_input_sets=20)
    for idx in batches(n, 100):
        metric.update(f_p[idx], f_q[idx], ids=idx)
    out = metric.compute_result()
    assert metric.state_nbytes() < 8 * ((2 * m + 3) ** 2 + metric.buffer_size * (2 * m + 3)) + 1000  # nothing of size K
    assert out.llv.label_search == "restricted" and not out.svd.exhaustive
    # check against the functional core restricted to the same pivot (its full search is O(K^2))
    rep = llv_distance(
        f_p.double() @ w_p.double().T, f_q.double() @ w_q.double().T, rep_dim=m, label_pivot=out.llv.label_pivot,
        input_sets=out.llv.candidate_sets,
    )
    assert rep.leave_out == out.llv.leave_out
    for name in ("t1", "t2", "t3", "t4", "t1_terms", "t2_terms", "candidate_scores"):
        assert_rel(getattr(out.llv, name), getattr(rep, name), 1e-8, name)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
def _message(fn, *args, **kwargs) -> str:
    with pytest.raises((ValueError, TypeError)) as err:
        fn(*args, **kwargs)
    return str(err.value)


def test_bad_input_errors_match_the_functional_layer():
    z = torch.randn(20, 5)
    bad = z.clone()
    bad[3, 1] = float("nan")
    pairs = [(z, torch.randn(20, 4)), (z, bad), (torch.randn(5), torch.randn(5)), (z.long(), z.long())]
    for a, b in pairs:
        assert _message(LLVDistance(rep_dim=2).update, a, b) == _message(llv_distance, a, b, rep_dim=2)
        assert _message(MeanKLDivergence().update, a, b) == _message(mean_kl_divergence, a, b)
    f = torch.randn(20, 2)
    badf = f.clone()
    badf[0, 0] = float("inf")
    for a, b in [(f, torch.randn(19, 2)), (f, badf)]:
        assert _message(MeanCCA().update, a, b) == _message(mean_cca, a, b)
    w = torch.randn(5, 2)
    # widths may differ (a smaller student), but each unembedding must fit its embedding
    assert "`unemb_q` must have shape (K, M) or (K, M+1)" in _message(SVDDissimilarity(unemb_p=w, unemb_q=w).update, f,
                                                                     torch.randn(20, 3))
    assert "unembeddings" in _message(SVDDissimilarity().update, f, f)
    assert "(K, M) or (K, M+1)" in _message(SVDDissimilarity(unemb_p=torch.randn(5, 4), unemb_q=w).update, f, f)
    assert "K >= M + 2" in _message(SVDDissimilarity(unemb_p=w[:3], unemb_q=w[:3]).update, f, f)
    assert "same number of labels" in _message(SVDDissimilarity(unemb_p=w, unemb_q=torch.randn(6, 2)).update, f, f)
    assert "mask" in _message(LLVDistance(rep_dim=2).update, z, z, mask=torch.ones(19, dtype=torch.bool))
    assert "boolean" in _message(LLVDistance(rep_dim=2).update, z, z, mask=torch.ones(20))
    assert "K=5" in _message(LLVDistance(rep_dim=2, num_labels=4).update, z, z)
    with pytest.raises(ValueError, match="nan_strategy"):
        LLVDistance(rep_dim=2, nan_strategy="drop")


def test_nan_strategy_ignore_drops_and_counts_rows():
    g = torch.Generator().manual_seed(14)
    z_p, z_q = torch.randn(2, 300, 6, generator=g, dtype=torch.float64).unbind(0)
    bad_p, bad_q = z_p.clone(), z_q.clone()
    bad_p[[5, 17], 2] = float("nan")
    bad_q[40, 0] = float("-inf")
    clean = torch.ones(300, dtype=torch.bool)
    clean[[5, 17, 40]] = False
    metric, kl = LLVDistance(rep_dim=2, nan_strategy="ignore"), MeanKLDivergence(nan_strategy="ignore")
    ref_metric = LLVDistance(rep_dim=2)
    for idx in batches(300, 64):
        metric.update(bad_p[idx], bad_q[idx])
        kl.update(bad_p[idx], bad_q[idx])
        ref_metric.update(z_p[idx][clean[idx]], z_q[idx][clean[idx]])
    assert int(metric.num_dropped) == 3 and int(kl.num_dropped) == 3 and metric.num_inputs == 297
    assert_same(metric.compute_result(), ref_metric.compute_result())
    assert_rel(kl.compute(), mean_kl_divergence(z_p[clean], z_q[clean]), RTOL)


def test_compute_errors_too_few_inputs_and_zero_variance():
    metric = LLVDistance(rep_dim=2)
    metric.update(torch.randn(3, 5), torch.randn(3, 5))
    with pytest.raises(ValueError, match="need at least M \\+ 2 = 4 inputs"):
        metric.compute_result()
    const = LLVDistance(rep_dim=1)
    z = torch.randn(50, 1).expand(50, 3)  # every label equally likely for every input: sigma = 0
    const.update(z, torch.randn(50, 3))
    with pytest.raises(ValueError, match="zero variance") as err:
        const.compute()
    assert str(err.value) == _message(llv_distance, z, torch.randn(50, 3), rep_dim=1)
    cca = MeanCCA()
    cca.update(torch.randn(3, 2), torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"N >= max\(M_p, M_q\) \+ 2 = 4 inputs"):
        cca.compute()
    with pytest.raises(ValueError, match="`buffer_size`=2 cannot hold an input set of M\\+1 = 3 inputs"):
        LLVDistance(rep_dim=2, buffer_size=2)
    few = LLVDistance(rep_dim=2, buffer_size=3)
    few.update(torch.randn(2, 5).repeat(15, 1), torch.randn(2, 5).repeat(15, 1))
    with pytest.raises(ValueError, match="candidate buffer holds 2 distinct inputs"):
        few.compute()
    pinned = LLVDistance(rep_dim=2, input_sets=torch.tensor([[0, 1, 99]]))
    pinned.update(torch.randn(30, 5), torch.randn(30, 5), ids=torch.arange(30))
    with pytest.raises(ValueError, match="never passed to update\\(\\): \\[99\\]"):
        pinned.compute()
    with pytest.raises(ValueError, match="pass the inputs' `ids`"):
        pinned.update(torch.randn(30, 5), torch.randn(30, 5))


def test_compute_before_update_warns():
    metrics = (LLVDistance(rep_dim=2), LLVDistance(rep_dim=2, num_labels=5), MeanKLDivergence(), MeanCCA(), SVDDissimilarity())
    for metric in metrics:
        with pytest.warns(UserWarning, match="before the ``update``"), pytest.raises(ValueError):
            metric.compute_result()


def test_buffer_insert_merges_as_the_bottom_k_of_the_union():
    """Inserting a batch into the sorted buffer (merged, not sorted again) gives the same bits as the bottom-k of the
    union; batches with a repeated input (equal keys), an input already buffered or a key shared with a different
    second key take the general ordering, with the same result; a full buffer only admits smaller keys."""
    from lightning_repsim.metrics.sketch import META, _merged_order, bottom_k, buffer_insert, empty_buffer

    g = torch.Generator().manual_seed(7)
    paths = set()
    for capacity, sizes in ((64, (10, 30, 50, 40, 30)), (1000, (256, 256, 256)), (8, (5, 5, 20, 4))):
        buf = empty_buffer(capacity, 3)
        for i, size in enumerate(sizes):
            rows = torch.randn(size, META + 3, generator=g, dtype=torch.float64)
            filled = int(torch.isfinite(buf[:, 0]).sum())
            if i % 2 and filled:
                rows[1] = rows[0]  # a repeated input
                rows[2, :2] = buf[0, :2]  # an input already buffered
                rows[3, 0], rows[3, 1] = buf[filled - 1, 0], buf[filled - 1, 1] + 1.0  # the same key, another key2
            paths.add(_merged_order(buf[:, :2], rows[:, :2]) is None)
            expected = bottom_k(torch.cat([buf, rows]), capacity)
            buf = buffer_insert(buf, rows)
            assert torch.equal(buf, expected), (capacity, size)
    assert paths == {True, False}  # both the merge and the general ordering were taken
