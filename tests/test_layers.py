"""Layer-wise comparison in ReferenceComparison: per-layer CKA / debiased CKA / Procrustes from forward hooks equal
the functional values on the same layer outputs, the layer-by-layer matrix and its wandb heatmap, conv maps
(flatten, mean, refusal, projection), language-model tokens masked like the logits, bounded state, clear errors."""

from __future__ import annotations

import math
import os

import lightning.pytorch as pl
import pytest
import torch
from test_callback import make_pair, radial_loaders, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_repsim.callbacks import ReferenceComparison
from lightning_repsim.callbacks.layers import LayerComparison, layer_rows
from lightning_repsim.functional import linear_cka, procrustes_distance
from tests.conftest import STREAM_RTOL

RTOL = STREAM_RTOL


def rel(a, b) -> float:
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-300)


@torch.no_grad()
def layer_outputs(model: nn.Module, name: str, loader) -> torch.Tensor:
    """A module's outputs over the loader, batch by batch (the same float32 kernels as during validation)."""
    model.eval()
    module = dict(model.named_modules())[name]
    outs: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, a, o: outs.append(o.detach()))
    try:
        for x, _ in loader:
            model(x)
    finally:
        handle.remove()
    return torch.cat(outs).double()


def test_mlp_layers_equal_functional_values():
    ref, student = make_pair(width=16)
    _, val = radial_loaders(n_val=200, batch_size=48)
    cb = ReferenceComparison(ref, layers=["body.1", "body.3", ("body.1", "body.4")], log_media=False)
    tr = trainer(callbacks=[cb])
    tr.validate(student, val, verbose=False)
    h = cb.history[-1]
    assert set(h["layers"]) == {"body.1", "body.3", "body.1~body.4"}
    for (r, s), name in ((("body.1", "body.1"), "body.1"), (("body.3", "body.3"), "body.3"),
                         (("body.1", "body.4"), "body.1~body.4")):
        x, y = layer_outputs(ref, r, val), layer_outputs(student, s, val)
        expected = {"cka": linear_cka(x, y), "cka_debiased": linear_cka(x, y, debiased=True),
                    "procrustes": procrustes_distance(x, y)}
        for measure, value in expected.items():
            assert rel(h["layers"][name][measure], value) < RTOL, (name, measure)
            assert rel(tr.callback_metrics[f"repsim/layers/{name}/{measure}"], value) < 1e-6  # logged (float32)
    # the student's own validation forward was captured (no second pass for the layers)
    assert cb.stats["own_student_forward"] <= 1
    # identical models: CKA 1 on every layer
    same = ReferenceComparison(student, layers=["body.1", "body.3"], log_media=False)
    pl.seed_everything(0, verbose=False)
    twin = type(student)(width=16)
    twin.load_state_dict(student.state_dict())
    trainer(callbacks=[same]).validate(twin, val, verbose=False)
    for name in ("body.1", "body.3"):
        assert abs(same.history[-1]["layers"][name]["cka"] - 1.0) < 1e-12
        assert same.history[-1]["layers"][name]["procrustes"] < 1e-6


def test_layer_matrix_in_history_and_figure():
    ref, student = make_pair(width=16)
    _, val = radial_loaders(n_val=120, batch_size=40)
    layers = ["body.0", "body.1", "body.3"]
    cb = ReferenceComparison(ref, layers=layers, layer_matrix="cka_debiased", log_media=False)
    trainer(callbacks=[cb]).validate(student, val, verbose=False)
    matrix = cb.history[-1]["layer_matrix"]
    assert matrix["measure"] == "cka_debiased" and matrix["reference"] == layers and matrix["student"] == layers
    for i, r in enumerate(layers):
        x = layer_outputs(ref, r, val)
        for j, s in enumerate(layers):
            assert rel(matrix["values"][i][j], linear_cka(x, layer_outputs(student, s, val), debiased=True)) < RTOL
    fig = cb.layer_figure()
    assert fig is not None and len(fig.axes) == 2


def test_layer_heatmap_and_table_in_offline_wandb_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    ref, student = make_pair(width=16)
    train, val = radial_loaders(n_train=128, n_val=100)
    cb = ReferenceComparison(ref, layers=["body.1", "body.3"], layer_matrix=True)
    wl = WandbLogger(offline=True, save_dir=str(tmp_path), project="repsim-layers")
    trainer(tmp_path, callbacks=[cb], logger=wl, max_epochs=1).fit(student, train, val)
    files_dir = wl.experiment.dir
    wandb.finish()
    images = os.listdir(os.path.join(files_dir, "media", "images", "repsim", "layers"))
    assert any(f.startswith("cka_matrix") and f.endswith(".png") for f in images), images
    tables = os.listdir(os.path.join(files_dir, "media", "table", "repsim", "layers"))
    assert any(f.startswith("cka_table") for f in tables), tables
    assert all(math.isfinite(v) for row in cb.history[-1]["layer_matrix"]["values"] for v in row)


class ConvNet(pl.LightningModule):
    def __init__(self, channels: int = 4):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, 8, 3, padding=1))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))

    def validation_step(self, batch, batch_idx):
        return None


def conv_data(n=40):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % 5), batch_size=16)


