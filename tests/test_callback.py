"""ReferenceComparison: values, freezing, isolation from training, checkpoints, extraction, padding."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_repsim.callbacks import FinalLinear, LogitsOnly, ReferenceComparison, plot_embeddings, weights_fingerprint
from lightning_repsim.callbacks.plotting import figure_to_array
from lightning_repsim.constructions import radial_dataset
from lightning_repsim.functional import compare, llv_distance, mean_kl_divergence

KEYS = ("kl", "d_logit", "d_llv", "llv_t1", "llv_t2", "llv_t3", "llv_t4", "d_svd", "d_svd_f", "d_svd_g", "mcca", "bound_paper",
        "bound_sharp")


# ----------------------------------------------------------------------------------------------
# small models (also imported by the wandb and ddp tests)
# ----------------------------------------------------------------------------------------------
class RadialNet(pl.LightningModule):
    """f: MLP R^2 -> R^M, head: Linear(M, K) (the paper's synthetic setting, smaller)."""

    def __init__(self, k: int = 6, m: int = 2, width: int = 16, dropout: float = 0.0, lr: float = 1e-2):
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(
            nn.Linear(2, width), nn.LeakyReLU(), nn.Dropout(dropout), nn.Linear(width, width), nn.LeakyReLU(),
            nn.Linear(width, m),
        )
        self.head = nn.Linear(m, k)
        self.grads: list[torch.Tensor] = []

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def on_after_backward(self):
        self.grads.append(torch.cat([p.grad.reshape(-1) for p in self.parameters()]).clone())

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def radial_loaders(n_train: int = 256, n_val: int = 200, k: int = 6, batch_size: int = 50, shuffle: bool = True):
    x, y = radial_dataset(n_train, k, seed=0)
    xv, yv = radial_dataset(n_val, k, seed=1)
    train = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=shuffle)
    val = DataLoader(TensorDataset(xv, yv), batch_size=batch_size)
    return train, val


def make_pair(seed_ref: int = 1, seed_student: int = 0, ref_cls: type = RadialNet, **kwargs):
    pl.seed_everything(seed_ref, verbose=False)
    ref = ref_cls(**kwargs)
    pl.seed_everything(seed_student, verbose=False)
    return ref, RadialNet(**kwargs)


def trainer(tmp_path=None, **kwargs) -> pl.Trainer:
    defaults = dict(
        max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", devices=1, deterministic=True,
    )
    if tmp_path is not None:
        defaults["default_root_dir"] = str(tmp_path)
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def unembedding(linear: nn.Linear) -> torch.Tensor:
    return torch.cat([linear.weight, linear.bias[:, None]], dim=1).detach().double()


@torch.no_grad()
def radial_representations(model: RadialNet, loader: DataLoader) -> torch.Tensor:
    """Embeddings batch by batch (the same float32 kernels as during validation)."""
    model.eval()
    return torch.cat([model.body(x).double() for x, _ in loader])


@torch.no_grad()
def radial_logits(model: RadialNet, loader: DataLoader) -> torch.Tensor:
    """The model's own logits batch by batch: the callback takes the KL and each input's logZ from them."""
    model.eval()
    return torch.cat([model(x) for x, _ in loader])


def candidate_sets(cb: ReferenceComparison, id_to_row=None) -> torch.Tensor:
    """The candidate input sets the streaming metric drew (as input ids = global sample positions), mapped
    to row indices of the data given to ``compare``: the streaming metric draws them among the inputs of
    its bounded candidate buffer, ``compare`` among all N, so the comparison gives ``compare`` the same
    candidates; the label sets are searched in full by both."""
    results = cb.last_results
    llv = results["svd"].llv if "svd" in results else results["llv"]
    sets = llv.candidate_sets.cpu()
    return sets if id_to_row is None else sets.apply_(id_to_row)


