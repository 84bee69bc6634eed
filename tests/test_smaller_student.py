"""Distillation into a smaller student: every measure at any widths (functional, metrics, callback), a redundant
coordinate changes nothing, identical models of different widths are identical, and the floor of d_SVD when the
student's rank is lower (docs/smaller_student.md)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_repsim import ReferenceComparison
from lightning_repsim.functional import compare, llv_distance, svd_dissimilarity
from lightning_repsim.metrics import LLVDistance, MeanCCA, SVDDissimilarity
from tests.conftest import STREAM_RTOL
from tests.test_callback import RadialNet, candidate_sets, radial_loaders, trainer, unembedding

MEASURES = ("kl", "d_llv", "d_svd", "mcca")


def teacher_student(n=1500, k=20, m=4, seed=0):
    """A teacher (width m, bias column) and an unrelated-but-correlated student of the same width."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, m, generator=g, dtype=torch.float64)
    w = torch.randn(k, m, generator=g, dtype=torch.float64)
    teacher = torch.cat([w, torch.randn(k, 1, generator=g, dtype=torch.float64)], 1)
    f_s = f @ torch.randn(m, m, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, m, generator=g, dtype=torch.float64)
    return f, teacher, f_s, torch.randn(k, m, generator=g, dtype=torch.float64)


def with_redundant_column(f, unemb, kind, seed=1):
    """The same model with one more embedding coordinate (a constant, or a linear combination of the others) and a
    zero unembedding column: same logits, same rank. A bias column stays last."""
    g = torch.Generator().manual_seed(seed)
    extra = (torch.full((f.shape[0], 1), 2.5, dtype=torch.float64) if kind == "constant"
             else f @ torch.randn(f.shape[1], 1, generator=g, dtype=torch.float64))
    zero = torch.zeros(unemb.shape[0], 1, dtype=torch.float64)
    m = f.shape[1]
    return torch.cat([f, extra], 1), torch.cat([unemb[:, :m], zero, unemb[:, m:]], 1)


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


@pytest.mark.parametrize("route", ["logits", "representation"])
@pytest.mark.parametrize("kind", ["constant", "combination"])
def test_a_redundant_coordinate_changes_nothing(route, kind):
    f, g, f_s, g_s = teacher_student()
    base = compare(f, g, f_s, g_s, route=route).as_dict()
    wide_s = compare(f, g, *with_redundant_column(f_s, g_s, kind), route=route)
    wide_t = compare(*with_redundant_column(f, g, kind), f_s, g_s, route=route)
    for report in (wide_s, wide_t):
        assert report.rep_dim == 4 and sorted(report.widths) == [4, 5]
        for key in MEASURES:
            assert relative(report.as_dict()[key], base[key]) <= STREAM_RTOL, (key, report.as_dict()[key], base[key])


@pytest.mark.parametrize("route", ["logits", "representation"])
@pytest.mark.parametrize("kind", ["constant", "combination"])
def test_identical_models_of_different_widths_are_identical(route, kind):
    f, g, _, _ = teacher_student()
    report = compare(f, g, *with_redundant_column(f, g, kind), route=route)
    values = report.as_dict()
    assert abs(values["kl"]) <= 1e-9 and abs(values["d_llv"]) <= 1e-9 and 0 <= values["d_svd"] <= 1e-9
    assert abs(values["mcca"] - 1) <= 1e-9
    assert report.embedding_rank == (4, 4) and report.widths == (4, 5)


def test_functional_entry_points_accept_different_widths():
    f, g, f_s, g_s = teacher_student()
    small, w_small = f_s[:, :2], g_s[:, :2]
    svd = svd_dissimilarity(f, g, small, w_small)
    assert svd.rep_dim == 4 and svd.embedding_rank == (4, 2)
    report = compare(f, g, small, w_small)
    assert float(report.svd.value) == pytest.approx(float(svd.value), rel=STREAM_RTOL)
    logits = (f @ g[:, :4].T + g[:, 4], small @ w_small.T)
    assert float(llv_distance(*logits, rep_dim=4).value) == pytest.approx(float(report.llv.value), rel=STREAM_RTOL)
    # rep_dim overrides the default max(r_p, r_q)
    at_two = compare(f, g, small, w_small, rep_dim=2)
    assert at_two.rep_dim == 2 and at_two.llv.input_set.numel() == 3 and at_two.svd.rep_dim == 2


def floor_of_m_svd(a: torch.Tensor, rank: int) -> float:
    """The bound of docs/smaller_student.md: for r standardised teacher coordinates ``a`` (samples x r) and a student
    whose coordinates span ``rank`` dimensions, m_SVD <= sqrt(Lambda / r), Lambda the sum of the ``rank`` largest
    eigenvalues of the teacher coordinates' correlation matrix."""
    corr = torch.corrcoef(a.T)
    top = torch.linalg.eigvalsh(corr).flip(0)[:rank].sum()
    return float((top / a.shape[1]).sqrt())


