"""examples/distillation.py --quick runs end to end and writes its table, plot and raw numbers."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import load_example


def test_distillation_quick(tmp_path):
    example = load_example("distillation")
    results = example.main(["--quick", "--out", str(tmp_path)])
    assert list(results) == ["digits"]
    result = results["digits"]
    assert set(result["runs"]) == set(example.LOSSES) >= {"labels", "kd", "kd1", "logit", "llv", "recipe"}
    assert result["llv_selection"]["chosen"] in example.LLV_CANDIDATES
    # the LLVLoss recipe (e): chosen on validation data among the candidates, against a KD (T=4) student of the same seed
    sel = result["recipe_selection"]
    assert sel["chosen"] in example.RECIPE_CANDIDATES and sel["setting"] == example.RECIPE_CANDIDATES[sel["chosen"]]
    assert [r["setting"] for r in sel["sweep"]] == list(example.RECIPE_CANDIDATES)
    assert 0.0 <= sel["kd_reference"]["acc"] <= 1.0 and math.isfinite(sel["kd_reference"]["d_llv"])
    assert set(result["recipe_acceptance"]) >= {"d_acc", "mcca", "seeds_lower_d_svd", "holds"}
    assert {"recipe_vs_kd", "recipe_vs_kd1", "llv_vs_kd", "logit_vs_kd"} <= set(result["verdict"])
    for name, runs in result["runs"].items():
        assert [r["seed"] for r in runs] == [1, 2], name
        for run in runs:
            for metric in ("acc", "agree", "kl", "d_llv", "d_svd", "mcca"):
                assert math.isfinite(run["test"][metric]), (name, metric)
            assert 0.0 <= run["test"]["acc"] <= 1.0 and 0.0 <= run["test"]["agree"] <= 1.0
            assert -1e-9 <= run["test"]["mcca"] <= 1.0 + 1e-9
            # the callback compared once before training and after each of the 2 epochs
            assert run["history"]["stage"] == ["validate", "fit", "fit"]
            assert all(math.isfinite(v) for key in ("mcca", "d_svd") for v in run["history"][key])
            assert len(run["val_curve"]["agree"]) == 3
        for metric in ("acc", "agree", "kl", "d_llv", "d_svd", "mcca"):
            mean, std = result["summary"][name][metric]
            assert math.isfinite(mean) and math.isfinite(std)
    text = (tmp_path / "distillation_quick.md").read_text()
    assert "| student loss |" in text and "(d) LLVLoss" in text and "(e) LLVLoss recipe" in text
    assert "| recipe |" in text and "KD, T=4 (reference)" in text and "| acceptance (paired by seed) |" in text
    assert (tmp_path / "distillation_quick.png").stat().st_size > 1000
    raw = json.loads((tmp_path / "distillation_quick.json").read_text())
    assert raw["seeds"] == [1, 2] and "digits" in raw["results"]


def test_recipe_loss_uses_labels_and_teacher():
    """The recipe is LLVLoss + w_kd KD(T=4) + w_ce CE: zero distillation terms when the student equals the teacher,
    and the CE term reads the labels."""
    import torch

    example = load_example("distillation")
    teacher = torch.randn(64, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = teacher.argmax(-1)
    kd_only = example.Recipe(5, {"input_terms": False}, kd=0.1)
    assert abs(float(kd_only(teacher + 1.0, teacher, labels))) < 1e-12  # same distribution: LLV and KD vanish
    with_ce = example.Recipe(5, {"input_terms": False}, ce=1.0)
    ce = torch.nn.functional.cross_entropy(teacher, labels)
    assert float(with_ce(teacher + 1.0, teacher, labels)) == pytest.approx(float(ce))
    assert example.make_loss("recipe", 5, example.RECIPE_CANDIDATES["llv+kd0.3"]).llv.input_terms