def expected_report(ref: RadialNet, student: RadialNet, loader: DataLoader, cb: ReferenceComparison) -> dict[str, float]:
    """What the callback computes: the representation route (as SVDDissimilarity), with the KL and logZ from the
    models' own logits, on the candidate sets the streaming metric drew."""
    return compare(
        radial_representations(ref, loader), unembedding(ref.head),
        radial_representations(student, loader), unembedding(student.head), input_sets=candidate_sets(cb),
        logits=(radial_logits(ref, loader), radial_logits(student, loader)), route="representation",
    ).as_dict()


def assert_close(actual: float, expected: float, name: str, rtol: float = 1e-9) -> None:
    assert math.isfinite(actual) and math.isfinite(expected), f"{name}: {actual} vs {expected}"
    assert abs(actual - expected) <= rtol * max(abs(expected), 1e-12), f"{name}: {actual!r} != {expected!r}"


# ----------------------------------------------------------------------------------------------
# values
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reuse", [True, False])
def test_logged_values_equal_functional_compare(reuse):
    ref, student = make_pair()
    train, val = radial_loaders()
    cb = ReferenceComparison(ref, reuse_student_outputs=reuse, prog_bar=True)
    tr = trainer(callbacks=[cb])
    tr.fit(student, train, val)

    assert [h["epoch"] for h in cb.history] == [0, 1]
    assert all(h["stage"] == "fit" and h["num_inputs"] == 200 for h in cb.history)
    expected = expected_report(ref, student, val, cb)
    for key in KEYS:
        assert_close(cb.history[-1][key], expected[key], f"history {key}")
        logged = tr.callback_metrics[f"repsim/{key}"]
        assert logged.dtype == torch.float64
        assert_close(float(logged), expected[key], f"logged {key}")
    assert {"repsim/kl", "repsim/d_llv", "repsim/d_svd"} <= set(tr.progress_bar_metrics)
    if reuse:  # the student's own validation forward was reused: the sanity check's forward, and one forward per
        # comparison that checks the reused outputs on its first batch
        assert cb.stats["own_student_forward"] == 1 + 2 and cb.stats["reused_student_forward"] == 2 * 4
    else:
        assert cb.stats["reused_student_forward"] == 0 and cb.stats["own_student_forward"] == 8 + 1  # + sanity check
    # the values change between epochs (the student trains), and the first epoch is right too
    assert cb.history[0]["d_llv"] != cb.history[1]["d_llv"]


def test_validate_and_every_n_epochs_and_no_sanity_check():
    ref, student = make_pair()
    train, val = radial_loaders()
    cb = ReferenceComparison(ref, every_n_epochs=2)
    tr = trainer(max_epochs=4, num_sanity_val_steps=2, callbacks=[cb])
    tr.fit(student, train, val)
    assert [(h["epoch"], h["stage"]) for h in cb.history] == [(1, "fit"), (3, "fit")]
    tr.validate(student, val, verbose=False)
    assert cb.history[-1]["stage"] == "validate" and len(cb.history) == 3
    expected = expected_report(ref, student, val, cb)
    for key in KEYS:
        assert_close(cb.history[-1][key], expected[key], key)


def test_custom_dataloader_and_student_untouched():
    """Same seed with and without the callback: identical gradients at every step and identical weights,
    with dropout in the student (so any use of the global RNG by the callback would show)."""
    train, val = radial_loaders()
    extra_x, extra_y = radial_dataset(120, 6, seed=7)
    extra = DataLoader(TensorDataset(extra_x, extra_y), batch_size=40, shuffle=True)

    def run(with_callback: bool):
        ref, student = make_pair(dropout=0.2)
        callbacks = [ReferenceComparison(ref, dataloader=extra)] if with_callback else []
        pl.seed_everything(3, verbose=False)
        trainer(max_epochs=2, callbacks=callbacks).fit(student, train, val)
        return student, callbacks, ref

    plain, _, _ = run(False)
    student, (cb,), ref = run(True)
    assert len(plain.grads) == len(student.grads) == 8
    # bit-identical: both runs do the same float operations in one process; any change by the callback (e.g. a draw
    # from the global RNG shifting the dropout masks) shows as a difference
    for g_plain, g in zip(plain.grads, student.grads):
        assert torch.equal(g_plain, g)
    for (name, p_plain), p in zip(plain.named_parameters(), student.parameters()):
        assert torch.equal(p_plain, p), name
    assert [h["num_inputs"] for h in cb.history] == [120, 120]
    loader = DataLoader(TensorDataset(extra_x, extra_y), batch_size=40)
    x = radial_representations(ref, loader)
    expected = compare(x, unembedding(ref.head), radial_representations(student, loader), unembedding(student.head),
                       logits=(radial_logits(ref, loader), radial_logits(student, loader)),
                       route="representation").as_dict()
    # the loader shuffles, so the inputs' ids (positions in the loader's order) are not dataset indices:
    # only the quantities that do not depend on the input set are compared here
    for key in ("kl", "llv_t1", "llv_t3", "d_svd_f", "mcca"):
        assert_close(cb.history[-1][key], expected[key], key, rtol=1e-7)


