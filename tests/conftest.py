"""Shared fixtures and helpers: the reference cases computed by the paper authors' implementation, loading the
examples, comparing results to the tolerance the code promises, reading an offline wandb run.

How the tests compare floats
----------------------------
The streaming statistics (centred moments, exact Chan merges) reproduce the functional core on the concatenated
data, and the functional core reproduces the reference cases, to :data:`STREAM_RTOL` relative: the same numbers
summed in another order (other batch sizes, another merge order, another number of processes, another BLAS thread
count, another machine) round differently in the last bits. Two results reached by different routes are therefore
compared with :func:`assert_rel` / :func:`assert_close_dict`, never with ``==``.

``==`` (``torch.equal``, ``tolist() ==``) is kept only where the code guarantees bit-identity:

* **chosen indices and sets** (label pivot, leave-out label, input set, label subsets, chosen candidate): the
  searches break ties within ``TIE_RTOL`` (relative) in favour of the smallest index, so a choice does not depend
  on how the compared values were rounded;
* **integers**: counts (``num_inputs``, ``num_dropped``), shapes, epochs, steps, byte sizes;
* **hash keys and the bottom-k candidate buffer**: keys are exact integer arithmetic on the bits of the float64
  inputs, and the buffer holds copies of input rows (no arithmetic), so any batching or sharding gives the same bits;
* **the same value reached the same way**: a value and its cached or restored copy (``compute()`` and
  ``compute_result().value``, a checkpoint's history), one of the compared floats selected by ``max``/``argmin``,
  exact zeros by construction (masked rows, disabled terms), and the same computation repeated on the same inputs
  in the same process (a seeded run twice).

Every test starts from the same global random state (:func:`_seeded_global_rngs`), so a test's data does not depend
on which tests ran before it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import random
import sys
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The paper authors' reference cases, bundled with the repository (provenance and format: its README).
REFERENCE_DIR = Path(os.environ.get("REPSIM_REFERENCE_DIR", REPO_ROOT / "tests" / "data" / "reference_cases"))
REFERENCE_FILES = sorted(REFERENCE_DIR.glob("*.npz"))

#: The relative tolerance the package promises for the streaming statistics and the reference cases (SPEC §6, §8):
#: streaming = functional on the concatenated data, and functional = the authors' implementation, to 1e-9.
STREAM_RTOL = 1e-9

# BLAS reductions round differently with the thread count: OMP_NUM_THREADS, when set, is the count the suite runs with
# (`OMP_NUM_THREADS=1 make test`); otherwise at most 2 threads, as on the CI machines.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

EXAMPLES = REPO_ROOT / "examples"


@pytest.fixture(autouse=True)
def _seeded_global_rngs():
    """Every test starts from the same global random state (torch, numpy, random), whatever ran before it."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


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


# ----------------------------------------------------------------------------------------------
# comparing floats to the promised tolerance
# ----------------------------------------------------------------------------------------------
def assert_rel(actual, expected, rtol: float = STREAM_RTOL, name: str = "", atol: float = 0.0) -> None:
    """Elementwise relative agreement (absolute for exact zeros); differences below ``atol`` always pass (for
    quantities that are zero up to rounding, e.g. an m_SVD of 1e-17)."""
    a = torch.as_tensor(actual, dtype=torch.float64).flatten()
    e = torch.as_tensor(expected, dtype=torch.float64).flatten()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    err = (a - e).abs() / e.abs().clamp_min(1e-300)
    err = torch.where(e == 0, (a - e).abs(), err)
    err = torch.where((a - e).abs() <= atol, torch.zeros_like(err), err)
    assert bool((err <= rtol).all()), f"{name}: max relative error {float(err.max()):.3e} > {rtol:.0e}\n{a}\n{e}"


