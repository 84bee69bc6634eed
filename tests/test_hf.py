"""Hugging Face language models as a tested path: GPT2LMHeadModel built from a config (never downloaded), a
byte-level BPE trained here on text that ships with this repository, padded batches with an int64
attention_mask, through the callback, the metrics and the losses."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_repsim import KDLoss, LLVDistance, LLVLoss, LogitDistanceLoss, MeanKLDivergence, ReferenceComparison
from lightning_repsim.functional import DiversityWarning, compare, llv_distance

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

VOCAB = 300
WIDTH = 32


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE trained on this package's own source (no download)."""
    tok = tokenizers.ByteLevelBPETokenizer()
    files = sorted(str(p) for p in (Path(__file__).resolve().parents[1] / "lightning_repsim").rglob("*.py"))
    tok.train(files, vocab_size=VOCAB, min_frequency=2, special_tokens=["<pad>"], show_progress=False)
    tok.enable_padding(pad_id=tok.token_to_id("<pad>"), pad_token="<pad>", direction="left")  # left padding
    tok.enable_truncation(max_length=24)
    return tok


def batches(tokenizer, n_batches=3, batch_size=4, seed=0):
    text = (Path(__file__).resolve().parents[1] / "lightning_repsim" / "losses.py").read_text().splitlines()
    lines = [line.strip() for line in text if len(line.strip()) > 10]
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lines), generator=g)[: n_batches * batch_size].tolist()
    out = []
    for b in range(n_batches):
        enc = tokenizer.encode_batch([lines[i] for i in order[b * batch_size : (b + 1) * batch_size]])
        out.append({
            "input_ids": torch.tensor([e.ids for e in enc]),
            "attention_mask": torch.tensor([e.attention_mask for e in enc], dtype=torch.int64),
        })
    return out


def gpt2(seed: int, vocab: int = VOCAB) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab, n_embd=WIDTH, n_layer=2, n_head=2, n_positions=64,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


class LM(pl.LightningModule):
    def __init__(self, seed: int = 0, vocab: int = VOCAB) -> None:
        super().__init__()
        self.model = gpt2(seed, vocab)

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)

    def training_step(self, batch, batch_idx):
        out = self.model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
        return out.loss

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def trainer(**kwargs) -> pl.Trainer:
    defaults = dict(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, accelerator="cpu", devices=1)
    return pl.Trainer(**{**defaults, **kwargs})


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_identical_gpt2_models_compare_as_identical(tokenizer, precision):
    data = batches(tokenizer)
    student = LM(seed=0)
    cb = ReferenceComparison(copy.deepcopy(student), log_media=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiversityWarning)  # the LayerNorm-final embedding is handled (rank-aware)
        trainer(precision=precision, callbacks=[cb]).validate(student, DataLoader(data, batch_size=None), verbose=False)
    h = cb.history[-1] if cb.history else None
    assert h is not None and h["num_inputs"] == sum(int(b["attention_mask"].sum()) for b in data)
    assert h["kl"] <= 1e-6 and h["d_llv"] <= 1e-6, h
    assert h["d_svd"] <= 1e-9 and h["mcca"] >= 1 - 1e-9, h
    assert h["rep_dim"] == WIDTH - 1  # ln_f's constraint