# ----------------------------------------------------------------------------------------------
# the reference: frozen, never part of the student
# ----------------------------------------------------------------------------------------------
def test_reference_frozen_and_not_in_student_checkpoint(tmp_path):
    ref, student = make_pair()
    before = weights_fingerprint(ref)
    ref.train()
    train, val = radial_loaders()
    cb = ReferenceComparison(ref)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    tr = trainer(tmp_path, callbacks=[cb, ckpt], enable_checkpointing=True)
    tr.fit(student, train, val)
    assert weights_fingerprint(ref) == before == cb.reference_fingerprint
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    ref_ids = {id(p) for p in ref.parameters()}
    opt_ids = {id(p) for group in tr.optimizers[0].param_groups for p in group["params"]}
    assert not (ref_ids & opt_ids)
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert set(state["state_dict"]) == set(student.state_dict())
    cb_state = state["callbacks"][cb.state_key]
    assert set(cb_state) == {"version", "config", "history", "reference_fingerprint"}
    assert cb_state["reference_fingerprint"] == before
    json.dumps(cb_state)  # config and history are plain data, no tensors


def test_reference_must_not_be_the_student():
    ref, student = make_pair()
    train, val = radial_loaders()
    with pytest.raises(ValueError, match="the student itself"):
        ReferenceComparison(student).setup(None, student, "fit")
    shared = copy.deepcopy(student)
    shared.head = student.head
    with pytest.raises(ValueError, match="shares 2 parameter"):
        ReferenceComparison(shared).setup(None, student, "fit")
    with pytest.raises(ValueError, match="every_n_epochs"):
        ReferenceComparison(ref, every_n_epochs=0)
    with pytest.raises(TypeError, match="nn.Module or a checkpoint path"):
        ReferenceComparison(3)


def test_resume_continues_history_and_refuses_other_reference(tmp_path):
    ref, student = make_pair()
    train, val = radial_loaders()
    cb = ReferenceComparison(ref)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(tmp_path, callbacks=[cb, ckpt], enable_checkpointing=True).fit(student, train, val)
    last = tmp_path / "last.ckpt"

    # a checkpoint path as reference, loaded with the student's class: the same weights, accepted
    ref_path = tmp_path / "reference.ckpt"
    torch.save({"state_dict": ref.state_dict(), "hyper_parameters": dict(ref.hparams),
                "pytorch-lightning_version": pl.__version__}, ref_path)
    resumed_student = RadialNet()
    cb2 = ReferenceComparison(str(ref_path), reference_load_kwargs={"weights_only": False})
    tr2 = trainer(tmp_path, max_epochs=3, callbacks=[cb2], enable_checkpointing=False)
    tr2.fit(resumed_student, train, val, ckpt_path=last)
    assert [h["epoch"] for h in cb2.history] == [0, 1, 2]
    assert cb2.history[:2] == cb.history  # restored from the checkpoint (the same floats), not recomputed
    assert cb2.reference_fingerprint == cb.reference_fingerprint
    expected = expected_report(cb2.reference, resumed_student, val, cb2)
    assert_close(cb2.history[-1]["d_llv"], expected["d_llv"], "d_llv after resume")

    other = RadialNet()  # different weights
    cb3 = ReferenceComparison(other)
    with pytest.raises(RuntimeError, match="different reference model"):
        trainer(tmp_path, max_epochs=3, callbacks=[cb3]).fit(RadialNet(), train, val, ckpt_path=last)


