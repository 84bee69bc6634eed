"""The metrics against the lowest torchmetrics release pyproject.toml allows.

The metrics rest on torchmetrics' public API (``add_state`` with ``dist_reduce_fx`` callables, a ``dist_sync_fn``,
``compute_with_cache=False``, the full-state ``forward``, ``merge_state``, ``metric_state``, ``sync``) and override one
private hook, ``_apply`` (to keep float64 states under ``module.to(dtype)``, passing torchmetrics' ``exclude_state``);
tests/test_metrics_base.py checks that no other private name is overridden or written. This test installs the lowest
allowed release into a temporary folder (one small wheel, about 2 s) and runs those tests, the torchmetrics-API tests,
the CKA-family tests and the 2-process DDP test with it, so the lower bound is a tested claim. The newest release is
what ``make test`` installs and runs everywhere else.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from packaging.version import Version

from tests.conftest import REPO_ROOT


def lowest_torchmetrics() -> str:
    text = (REPO_ROOT / "pyproject.toml").read_text()
    match = re.search(r'"torchmetrics>=([0-9.]+)"', text)
    assert match, "pyproject.toml must give torchmetrics a lower bound"
    return match.group(1)


def test_metrics_work_with_the_lowest_allowed_torchmetrics(tmp_path):
    version = lowest_torchmetrics()
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--disable-pip-version-check", "--target",
         str(target), f"torchmetrics=={version}"],
        capture_output=True, text=True, timeout=180,
    )
    if install.returncode != 0:
        pytest.skip(f"could not install torchmetrics=={version} (no package index reachable?): {install.stderr[-400:]}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(REPO_ROOT)])}
    probe = subprocess.run([sys.executable, "-c", "import torchmetrics; print(torchmetrics.__version__)"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert Version(probe.stdout.strip()) == Version(version), probe.stderr
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_metrics_base.py",
         "tests/test_metrics_api.py", "tests/test_cka.py", "tests/test_metrics_ddp.py"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, f"with torchmetrics=={version}:\n{run.stdout[-4000:]}\n{run.stderr[-2000:]}"
