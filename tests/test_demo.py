"""The first-run demo (``python -m lightning_repsim.demo``): quick configuration, summary.json, the offline wandb run
read back, the report alone, and the full demo's message on its default seed (about 30 s on one core)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from lightning_repsim.callbacks import METRIC_KEYS
from lightning_repsim.demo import STUDENTS, acceptance, load_data, load_digits_split, load_radial_split, main, report
from lightning_repsim.demo.tables import StudentsTable
from tests.conftest import finish_wandb_run, read_wandb_run

SUMMARY_KEYS = {"kl", "d_llv", "d_svd", "mcca", "accuracy", "agreement"}


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


def test_data_splits_are_fixed():
    x_tr, y_tr, x_te, y_te = load_radial_split()
    assert x_tr.shape == (8000, 2) and x_te.shape == (2000, 2)
    assert int(y_tr.max()) == 5 and torch.bincount(y_te, minlength=6).min() >= 200  # every class held out
    assert torch.equal(load_radial_split()[3], y_te) and not torch.equal(x_tr[:2000], x_te)
    x_tr, y_tr, x_te, y_te = load_digits_split()
    assert x_tr.shape[1] == 64 and len(y_tr) + len(y_te) == 1797
    assert float(x_tr.max()) <= 1.0 and float(x_tr.min()) >= 0.0
    assert torch.bincount(y_te, minlength=10).min() >= 40
    data = load_data("digits")
    assert data.num_classes == 10 and data.in_dim == 64 and data.collate is not None
    with pytest.raises(ValueError, match="unknown data set"):
        load_data("cifar")


def check_summary(summary: dict, num_test: int) -> None:
    """The documented schema of summary.json: {"students": {name: {kl, d_llv, d_svd, mcca, accuracy, agreement}},
    "teacher_accuracy": ...} (plus the run's settings)."""
    assert set(summary["students"]) == set(STUDENTS) == {"kl", "logit"}
    assert 0.0 <= summary["teacher_accuracy"] <= 1.0
    assert abs(summary["teacher_accuracy"] * num_test - round(summary["teacher_accuracy"] * num_test)) < 1e-9
    for name, values in summary["students"].items():
        assert set(values) == SUMMARY_KEYS, name
        assert all(isinstance(v, float) and math.isfinite(v) for v in values.values()), name
        assert values["kl"] >= 0 and values["d_llv"] >= 0 and 0 <= values["d_svd"] <= 1 and 0 <= values["mcca"] <= 1
        for key in ("accuracy", "agreement"):  # a multiple of 1/num_test
            assert 0 <= values[key] <= 1 and abs(values[key] * num_test - round(values[key] * num_test)) < 1e-6
    assert summary["num_test"] == num_test


def test_demo_quick_logs_everything(offline_wandb, capsys):
    import wandb

    threads = torch.get_num_threads()
    wandb.init(project="before-the-demo").finish()  # the process already uses wandb: a service is running
    env_before = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    out = offline_wandb / "demo"
    result = main(["--quick", "--out", str(out), "--no-progress"])

    # each student's callback compared after every epoch; every metric is defined (K = 6 >= M + 2)
    assert set(result["histories"]) == {"kl", "logit"}
    for name, history in result["histories"].items():
        assert [h["epoch"] for h in history] == [0, 1, 2], name
        for h in history:
            for key in METRIC_KEYS:
                assert math.isfinite(h[key]), (name, key)
            assert h["num_inputs"] == 2000
    # the two students are different models: their comparisons differ
    assert result["histories"]["kl"][-1]["d_llv"] != result["histories"]["logit"][-1]["d_llv"]
    assert [r["epoch"] for r in result["rows"]] == [1, 2, 3]
    assert all(0 <= r[name]["agree"] <= 1 for r in result["rows"] for name in ("kl", "logit"))

    # summary.json: the documented schema, the same numbers as the callbacks' last entries
    summary = json.loads(result["summary_path"].read_text())
    assert result["summary_path"] == out.resolve() / "summary.json"
    check_summary(summary, 2000)
    for name in ("kl", "logit"):
        for key in ("kl", "d_llv", "d_svd", "mcca"):
            assert summary["students"][name][key] == pytest.approx(result["histories"][name][-1][key], rel=1e-12)
        assert summary["students"][name]["agreement"] == pytest.approx(result["rows"][-1][name]["agree"])
        assert summary["students"][name]["accuracy"] == pytest.approx(result["rows"][-1][name]["acc"])
    assert summary["teacher_accuracy"] == pytest.approx(result["teacher_acc"])
    assert set(acceptance(summary)) == {"max_kl", "d_llv_ratio", "mcca_gap", "ok"}

    # the printed per-epoch table, the final table and where the outputs went
    text = capsys.readouterr().out
    for needle in ("KL student", "logit student", "d_LLV", "d_SVD", "mCCA", "Final", "teacher", "summary.json",
                   "Outputs in", "wandb sync", "embeddings.png"):
        assert needle in text, needle

    # files: the three-panel PNG, CSV with both callbacks' columns, wandb offline run with both students' values
    assert result["png"].stat().st_size > 20000
    header = result["csv"].read_text().splitlines()[0].split(",")
    for name in ("kl", "logit"):
        assert {f"{name}_student/{k}" for k in ("kl", "d_llv", "d_svd", "mcca")} <= set(header)
        assert {f"val_acc/{name}", f"agreement/{name}"} <= set(header)
    # the offline wandb run, read back as soon as main() returned: finished and complete on disk (its exit record is
    # there), one row per epoch with each student's values of that epoch, the pictures and the final summary
    run_dir = result["wandb_dir"]
    assert run_dir.is_dir() and run_dir.name.startswith("offline-run-")
    run = read_wandb_run(run_dir, complete=True)
    for name in ("kl", "logit"):
        rows = [row for row in run.history if f"{name}_student/d_llv" in row]
        history = result["histories"][name]
        assert [row["epoch"] for row in rows] == [h["epoch"] for h in history] == [0, 1, 2], name
        for row, h in zip(rows, history):
            for key in METRIC_KEYS:
                if math.isfinite(h[key]):
                    assert row[f"{name}_student/{key}"] == pytest.approx(h[key], rel=1e-12), (name, key, h["epoch"])
        pictures = [row[f"{name}_student/embeddings/_type"] for row in run.history if f"{name}_student/embeddings/_type" in row]
        assert pictures == ["images/separated"] * 3, name  # one picture per epoch
        for key in ("kl", "d_llv", "d_svd", "mcca", "accuracy", "agreement"):
            assert run.summary[f"final/{name}/{key}"] == pytest.approx(summary["students"][name][key], rel=1e-12)
    assert [row["demo/embeddings/_type"] for row in run.history if "demo/embeddings/_type" in row] == ["images/separated"]

    # called as a function, the demo leaves the process as it found it, and wandb usable: the service it shut down to
    # complete its run is not pointed to any more (wandb starts a new one)
    assert torch.get_num_threads() == threads
    assert dict(os.environ) == env_before and "WANDB_SERVICE" not in os.environ
    finish_wandb_run(wandb.init(project="after-the-demo"))


def test_demo_without_wandb_restores_environment(tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.startswith("WANDB_"):
            monkeypatch.delenv(name)
    result = main(["--epochs", "1", "--out", str(tmp_path), "--no-wandb", "--no-progress", "--seed", "3"])
    assert result["wandb_dir"] is None and result["csv"].exists()
    assert all(len(h) == 1 for h in result["histories"].values())
    summary = json.loads((tmp_path / "summary.json").read_text())
    check_summary(summary, 2000)
    assert summary["seed"] == 3 and summary["student_seed"] == 4
    assert not any(name.startswith("WANDB_") for name in os.environ)


def test_report_alone_prints_the_tables_and_the_message(capsys):
    """The report needs only the numbers: the final table and the message from a summary, no training."""

    def student(kl, d_llv, d_svd, mcca):
        return {"kl": kl, "d_llv": d_llv, "d_svd": d_svd, "mcca": mcca, "accuracy": 0.99, "agreement": 0.995}

    summary = {"students": {"kl": student(0.02, 1.2, 0.28, 0.886), "logit": student(0.009, 0.0098, 6.2e-5, 0.9999)},
               "teacher_accuracy": 0.996, "epochs": 30, "num_test": 2000}
    table = StudentsTable({name: None for name in STUDENTS})
    table.rows = [{"epoch": e, "kl": {"acc": 0.9, "agree": 0.9, **{k: summary["students"]["kl"][k] for k in
                                                                  ("kl", "d_llv", "d_svd", "mcca")}},
                   "logit": {"acc": 0.9, "agree": 0.9, **{k: summary["students"]["logit"][k] for k in
                                                          ("kl", "d_llv", "d_svd", "mcca")}}} for e in range(1, 31)]
    check = acceptance(summary)
    assert check["ok"]
    report.print_results(table, summary, check, full_epochs=30)
    text = capsys.readouterr().out
    assert [line.split("|")[0].strip() for line in text.splitlines() if "|" in line][2:] == ["1", "2", "3", "5", "10",
                                                                                           "20", "30"]
    assert "logit student     0.9900  0.995  0.0090  0.0098  6.2e-05 0.9999" in text
    assert "d_LLV 1.200 vs 0.0098 (122x apart)" in text and "Check (both KL <= 0.05" in text and "holds" in text
    assert "The logit student's embedding is nearly a linear map of the teacher's" in text


def test_module_entry_point_answers_help():
    out = subprocess.run([sys.executable, "-m", "lightning_repsim.demo", "--help"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.startswith("usage: python -m lightning_repsim.demo") and "--quick" in out and "--no-wandb" in out


def test_acceptance_rule():
    def summary(kl_a, llv_a, mcca_a, kl_b, llv_b, mcca_b):
        base = {"d_svd": 0.1, "accuracy": 0.99, "agreement": 0.99}
        return {"students": {"kl": {"kl": kl_a, "d_llv": llv_a, "mcca": mcca_a, **base},
                             "logit": {"kl": kl_b, "d_llv": llv_b, "mcca": mcca_b, **base}}, "teacher_accuracy": 0.99}

    assert acceptance(summary(0.02, 1.2, 0.89, 0.01, 0.01, 1.0))["ok"]
    assert not acceptance(summary(0.06, 1.2, 0.89, 0.01, 0.01, 1.0))["ok"]  # KL too large
    assert not acceptance(summary(0.02, 0.09, 0.89, 0.01, 0.01, 1.0))["ok"]  # d_LLV only 9x apart
    assert not acceptance(summary(0.02, 1.2, 0.96, 0.01, 0.01, 1.0))["ok"]  # mCCA only 0.04 apart


def test_demo_default_seed_shows_the_contrast(tmp_path, monkeypatch):
    """The acceptance of the demo on its default seed: both students' final KL <= 0.05 nats, their d_LLV >= 10x
    apart, their mCCA >= 0.05 apart (examples/demo_seeds.py checks seeds 1 and 2 too)."""
    for name in list(os.environ):
        if name.startswith("WANDB_"):
            monkeypatch.delenv(name)
    result = main(["--out", str(tmp_path), "--no-wandb", "--no-progress"])
    summary = result["summary"]
    check_summary(summary, 2000)
    check = acceptance(summary)
    assert check["max_kl"] <= 0.05 and check["d_llv_ratio"] >= 10 and check["mcca_gap"] >= 0.05, check
    assert summary["students"]["logit"]["d_llv"] < summary["students"]["kl"]["d_llv"]
    for values in summary["students"].values():
        assert values["agreement"] >= 0.98
