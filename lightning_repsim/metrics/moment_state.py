"""Packed moment states: one flat float64 tensor ``[n, mean (D), m2 (D*D)]`` per statistic.

A packed state is a centred triple of :mod:`lightning_repsim.functional._moments` (count, mean, centred
co-moment). Packing it into one tensor lets torchmetrics gather it as a single state and reduce it with
:func:`fold_moments`, an exact Chan merge (a plain ``"sum"`` of means or co-moments would be wrong).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_repsim.functional._moments import add_rows_, covariance_from_moments, merge_moments, merge_moments_

__all__ = [
    "empty_moments",
    "fold_moments",
    "moments_add",
    "moments_covariance",
    "moments_dim",
    "moments_merge_",
    "moments_size",
    "pack_moments",
    "unpack_moments",
]


def moments_size(dim: int) -> int:
    """Length of a packed moment state of a ``dim``-vector: ``1 + dim + dim**2``."""
    return 1 + dim + dim * dim


def moments_dim(size: int) -> int:
    dim = (math.isqrt(4 * size - 3) - 1) // 2
    if moments_size(dim) != size:
        raise ValueError(f"a packed moment state cannot have {size} entries")
    return dim


def empty_moments(dim: int, device: torch.device | str | None = None) -> Tensor:
    return torch.zeros(moments_size(dim), dtype=torch.float64, device=device)


def unpack_moments(state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Views ``(n, mean, m2)`` of a packed state."""
    dim = moments_dim(state.numel())
    return state[0], state[1 : 1 + dim], state[1 + dim :].view(dim, dim)


def pack_moments(n: Tensor, mean: Tensor, m2: Tensor) -> Tensor:
    return torch.cat([n.reshape(1), mean, m2.reshape(-1)])


def moments_add(state: Tensor, x: Tensor) -> Tensor:
    """Merge the rows of ``x`` (float64, (B, D)) into a packed state, in place; returns the state.

    The batch's centred co-moment is accumulated straight into the state (:func:`add_rows_`), so no D x D
    temporary is formed (K = 8,192 labels make D = 16,384: 2 GB per temporary), and the Chan correction
    is a rank-one update with a device-side coefficient (no host synchronisation).

    Example:
        >>> import torch
        >>> x = torch.randn(10, 3, dtype=torch.float64)
        >>> state = moments_add(moments_add(empty_moments(3), x[:4]), x[4:])
        >>> n, mean, m2 = unpack_moments(state)
        >>> bool(torch.allclose(m2, (x - x.mean(0)).T @ (x - x.mean(0)))), int(n)
        (True, 10)
    """
    add_rows_(*unpack_moments(state), x.to(torch.float64, copy=True))
    return state


def moments_merge_(state: Tensor, other: Tensor) -> Tensor:
    """Merge the packed state ``other`` into ``state`` in place (exact Chan merge); returns ``state``."""
    merge_moments_(*unpack_moments(state), *unpack_moments(other))
    return state


def fold_moments(stacked: Tensor) -> Tensor:
    """Exact (Chan) merge of packed states stacked along dim 0: the ``dist_reduce_fx`` of moment states."""
    if stacked.ndim == 1:
        return stacked
    if stacked.shape[-1] == 0:  # never sized anywhere
        return stacked[0]
    out = stacked[0]
    for state in stacked[1:]:
        out = pack_moments(*merge_moments(*unpack_moments(out), *unpack_moments(state)))
    return out


def moments_covariance(state: Tensor) -> tuple[int, Tensor, Tensor]:
    """``(n, mean, unbiased covariance)`` of a packed state."""
    n, mean, m2 = unpack_moments(state)
    return int(n), mean, covariance_from_moments(n, m2)
