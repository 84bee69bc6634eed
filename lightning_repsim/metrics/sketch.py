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


def bottom_k(rows: Tensor, capacity: int) -> Tensor:
    """The ``capacity`` rows with the smallest ``(key, key2)``, one per distinct pair, sorted, padded."""
    rows = take_rows(rows, torch.isfinite(rows[:, 0]))
    rows = rows.index_select(0, torch.argsort(rows[:, 1], stable=True))
    rows = rows.index_select(0, torch.argsort(rows[:, 0], stable=True))
    if rows.shape[0] > 1:
        dup = (rows[1:, 0] == rows[:-1, 0]) & (rows[1:, 1] == rows[:-1, 1])
        rows = take_rows(rows, torch.cat([dup.new_ones(1), ~dup]))
    rows = rows[:capacity]
    if rows.shape[0] < capacity:
        pad = empty_buffer(capacity - rows.shape[0], rows.shape[1] - META, rows.device)
        rows = torch.cat([rows, pad])
    return rows


def buffer_insert(buf: Tensor, rows: Tensor) -> Tensor:
    """Insert keyed rows ``[key, key2, id, data...]`` into a buffer (bottom-k of the union)."""
    limit = buf[-1, 0]
    if bool(torch.isfinite(limit)):  # full: only keys up to the current largest can enter
        rows = take_rows(rows, rows[:, 0] <= limit)
    if rows.shape[0] == 0:
        return buf
    return bottom_k(torch.cat([buf, rows]), buf.shape[0])


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