@pytest.mark.parametrize("seed", range(4))
def test_the_floor_of_d_svd_for_a_lower_rank_student(seed):
    """A student of rank r_q < r = r_p: its log-odds span r_q dimensions, so every m_SVD is at most
    sqrt(Lambda_{r_q} / r) (at most sqrt(r_q / r) when the teacher's coordinates are uncorrelated) and d_SVD is at least
    one minus that; mCCA averages the min(r_p, r_q) canonical correlations."""
    f, g, f_s, g_s = teacher_student(m=5, seed=seed)
    for r_q in (1, 2, 3):
        report = compare(f, g, f_s[:, :r_q], g_s[:, :r_q])
        svd = report.svd
        assert report.rep_dim == 5 and report.embedding_rank == (5, r_q)
        assert report.canonical_correlations.numel() == r_q
        w = g[:, :5]
        for subset, msvd in zip(svd.label_subsets, svd.msvd_f):  # f-part: the teacher's log-odds over inputs
            labels = svd.kept_labels[subset]
            log_odds = f @ (w[labels] - w[svd.label_pivot]).T
            assert float(msvd) <= floor_of_m_svd(log_odds, r_q) + 1e-12
        n_p = f[svd.input_set[1:]] - f[svd.input_set[0]]  # g-part: the teacher's coordinates over labels
        assert float(svd.msvd_g) <= floor_of_m_svd(w @ n_p.T, r_q) + 1e-12
        # the sharp bound of SPEC §5 needs no equal widths: d_SVD <= 2 d_LLV^2, so d_LLV >= sqrt(d_SVD / 2)
        assert float(svd.value) <= float(report.bound_sharp) + 1e-12


def test_streaming_metric_with_different_widths_equals_compare():
    f, g, f_s, g_s = teacher_student(n=600)
    small, w_small = f_s[:, :3], g_s[:, :3]
    results = []
    for size in (1, 7, 600):
        metric = SVDDissimilarity(unemb_p=g, unemb_q=w_small)
        for i in range(0, 600, size):
            metric.update(f[i : i + size], small[i : i + size], ids=torch.arange(i, min(600, i + size)))
        results.append(metric.compute_result())
    expected = compare(f, g, small, w_small, input_sets=results[0].llv.candidate_sets, route="representation")
    for res in results:
        assert res.llv.input_set.tolist() == expected.llv.input_set.tolist()  # chosen sets: ties broken by index
        assert float(res.llv.value) == pytest.approx(float(expected.llv.value), rel=STREAM_RTOL)
        assert float(res.value) == pytest.approx(float(expected.svd.value), rel=STREAM_RTOL)
        assert res.svd.embedding_rank == (4, 3) and res.llv.rep_dim == 4
    cca = MeanCCA()
    cca.update(f, small)
    assert float(cca.compute()) == pytest.approx(float(expected.mcca), rel=STREAM_RTOL)


def test_streaming_identical_models_of_different_widths():
    f, g, _, _ = teacher_student(n=500)
    wide, w_wide = with_redundant_column(f, g, "constant")
    metric = SVDDissimilarity(unemb_p=g, unemb_q=w_wide)
    for i in range(0, 500, 64):
        metric.update(f[i : i + 64], wide[i : i + 64])
    res = metric.compute_result()
    assert abs(float(res.llv.value)) <= 1e-9 and 0 <= float(res.value) <= 1e-9
    llv = LLVDistance(rep_dim=4)
    llv.update(f @ g[:, :4].T + g[:, 4], wide @ w_wide[:, :5].T + w_wide[:, 5])
    assert abs(float(llv.compute())) <= 1e-9


class Narrow(RadialNet):
    """A student of another width (same data, same labels)."""


def test_callback_keeps_the_representation_route_for_a_smaller_student():
    """Teacher width 12, student width 8, K = 40: d_SVD and mCCA are logged, at M = max(r_p, r_q) = 12, and the values
    equal compare() on the same candidate sets."""
    torch.manual_seed(1)
    teacher = RadialNet(k=40, m=12)
    torch.manual_seed(0)
    student = Narrow(k=40, m=8)
    _, val = radial_loaders(n_val=300, k=40)
    cb = ReferenceComparison(teacher)
    trainer(callbacks=[cb]).validate(student, val, verbose=False)
    entry = cb.history[-1]
    assert entry["mode"] == "representations" and entry["rep_dim"] == 12 and entry["widths"] == [12, 8]
    assert entry["embedding_rank"] == [12, 8] and "max(rank 12" in entry["rep_dim_reason"]
    for key in ("kl", "d_logit", "d_llv", "d_svd", "d_svd_f", "d_svd_g", "mcca"):
        assert math.isfinite(entry[key]), key
    assert entry["d_svd_f"] >= 1 - 8 / 12 - 1e-12  # the floor of a rank-8 student at M = 12
    with torch.no_grad():
        f_t = torch.cat([teacher.body(x).double() for x, _ in val])
        f_s = torch.cat([student.body(x).double() for x, _ in val])
        z_t = torch.cat([teacher(x) for x, _ in val])
        z_s = torch.cat([student(x) for x, _ in val])
    expected = compare(f_t, unembedding(teacher.head), f_s, unembedding(student.head), input_sets=candidate_sets(cb),
                       logits=(z_t, z_s), route="representation").as_dict()
    for key in ("kl", "d_llv", "d_svd", "mcca"):
        assert entry[key] == pytest.approx(expected[key], rel=STREAM_RTOL, abs=1e-12), key