def test_conv_layers_flatten_mean_refuse_and_project():
    torch.manual_seed(0)
    ref, student = ConvNet(), ConvNet()
    val = conv_data()
    # flatten: 8 x 8 x 8 = 512 features per example
    cb = ReferenceComparison(ref, layers=["features.2"], log_media=False)
    trainer(callbacks=[cb]).validate(student, val, verbose=False)
    x, y = layer_outputs(ref, "features.2", val), layer_outputs(student, "features.2", val)
    assert rel(cb.history[-1]["layers"]["features.2"]["cka"], linear_cka(x.flatten(1), y.flatten(1))) < RTOL
    # mean: the channels, averaged over positions
    cb = ReferenceComparison(ref, layers=["features.2"], layer_reduce="mean", log_media=False)
    trainer(callbacks=[cb]).validate(student, val, verbose=False)
    assert rel(cb.history[-1]["layers"]["features.2"]["cka"], linear_cka(x.mean((2, 3)), y.mean((2, 3)))) < RTOL
    # too wide: refused with a message that says what to do
    cb = ReferenceComparison(ref, layers=["features.2"], layer_max_width=100, log_media=False)
    with pytest.raises(ValueError, match="layer_max_width=100.*layer_reduce='mean'.*project"):
        trainer(callbacks=[cb]).validate(student, val, verbose=False)
    # ... or projected (seeded: the same value twice), close to the exact value
    values = []
    for _ in range(2):
        cb = ReferenceComparison(ref, layers=["features.2"], layer_max_width=256, layer_too_wide="project", log_media=False)
        trainer(callbacks=[cb]).validate(student, val, verbose=False)
        values.append(cb.history[-1]["layers"]["features.2"]["cka"])
    assert values[0] == values[1]  # bit-identical: the same seeded projection and arithmetic, in one process
    assert abs(values[0] - float(linear_cka(x.flatten(1), y.flatten(1)))) < 0.1


def test_state_is_independent_of_the_number_of_inputs():
    sizes = []
    for n in (32, 512):
        comparison = LayerComparison(["a"], matrix=True)
        g = torch.Generator().manual_seed(0)
        for _ in range(n // 16):
            comparison._ref_hooks.outputs["a"] = torch.randn(16, 6, generator=g)
            comparison._stu_hooks.outputs["a"] = torch.randn(16, 9, generator=g)
            comparison.update((16,), None)
        sizes.append(comparison.state_nbytes())
        assert comparison.metrics[("a", "a")].num_inputs == n
    assert sizes[0] == sizes[1] == 8 * (2 + 15 + 1 + 17 + 17 * 17) + 8  # the statistic and the dropped-row count


def test_layer_rows_shapes_and_masks():
    keep = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool).reshape(-1)
    tokens = torch.arange(2 * 3 * 4, dtype=torch.float64).reshape(2, 3, 4)
    assert torch.equal(layer_rows(tokens, (2, 3), keep, "flatten", "t"), tokens.reshape(6, 4)[keep])
    per_example = torch.randn(2, 5, 7)
    assert layer_rows(per_example, (2,), None, "flatten", "t").shape == (2, 35)
    assert torch.allclose(layer_rows(per_example, (2,), None, "mean", "t"), per_example.double().mean(1))
    conv = torch.randn(2, 3, 4, 4)
    assert torch.allclose(layer_rows(conv, (2,), None, "mean", "c"), conv.double().mean((2, 3)))
    with pytest.raises(ValueError, match="cannot be matched"):
        layer_rows(torch.randn(7, 3), (2,), None, "flatten", "bad")


def test_errors_name_the_problem():
    ref, student = make_pair(width=16)
    _, val = radial_loaders(n_val=60)
    with pytest.raises(ValueError, match="no module named \\['body.9'\\]"):
        trainer(callbacks=[ReferenceComparison(ref, layers=["body.9"], log_media=False)]).validate(student, val, verbose=False)
    with pytest.raises(ValueError, match="needs `layers`"):
        ReferenceComparison(ref, layer_matrix=True)
    with pytest.raises(ValueError, match="layer_matrix"):
        ReferenceComparison(ref, layers=["body.1"], layer_matrix="cca")
    with pytest.raises(TypeError, match="list of module names"):
        ReferenceComparison(ref, layers="body.1")
    with pytest.raises(ValueError, match="layer_reduce"):
        ReferenceComparison(ref, layers=["body.1"], layer_reduce="max")


def test_language_model_tokens_are_masked_like_the_logits():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)

    def gpt2(seed):
        torch.manual_seed(seed)
        config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return transformers.GPT2LMHeadModel(config)

    class LM(pl.LightningModule):
        def __init__(self, seed):
            super().__init__()
            self.model = gpt2(seed)

        def forward(self, input_ids, attention_mask=None):
            return self.model(input_ids=input_ids, attention_mask=attention_mask)

        def validation_step(self, batch, batch_idx):
            return None

    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(3):
        ids = torch.randint(0, 50, (4, 10), generator=g)
        mask = torch.ones(4, 10, dtype=torch.int64)
        mask[1, 7:] = 0
        mask[3, 4:] = 0
        data.append({"input_ids": ids, "attention_mask": mask})
    reference, student = gpt2(1), LM(0)
    cb = ReferenceComparison(reference, layers=[("transformer.h.0", "model.transformer.h.0")], log_media=False)
    trainer(callbacks=[cb]).validate(student, DataLoader(data, batch_size=None), verbose=False)
    value = cb.history[-1]["layers"]["transformer.h.0~model.transformer.h.0"]["cka"]
    with torch.no_grad():
        hp = [reference(**b, output_hidden_states=True).hidden_states[1][b["attention_mask"].bool()] for b in data]
        hq = [student.model(**b, output_hidden_states=True).hidden_states[1][b["attention_mask"].bool()] for b in data]
    assert rel(value, linear_cka(torch.cat(hp).double(), torch.cat(hq).double())) < RTOL
