"""examples/language_model.py --quick runs end to end (a GPT-2 on a few stdlib files, no download) and writes its
table, plot and raw numbers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import load_example

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")



def finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def check_comparison(h: dict) -> None:
    for key in ("kl", "d_llv", "d_svd", "mcca"):
        assert finite(h[key]), (key, h)
    assert h["kl"] >= 0 and h["d_llv"] >= 0
    assert 0.0 <= h["d_svd"] <= 1.0 + 1e-9
    assert -1e-9 <= h["mcca"] <= 1.0 + 1e-9


def test_language_model_quick(tmp_path):
    example = load_example("language_model")
    threads = torch.get_num_threads()
    raw = example.main(["--quick", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads
    result = raw["result"]
    data = result["data"]
    assert data["files"]["train"] and data["files"]["val"]
    assert not {f["name"] for f in data["files"]["train"]} & {f["name"] for f in data["files"]["val"]}
    assert data["sequences"]["train"] >= 2 and data["sequences"]["val"] >= 2
    cfg = result["config"]
    assert data["tokens_used"]["val"] == data["sequences"]["val"] * cfg["seq_len"]

    ref = result["reference"]
    assert len(ref["val_curve"]) == 2 and all(finite(c["val_loss"]) for c in ref["val_curve"])  # init + 1 epoch
    assert ref["val_curve"][-1]["val_loss"] < ref["val_curve"][0]["val_loss"]  # it learns something

    assert set(result["runs"]) == set(example.LOSSES)
    for name, runs in result["runs"].items():
        assert [r["seed"] for r in runs] == [1], name
        for r in runs:
            # the callback compared before training and after the epoch, on every validation position
            assert [h["stage"] for h in r["history"]] == ["validate", "fit"], name
            for h in r["history"]:
                check_comparison(h)
                assert h["num_inputs"] == data["tokens_used"]["val"] and h["num_dropped"] == 0
                assert h["rep_dim"] == cfg["n_embd"] - 1  # lm_head's input is the final LayerNorm's output
            check_comparison(r["final"])
            assert finite(r["final"]["val_loss"]) and r["final"]["val_loss"] > 0
            if name != "ce":
                assert finite(r["train_curve"][-1]["term"]) and r["train_curve"][-1]["term"] >= 0
        for metric in example.METRICS:
            mean, std = result["summary"][name][metric]
            assert finite(mean) and std == 0.0

    text = (tmp_path / "language_model_quick.md").read_text()
    assert "## Part 1" in text and "## Part 2" in text and "| student loss |" in text
    assert "python examples/language_model.py --quick" in text
    assert (tmp_path / "language_model_quick.png").stat().st_size > 5000
    saved = json.loads((tmp_path / "language_model_quick.json").read_text())
    assert saved["result"]["data"]["files"] == data["files"]
    assert saved["result"]["summary"]["kd"]["kl"][0] == pytest.approx(result["summary"]["kd"]["kl"][0], rel=1e-6)

    # the markdown and the plot can be rewritten from the JSON alone
    again = tmp_path / "again"
    example.main(["--report", str(tmp_path / "language_model_quick.json"), "--out", str(again)])
    assert (again / "language_model_quick.md").read_text() == text
