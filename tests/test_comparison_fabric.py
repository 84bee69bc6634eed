"""ModelComparison without a Trainer: a plain loop and a 2-process Fabric loop (CPU, gloo) give the callback's values.

The validation set has an odd size (201): Fabric's DistributedSampler pads rank 1 with a copy of sample 0, which the
comparison drops when given the samples' global positions and the data set's length. Models and data are float64 so
that per-sample forwards do not depend on the batch composition beyond ~1e-16.
"""

from __future__ import annotations

import math

import pytest
import torch
from lightning.fabric import Fabric
from test_callback import KEYS, make_pair, trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_repsim.callbacks import ComparisonConfig, ModelComparison, ReferenceComparison
from lightning_repsim.constructions import radial_dataset
from tests.conftest import STREAM_RTOL

LAYERS = ["body.1", "body.3"]


def models_and_data():
    ref, student = make_pair()
    xv, yv = radial_dataset(201, 6, seed=1)
    return ref.double(), student.double(), TensorDataset(xv.double(), yv)


def callback_values() -> dict[str, float]:
    ref, student, data = models_and_data()
    cb = ReferenceComparison(ref, layers=LAYERS, log_media=False)
    trainer(callbacks=[cb], num_sanity_val_steps=0).validate(student, DataLoader(data, batch_size=50), verbose=False)
    return {**{k: cb.history[-1][k] for k in KEYS}, **{f"layers/{n}/cka": cb.history[-1]["layers"][n]["cka"] for n in LAYERS}}


def fabric_loop(fabric: Fabric) -> dict[str, float]:
    """The documented Fabric loop: the comparison on each process, batches of the process's shard, global positions."""
    ref, student, data = models_and_data()
    comparison = ModelComparison(ref, ComparisonConfig(layers=LAYERS, log_media=False)).to(fabric.device)
    loader = fabric.setup_dataloaders(DataLoader(data, batch_size=25))  # a DistributedSampler, padded to 202
    student = fabric.setup_module(student)
    comparison.watch_layers(student.module)
    rank, world, seen = fabric.global_rank, fabric.world_size, 0
    for batch in loader:
        size = batch[0].shape[0]
        positions = rank + (seen + torch.arange(size)) * world  # where the sampler took these samples from
        seen += size
        comparison.update(batch, student.module, positions=positions, dataset_length=len(data))
    outcome = comparison.compute()  # a collective: every process computes
    values = dict(outcome.values)
    values["num_inputs"] = outcome.info["num_inputs"]
    return values


@pytest.mark.ddp
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_fabric_two_processes_give_the_callbacks_values():
    expected = callback_values()
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn")
    got = fabric.launch(fabric_loop)
    assert got["num_inputs"] == 201  # the padded copy of sample 0 was dropped
    for key, value in expected.items():
        assert math.isfinite(got[key]), key
        assert got[key] == pytest.approx(value, rel=STREAM_RTOL, abs=1e-12), key


def test_plain_loop_gives_the_callbacks_values():
    expected = callback_values()
    ref, student, data = models_and_data()
    comparison = ModelComparison(ref, layers=LAYERS, log_media=False)
    comparison.watch_layers(student)
    student.eval()
    for i, batch in enumerate(DataLoader(data, batch_size=64)):
        comparison.update(batch, student, positions=torch.arange(i * 64, i * 64 + batch[0].shape[0]))
    outcome = comparison.compute()
    assert outcome.info["num_inputs"] == 201 and outcome.info["rep_dim"] == 2
    for key, value in expected.items():
        assert outcome.values[key] == pytest.approx(value, rel=STREAM_RTOL, abs=1e-12), key
    comparison.reset()
    with pytest.raises(TypeError, match="unknown option"):
        ModelComparison(ref, prefx="typo")