def _close_floats(a: float, b: float, rtol: float, atol: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= max(rtol * abs(b), atol)


def assert_close_dict(actual: Any, expected: Any, rtol: float = STREAM_RTOL, path: str = "", atol: float = 0.0) -> None:
    """``actual`` equals ``expected`` with floats compared to ``rtol`` relative (``atol`` absolute; NaN equals NaN) and
    everything else exactly: keys, integers, booleans, strings, integer tensors. Recurses into mappings, lists,
    tuples and dataclasses, e.g. an input-set search report ``{"method": ..., "sampled_best": 0.72289...}`` or a
    callback's history entry."""
    where = path or "value"
    if dataclasses.is_dataclass(actual) and not isinstance(actual, type):
        assert type(actual) is type(expected), f"{where}: {type(actual).__name__} != {type(expected).__name__}"
        for field in dataclasses.fields(actual):
            assert_close_dict(getattr(actual, field.name), getattr(expected, field.name), rtol, f"{path}.{field.name}", atol)
    elif isinstance(actual, Mapping):
        assert isinstance(expected, Mapping) and set(actual) == set(expected), \
            f"{where}: keys {sorted(map(str, actual))} != {sorted(map(str, expected))}"
        for key in actual:
            assert_close_dict(actual[key], expected[key], rtol, f"{path}[{key!r}]", atol)
    elif isinstance(actual, (list, tuple)):
        assert isinstance(expected, (list, tuple)) and len(actual) == len(expected), f"{where}: {actual!r} != {expected!r}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close_dict(a, e, rtol, f"{path}[{i}]", atol)
    elif isinstance(actual, torch.Tensor) and actual.is_floating_point():
        expected = torch.as_tensor(expected)
        assert actual.shape == expected.shape, f"{where}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        a, e = actual.detach().double().cpu().flatten().tolist(), expected.detach().double().cpu().flatten().tolist()
        bad = [(x, y) for x, y in zip(a, e) if not _close_floats(x, y, rtol, atol)]
        assert not bad, f"{where}: {len(bad)} value(s) differ by more than {rtol:.0e} relative, e.g. {bad[0]}"
    elif isinstance(actual, torch.Tensor):
        assert torch.equal(actual.cpu(), torch.as_tensor(expected).cpu()), f"{where}: {actual} != {expected}"
    elif isinstance(actual, float) or isinstance(expected, float):
        assert isinstance(actual, (int, float)) and isinstance(expected, (int, float)) and not isinstance(actual, bool), \
            f"{where}: {actual!r} != {expected!r}"
        assert _close_floats(float(actual), float(expected), rtol, atol), \
            f"{where}: {actual!r} != {expected!r} (relative tolerance {rtol:.0e})"
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def near_collinear_unembedding(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f, g)``: 200 random 2-D embeddings and a 6-label unembedding whose second column is twice the first up to
    1e-12, so every diversity matrix built from it is near-singular (a genuine ``DiversityWarning`` case)."""
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(200, 2, generator=gen, dtype=torch.float64)
    g = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    g[:, 1] = g[:, 0] * 2 + 1e-12 * torch.randn(6, generator=gen, dtype=torch.float64)
    return f, g


# ----------------------------------------------------------------------------------------------
# reading an offline wandb run
# ----------------------------------------------------------------------------------------------
_BLOCK, _HEADER = 32768, 7


def wandb_records(path: str | Path) -> Iterator[Any]:
    """The protobuf records of an offline run's transaction log (``run-*.wandb``), in the order they were written.

    The format is LevelDB's log: a 7-byte file header (``:W&B``, magic, version), then 32 KiB blocks of chunks
    ``crc32 (4, LE) | length (2, LE) | type (1) | payload`` (types FULL, FIRST, MIDDLE, LAST; a block's last < 7
    bytes are padding); the checksum is zlib's crc32 of the type byte and the payload. Every chunk's checksum is
    verified and a chunk cut short raises, so a file that is still being written fails loudly instead of reading
    as an older state of the run. (wandb 0.31 has no Python reader and writes no ``wandb-summary.json`` offline.)
    """
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a wandb run file"
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer
            pos += left
            continue
        crc = int.from_bytes(data[pos : pos + 4], "little")
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        if crc == 0 and length == 0 and kind == 0:  # zero padding
            pos += _HEADER
            continue
        payload = data[pos + _HEADER : pos + _HEADER + length]
        assert len(payload) == length, f"{path}: chunk at byte {pos} cut short (the run is still being written)"
        assert zlib.crc32(bytes([kind]) + payload) == crc, f"{path}: bad checksum at byte {pos}"
        pos += _HEADER + length
        if kind == 1:
            chunks = [payload]
        elif kind == 2:
            pending, chunks = payload, []
        elif kind == 3:
            pending, chunks = pending + payload, []
        elif kind == 4:
            chunks, pending = [pending + payload], b""
        else:
            raise AssertionError(f"{path}: unknown chunk type {kind} at byte {pos}")
        for chunk in chunks:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            yield record


@dataclasses.dataclass
class WandbRun:
    """What an offline wandb run holds: its ``wandb.log`` rows in logging order and its summary (values decoded from
    JSON, nested keys joined by "/")."""

    history: list[dict]
    summary: dict


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def read_wandb_run(run_dir: str | Path, complete: bool = True) -> WandbRun:
    """The offline run in ``run_dir`` (``.../wandb/offline-run-*``), read from its transaction log. ``complete``: also
    check that the run was finished and is entirely on disk (the log holds the run's exit record)."""
    (path,) = Path(run_dir).glob("run-*.wandb")
    run, kinds = WandbRun([], {}), set()
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        kinds.add(kind)
        if kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "summary":
            run.summary.update(_items(record.summary.update))
            for item in record.summary.remove:
                run.summary.pop(item.key or "/".join(item.nested_key), None)
    if complete:
        assert "exit" in kinds, f"{path}: no exit record: the run was not finished, or not yet written to disk"
    return run


def finish_wandb_run(run: Any) -> None:
    """Finish ``run`` and wait until its transaction log is entirely on disk. ``run.finish()`` only *asks* wandb's
    service to close the run; the service writes the log's last (partial) 32 KiB block when it does, which can be
    after ``finish()`` returned. ``wandb.teardown()`` waits for the service to close every run and exit."""
    import wandb

    run.finish()
    wandb.teardown()