# ----------------------------------------------------------------------------------------------
# extraction: ResNet fc, LM head with padding, logits only
# ----------------------------------------------------------------------------------------------
class ResNetModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        import torchvision

        self.model = torchvision.models.resnet18(weights=None, num_classes=10)

    def forward(self, x):
        return self.model(x)

    def validation_step(self, batch, batch_idx):
        return {"loss": nn.functional.cross_entropy(self(batch[0]), batch[1])}


def test_resnet_fc_found_and_undefined_values_skipped():
    torch.manual_seed(0)
    ref, student = ResNetModule(), ResNetModule()
    x = torch.randn(24, 3, 16, 16)
    y = torch.arange(24) % 10
    val = DataLoader(TensorDataset(x, y), batch_size=12)
    cb = ReferenceComparison(ref, log_media=False)
    tr = trainer(callbacks=[cb])
    with pytest.warns(UserWarning, match="not defined here"):
        tr.validate(student, val, verbose=False)
    assert cb.student_extractor.head(student) is student.model.fc
    assert cb.reference_extractor.head(ref) is ref.model.fc
    h = cb.history[-1]
    with torch.no_grad():
        ref.eval(), student.eval()
        expected_kl = mean_kl_divergence(torch.cat([ref(b) for b, _ in val]), torch.cat([student(b) for b, _ in val]))
    assert_close(h["kl"], float(expected_kl), "kl")  # the models' own logits
    # d_SVD (K = 10 < M + 2 = 514) and mCCA (N = 24 < M + 2) are undefined, reported as NaN and not logged; d_LLV is
    # compared at the rank of the log-probabilities (at most K - 1 = 9), not at the width 512
    assert h["mode"] == "logits" and h["rep_dim"] == 9 and "log-probabilities" in h["rep_dim_reason"]
    defined = {"kl", "d_logit", "d_llv", "llv_t1", "llv_t2", "llv_t3", "llv_t4", "bound_paper", "bound_sharp"}
    for key in KEYS:
        assert math.isfinite(h[key]) == (key in defined), key
    assert set(k for k in tr.callback_metrics if k.startswith("repsim/")) == {f"repsim/{k}" for k in defined}


class TinyLM(pl.LightningModule):
    """Token embedding + GRU + lm_head over (B, T, V); returns an HF-style output with ``.logits``."""

    def __init__(self, vocab: int = 9, dim: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)
        self.rnn = nn.GRU(8, dim, batch_first=True)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids):
        hidden, _ = self.rnn(self.embed(input_ids))
        return SimpleNamespace(logits=self.lm_head(hidden), hidden=hidden)

    def validation_step(self, batch, batch_idx):
        return None


def lm_batches():
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        ids = torch.randint(0, 9, (4, 11), generator=g)
        lengths = torch.randint(5, 12, (4,), generator=g)
        mask = torch.arange(11)[None, :] < lengths[:, None]
        batches.append({"input_ids": ids, "attention_mask": mask.long()})
    return batches


