"""Rank-aware representations (LayerNorm-final heads, dead or constant units): identical models compare as
identical without warnings, streaming equals functional, redundant coordinates change nothing, and genuinely
ill-conditioned diversity sets still warn (once per fit)."""

from __future__ import annotations

import copy
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_repsim import ReferenceComparison
from lightning_repsim.functional import DiversityWarning, compare, mean_cca, svd_dissimilarity
from lightning_repsim.functional.subspace import embedding_subspace
from lightning_repsim.metrics import MeanCCA, SVDDissimilarity
from tests.conftest import STREAM_RTOL, assert_rel, near_collinear_unembedding

RTOL = STREAM_RTOL


class LayerNormNet(pl.LightningModule):
    """An MLP whose embedding is a LayerNorm output (an affine hyperplane), then a linear head."""

    def __init__(self, width: int = 6, k: int = 12, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, width), nn.LayerNorm(width))
        self.head = nn.Linear(width, k)

    def forward(self, x):
        return self.head(self.body(x))

    def validation_step(self, batch, batch_idx):
        return None


def layernorm_data(n: int = 400, seed: int = 0):
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def representations(model: LayerNormNet, x: torch.Tensor):
    model.eval()
    f = model.body(x).double()
    unemb = torch.cat([model.head.weight, model.head.bias[:, None]], 1).double()
    return f, unemb, model(x)


def test_layernorm_embeddings_have_one_null_direction():
    f, _, _ = representations(LayerNormNet(), layernorm_data())
    assert embedding_subspace(torch.cov(f.T)).rank == f.shape[1] - 1


def test_identical_layernorm_models_compare_as_identical_without_warnings():
    model = LayerNormNet()
    x = layernorm_data()
    f, unemb, z = representations(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DiversityWarning (nor anything else)
        for route in ("logits", "representation"):
            rep = compare(f, unemb, f.clone(), unemb.clone(), route=route)
            assert float(rep.svd.value) <= 1e-9 and float(rep.mcca) >= 1 - 1e-9 and float(rep.llv.value) <= 1e-12
            assert rep.rep_dim == f.shape[1] - 1 and rep.svd.embedding_rank == (5, 5)
        svd, cca = SVDDissimilarity(unemb_p=unemb, unemb_q=unemb), MeanCCA()
        for i in range(0, 400, 64):
            svd.update(f[i : i + 64], f[i : i + 64], ids=torch.arange(i, min(i + 64, 400)))
            cca.update(f[i : i + 64], f[i : i + 64])
        assert float(svd.compute()) <= 1e-9 and float(cca.compute()) >= 1 - 1e-9


def test_identical_layernorm_models_through_the_callback():
    student = LayerNormNet()
    x = layernorm_data()
    loader = DataLoader(TensorDataset(x, torch.zeros(400, dtype=torch.long)), batch_size=50)
    cb = ReferenceComparison(copy.deepcopy(student), log_media=False)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, precision="32-true", callbacks=[cb])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiversityWarning)
        trainer.validate(student, loader, verbose=False)
    h = cb.history[-1]
    assert h["d_svd"] <= 1e-9 and h["mcca"] >= 1 - 1e-9 and h["kl"] <= 1e-12 and h["d_llv"] <= 1e-12, h
    assert h["rep_dim"] == 5  # the LayerNorm's constraint removed one dimension


def test_streaming_equals_functional_on_layernorm_embeddings():
    x = layernorm_data(600, seed=1)
    f_p, g_p, _ = representations(LayerNormNet(seed=0), x)
    f_q, g_q, _ = representations(LayerNormNet(seed=3), x)
    svd, cca = SVDDissimilarity(unemb_p=g_p, unemb_q=g_q), MeanCCA()
    for i in range(0, 600, 77):
        svd.update(f_p[i : i + 77], f_q[i : i + 77], ids=torch.arange(i, min(i + 77, 600)))
        cca.update(f_p[i : i + 77], f_q[i : i + 77])
    out = svd.compute_result()
    rep = compare(f_p, g_p, f_q, g_q, input_sets=out.llv.candidate_sets, route="representation")
    assert_rel(cca.compute(), mean_cca(f_p, f_q), RTOL, "mcca")
    assert_rel(cca.compute(), rep.mcca, RTOL, "mcca vs compare")
    for name in ("value", "f_part", "g_part"):
        assert_rel(getattr(out, name), getattr(rep.svd, name), RTOL, name)
    assert_rel(out.llv.value, rep.llv.value, RTOL, "d_llv")
    assert out.llv.rep_dim == rep.rep_dim == 5


@pytest.mark.parametrize("extra", ["constant", "combination"])
def test_redundant_coordinates_change_nothing(extra):
    """Appending a constant coordinate or a linear combination of existing ones (with a zero unembedding column) to
    both models' embeddings leaves every reported value unchanged."""
    x = layernorm_data(500, seed=2)
    f_p, g_p, _ = representations(LayerNormNet(seed=0), x)
    f_q, g_q, _ = representations(LayerNormNet(seed=5), x)

    def widen(f, g):
        column = torch.full_like(f[:, :1], 3.0) if extra == "constant" else f[:, :1] - 2 * f[:, 2:3]
        return torch.cat([f[:, :-1], column, f[:, -1:]], 1), torch.cat([g[:, :-2], torch.zeros_like(g[:, :1]), g[:, -2:]], 1)

    base = compare(f_p, g_p, f_q, g_q, num_input_sets=50, route="representation")
    wide = compare(*widen(f_p, g_p), *widen(f_q, g_q), num_input_sets=50, route="representation")
    for key, value in base.as_dict().items():
        assert_rel(wide.as_dict()[key], value, RTOL, key)
    assert wide.rep_dim == base.rep_dim and wide.llv.input_set.tolist() == base.llv.input_set.tolist()
    assert_rel(mean_cca(*[widen(f, g)[0] for f, g in ((f_p, g_p), (f_q, g_q))]), mean_cca(f_p, f_q), RTOL, "mcca")


def test_ill_conditioned_diversity_sets_still_warn_once_per_fit():
    f, g_bad = near_collinear_unembedding()
    with pytest.warns(DiversityWarning, match="condition number"):
        svd_dissimilarity(f, g_bad, f, g_bad, label_pivot=0, leave_out=1, input_set=torch.tensor([0, 1, 2]))

    class BadHead(LayerNormNet):
        def __init__(self):
            super().__init__(width=3, k=6)
            self.body = nn.Sequential(nn.Linear(4, 3))  # full-rank embeddings
            with torch.no_grad():  # head rows collinear: the displaced unembeddings are singular
                self.head.weight[:, 1] = 2 * self.head.weight[:, 0]
                self.head.weight[:, 2] = -self.head.weight[:, 0]

    student, reference = BadHead(), BadHead()
    x = layernorm_data(300)
    loader = DataLoader(TensorDataset(x, torch.zeros(300, dtype=torch.long)), batch_size=100)
    cb = ReferenceComparison(reference, log_media=False)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, max_epochs=3, limit_train_batches=0, num_sanity_val_steps=0,
                         callbacks=[cb])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            trainer.validate(student, loader, verbose=False)
    diversity = [w for w in caught if issubclass(w.category, DiversityWarning)]
    assert len(cb.history) == 3 and 1 <= len(diversity) <= 2  # once (per matrix and model), not once per epoch
