"""The examples' --quick modes run and show what their docstrings promise."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import load_example


def test_table1_quick(tmp_path):
    rows = load_example("table1").main(["--quick", "--out", str(tmp_path)])
    assert [r["rho"] for r in rows] == [1.0, 5.0, 20.0]
    assert rows[-1]["kl"] < 1e-3 < rows[0]["kl"]
    for r in rows:
        assert r["d_llv"] == pytest.approx(1.317, abs=0.01)
        assert r["mcca"] < 0.05
        assert r["d_svd_f"] > 0.95
    assert (tmp_path / "table1_quick.md").read_text().startswith("| rho |")
    assert (tmp_path / "table1_quick.png").stat().st_size > 1000


def test_radial_quick(tmp_path):
    """Figure 3 right, reduced: Lightning-trained two-tower models, pairwise d_LLV / d_SVD from the streaming metrics."""
    rows = load_example("radial").main(["--quick", "--out", str(tmp_path), "--no-cache"])
    assert [(r["K"], r["W"]) for r in rows] == [(4, 16), (4, 32)]
    kept = [r for r in rows if r["pairs"]]
    assert kept, "no pair of quick models reached test accuracy > 0.9"
    for r in kept:
        assert r["accurate"] == 2 and r["pairs"] == 1
        for key in ("d_llv", "d_svd", "kl", "mcca"):
            assert math.isfinite(r[f"{key}_mean"]) and r[f"{key}_mean"] >= 0
        assert r["d_svd_mean"] <= 1 and r["mcca_mean"] <= 1
    table = (tmp_path / "radial_quick.md").read_text()
    assert "| K | W |" in table and "| 4 | 32 |" in table
    assert (tmp_path / "radial_quick.png").stat().st_size > 1000
    assert (tmp_path / "radial_quick_pairs.csv").read_text().startswith("K,W,seed_a,seed_b")


def test_radial_layers_quick(tmp_path):
    """Layer-wise CKA between two seeds through ReferenceComparison(layers=..., layer_matrix=True)."""
    out = load_example("radial").main(["--layers", "--quick", "--out", str(tmp_path), "--no-cache"])
    matrix = out["matrix"]
    assert matrix["reference"] == matrix["student"] == ["net.f.1", "net.f.3", "net.f.5", "net.f.6"]
    values = torch.tensor(matrix["values"], dtype=torch.float64)
    assert values.shape == (4, 4) and bool(((values > 0) & (values <= 1 + 1e-12)).all())
    diagonal = [out["history"]["layers"][name]["cka"] for name in matrix["reference"]]
    assert diagonal == pytest.approx(values.diagonal().tolist(), rel=1e-12)
    assert out["metrics"]["repsim/layers/net.f.6/cka"] == pytest.approx(diagonal[-1], rel=1e-6)
    assert "| `net.f.1` |" in (tmp_path / "radial_layers_quick.md").read_text()
    assert (tmp_path / "radial_layers_quick.png").stat().st_size > 1000


def test_fake_cifar10_is_read_by_torchvision(tmp_path):
    cifar = load_example("cifar10")
    folder = cifar.write_fake_cifar10(tmp_path, n_train=60, n_test=20)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    )
    train = cifar.cifar10(tmp_path, train=True, download=False, verify_checksums=False)
    test = cifar.cifar10(tmp_path, train=False, download=False, verify_checksums=False)
    assert (len(train), len(test)) == (60, 20) and train.classes[0] == "airplane"
    x, y = train[0]
    assert x.shape == (3, 32, 32) and -1 <= float(x.min()) and float(x.max()) <= 1 and 0 <= y < 10
    with pytest.raises(RuntimeError):  # the real loader's md5 check refuses generated files
        cifar.cifar10(tmp_path, train=True, download=False)


def test_cifar10_quick(tmp_path):
    """Figure 3 left, reduced: the real torchvision CIFAR10 loader (download=False) on generated files in the
    on-disk format, two ResNet-18 seeds compared by the callback with the EmbedUnembed extractors."""
    cifar = load_example("cifar10")
    data = tmp_path / "data"
    cifar.write_fake_cifar10(data, n_train=200, n_test=30)
    threads = torch.get_num_threads()
    result = cifar.main(["--quick", "--data-root", str(data), "--out", str(tmp_path / "out"), "--no-progress", "--threads", "1"])
    assert torch.get_num_threads() == threads
    (h,) = result["history"]
    for key in ("kl", "d_llv", "d_svd", "mcca"):
        assert math.isfinite(h[key])
    assert h["num_inputs"] == 30
    assert result["png"].stat().st_size > 5000
    assert "| epoch | step |" in result["md"].read_text()


def test_demo_seeds_quick(tmp_path):
    """examples/demo_seeds.py --quick: one demo run (1 epoch per model) recorded with its acceptance check; a failing
    run is recorded, not raised."""
    example = load_example("demo_seeds")
    records = example.main(["--quick", "--digits-seeds", "0", "--out", str(tmp_path)])
    assert [(r["data"], r["seed"]) for r in records] == [("radial", 0), ("digits", 0)]
    for r in records:
        assert "error" not in r, r.get("error")
        assert set(r["summary"]["students"]) == {"kl", "logit"}
        assert set(r["acceptance"]) == {"max_kl", "d_llv_ratio", "mcca_gap", "ok"}
        assert r["acceptance"]["max_kl"] == max(v["kl"] for v in r["summary"]["students"].values())
    text = (tmp_path / "demo_seeds_quick.md").read_text()
    assert "`python examples/demo_seeds.py --quick --digits-seeds 0`" in text and "--out" not in text and "| radial | 0 |" in text
    assert (tmp_path / "demo_seeds_quick.json").exists()


def test_results_helpers():
    """examples/_results.py: the command recorded without --out, JSON-ready numbers."""
    helpers = load_example("_results")
    assert helpers.shown_args(["--quick", "--out", "/tmp/x", "--seeds", "3", "--out=/y"]) == ["--quick", "--seeds", "3"]
    assert helpers.compact({"a": 0.123456789, "b": (1, torch.tensor([2.5])), "c": float("nan")})["a"] == 0.1234568
    assert helpers.compact({"b": (1, torch.tensor([2.5]))}) == {"b": [1, [2.5]]}


def test_smaller_student_quick():
    """Students of widths 8, 4, 2 distilled from a width-8 teacher, compared at M = 8 by the callback: every value
    logged, d_SVD at or above the floor a student of that rank cannot go below, and below the sharp bound."""
    rows = load_example("smaller_student").main(["--quick"])
    assert [(r["width"], r["M"]) for r in rows] == [(8, 8), (4, 8), (2, 8)]
    for r in rows:
        for key in ("kl", "d_llv", "d_svd", "mcca", "floor"):
            assert math.isfinite(r[key]), key
        assert r["d_svd"] >= r["floor"] - 1e-12 and r["floor"] <= r["worst_floor"] + 1e-12
        assert r["d_svd"] <= r["bound_sharp"] + 1e-12