def test_lm_head_with_padding_mask():
    torch.manual_seed(0)
    ref, student = TinyLM(), TinyLM()
    batches = lm_batches()
    cb = ReferenceComparison(ref)
    trainer(callbacks=[cb]).validate(student, DataLoader(batches, batch_size=None), verbose=False)
    assert cb.student_extractor.head(student) is student.lm_head
    with torch.no_grad():
        f_p = torch.cat([ref(b["input_ids"]).hidden[b["attention_mask"].bool()] for b in batches]).double()
        f_q = torch.cat([student(b["input_ids"]).hidden[b["attention_mask"].bool()] for b in batches]).double()
        z_p = torch.cat([ref(b["input_ids"]).logits[b["attention_mask"].bool()] for b in batches])
        z_q = torch.cat([student(b["input_ids"]).logits[b["attention_mask"].bool()] for b in batches])
    # token ids: global sequence position * 2**20 + token position; rows: the masked tokens in order
    ids = torch.cat([(i * 4 + torch.arange(4))[:, None] * 2**20 + torch.arange(11) for i in range(3)])
    masks = torch.cat([b["attention_mask"].bool() for b in batches])
    row_of = {int(t): r for r, t in enumerate(ids[masks].tolist())}
    sets = candidate_sets(cb, lambda i: row_of[i])
    w_p, w_q = ref.lm_head.weight.detach().double(), student.lm_head.weight.detach().double()
    expected = compare(f_p, w_p, f_q, w_q, input_sets=sets, logits=(z_p, z_q), route="representation").as_dict()
    assert cb.history[-1]["num_inputs"] == f_p.shape[0] == int(sum(b["attention_mask"].sum() for b in batches))
    for key in KEYS:
        assert_close(cb.history[-1][key], expected[key], key)


class ScaledLogits(RadialNet):
    """Logits are not the output of an nn.Linear (temperature after the head): no embedding access."""

    def forward(self, x):
        return self.head(self.body(x)) / 0.5


def test_logits_only_models_get_llv_and_kl():
    ref, student = make_pair(ref_cls=ScaledLogits)
    train, val = radial_loaders()
    cb = ReferenceComparison(ref, rep_dim=2)
    with pytest.warns(UserWarning, match="no nn.Linear layer produces the logits"):
        trainer(max_epochs=1, callbacks=[cb]).fit(student, train, val)
    with torch.no_grad():
        ref.eval(), student.eval()
        z_p = torch.cat([ref(x) for x, _ in val])
        z_q = torch.cat([student(x) for x, _ in val])  # the models' own logits, for both
    llv = llv_distance(z_p, z_q, rep_dim=2, input_sets=candidate_sets(cb))
    h = cb.history[-1]
    assert_close(h["d_llv"], float(llv.value), "d_llv")
    assert_close(h["llv_t2"], float(llv.t2), "t2")
    assert_close(h["kl"], float(mean_kl_divergence(z_p, z_q)), "kl")
    assert math.isnan(h["d_svd"]) and math.isnan(h["mcca"])
    # explicit LogitsOnly on both sides gives the same d_LLV
    cb2 = ReferenceComparison(ref, rep_dim=2, reference_extractor=LogitsOnly(), student_extractor=LogitsOnly())
    trainer(callbacks=[cb2]).validate(student, val, verbose=False)
    assert_close(cb2.history[-1]["d_llv"], float(llv.value), "d_llv LogitsOnly")
    assert cb2.last_results["llv"].candidate_sets.equal(cb.last_results["llv"].candidate_sets)


