"""The examples' --quick modes run and show what their docstrings promise."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


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
