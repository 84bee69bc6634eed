"""Shared fixtures: the reference cases computed by the paper authors' implementation; loading the examples."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The paper authors' reference cases, bundled with the repository (provenance and format: its README).
REFERENCE_DIR = Path(os.environ.get("REPSIM_REFERENCE_DIR", REPO_ROOT / "tests" / "data" / "reference_cases"))
REFERENCE_FILES = sorted(REFERENCE_DIR.glob("*.npz"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

EXAMPLES = REPO_ROOT / "examples"


def load_example(name: str):
    """The script ``examples/<name>.py`` imported as a module (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def load_reference(path: Path) -> dict[str, torch.Tensor]:
    """A reference case as float64/int64 torch tensors (scalars as 0-d tensors)."""
    with np.load(path) as data:
        return {key: torch.from_numpy(np.array(data[key])) for key in data.files}


@pytest.fixture(params=REFERENCE_FILES, ids=[p.stem for p in REFERENCE_FILES])
def reference_case(request) -> dict[str, torch.Tensor]:
    return load_reference(request.param)


def pytest_collection_modifyitems(config, items):
    if not REFERENCE_FILES:
        raise pytest.UsageError(f"no reference cases found in {REFERENCE_DIR} (set REPSIM_REFERENCE_DIR)")


def assert_rel(actual, expected, rtol: float = 1e-9, name: str = "", atol: float = 0.0) -> None:
    """Elementwise relative agreement (absolute for exact zeros); differences below ``atol`` always pass (for
    quantities that are zero up to rounding, e.g. an m_SVD of 1e-17)."""
    a = torch.as_tensor(actual, dtype=torch.float64).flatten()
    e = torch.as_tensor(expected, dtype=torch.float64).flatten()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    err = (a - e).abs() / e.abs().clamp_min(1e-300)
    err = torch.where(e == 0, (a - e).abs(), err)
    err = torch.where((a - e).abs() <= atol, torch.zeros_like(err), err)
    assert bool((err <= rtol).all()), f"{name}: max relative error {float(err.max()):.3e} > {rtol:.0e}\n{a}\n{e}"


def near_collinear_unembedding(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f, g)``: 200 random 2-D embeddings and a 6-label unembedding whose second column is twice the first up to
    1e-12, so every diversity matrix built from it is near-singular (a genuine ``DiversityWarning`` case)."""
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(200, 2, generator=gen, dtype=torch.float64)
    g = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    g[:, 1] = g[:, 0] * 2 + 1e-12 * torch.randn(6, generator=gen, dtype=torch.float64)
    return f, g
