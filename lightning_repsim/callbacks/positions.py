"""Global sample positions of the validation inputs, the ids the metrics hash for their candidate buffers.

Lightning's ``DistributedSampler`` (``drop_last=False``) pads the index list to a multiple of the world size
with copies of its first indices and gives rank ``r`` the positions ``r, r + W, r + 2W, ...`` of that list.
So the ``k``-th sample of rank ``r`` has global position ``r + k W``, and it is a padded duplicate exactly
when that position is ``>= len(dataset)``: those rows are dropped, nothing is counted twice. The position is
the same for 1 or W processes (without shuffling it is the dataset index), which makes the candidate inputs
of d_LLV, and thus every value, independent of the number of processes. Rows of ``(B, T, V)`` outputs get the
id ``position * 2**20 + token position``.

Every container of validation loaders Lightning accepts is read the same way: a single loader, a list or a dict of
them, or a ``CombinedLoader``. In its ``"sequential"`` mode (Lightning's default for evaluation) the batches of loader
``dataloader_idx`` (in Lightning's flat order: a dict's values in insertion order) come one loader at a time; in the
``"max_size_cycle"``, ``"max_size"`` and ``"min_size"`` modes each batch holds one batch of every loader, and
:meth:`SamplePositions.select` takes the compared loader's part (None once a ``"max_size"`` loader is exhausted). A
loader that ``"max_size_cycle"`` restarts gives positions past its length: they are dropped like padding, so a cycled
input is not counted again.

Without a sized sampler (an ``IterableDataset``) or, under several processes, without a ``DistributedSampler``
(``use_distributed_sampler=False``, a dataset sharded by the user), positions are unknown: the metrics then hash the
inputs' content, and :class:`~lightning_repsim.callbacks.comparison.ModelComparison` checks at the end whether
processes saw the same inputs (:mod:`~lightning_repsim.callbacks.overlap`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

__all__ = ["TOKEN_STRIDE", "SamplePositions", "rows_and_ids"]

#: ids of token rows of (B, T) outputs: global sample position * 2**20 + token position.
TOKEN_STRIDE = 2**20


def _leaf_paths(tree: Any, path: tuple = ()) -> list[tuple]:
    """Paths to the leaves of a container of loaders, in Lightning's flat order (dicts in insertion order, lists and
    tuples by position, anything else is a leaf)."""
    if isinstance(tree, Mapping):
        return [p for key in tree for p in _leaf_paths(tree[key], (*path, key))]
    if isinstance(tree, (list, tuple)):
        return [p for i, item in enumerate(tree) for p in _leaf_paths(item, (*path, i))]
    return [path]


def _at(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _combined_loader(trainer: pl.Trainer) -> Any:
    """The evaluation loop's ``CombinedLoader`` (its mode says how batches are combined), or None."""
    from lightning.pytorch.trainer.states import TrainerFn

    loop = trainer.validate_loop if trainer.state.fn == TrainerFn.VALIDATING else trainer.fit_loop.epoch_loop.val_loop
    return getattr(loop, "_combined_loader", None)


def _sampler_of(loader: Any) -> Any:
    if not isinstance(loader, DataLoader):
        return None
    sampler = loader.sampler
    if not isinstance(sampler, DistributedSampler) and loader.batch_sampler is not None:
        sampler = getattr(loader.batch_sampler, "sampler", sampler)
    return sampler


def _length(obj: Any) -> int | None:
    try:
        return len(obj)
    except TypeError:  # an IterableDataset's sampler
        return None


class SamplePositions:
    """Where each validation sample of the compared loader sits in its (unsharded) dataset, batch after batch."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.cursor = 0  # samples seen so far (on this process)
        self.stride: tuple[int, int] | None = (0, 1)  # local sample k has position offset + k * stride; None: unknown
        self.length: int | None = None  # positions at or past it are duplicates (DistributedSampler padding, cycling)
        self.path: tuple | None = None  # where the compared loader's part sits in a combined batch (None: sequential)

    @property
    def combined(self) -> bool:
        """Whether each batch combines one batch of every loader (a non-sequential ``CombinedLoader``)."""
        return self.path is not None

    def configure(self, trainer: pl.Trainer, dataloader_idx: int) -> None:
        """Read the compared validation loader (``dataloader_idx`` in Lightning's flat order) and its sampler."""
        self.reset()
        combined = _combined_loader(trainer)
        iterables = combined.iterables if combined is not None else trainer.val_dataloaders
        paths = _leaf_paths(iterables) if iterables is not None else []
        if dataloader_idx >= len(paths):
            return
        loader = _at(iterables, paths[dataloader_idx])
        mode = getattr(combined, "_mode", "sequential") if combined is not None else "sequential"
        if mode != "sequential" and len(paths) > 1:
            self.path = paths[dataloader_idx]
        sampler = _sampler_of(loader)
        if isinstance(sampler, DistributedSampler):
            self.stride = (int(sampler.rank), int(sampler.num_replicas))
            self.length = _length(sampler.dataset)
            return
        length = None if sampler is None else _length(sampler)
        if length is None or trainer.world_size > 1:
            # an iterable dataset, or processes without a DistributedSampler: positions are unknown (local positions
            # would collide across processes); the metrics hash the content, and the comparison checks at its end
            # whether processes saw the same inputs
            self.stride = None
        elif mode == "max_size_cycle" and isinstance(loader, DataLoader) and loader.batch_size is not None:
            self.length = length  # one sampler index per sample: positions past it are the restarted loader's

    def select(self, batch: Any) -> Any:
        """The compared loader's part of a batch (the batch itself unless loaders are combined; None when a
        ``"max_size"`` loader is exhausted)."""
        return batch if self.path is None else _at(batch, self.path)

    def next(self, batch_size: int) -> Tensor | None:
        """Positions of the next ``batch_size`` samples of the validation loader (None when unknown)."""
        start = self.cursor
        self.cursor += batch_size
        if self.stride is None:
            return None
        offset, stride = self.stride
        return offset + (start + torch.arange(batch_size)) * stride


def rows_and_ids(
    mask: Tensor | None, lead: tuple[int, ...], positions: Tensor | None, length: int | None
) -> tuple[Tensor | None, Tensor | None, int]:
    """``(keep, ids, padded)`` over the flattened leading positions: the padding mask (bool or 0/1), the
    DistributedSampler duplicates dropped (``padded`` of them), and the global ids of the rows."""
    keep = None
    if mask is not None:
        if tuple(mask.shape) != lead:
            raise ValueError(f"the mask from `mask_fn` has shape {tuple(mask.shape)}, the logits' leading shape is {lead}")
        keep = mask.to(torch.bool).reshape(-1).cpu()
    padded = 0
    if length is not None and positions is not None:
        sample_keep = positions < length  # padded duplicates sit after the dataset's end
        padded = int((~sample_keep).sum())
        if padded:
            per_row = sample_keep.reshape((-1,) + (1,) * (len(lead) - 1)).expand(lead).reshape(-1)
            keep = per_row if keep is None else keep & per_row
    if keep is not None and bool(keep.all()):
        keep = None  # nothing to drop: the rows are used as they are (no copy of (B*T, V) logits)
    if positions is None:
        ids = None
    elif len(lead) == 1:
        ids = positions
    else:
        inner = math.prod(lead[1:])
        ids = positions[:, None] * TOKEN_STRIDE + torch.arange(inner)[None, :] if inner <= TOKEN_STRIDE else None
        ids = None if ids is None else ids.reshape(-1)
    return keep, ids, padded
