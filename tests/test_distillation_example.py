"""examples/distillation.py --quick runs end to end and writes its table, plot and raw numbers."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "distillation.py"


def load_example():
    spec = importlib.util.spec_from_file_location("example_distillation", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_distillation_quick(tmp_path):
    example = load_example()
    results = example.main(["--quick", "--out", str(tmp_path)])
    assert list(results) == ["digits"]
    result = results["digits"]
    assert {"labels", "kd", "logit", "llv"} <= set(result["runs"])
    assert result["llv_selection"]["chosen"] in example.LLV_CANDIDATES
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
    assert "| student loss |" in text and "(d) LLVLoss" in text
    assert (tmp_path / "distillation_quick.png").stat().st_size > 1000
    raw = json.loads((tmp_path / "distillation_quick.json").read_text())
    assert raw["seeds"] == [1, 2] and "digits" in raw["results"]
