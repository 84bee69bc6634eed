"""Every way users run Lightning gives the values of one process, and nothing is lost (CPU, gloo, 2 processes).

One ``ddp_spawn`` run (the history must come back to the main process) and one launch of 2 ``ddp`` processes (started
here the way ``torchrun`` starts them, each running every scenario in turn) are compared with one process on:

* several validation loaders given as a dict, a list, or a ``CombinedLoader`` in ``"max_size_cycle"`` mode (its short
  loader restarts: the restarted inputs must not count again) or ``"max_size"`` mode (an exhausted loader's part is
  None), the first of odd size (201: the DistributedSampler pads rank 1 with a copy of sample 0);
* an ``IterableDataset`` sharded by the user (no sampler, uneven shards);
* ``use_distributed_sampler=False`` (every process iterates everything: each input must count once);
* ``ModelParallelStrategy`` with the student sharded by FSDP2's ``fully_shard`` (data parallel over 2 processes: the
  unembedding is a DTensor, gathered once per comparison), and with its default tensor-parallel layout (2 processes
  in one data-parallel group see the same inputs: each input must count once);
* a reference too large for one device, sharded by the user with ``fully_shard`` (run where it lives: its forward
  gathers its layers, its unembedding is gathered once per comparison, its fingerprint is the unsharded weights');
* an iterable dataset whose shards overlap: refused with a clear error, never counted twice.

Models and data are float64, so per-sample forwards do not depend on the batch composition beyond ~1e-16.
"""

from __future__ import annotations

import json
import math
import os
import socket

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import CombinedLoader
from test_callback import KEYS, RadialNet, make_pair
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_repsim.callbacks import ReferenceComparison
from lightning_repsim.constructions import radial_dataset
from tests.conftest import STREAM_RTOL

pytestmark = [pytest.mark.ddp, pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")]


class MultiLoaderNet(RadialNet):
    """A student for several validation loaders, sequential (``dataloader_idx``) or combined (a dict or list of
    ``[x, y]`` batches, None for an exhausted loader)."""

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        if isinstance(batch, dict):
            parts = list(batch.values())
        elif batch[0] is None or isinstance(batch[0], (list, tuple)):
            parts = batch
        else:
            parts = [batch]
        for x, y in (p for p in parts if p is not None):
            self.log("val_loss", nn.functional.cross_entropy(self(x), y), batch_size=len(x))


class ShardedNet(MultiLoaderNet):
    """The student sharded with FSDP2 on the data-parallel mesh (Lightning calls configure_model again at validate)."""

    def configure_model(self):
        if getattr(self, "_sharded", False):
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in [*self.body, self.head]:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)
        self._sharded = True


class ShardedIterable(IterableDataset):
    """Samples ``i`` with ``i % world == rank`` (plus the first ``overlap`` samples on every process)."""

    def __init__(self, dataset: TensorDataset, overlap: int = 0):
        self.dataset, self.overlap = dataset, overlap

    def __iter__(self):
        dist = torch.distributed
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        for i in range(len(self.dataset)):
            if i % world == rank or (world > 1 and i < self.overlap):
                yield self.dataset[i]


def datasets() -> tuple[TensorDataset, TensorDataset]:
    (xa, ya), (xb, yb) = radial_dataset(201, 6, seed=1), radial_dataset(64, 6, seed=2)
    return TensorDataset(xa.double(), ya), TensorDataset(xb.double(), yb)


def loaders(scenario: str):
    odd, small = datasets()
    a, b = DataLoader(odd, batch_size=25), DataLoader(small, batch_size=16)
    return {
        "dict": lambda: {"odd": a, "small": b},
        "list": lambda: [a, b],
        "combined_cycle": lambda: CombinedLoader({"odd": a, "small": b}, mode="max_size_cycle"),
        "combined_max_size": lambda: CombinedLoader([a, b], mode="max_size"),
        "iterable": lambda: DataLoader(ShardedIterable(odd), batch_size=25),
        "no_sampler": lambda: a,
        "model_parallel": lambda: a,
        "tensor_parallel_groups": lambda: a,
        "sharded_reference": lambda: a,
        "overlapping_shards": lambda: DataLoader(ShardedIterable(odd, overlap=10), batch_size=25),
    }[scenario]()


SCENARIOS = ["dict", "list", "combined_cycle", "combined_max_size", "iterable", "no_sampler", "model_parallel",
             "tensor_parallel_groups", "sharded_reference"]
TWO_LOADERS = {"dict", "list", "combined_cycle", "combined_max_size"}