def test_callback_gpt2_vocabulary_with_a_smaller_student():
    """GPT-2's vocabulary (V = 50,257), teacher width 128, student width 64: every value logged (the callback used to
    refuse with a 163 GB estimate), bounded state."""
    transformers = pytest.importorskip("transformers")
    import lightning.pytorch as pl

    def gpt2(width, seed):
        torch.manual_seed(seed)
        config = transformers.GPT2Config(vocab_size=50257, n_embd=width, n_layer=1, n_head=2, n_positions=32,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return transformers.GPT2LMHeadModel(config)

    class Student(pl.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids)

        def validation_step(self, batch, batch_idx):
            return None

    ids = torch.randint(0, 50257, (64, 16), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(ids), batch_size=16,
                        collate_fn=lambda rows: {"input_ids": torch.stack([r[0] for r in rows])})
    cb = ReferenceComparison(gpt2(128, 1))
    trainer(callbacks=[cb]).validate(Student(gpt2(64, 0)), loader, verbose=False)
    entry = cb.history[-1]
    assert entry["num_inputs"] == 64 * 16 and entry["mode"] == "representations" and entry["widths"] == [128, 64]
    for key in ("kl", "d_logit", "d_llv", "d_svd", "mcca"):
        assert math.isfinite(entry[key]), key
    assert 0 < entry["state_bytes"] < 100e6  # the metrics' states while the epoch's inputs were accumulated


def test_rep_dim_from_logits_is_the_larger_rank():
    """From logits alone, rep_dim defaults to the larger rank of the two models' log-probabilities centred over labels
    (the rank of their embeddings, a bias column or a LayerNorm-like null direction not counted), in the functional
    core and the streaming metric alike."""
    f, g, f_s, g_s = teacher_student(n=800, k=12, m=4)
    z_t = f @ g[:, :4].T + g[:, 4]
    z_s = f_s[:, :2] @ g_s[:, :2].T
    res = llv_distance(z_t, z_s)
    assert res.rep_dim == 4 and res.input_set.numel() == 5
    assert float(res.value) == pytest.approx(float(llv_distance(z_t, z_s, rep_dim=4).value), rel=STREAM_RTOL)
    metric = LLVDistance()
    for i in range(0, 800, 100):
        metric.update(z_t[i : i + 100], z_s[i : i + 100], ids=torch.arange(i, i + 100))
    streamed = metric.compute_result()
    assert streamed.rep_dim == 4
    assert float(streamed.t1) == pytest.approx(float(res.t1), rel=STREAM_RTOL)
    wide, w_wide = with_redundant_column(f, g, "combination")
    assert llv_distance(z_t, wide @ w_wide[:, :5].T + w_wide[:, 5]).rep_dim == 4  # a redundant coordinate: still 4


def test_default_buffer_fits_wide_models():
    """The default candidate buffer holds 10,240 inputs for narrow embeddings and fewer for wide ones, so that the
    exhaustive input-set search stays about as cheap as for 10,240 inputs of 2-d models and two models of width 768 keep
    their state well under 100 MB."""
    from lightning_repsim.functional.input_search import exhaustive_cost
    from lightning_repsim.metrics.candidates import auto_buffer_size

    g = torch.Generator().manual_seed(0)
    w = torch.randn(900, 768, generator=g) / 30
    metric = SVDDissimilarity(unemb_p=w, unemb_q=w)
    f = torch.randn(8, 768, generator=g)
    metric.update(f, f + 0.01)
    assert metric.buffer_size == auto_buffer_size(1536) == 1323 and metric.state_nbytes() < 100e6
    narrow = SVDDissimilarity(unemb_p=w[:, :2], unemb_q=w[:, :2])
    narrow.update(f[:, :2], f[:, :2] + 0.1)
    assert narrow.buffer_size == 10240
    for width in (4, 64, 256, 1536):
        size = auto_buffer_size(width)
        assert exhaustive_cost(size - 1, width + 2) <= exhaustive_cost(10240, 6) or size == 1024
