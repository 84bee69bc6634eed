"""ReferenceComparison with an offline WandbLogger: scalars, the per-epoch table, the line plot and the
embedding image end up in the offline run's files; other loggers (CSV) get the scalars."""

from __future__ import annotations

import csv
import json
import math
import os

import pytest
from test_callback import KEYS, assert_close, expected_report, make_pair, radial_loaders, trainer

from lightning_repsim.callbacks import ReferenceComparison
from tests.conftest import finish_wandb_run, read_wandb_run

wandb = pytest.importorskip("wandb")


def logged_history(run_dir: str) -> list[dict]:
    """The ``wandb.log`` rows of a finished offline run (the reader is in conftest, shared with the demo's test)."""
    return read_wandb_run(run_dir).history


def read_json(path: str):
    with open(path) as fh:
        return json.load(fh)


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Offline, silent wandb writing only under tmp_path. Every environment variable is restored afterwards
    (monkeypatch for ours; a snapshot for those that wandb or Lightning's seeding set)."""
    snapshot = dict(os.environ)
    for name in list(os.environ):
        if name.startswith("WANDB_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    touched = {k for k in os.environ if k.startswith("WANDB_")} | {k for k in snapshot if k.startswith("WANDB_")}
    yield tmp_path
    wandb.finish()
    for name in set(os.environ) - set(snapshot) - touched - {"PYTEST_CURRENT_TEST"}:
        del os.environ[name]
    for name, value in snapshot.items():
        if name not in touched and name != "PYTEST_CURRENT_TEST" and os.environ.get(name) != value:
            os.environ[name] = value


def test_wandb_offline_run_has_scalars_table_plot_and_image(wandb_env):
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    tmp = wandb_env
    ref, student = make_pair()
    train, val = radial_loaders()
    cb = ReferenceComparison(ref, prefix="cmp")
    wl = WandbLogger(offline=True, save_dir=str(tmp), project="repsim-test")
    cl = CSVLogger(str(tmp), name="csv")
    tr = trainer(tmp, callbacks=[cb], logger=[wl, cl], log_every_n_steps=1)
    tr.fit(student, train, val)
    files_dir = wl.experiment.dir  # .../wandb/offline-run-*/files
    finish_wandb_run(wl.experiment)  # the whole run on disk before it is read

    expected = expected_report(ref, student, val, cb)
    history = logged_history(os.path.dirname(files_dir))
    summary: dict = {}
    for row in history:
        summary.update(row)
    scalar_rows = [row for row in history if "cmp/d_llv" in row]
    assert len(scalar_rows) == 2  # one per epoch
    for key in KEYS:
        assert_close(summary[f"cmp/{key}"], expected[key], f"wandb {key}")
    run_dir = files_dir

    # the per-epoch table: one row per epoch with every value
    table_dir = os.path.join(run_dir, "media", "table", "cmp")
    tables = sorted(f for f in os.listdir(table_dir) if f.startswith("table_") and f.endswith(".table.json"))
    assert tables, os.listdir(os.path.join(run_dir, "media", "table"))
    last = max((read_json(os.path.join(table_dir, f)) for f in tables), key=lambda t: len(t["data"]))
    assert last["columns"] == ["epoch", "global_step", "stage", "num_inputs", *KEYS]
    assert [row[0] for row in last["data"]] == [0, 1]
    final = dict(zip(last["columns"], last["data"][-1]))
    for key in KEYS:
        assert_close(final[key], expected[key], f"table {key}", rtol=1e-12)
    assert summary["cmp/table/_type"] == "table-file"

    # the embedding image (M = 2) and the line plot
    assert summary["cmp/embeddings/_type"] == "images/separated"
    images = os.listdir(os.path.join(run_dir, "media", "images", "cmp"))
    assert any(name.startswith("embeddings") and name.endswith(".png") for name in images)
    assert summary["cmp/curves_table/_type"] == "table-file"  # a custom chart's data is stored as "<key>_table"
    curves = [f for f in os.listdir(table_dir) if f.startswith("curves_table_")]
    curve = max((read_json(os.path.join(table_dir, f)) for f in curves), key=lambda t: len(t["data"]))
    assert curve["columns"] == ["step", "lineKey", "lineVal"]
    assert {row[1] for row in curve["data"]} == {"kl", "d_llv", "d_svd", "mcca"} and len(curve["data"]) == 8

    # the CSV logger got the same scalars
    with open(os.path.join(cl.log_dir, "metrics.csv")) as fh:
        rows = list(csv.DictReader(fh))
    logged = [r for r in rows if r.get("cmp/d_llv")]
    assert len(logged) == 2
    assert_close(float(logged[-1]["cmp/d_llv"]), expected["d_llv"], "csv d_llv", rtol=1e-12)
    assert math.isfinite(float(logged[0]["cmp/kl"]))