def test_gpt2_through_the_callback_equals_compare_and_the_reference_sees_the_mask(tokenizer):
    data = batches(tokenizer)
    reference, student = LM(seed=1).model, LM(seed=0)
    seen = []
    reference.register_forward_pre_hook(lambda module, args, kwargs: seen.append(sorted(kwargs)), with_kwargs=True)
    cb = ReferenceComparison(reference, log_media=False)
    trainer(callbacks=[cb]).validate(student, DataLoader(data, batch_size=None), verbose=False)
    assert cb.student_extractor.head(student) is student.model.lm_head
    assert all("attention_mask" in keys for keys in seen)  # left padding: the mask matters
    h = cb.history[-1]
    with torch.no_grad():
        outs = [(reference(**b, output_hidden_states=True), student.model(**b, output_hidden_states=True)) for b in data]
    keep = [b["attention_mask"].bool() for b in data]
    f_p = torch.cat([o[0].hidden_states[-1][k] for o, k in zip(outs, keep)]).double()
    f_q = torch.cat([o[1].hidden_states[-1][k] for o, k in zip(outs, keep)]).double()
    z_p = torch.cat([o[0].logits[k] for o, k in zip(outs, keep)])
    z_q = torch.cat([o[1].logits[k] for o, k in zip(outs, keep)])
    ids = torch.cat([(i * 4 + torch.arange(4))[:, None] * 2**20 + torch.arange(b["input_ids"].shape[1])
                     for i, b in enumerate(data)])
    masks = torch.cat(keep)
    row_of = {int(t): r for r, t in enumerate(ids[masks].tolist())}
    llv = cb.last_results["svd"].llv
    sets = llv.candidate_sets.cpu().apply_(lambda i: row_of[i])
    w_p, w_q = reference.lm_head.weight.detach().double(), student.model.lm_head.weight.detach().double()
    expected = compare(f_p, w_p, f_q, w_q, input_sets=sets, logits=(z_p, z_q), route="representation")
    for key, value in (("kl", expected.kl), ("d_llv", expected.llv.value), ("llv_t1", expected.llv.t1),
                       ("llv_t2", expected.llv.t2)):
        assert abs(h[key] - float(value)) <= 1e-9 * abs(float(value)), key


def test_gpt2_fit_logs_every_epoch(tokenizer):
    """A short fit with the callback attached trains and logs every epoch (the LM path end to end)."""
    data = batches(tokenizer, n_batches=2)
    reference, student = LM(seed=1), LM(seed=0)
    cb = ReferenceComparison(reference, log_media=False)
    loader = DataLoader(data, batch_size=None)
    trainer(max_epochs=2, num_sanity_val_steps=1, callbacks=[cb]).fit(student, loader, loader)
    assert [h["epoch"] for h in cb.history] == [0, 1]
    assert all(math.isfinite(h["kl"]) and math.isfinite(h["d_llv"]) for h in cb.history)


def test_gpt2_metrics_and_losses(tokenizer):
    data = batches(tokenizer)
    reference, student = gpt2(1), gpt2(0)
    llv, kl = LLVDistance(rep_dim=WIDTH), MeanKLDivergence()
    for b in data:
        with torch.no_grad():
            z_p, z_q = reference(**b).logits, student(**b).logits
        llv.update(z_p, z_q, mask=b["attention_mask"])  # (B, T, V) with an int64 mask
        kl.update(z_p, z_q, mask=b["attention_mask"])
    with torch.no_grad():
        zp = torch.cat([reference(**b).logits[b["attention_mask"].bool()] for b in data])
        zq = torch.cat([student(**b).logits[b["attention_mask"].bool()] for b in data])
    assert abs(float(kl.compute()) - float(torch.nn.functional.kl_div(
        torch.log_softmax(zq.double(), -1), torch.log_softmax(zp.double(), -1), log_target=True, reduction="batchmean"))) < 1e-9
    res = llv.compute_result()
    full = llv_distance(zp, zq, rep_dim=WIDTH)  # the label terms do not depend on the candidate input sets
    assert res.num_inputs == zp.shape[0] and (res.label_pivot, res.leave_out) == (full.label_pivot, full.leave_out)
    assert abs(float(res.t1) - float(full.t1)) <= 1e-9 * float(full.t1)
    # losses on (B, T, V) with an int64 mask: finite, differentiable, scale-free at vocabulary size with class_reduction="mean"
    b = data[0]
    logits = student(**b).logits
    with torch.no_grad():
        teacher = reference(**b).logits
    for loss in (LogitDistanceLoss(class_reduction="mean"), KDLoss(), LLVLoss(rep_dim=4)):
        value = loss(logits, teacher, mask=b["attention_mask"])
        assert torch.isfinite(value)
        (grad,) = torch.autograd.grad(value, logits, retain_graph=True)
        assert torch.isfinite(grad).all() and grad[b["attention_mask"] == 0].abs().max() == 0
    big = torch.randn(64, 8192), torch.randn(64, 8192)
    assert LogitDistanceLoss()(*big) > 10_000 and 1.5 < float(LogitDistanceLoss(class_reduction="mean")(*big)) < 2.5