def run_scenario(scenario: str, devices: int, strategy: str = "auto") -> dict:
    """Validate the student on the scenario's loaders; the logged values and the history of each callback."""
    ref, trained = make_pair()
    sharded = devices > 1 and scenario in ("model_parallel", "tensor_parallel_groups", "sharded_reference")
    student = (ShardedNet if sharded else MultiLoaderNet)()
    student.load_state_dict(trained.state_dict())
    ref, student = ref.double(), student.double()
    if devices > 1 and scenario == "sharded_reference":  # a reference too large for one device, sharded by the user
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (devices,))
        for layer in [*ref.body, ref.head]:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(ref, mesh=mesh)
    indices = (0, 1) if scenario in TWO_LOADERS else (0,)
    callbacks = [ReferenceComparison(ref, dataloader_idx=i, prefix=f"cmp{i}", log_media=False) for i in indices]
    if sharded:
        from lightning.pytorch.strategies import ModelParallelStrategy

        dp = 1 if scenario == "tensor_parallel_groups" else devices  # the default layout: 1 data-parallel group of 2
        strategy = ModelParallelStrategy(data_parallel_size=dp, tensor_parallel_size=devices // dp)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks,
                         use_distributed_sampler=scenario != "no_sampler")
    trainer.validate(student, loaders(scenario), verbose=False)
    out = {}
    for cb in callbacks:
        entry = cb.history[-1]
        out[cb.prefix] = {
            "logged": {k: float(trainer.callback_metrics[f"{cb.prefix}/{k}"]) for k in KEYS},
            "history": {k: entry[k] for k in (*KEYS, "num_inputs")},
            "across": entry.get("inputs_across_processes"),
            "gathers": cb.comparison.unembedding_gathers,
            "fingerprint": cb.reference_fingerprint,
        }
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank: int, out_dir: str, port: int) -> None:
    """One of 2 processes started as ``torchrun`` would (Lightning then launches nothing): every scenario in turn."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    results = {}
    for scenario in SCENARIOS:
        results[scenario] = run_scenario(scenario, 2, "ddp")
    try:
        run_scenario("overlapping_shards", 2, "ddp")
        results["overlapping_shards"] = "not refused"
    except RuntimeError as err:
        results["overlapping_shards"] = f"{type(err).__name__}: {err}"
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(results, fh)
    # Lightning leaves a process group it did not launch in place; one still alive at interpreter exit can abort the
    # process there ("terminate called without an active exception": gloo's threads destroyed while joinable)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ddp_processes(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ddp")
    torch.multiprocessing.start_processes(ddp_worker, args=(str(out), _free_port()), nprocs=2, start_method="spawn")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # every process logged and recorded the same values
    return ranks[0]


def assert_same_values(one: dict, two: dict, where: str) -> None:
    for key in KEYS:
        a, b = one[key], two[key]
        assert math.isfinite(a) and math.isfinite(b), (where, key)
        assert abs(a - b) <= STREAM_RTOL * max(abs(a), 1e-12), f"{where} {key}: 1 process {a!r}, 2 processes {b!r}"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_two_ddp_processes_log_the_values_of_one(two_ddp_processes, scenario):
    single, double = run_scenario(scenario, 1), two_ddp_processes[scenario]
    assert single.keys() == double.keys()
    for prefix, one in single.items():
        two = double[prefix]
        assert two["history"]["num_inputs"] == one["history"]["num_inputs"] == (64 if prefix == "cmp1" else 201)
        assert_same_values(one["logged"], two["logged"], f"{scenario} {prefix} logged")
        assert_same_values(one["history"], two["history"], f"{scenario} {prefix} history")
    expected_across = {"iterable": "disjoint", "no_sampler": "replicated",
                       "tensor_parallel_groups": "positions, shared by groups"}.get(scenario, "positions")
    assert all(v["across"] == expected_across for v in double.values())
    if scenario in ("model_parallel", "tensor_parallel_groups"):  # the student's DTensor unembedding, gathered once
        assert double["cmp0"]["gathers"] == 1
    if scenario == "sharded_reference":  # both unembeddings gathered once; the fingerprint of the unsharded weights
        assert double["cmp0"]["gathers"] == 2
        assert double["cmp0"]["fingerprint"] == single["cmp0"]["fingerprint"]


def test_overlapping_shards_are_refused(two_ddp_processes):
    message = two_ddp_processes["overlapping_shards"]
    assert message.startswith("SharedInputsError: 10 distinct input(s) were compared by more than one of the 2 processes")


class RankZeroHistory(Callback):
    """Writes the comparison's history and last results as rank 0 of the spawned workers has them."""

    def __init__(self, compare: ReferenceComparison, path: str):
        self.compare, self.path = compare, path

    def teardown(self, trainer, pl_module, stage):
        if trainer.global_rank == 0:
            torch.save({"history": self.compare.history, "results": self.compare.last_results}, self.path)


def test_ddp_spawn_returns_the_history_to_the_main_process(tmp_path):
    """Before: the callback in the main process had ``history == []`` after a ``ddp_spawn`` run; with a dict of
    loaders the padded copy was counted (202 inputs, KL 0.229361 instead of 0.229038)."""
    single = run_scenario("dict", 1)
    ref, trained = make_pair()
    student = MultiLoaderNet()
    student.load_state_dict(trained.state_dict())
    ref, student = ref.double(), student.double()
    callbacks = [ReferenceComparison(ref, dataloader_idx=i, prefix=f"cmp{i}", log_media=False) for i in (0, 1)]
    spies = [RankZeroHistory(cb, str(tmp_path / f"rank0_{cb.prefix}.pt")) for cb in callbacks]
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=[*callbacks, *spies])
    trainer.validate(student, loaders("dict"), verbose=False)
    for cb in callbacks:
        rank0 = torch.load(tmp_path / f"rank0_{cb.prefix}.pt", weights_only=False)
        assert len(cb.history) == 1 and cb.history == rank0["history"]  # the main process has rank 0's history
        assert float(cb.last_results["kl"].value) == float(rank0["results"]["kl"].value)
        assert cb.history[-1]["num_inputs"] == single[cb.prefix]["history"]["num_inputs"]
        assert_same_values(single[cb.prefix]["history"], cb.history[-1], f"{cb.prefix} main-process history")
        logged = {k: float(trainer.callback_metrics[f"{cb.prefix}/{k}"]) for k in KEYS}
        assert_same_values(single[cb.prefix]["logged"], logged, f"{cb.prefix} logged")
    assert not any(os.path.exists(cb._mailbox.path) for cb in callbacks)  # read once, then removed