# ----------------------------------------------------------------------------------------------
# DistributedSampler padding (single process, explicit sampler of rank 1 of 2)
# ----------------------------------------------------------------------------------------------
def test_distributed_sampler_padding_is_not_counted():
    ref, student = make_pair()
    xv, yv = radial_dataset(41, 6, seed=1)  # 41 samples, 2 replicas: rank 1 gets 1, 3, ..., 39 and a padded copy of 0
    sampler = DistributedSampler(TensorDataset(xv, yv), num_replicas=2, rank=1, shuffle=False)
    loader = DataLoader(TensorDataset(xv, yv), batch_size=7, sampler=sampler)
    cb = ReferenceComparison(ref)
    trainer(use_distributed_sampler=False, callbacks=[cb]).validate(student, loader, verbose=False)
    assert cb.stats["padded_rows_dropped"] == 1
    assert cb.history[-1]["num_inputs"] == 20
    rows = DataLoader(TensorDataset(xv[1::2], yv[1::2]), batch_size=7)
    # ids are the global positions 1, 3, ..., 39 (= dataset indices): row (id - 1) / 2 of the kept data
    sets = candidate_sets(cb, lambda i: (i - 1) // 2)
    expected = compare(
        radial_representations(ref, rows), unembedding(ref.head), radial_representations(student, rows),
        unembedding(student.head), input_sets=sets, logits=(radial_logits(ref, rows), radial_logits(student, rows)),
        route="representation",
    ).as_dict()
    for key in KEYS:
        assert_close(cb.history[-1][key], expected[key], key)


# ----------------------------------------------------------------------------------------------
# plotting and the extractor on its own
# ----------------------------------------------------------------------------------------------
def test_plot_embeddings_and_extractor():
    from lightning_repsim.constructions import theorem31_pair

    pair = theorem31_pair(rho=5.0, n_per_class=20)
    fig = plot_embeddings(pair.emb_p, pair.emb_q, pair.labels, title="t", metrics={"kl": 0.1, "d_llv": 1.3})
    image = figure_to_array(fig)
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype.name == "uint8" and image.std() > 0
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        plot_embeddings(pair.emb_p[:, :1], pair.emb_q[:, :1])

    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 5), nn.Identity())
    ext = FinalLinear()
    x = torch.randn(6, 4)
    reps = ext(net, x)
    assert ext.head(net) is net[2]
    assert torch.allclose(reps.embeddings @ net[2].weight.T + net[2].bias, reps.logits)
    again = ext(net, x)  # second call: the located head, one hook
    assert torch.equal(again.embeddings, reps.embeddings) and again.unembedding.shape == (5, 4)


# ----------------------------------------------------------------------------------------------
# precision: the reference runs at the student's precision
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["64-true", "bf16-mixed", "bf16-true"])
def test_reference_runs_at_the_students_precision(precision):
    ref, student = make_pair()
    train, val = radial_loaders()
    cb = ReferenceComparison(ref)
    before = weights_fingerprint(ref)
    trainer(max_epochs=1, callbacks=[cb], precision=precision).fit(student, train, val)
    assert cb.reference_fingerprint == before  # taken before the conversion
    dtype = {"64-true": torch.float64, "bf16-mixed": torch.float32, "bf16-true": torch.bfloat16}[precision]
    assert all(p.dtype == dtype for p in cb.reference.parameters()) and all(p.dtype == dtype for p in student.parameters())
    assert all(p.dtype == torch.float32 for p in ref.parameters())  # a converted copy ran: the user's module is as given
    assert all(math.isfinite(cb.history[-1][key]) for key in KEYS)
    if precision == "64-true":  # both models ran in float64 on float64 batches: compare on float64 data
        x = torch.cat([b for b, _ in val]).double()
        ref64 = cb.reference  # the float64 copy the callback ran
        with torch.no_grad():
            f_p, f_q, z_p, z_q = ref64.body(x), student.body(x), ref64(x), student(x)
        expected = compare(f_p, unembedding(ref64.head), f_q, unembedding(student.head), input_sets=candidate_sets(cb),
                           logits=(z_p, z_q), route="representation").as_dict()
        for key in KEYS:
            assert_close(cb.history[-1][key], expected[key], key, rtol=1e-7)  # float64 batches of 50 vs all at once


@pytest.mark.parametrize("precision", ["32-true", "64-true", "bf16-mixed", "bf16-true"])
def test_identical_models_are_identical_under_every_precision(precision):
    """A reference that is a copy of the student: KL and d_LLV are 0, d_SVD 0 and mCCA 1 (to rounding), whatever the
    precision plugin (the reference is converted like the student and runs in its autocast context)."""
    _, student = make_pair(lr=0.0)  # fit leaves the weights as they are
    train, val = radial_loaders()
    cb = ReferenceComparison(copy.deepcopy(student))
    trainer(max_epochs=1, callbacks=[cb], precision=precision, limit_train_batches=1).fit(student, train, val)
    cb2 = ReferenceComparison(copy.deepcopy(student))
    trainer(callbacks=[cb2], precision=precision).validate(student, val, verbose=False)
    for h in (cb.history[-1], cb2.history[-1]):
        assert h["kl"] <= 1e-6 and h["d_llv"] <= 1e-6, (precision, h)
        assert h["d_svd"] <= 1e-6 and h["mcca"] >= 1 - 1e-6, (precision, h)


