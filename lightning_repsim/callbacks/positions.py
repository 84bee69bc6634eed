"""Global sample positions of the validation inputs, the ids the metrics hash for their candidate buffers.

Lightning's ``DistributedSampler`` (``drop_last=False``) pads the index list to a multiple of the world size
with copies of its first indices and gives rank ``r`` the positions ``r, r + W, r + 2W, ...`` of that list.
So the ``k``-th sample of rank ``r`` has global position ``r + k W``, and it is a padded duplicate exactly
when that position is ``>= len(dataset)``: those rows are dropped, nothing is counted twice. The position is
the same for 1 or W processes (without shuffling it is the dataset index), which makes the candidate inputs
of d_LLV, and thus every value, independent of the number of processes. Rows of ``(B, T, V)`` outputs get the
id ``position * 2**20 + token position``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

__all__ = ["TOKEN_STRIDE", "SamplePositions"]

#: ids of token rows of (B, T) outputs: global sample position * 2**20 + token position.
TOKEN_STRIDE = 2**20


class SamplePositions:
    """Where each validation sample sits in the (unsharded) dataset, batch after batch."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.cursor = 0  # samples seen so far (on this process)
        self.stride: tuple[int, int] | None = (0, 1)  # local sample k has position offset + k * stride; None: unknown
        self.length: int | None = None  # the dataset length when a padding DistributedSampler is used

    def configure(self, trainer: pl.Trainer, dataloader_idx: int) -> str | None:
        """Read the validation dataloader's sampler; returns a warning when positions cannot be known."""
        self.reset()
        loader = trainer.val_dataloaders
        if isinstance(loader, Sequence) and not isinstance(loader, DataLoader):
            loader = loader[dataloader_idx] if dataloader_idx < len(loader) else None
        sampler = None
        if isinstance(loader, DataLoader):
            sampler = loader.sampler
            if not isinstance(sampler, DistributedSampler) and loader.batch_sampler is not None:
                sampler = getattr(loader.batch_sampler, "sampler", sampler)
        if isinstance(sampler, DistributedSampler):
            self.stride = (int(sampler.rank), int(sampler.num_replicas))
            try:
                length = len(sampler.dataset)  # type: ignore[arg-type]
            except TypeError:
                length = None
            if length is not None and not sampler.drop_last and sampler.total_size > length:
                self.length = length
        elif trainer.world_size > 1:
            self.stride = None  # local positions would collide across processes: the metrics hash the content
            return (
                "ReferenceComparison: running on several processes but the validation dataloader has no "
                "DistributedSampler; if every process sees the same batches, every input is counted once per "
                "process. Use Lightning's default `use_distributed_sampler=True` or pass `dataloader=`."
            )
        return None

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
