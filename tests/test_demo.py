"""The first-run demo (``python -m lightning_repsim.demo``) in its quick configuration."""

from __future__ import annotations

import math
import os

import pytest
import torch

from lightning_repsim.callbacks import METRIC_KEYS
from lightning_repsim.demo import load_digits_split, main


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """Offline, silent wandb writing only under tmp_path (monkeypatch restores every variable)."""
    for name in list(os.environ):
        if name.startswith("WANDB_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    return tmp_path


def test_digits_split_is_fixed_and_stratified():
    x_tr, y_tr, x_te, y_te = load_digits_split()
    assert x_tr.shape[1] == 64 and len(y_tr) + len(y_te) == 1797
    assert float(x_tr.max()) <= 1.0 and float(x_tr.min()) >= 0.0
    assert torch.bincount(y_te, minlength=10).min() >= 40  # every class in the test set
    assert torch.equal(load_digits_split()[3], y_te)


def test_demo_quick_logs_everything(offline_wandb, capsys):
    threads = torch.get_num_threads()
    env_before = dict(os.environ)
    out = offline_wandb / "demo"
    result = main(["--quick", "--out", str(out), "--no-progress"])

    # the callback compared after every epoch; every metric is defined (K = 10 >= M + 2)
    history = result["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    for h in history:
        for key in METRIC_KEYS:
            assert math.isfinite(h[key]), key
        assert h["kl"] >= 0 and h["d_llv"] > 0 and 0 <= h["d_svd"] <= 1 and 0 <= h["mcca"] <= 1
        assert h["bound_sharp"] == pytest.approx(2 * h["d_llv"] ** 2)
    assert len(result["rows"]) == 3 and 0 <= result["agreement"] <= 1

    # the printed table and the closing summary
    text = capsys.readouterr().out
    assert "d_LLV" in text and "mCCA" in text and "Outputs in" in text and "wandb sync" in text

    # files: embedding PNG, CSV with the callback's columns, wandb offline run with the repsim values
    assert result["png"].stat().st_size > 5000
    header = result["csv"].read_text().splitlines()[0].split(",")
    assert {"repsim/kl", "repsim/d_llv", "repsim/d_svd", "repsim/mcca", "val_acc"} <= set(header)
    run_dir = result["wandb_dir"]
    assert run_dir.is_dir() and run_dir.name.startswith("offline-run-")
    from test_callback_wandb import logged_history

    summary: dict = {}
    for row in logged_history(str(run_dir)):
        summary.update(row)
    for key in ("kl", "d_llv", "d_svd", "mcca", "bound_sharp"):
        assert summary[f"repsim/{key}"] == pytest.approx(history[-1][key], rel=1e-6)
    assert summary["repsim/embeddings/_type"] == "images/separated"

    # called as a function, the demo leaves the process as it found it
    assert torch.get_num_threads() == threads
    assert dict(os.environ) == env_before


def test_demo_without_wandb_restores_environment(tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.startswith("WANDB_"):
            monkeypatch.delenv(name)
    result = main(["--epochs", "1", "--out", str(tmp_path), "--no-wandb", "--no-progress"])
    assert result["wandb_dir"] is None and result["csv"].exists()
    assert len(result["history"]) == 1
    assert not any(name.startswith("WANDB_") for name in os.environ)