def test_the_users_reference_keeps_its_dtype_after_a_bf16_true_run():
    """Before: after a ``"bf16-true"`` run the user's reference object stayed bfloat16, so a later ``"32-true"`` run
    compared a bf16 reference with an fp32 copy of it (KL 2.5e-6, d_LLV 4.3e-3 instead of 0)."""
    _, student = make_pair(lr=0.0)
    _, val = radial_loaders()
    reference = copy.deepcopy(student)
    cb = ReferenceComparison(reference)
    trainer(callbacks=[cb], precision="bf16-true").validate(copy.deepcopy(student), val, verbose=False)
    assert all(p.dtype == torch.float32 for p in reference.parameters())
    assert all(p.dtype == torch.bfloat16 for p in cb.reference.parameters())
    for callback in (cb, ReferenceComparison(reference)):  # the same callback, or the same module in a new one
        trainer(callbacks=[callback], precision="32-true").validate(student, val, verbose=False)
        h = callback.history[-1]
        assert all(p.dtype == torch.float32 for p in callback.reference.parameters())
        assert h["kl"] == 0.0 and h["d_llv"] <= 1e-12 and h["mcca"] >= 1 - 1e-12, h


# ----------------------------------------------------------------------------------------------
# reporting: dropped rows, incompatible models, validate() results
# ----------------------------------------------------------------------------------------------
class NaNStudent(RadialNet):
    """Its logits are NaN for every third input (a diverging student)."""

    def forward(self, x):
        out = super().forward(x)
        bad = (torch.arange(x.shape[0], device=x.device) % 3 == 0)[:, None]
        return torch.where(bad, torch.full_like(out, float("nan")), out)


def test_non_finite_rows_are_skipped_and_reported_and_validate_returns_the_values():
    ref, _ = make_pair()
    pl.seed_everything(0, verbose=False)
    student = NaNStudent()
    _, val = radial_loaders()
    cb = ReferenceComparison(ref, reference_extractor=LogitsOnly(), student_extractor=LogitsOnly(), rep_dim=2)
    with pytest.warns(UserWarning, match="had non-finite outputs and were skipped"):
        (results,) = trainer(callbacks=[cb]).validate(student, val, verbose=False)
    h = cb.history[-1]
    nan_rows = sum(int((torch.arange(len(b)) % 3 == 0).sum()) for b, _ in val)
    assert h["num_dropped"] == nan_rows and h["num_inputs"] == 200 - nan_rows
    assert math.isfinite(h["kl"]) and math.isfinite(h["d_llv"])
    assert {"repsim/kl", "repsim/d_llv"} <= set(results)  # validate() without a logger returns them too


def test_models_with_different_label_sets_fail_before_training():
    pl.seed_everything(0, verbose=False)
    ref, student = RadialNet(k=7), RadialNet(k=6)
    train, val = radial_loaders()
    tr = trainer(callbacks=[ReferenceComparison(ref)], num_sanity_val_steps=1)
    with pytest.raises(ValueError, match="the reference predicts K=7 classes but the student K=6"):
        tr.fit(student, train, val)
    assert tr.global_step == 0  # refused in the sanity check, before any training step


def test_every_compared_batch_takes_the_same_path_with_or_without_a_sanity_check():
    """A fresh callback (head not located) and one whose head is known log the same values, also without a sanity
    check: the first batch's student representations come from its own validation forward, like all others."""
    ref, student = make_pair()
    _, val = radial_loaders()
    cb_fresh = ReferenceComparison(ref)
    trainer(callbacks=[cb_fresh], num_sanity_val_steps=0).validate(student, val, verbose=False)
    assert cb_fresh.stats["own_student_forward"] == 1 and cb_fresh.stats["reused_student_forward"] == 4
    trainer(callbacks=[cb_fresh], num_sanity_val_steps=0).validate(student, val, verbose=False)  # head known now
    assert cb_fresh.history[0] == cb_fresh.history[1]  # the same path and arithmetic on the same inputs: bit-identical


