"""ReferenceComparison under DDP: a 2-process ``ddp_spawn`` fit on CPU (gloo) logs the same values as 1 process.

The validation set has an odd size (201), so Lightning's DistributedSampler pads rank 1 with a copy of
sample 0: the callback must drop it (otherwise that input would be counted twice). Models and data are
float64 so that per-sample forwards do not depend on the batch composition beyond ~1e-16; the training
data are not shuffled (Lightning would shuffle its injected training sampler, so the data module builds
unshuffled DistributedSamplers itself), so both runs take the same optimisation steps: rank r gets samples
r, r+2, ... of each 32-sample batch and DDP averages the two halves' gradients.
"""

from __future__ import annotations

import csv
import math
import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from test_callback import KEYS, make_pair
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_repsim.callbacks import ReferenceComparison
from lightning_repsim.constructions import radial_dataset
from tests.conftest import STREAM_RTOL


def logged_rows(log_dir: str) -> list[dict[str, float]]:
    with open(os.path.join(log_dir, "metrics.csv")) as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("repsim/d_llv")]
    return [{k: float(v) for k, v in r.items() if k.startswith("repsim/") or k == "epoch"} for r in rows]


class RadialData(pl.LightningDataModule):
    """Unshuffled loaders; under DDP, DistributedSamplers without shuffling (the validation one is what
    Lightning injects by default: padded to a multiple of the world size)."""

    def __init__(self, batch_size: int = 32):
        super().__init__()
        x, y = radial_dataset(128, 6, seed=0)
        xv, yv = radial_dataset(201, 6, seed=1)
        self.train_set = TensorDataset(x.double(), y)
        self.val_set = TensorDataset(xv.double(), yv)
        self.batch_size = batch_size

    def _loader(self, dataset, batch_size: int) -> DataLoader:
        world = self.trainer.world_size
        if world == 1:
            return DataLoader(dataset, batch_size=batch_size)
        sampler = DistributedSampler(dataset, num_replicas=world, rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(dataset, batch_size=batch_size // world, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, 50)


def run(tmp_path, devices: int) -> list[dict[str, float]]:
    ref, student = make_pair()
    ref.double()
    student.double()
    logger = CSVLogger(str(tmp_path), name=f"devices{devices}", version=0)
    compare = ReferenceComparison(ref, layers=["body.1", "body.3"])  # + layer-wise CKA, the padded copy dropped
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_epochs=2,
        logger=logger,
        callbacks=[compare],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    trainer.fit(student, datamodule=RadialData())
    return logged_rows(logger.log_dir), compare.history


@pytest.mark.ddp
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_spawn_two_processes_log_the_same_values_as_one(tmp_path):
    single, single_history = run(tmp_path, 1)
    double, double_history = run(tmp_path, 2)
    assert len(single) == len(double) == 2
    # the callback in the main process has the spawned workers' history (before: [] after ddp_spawn)
    assert [h["epoch"] for h in double_history] == [0, 1] and all(h["num_inputs"] == 201 for h in double_history)
    for one, two in zip(single_history, double_history):
        for key in KEYS:
            assert abs(one[key] - two[key]) <= STREAM_RTOL * max(abs(one[key]), 1e-12), key
    for one, two in zip(single, double):
        assert one["epoch"] == two["epoch"]
        layer_keys = [f"layers/{n}/{m}" for n in ("body.1", "body.3") for m in ("cka", "cka_debiased", "procrustes")]
        for key in (*KEYS, *layer_keys):
            a, b = one[f"repsim/{key}"], two[f"repsim/{key}"]
            assert math.isfinite(a), key
            assert abs(a - b) <= STREAM_RTOL * max(abs(a), 1e-12), f"epoch {one['epoch']} {key}: 1 process {a!r}, 2: {b!r}"
