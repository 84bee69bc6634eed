"""The candidate buffer: a bottom-k sketch of the inputs, identical for any batching and any number of processes.

Every input gets two seeded 52-bit hash keys of its content (or of a user-given id) and the buffer keeps
the ``capacity`` inputs with the smallest keys, one per key. The bottom-k of a union is the bottom-k of
the bottom-k's, so the content does not depend on the batch sizes, the order or the number of
processes. Rows are ``[key, key2, id, data...]``, sorted by key; empty slots have ``key = +inf``.
Identical rows have identical keys and are kept once.

Hashing is a seeded universal (linear) hash of each input's bits computed with exact float64 arithmetic
on small integers, so it is identical on every device and for every batch size.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from lightning_repsim.functional.inputs import take_rows

__all__ = [
    "META",
    "bottom_k",
    "buffer_content",
    "buffer_insert",
    "empty_buffer",
    "fold_buffers",
    "hash_keys",
    "take_rows",
]

META = 3  # buffer columns before the data: key, key2, id
_P = 2_097_143  # the largest prime below 2**21
_NUM_HASH = 6  # six seeded linear hashes mod _P (21 bits each) make the two 52-bit keys
_CHUNK_WORDS = 1 << 16  # |word| < 2**15, multiplier < 2**21: a chunk's dot product stays below 2**53


@functools.lru_cache(maxsize=64)
def _multipliers(num_words: int, seed: int, device: str) -> tuple[Tensor, Tensor]:
    """Seeded multipliers (num_words, 6) and offsets (6,) in [1, _P), as float64 (exact integers)."""
    gen = torch.Generator().manual_seed(int(seed) % (1 << 63))
    a = torch.randint(1, _P, (num_words + 1, _NUM_HASH), generator=gen, dtype=torch.int64).to(torch.float64)
    return a[1:].to(device), a[0].to(device)


def hash_keys(x: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """Two independent seeded 52-bit keys (float64, exact integers) of each row's content.

    ``x``: (B, R) floats, hashed as float64 bit patterns (so float16/32/64 copies of one value agree,
    and -0.0 counts as 0.0), or (B,) / (B, 1) integer ids. Each row's bits, read as 16-bit words
    ``w_j``, give six seeded linear hashes ``(b + sum_j a_j w_j) mod p`` (p = 2,097,143, random
    ``a_j``): a universal family, so two different rows get the same pair of keys with probability
    about 2^-104. The dot products are float64 matrix products of small integers, exact and therefore
    identical on every device and for every batch size.
    """
    if x.ndim == 1:
        x = x[:, None]
    if x.is_floating_point():
        bits = (x.to(torch.float64) + 0.0).contiguous().view(torch.int16)
    else:
        bits = x.to(torch.int64).contiguous().view(torch.int16)
    words = bits.to(torch.float64)
    a, b = _multipliers(words.shape[1], int(seed), str(words.device))
    h = b.expand(words.shape[0], _NUM_HASH)
    for start in range(0, words.shape[1], _CHUNK_WORDS):
        h = torch.remainder(h + words[:, start : start + _CHUNK_WORDS] @ a[start : start + _CHUNK_WORDS], _P)
    h = h.to(torch.int64)
    key = h[:, 0] * 2**31 + h[:, 1] * 2**10 + (h[:, 2] & 1023)
    key2 = h[:, 3] * 2**31 + h[:, 4] * 2**10 + (h[:, 5] & 1023)
    return key.to(torch.float64), key2.to(torch.float64)


def empty_buffer(capacity: int, width: int, device: torch.device | str | None = None) -> Tensor:
    buf = torch.zeros(capacity, META + width, dtype=torch.float64, device=device)
    buf[:, :2] = float("inf")
    buf[:, 2] = -1.0
    return buf


def _bottom_k_order(keys: Tensor, capacity: int) -> Tensor:
    """Row positions of the ``capacity`` smallest ``(key, key2)`` pairs of ``keys`` (R, 2), one per distinct pair, in
    order (ties of a pair keep the first row); rows with an infinite key are empty slots."""
    order = torch.nonzero(torch.isfinite(keys[:, 0])).flatten()
    order = order[torch.argsort(keys[order, 1], stable=True)]
    order = order[torch.argsort(keys[order, 0], stable=True)]
    if order.numel() > 1:
        ordered = keys[order]
        dup = (ordered[1:, 0] == ordered[:-1, 0]) & (ordered[1:, 1] == ordered[:-1, 1])
        order = order[torch.cat([dup.new_ones(1), ~dup])]
    return order[:capacity]


def _gather(sources: tuple[Tensor, ...], order: Tensor, capacity: int) -> Tensor:
    """A buffer of ``capacity`` rows: the rows at ``order`` of the sources stacked (without stacking them), padded."""
    first = sources[0]
    out = empty_buffer(capacity, first.shape[1] - META, first.device)
    start = 0
    for src in sources:
        take = (order >= start) & (order < start + src.shape[0])
        out.index_copy_(0, torch.nonzero(take).flatten(), src.index_select(0, order[take] - start))
        start += src.shape[0]
    return out


def bottom_k(rows: Tensor, capacity: int) -> Tensor:
    """The ``capacity`` rows with the smallest ``(key, key2)``, one per distinct pair, sorted, padded."""
    return _gather((rows,), _bottom_k_order(rows[:, :2], capacity), capacity)


def buffer_insert(buf: Tensor, rows: Tensor) -> Tensor:
    """Insert keyed rows ``[key, key2, id, data...]`` into a buffer (bottom-k of the union). The rows are ordered by
    their keys alone and each row is copied once (the buffer and the batch are never concatenated)."""
    limit = buf[-1, 0]
    if bool(torch.isfinite(limit)):  # full: only keys up to the current largest can enter
        rows = take_rows(rows, rows[:, 0] <= limit)
    if rows.shape[0] == 0:
        return buf
    order = _merged_order(buf[:, :2], rows[:, :2])
    if order is None:  # a key shared between or within the two: the general ordering
        order = _bottom_k_order(torch.cat([buf[:, :2], rows[:, :2]]), buf.shape[0])
    return _gather((buf, rows), order[: buf.shape[0]], buf.shape[0])


def _merged_order(buf_keys: Tensor, new_keys: Tensor) -> Tensor | None:
    """The bottom-k order of a sorted buffer and new rows by merging (the buffer is not sorted again): positions into
    ``[buffer; new rows]``, or None when a key occurs twice (then ``key2`` and the duplicates decide, in
    :func:`_bottom_k_order`). Equal to :func:`_bottom_k_order` whenever it answers."""
    filled = int(torch.isfinite(buf_keys[:, 0]).sum())
    key = buf_keys[:filled, 0].contiguous()
    new = torch.nonzero(torch.isfinite(new_keys[:, 0])).flatten()
    new = new[torch.argsort(new_keys[new, 0])]
    new_key = new_keys[new, 0]
    if new.numel() > 1 and bool((new_key[1:] == new_key[:-1]).any()):
        return None
    at = torch.searchsorted(key, new_key)  # buffer rows before each new row
    if filled and bool((key[at.clamp_max(filled - 1)] == new_key).any()):
        return None
    total = filled + new.numel()
    order = torch.empty(total, dtype=torch.long, device=key.device)
    new_place = at + torch.arange(new.numel(), device=key.device)
    order[new_place] = new + buf_keys.shape[0]
    is_buf = torch.ones(total, dtype=torch.bool, device=key.device)
    is_buf[new_place] = False
    order[is_buf] = torch.arange(filled, device=key.device)
    return order


def fold_buffers(stacked: Tensor) -> Tensor:
    """Bottom-k of the union of buffers stacked along dim 0: the ``dist_reduce_fx`` of buffers."""
    if stacked.ndim == 2:
        return stacked
    if stacked.numel() == 0:  # never sized anywhere
        return stacked[0]
    return bottom_k(stacked.reshape(-1, stacked.shape[-1]), stacked.shape[1])


def buffer_content(buf: Tensor) -> Tensor:
    """The filled rows of a buffer, in key order."""
    return take_rows(buf, torch.isfinite(buf[:, 0]))
