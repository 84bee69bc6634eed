"""Inputs seen by several processes: found at the end of a comparison, then counted once or refused.

Under several processes the comparison knows which inputs each process saw when it has their global positions (a
``DistributedSampler``: :mod:`~lightning_repsim.callbacks.positions`). Without them -- ``use_distributed_sampler=False``
with every process iterating the whole set, an ``IterableDataset`` sharded by the user, a custom sampler -- every
process keeps two 52-bit keys of the *content* of each of its samples (the model inputs, hashed exactly with
:func:`~lightning_repsim.metrics.sketch.hash_keys`: 16 bytes per sample), and :meth:`InputOverlap.settle` compares
them across processes (one ``all_gather``) before the statistics are synced:

* every process saw the same inputs (the same multiset): ``"replicated"``. Only process 0's statistics are kept (the
  others are reset before the sync), so each input counts once and the values are those of one process;
* no input was seen by two processes: ``"disjoint"`` (a dataset sharded by the user), nothing to do;
* some inputs, not all, were seen by more than one process: :class:`SharedInputsError`, which says how many. Counting
  them twice would silently change every value; they cannot be taken out of the accumulated statistics.

Identical inputs are indistinguishable by content: a data set that holds the same input twice, with the two copies
on two processes, is refused the same way (give each process distinct inputs, or a ``DistributedSampler``).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from lightning_repsim.metrics.sketch import hash_keys

__all__ = ["InputOverlap", "SharedInputsError", "distributed_world"]

_SEED = 7_919
_BLOCK = 1 << 14  # values hashed at a time per sample (bounded temporaries for image inputs)


class SharedInputsError(RuntimeError):
    """Some inputs were accumulated by more than one process (and not every input by every process)."""


def distributed_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sample_keys(tensor: Tensor, batch_size: int) -> Tensor:
    """(B, 2) keys of each sample's values (float bits or integers), over blocks of values."""
    rows = tensor.detach().reshape(batch_size, -1)
    if rows.dtype == torch.bool:
        rows = rows.to(torch.int64)
    if rows.shape[1] == 0:
        return torch.zeros(batch_size, 2, dtype=torch.float64, device=rows.device)
    parts = [torch.stack(hash_keys(rows[:, s : s + _BLOCK], _SEED), 1) for s in range(0, rows.shape[1], _BLOCK)]
    if len(parts) == 1:
        return parts[0]
    return torch.stack(hash_keys(torch.cat(parts, 1), _SEED), 1)


def _position_digest(positions: Tensor) -> Tensor:
    """``[count, sum, sum of squares, sum of a mix]`` of int64 positions with wrapping integer arithmetic: equal for
    equal multisets of positions, different otherwise (but for a collision of the sums)."""
    p = positions.to(torch.int64).reshape(-1)
    mixed = (p * -7046029254386353131) ^ (p >> 7)
    return torch.stack([torch.tensor(p.numel()), p.sum(), (p * p).sum(), mixed.sum()])


class InputOverlap:
    """What each process accumulated -- a digest of its samples' global positions, or content keys of its samples
    when positions are unknown -- and, at :meth:`settle`, whether this process's statistics count."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.keys: list[Tensor] = []
        self.digest = torch.zeros(4, dtype=torch.int64)
        self.unhashable = False
        self.verdict: str | None = None  # after settle() under several processes (see ModelComparison.compute)

    @property
    def tracking(self) -> bool:
        """Whether samples need to be recorded (several processes)."""
        return distributed_world()[1] > 1

    def add_positions(self, positions: Tensor) -> None:
        """Record samples by their global positions (padded duplicates already left out)."""
        self.digest += _position_digest(positions.cpu())

    def add(self, inputs: Any, batch_size: int) -> None:
        """Record samples without positions by their content: the models' inputs (a tensor or a collection of tensors
        whose first dimension is the batch)."""
        tensors: list[Tensor] = []
        apply_to_collection(inputs, Tensor, tensors.append)
        tensors = [t for t in tensors if t.ndim and t.shape[0] == batch_size]
        if not tensors or batch_size == 0:
            self.unhashable = self.unhashable or batch_size > 0
            return
        keys = [_sample_keys(t, batch_size) for t in tensors]
        combined = keys[0] if len(keys) == 1 else torch.stack(hash_keys(torch.cat(keys, 1), _SEED), 1)
        self.keys.append(combined)  # on the inputs' device: no host sync per batch

    def settle(self, device: torch.device) -> bool:
        """Compare what the processes accumulated (a collective: every process calls it) and say whether this
        process's statistics count: a process that saw the same samples as a lower rank does not (each input counts
        once). Raises :class:`SharedInputsError` when processes saw overlapping but different samples."""
        rank, world = distributed_world()
        if world == 1:
            self.verdict = None
            return True
        from torchmetrics.utilities.distributed import gather_all_tensors

        local = torch.cat(self.keys).to(device) if self.keys else torch.zeros(0, 2, dtype=torch.float64, device=device)
        header = torch.cat([torch.tensor([local.shape[0], int(self.unhashable)]), self.digest]).to(device)
        headers = torch.stack(gather_all_tensors(header)).cpu()
        if bool(headers[:, 1].any()):
            self.verdict = "unknown"
            return True
        # processes with the same positions (a DistributedSampler of fewer replicas than processes, e.g. the
        # tensor-parallel ranks of ModelParallelStrategy) form a group
        signature: list[Any] = [tuple(h[2:].tolist()) if int(h[2]) else ("empty", i) for i, h in enumerate(headers)]
        if int(headers[:, 0].sum()):
            gathered = [t.cpu().to(torch.int64) for t in gather_all_tensors(local)]
            uniques = [torch.unique(keys, dim=0, return_counts=True) for keys in gathered]
            for i, (rows, counts) in enumerate(uniques):
                if rows.shape[0]:
                    signature[i] = (rows.numpy().tobytes(), counts.numpy().tobytes())
            leaders = {sig: min(i for i, other in enumerate(signature) if other == sig) for sig in signature}
            distinct = [uniques[leaders[sig]][0] for sig in dict.fromkeys(signature) if uniques[leaders[sig]][0].shape[0]]
            _, seen_by = torch.unique(torch.cat(distinct), dim=0, return_counts=True) if distinct else (None, torch.zeros(0))
            shared = int((seen_by > 1).sum())
            if shared:
                raise SharedInputsError(
                    f"{shared} distinct input(s) were compared by more than one of the {world} processes, which did not "
                    f"all see the same inputs ({headers[:, 0].tolist()} inputs per process): counting them twice would "
                    "change every value. The validation loader has no DistributedSampler (or an iterable dataset is "
                    "sharded with overlaps): use Lightning's default `use_distributed_sampler=True` with a map-style "
                    "dataset, give every process disjoint inputs (an IterableDataset sharded by rank), or let every "
                    "process iterate the whole set (each input then counts once). A data set that holds identical "
                    "inputs on several processes is refused the same way."
                )
        leader = min(i for i, other in enumerate(signature) if other == signature[rank])
        by_content, grouped = bool(int(headers[:, 0].sum())), len(set(signature)) < world
        if by_content:
            self.verdict = "replicated" if grouped else "disjoint"
        else:
            self.verdict = "positions, shared by groups" if grouped else "positions"
        return leader == rank
