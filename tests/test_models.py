"""The paper's architectures (lightning_repsim.models) and their use with ReferenceComparison."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_repsim import radial_dataset
from lightning_repsim.callbacks import FinalLinear, ReferenceComparison
from lightning_repsim.functional import compare
from lightning_repsim.models import (
    MLP,
    BottleneckClassifier,
    Classifier,
    EmbedUnembed,
    cifar_model,
    cifar_resnet18,
    label_one_hot,
    radial_model,
)


def test_one_hot_codes_last_class_is_zero():
    codes = label_one_hot(torch.arange(4), 4)
    assert codes.shape == (4, 3)
    assert torch.equal(codes[:3], torch.eye(3)) and not codes[3].any()


def test_mlp_shape_and_bias_free_last_layer():
    net = MLP(2, 16, 2)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2, 16), (16, 16), (16, 16), (16, 2)]
    assert all(m.bias is not None for m in linears[:-1]) and linears[-1].bias is None
    assert sum(isinstance(m, nn.LeakyReLU) for m in net) == 3


def test_two_tower_logits_are_embedding_times_unembedding():
    torch.manual_seed(0)
    model = radial_model(6, 32)
    x = torch.randn(7, 2)
    assert model.unembed().shape == (6, 2)
    torch.testing.assert_close(model(x), model.embed(x) @ model.unembed().T)
    reps = EmbedUnembed()(Classifier(model), x)
    torch.testing.assert_close(reps.logits, model(x))
    assert reps.embeddings.shape == (7, 2) and reps.unembedding.shape == (6, 2)


def test_cifar_resnet_stem_and_head():
    net = cifar_resnet18()
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    assert (net.fc.in_features, net.fc.out_features) == (512, 2)
    model = cifar_model()
    assert model.unembed().shape == (10, 2)
    g_linears = [m for m in model.g if isinstance(m, nn.Linear)]
    assert [m.in_features for m in g_linears] == [9, 128, 128, 128]
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_bottleneck_classifier_default_extractor_agrees_with_embed_unembed():
    torch.manual_seed(0)
    net = BottleneckClassifier(64, 10, hidden=(32,), rep_dim=2)
    x = torch.randn(5, 64)
    a, b = FinalLinear()(net, x), EmbedUnembed()(net, x)
    torch.testing.assert_close(a.embeddings, b.embeddings)
    torch.testing.assert_close(a.unembedding, b.unembedding)  # (K, M+1): bias as last column
    torch.testing.assert_close(b.logits, net(x))


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_validation_step_hands_representations_to_the_callback():
    model = Classifier(radial_model(4, 16))
    x, y = radial_dataset(20, 4)
    out = model.validation_step((x, y), 0)
    assert set(out) == {"loss", "logits", "embeddings", "unembedding"}
    torch.testing.assert_close(out["logits"], model(x))


def _loader(n: int, k: int, seed: int) -> DataLoader:
    x, y = radial_dataset(n, k, seed=seed)
    return DataLoader(TensorDataset(x, y), batch_size=64)


@pytest.mark.parametrize("reuse", [True, False])
def test_reference_comparison_of_two_tower_models_matches_functional(reuse):
    """The override of the callback's extractors for the two-tower family: numbers equal functional.compare."""
    pl.seed_everything(0, verbose=False)
    reference = Classifier(radial_model(4, 16), lr=1e-3)
    pl.seed_everything(1, verbose=False)
    student = Classifier(radial_model(4, 16), lr=1e-3)
    cb = ReferenceComparison(reference, reference_extractor=EmbedUnembed(), student_extractor=EmbedUnembed(),
                             reuse_student_outputs=reuse, log_media=False)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[cb])
    val = _loader(300, 4, seed=5)
    trainer.fit(student, _loader(256, 4, seed=4), val)
    h = cb.history[-1]
    assert cb.stats["reused_student_forward" if reuse else "own_student_forward"] == len(val)
    x = val.dataset.tensors[0]
    with torch.no_grad():
        rep = compare(reference.embed(x).double(), reference.unembed().double(), student.embed(x).double(),
                      student.unembed().double())
    assert h["kl"] == pytest.approx(float(rep.kl), rel=1e-6)
    assert h["d_svd_f"] == pytest.approx(float(rep.svd.f_part), rel=1e-6)
    assert h["mcca"] == pytest.approx(float(rep.mcca), rel=1e-6)
    assert h["llv_t1"] == pytest.approx(float(rep.llv.t1), rel=1e-6)


def test_model_compared_with_a_linear_transform_of_itself_has_zero_distance():
    """f -> A f, g -> A^-T g is the identifiability class: d_LLV = d_SVD = 0, mCCA = 1, through the callback."""
    pl.seed_everything(0, verbose=False)
    reference = Classifier(radial_model(6, 16))
    student = copy.deepcopy(reference)
    a = torch.tensor([[2.0, 1.0], [0.5, 3.0]])
    with torch.no_grad():
        student.net.f[-1].weight.copy_(a @ student.net.f[-1].weight)
        student.net.g[-1].weight.copy_(torch.linalg.inv(a).T @ student.net.g[-1].weight)
    cb = ReferenceComparison(reference, reference_extractor=EmbedUnembed(), student_extractor=EmbedUnembed(), log_media=False)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    trainer.validate(student, _loader(300, 6, seed=3), verbose=False)
    h = cb.history[-1]
    assert h["kl"] < 1e-9 and h["d_llv"] < 1e-5 and h["d_svd"] < 1e-6 and h["mcca"] > 1 - 1e-6