def test_low_precision_logits_are_recomputed_in_float32_with_the_bias():
    """bf16 logits (mixed precision) are not used for the statistics: they are recomputed in float32 from the
    embedding and the unembedding (bias as its last column); float32 logits are used as they are."""
    from lightning_repsim.callbacks.extraction import Representations
    from lightning_repsim.callbacks.metric_suite import logits_for_statistics

    gen = torch.Generator().manual_seed(0)
    f = torch.randn(2, 5, 3, generator=gen)
    unemb = torch.randn(7, 4, generator=gen)  # (K, M + 1): weights and bias
    exact = f.reshape(-1, 3).double() @ unemb[:, :3].double().T + unemb[:, 3].double()
    keep = torch.tensor([True, False, True, True, True, False, True, True, True, True])
    z = logits_for_statistics(Representations(exact.bfloat16().reshape(2, 5, 7), f, unemb), keep)
    assert z.dtype == torch.float32 and z.shape == (8, 7)
    torch.testing.assert_close(z.double(), exact[keep], rtol=1e-6, atol=1e-6)
    own = torch.randn(2, 5, 7, generator=gen)
    assert torch.equal(logits_for_statistics(Representations(own, f, unemb), None), own.reshape(-1, 7))


# ----------------------------------------------------------------------------------------------
# reuse of the student's forward: checked before it is trusted
# ----------------------------------------------------------------------------------------------
class ScaledInputStep(RadialNet):
    """Normalisation done in the step: validation_step runs the model on ``x * 2``."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x * 2.0), y))


class NoisyInputStep(RadialNet):
    """Noise added in the step (from the global generator, as augmentation code does)."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x + 0.05 * torch.randn_like(x)), y))


@pytest.mark.parametrize("cls", [ScaledInputStep, NoisyInputStep], ids=["scaled", "noisy"])
def test_a_validation_step_that_transforms_its_inputs_is_not_reused(cls):
    """Before: with identical weights the reused head outputs belonged to other inputs than the reference's (scaled:
    KL 0.021, d_LLV 0.145, mCCA 0.9925; noisy: KL 7e-4, d_LLV 0.126). The first batch's check finds it, warns once
    and the student's own forward is used: the identical models compare as identical."""
    pl.seed_everything(0, verbose=False)
    student = cls(lr=0.0)
    reference = copy.deepcopy(student)
    train, val = radial_loaders()
    cb = ReferenceComparison(reference)
    with pytest.warns(UserWarning, match="did not run its head on the batch's inputs") as caught:
        trainer(callbacks=[cb], num_sanity_val_steps=0, limit_train_batches=1).fit(student, train, val)
    assert sum("did not run its head" in str(w.message) for w in caught) == 1  # once per fit
    assert len(cb.history) == 2
    for h in cb.history:
        assert h["kl"] <= 1e-12 and h["d_llv"] <= 1e-9 and h["mcca"] >= 1 - 1e-9, h
    # each comparison checks its first batch again: the probe (epoch 0) and one check (epoch 1), then own forwards
    assert cb.stats["reused_student_forward"] == 0
    assert cb.stats["own_student_forward"] == 1 + 4 + 1 + 4


def test_a_reused_forward_that_agrees_is_trusted_without_a_warning(recwarn):
    ref, student = make_pair()
    _, val = radial_loaders()
    cb = ReferenceComparison(ref)
    trainer(callbacks=[cb], num_sanity_val_steps=0).validate(student, val, verbose=False)
    assert not [w for w in recwarn if "did not run its head" in str(w.message)]
    assert cb.stats == {"reused_student_forward": 4, "own_student_forward": 1, "padded_rows_dropped": 0}
