"""Streaming machinery shared by every metric: packed moment states, the candidate buffer and a
``torchmetrics.Metric`` base class that keeps them exact, float64 and mergeable.

Moment states
    One flat float64 tensor ``[n, mean (D), m2 (D*D)]`` per statistic (a centred triple of
    :mod:`lightning_repsim.functional._moments`). Packing the triple into one tensor lets torchmetrics
    gather it as a single state and reduce it with :func:`fold_moments`, an exact Chan merge (a plain
    ``"sum"`` of means or co-moments would be wrong).

Candidate buffer
    A bottom-k sketch: every input gets two seeded 52-bit hash keys of its content (or of a
    user-given id) and the buffer keeps the ``capacity`` inputs with the smallest keys, one per key.
    The bottom-k of a union is the bottom-k of the bottom-k's, so the content does not depend on the
    batch sizes, the order or the number of processes. Rows are ``[key, key2, id, data...]``, sorted
    by key, empty slots have ``key = +inf``. Identical rows have identical keys and are kept once.

Hashing is a seeded universal (linear) hash of each input's bits computed with exact float64
arithmetic on small integers, so it is identical on every device and for every batch size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.prints import rank_zero_warn

from lightning_repsim.functional._moments import batch_moments, covariance_from_moments, merge_moments, merge_moments_
from lightning_repsim.functional._validation import as_matrix, check_choice, check_finite, check_same_shape

NAN_STRATEGIES = ("error", "ignore")
META = 3  # buffer columns before the data: key, key2, id


# ----------------------------------------------------------------------------------------------
# packed moments
# ----------------------------------------------------------------------------------------------
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
    """Merge the rows of ``x`` (float64, (B, D)) into a packed state, in place; returns the state."""
    merge_moments_(*unpack_moments(state), *batch_moments(x))
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


# ----------------------------------------------------------------------------------------------
# hashing (bottom-k keys)
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# the candidate buffer
# ----------------------------------------------------------------------------------------------
def empty_buffer(capacity: int, width: int, device: torch.device | str | None = None) -> Tensor:
    buf = torch.zeros(capacity, META + width, dtype=torch.float64, device=device)
    buf[:, :2] = float("inf")
    buf[:, 2] = -1.0
    return buf


def take_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[index]`` along dim 0 for a boolean mask or an index vector, via ``index_select`` (much cheaper
    than advanced indexing for small tensors on a busy CPU)."""
    if index.dtype == torch.bool:
        index = index.nonzero().flatten()
    return x.index_select(0, index)


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


# ----------------------------------------------------------------------------------------------
# input preparation
# ----------------------------------------------------------------------------------------------
def flatten_rows(x: Tensor, name: str, lead_shape: torch.Size | None = None) -> Tensor:
    """Float64 ``(N, D)`` rows of ``x`` (``(B, D)`` or ``(B, T, D)``), errors as the functional layer."""
    out = as_matrix(x, name)
    if lead_shape is not None and x.shape[:-1] != lead_shape:
        raise ValueError(
            f"`{name}` must hold the same inputs as the first argument: leading shape {tuple(lead_shape)}, "
            f"got {tuple(x.shape[:-1])}"
        )
    return out


def row_selector(lead_shape: torch.Size, mask: Tensor | None, ids: Tensor | None, device) -> tuple[Tensor | None, Tensor | None]:
    """Flattened boolean ``mask`` (True = keep) and integer ``ids`` for inputs of leading shape ``lead_shape``."""
    keep = None
    if mask is not None:
        mask = torch.as_tensor(mask, device=device)
        if mask.dtype != torch.bool:
            raise TypeError(f"`mask` must be a boolean tensor (True = keep the input), got dtype {mask.dtype}")
        if mask.shape != lead_shape:
            raise ValueError(f"`mask` must have shape {tuple(lead_shape)} (the inputs' leading shape), got {tuple(mask.shape)}")
        keep = mask.reshape(-1)
    flat_ids = None
    if ids is not None:
        ids = torch.as_tensor(ids, device=device)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
            raise TypeError(f"`ids` must be an integer tensor, got dtype {ids.dtype}")
        if ids.shape != lead_shape:
            raise ValueError(f"`ids` must have shape {tuple(lead_shape)} (the inputs' leading shape), got {tuple(ids.shape)}")
        flat_ids = ids.reshape(-1).to(torch.int64)
        if flat_ids.numel() and (bool((flat_ids < 0).any()) or bool((flat_ids >= 2**52).any())):
            raise ValueError("`ids` must be integers in [0, 2**52)")
    return keep, flat_ids


def finite_rows(
    mats: list[tuple[Tensor, str]], nan_strategy: str
) -> tuple[list[Tensor], Tensor | None, int]:
    """Apply ``nan_strategy`` to the float64 row matrices: ``"error"`` raises the functional layer's
    error, ``"ignore"`` drops every row with a non-finite value in any of them. Returns the matrices,
    the kept-row selector (None if all kept) and the number dropped."""
    if nan_strategy == "error":
        for x, name in mats:
            check_finite(x, name)
        return [x for x, _ in mats], None, 0
    ok = torch.ones(mats[0][0].shape[0], dtype=torch.bool, device=mats[0][0].device)
    for x, _ in mats:
        ok &= torch.isfinite(x).all(dim=1)
    dropped = int((~ok).sum())
    if dropped == 0:
        return [x for x, _ in mats], None, 0
    return [take_rows(x, ok) for x, _ in mats], ok, dropped


# ----------------------------------------------------------------------------------------------
# the metric base class
# ----------------------------------------------------------------------------------------------
class StreamingMetric(Metric):
    """Base class: float64 sufficient statistics with exact merges.

    * states are always float64 (``.to(dtype)``, ``.half()`` and ``set_dtype`` only move them between
      devices), so Lightning's ``"16-true"`` precision cannot round them;
    * moment states reduce with an exact Chan merge and buffers with a bottom-k merge, both under
      DDP sync and :meth:`merge_state`;
    * states may be sized lazily at the first ``update`` (a process that saw no data is sized from the
      others at sync time);
    * ``compute()`` returns result dataclasses unchanged (torchmetrics would try to rebuild them);
    * ``forward`` only updates (these values are not meaningful per batch and are costly), except where
      a subclass sets ``_forward_computes = True``.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False
    _forward_computes = False

    def __init__(self, nan_strategy: str = "error", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.nan_strategy = check_choice(nan_strategy, "nan_strategy", NAN_STRATEGIES)
        self._lazy: dict[str, str] = {}  # lazily sized state -> "moments" | "buffer"
        self.add_state("num_dropped", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum", persistent=True)

    # -- states ---------------------------------------------------------------------------------
    def _add_moments(self, name: str, dim: int | None) -> None:
        default = empty_moments(dim) if dim is not None else torch.zeros(0, dtype=torch.float64)
        self.add_state(name, default, dist_reduce_fx=fold_moments, persistent=True)
        self._lazy[name] = "moments"

    def _add_buffer(self, name: str, capacity: int, width: int | None) -> None:
        default = empty_buffer(capacity, width) if width is not None else torch.zeros(0, 0, dtype=torch.float64)
        self.add_state(name, default, dist_reduce_fx=fold_buffers, persistent=True)
        self._lazy[name] = "buffer"

    def _identity(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """The empty (merge-identity) value of a lazily sized state of the given shape."""
        if self._lazy[name] == "moments":
            return empty_moments(moments_dim(shape[0]), self.device)
        return empty_buffer(shape[0], shape[1] - META, self.device)

    def _size_state(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """Allocate a lazily sized state at its first use; refuse a different size later."""
        state = getattr(self, name)
        if state.numel() == 0:
            state = self._identity(name, shape)
            setattr(self, name, state)
        elif tuple(state.shape) != tuple(shape):
            raise ValueError(
                f"{type(self).__name__}: the inputs changed size between updates (state `{name}` has shape "
                f"{tuple(state.shape)}, the new inputs need {tuple(shape)}); call reset() first"
            )
        return state

    def state_nbytes(self) -> int:
        """Bytes held by the metric states (what is synced, merged and checkpointed)."""
        return sum(getattr(self, k).numel() * getattr(self, k).element_size() for k in self._defaults)

    @property
    def num_inputs(self) -> int:
        """Inputs accumulated so far on this process (after masking and dropping)."""
        state = getattr(self, self._count_state)
        return int(state[0]) if state.numel() else 0

    _count_state = "moments"

    def _drop(self, count: int) -> None:
        if count:
            self.num_dropped += count

    # -- torchmetrics plumbing -----------------------------------------------------------------
    def _apply(self, fn: Callable, exclude_state: Any = "") -> torch.nn.Module:
        self._computed = None  # cached results are frozen dataclasses torchmetrics cannot rebuild
        this = super()._apply(fn, exclude_state=tuple(self._defaults))
        device = this._device
        for key, value in this._defaults.items():
            this._defaults[key] = value.to(device)
            setattr(this, key, getattr(this, key).to(device))
        return this

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        for key in self._defaults:  # states are updated in place: never share the caller's tensors
            setattr(self, key, getattr(self, key).clone())

    def set_dtype(self, dst_type: Any) -> Metric:
        """States stay float64 (the statistics are exact only in float64); only the nominal dtype changes."""
        return self

    def _wrap_compute(self, compute: Callable) -> Callable:
        @functools.wraps(compute)
        def wrapped_func(*args: Any, **kwargs: Any) -> Any:
            if not self.update_called:
                rank_zero_warn(
                    f"The ``compute`` method of metric {self.__class__.__name__}"
                    " was called before the ``update`` method which may lead to errors,"
                    " as metric states have not yet been updated.",
                    UserWarning,
                )
            if self._computed is not None:
                return self._computed
            with self.sync_context(
                dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync
            ):
                value = compute(*args, **kwargs)
            if self.compute_with_cache:
                self._computed = value
            return value

        return wrapped_func

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._forward_computes:
            return super().forward(*args, **kwargs)
        self.update(*args, **kwargs)
        return None

    def _fill_lazy(self, shapes: dict[str, tuple[int, ...]]) -> None:
        for name, shape in shapes.items():
            if getattr(self, name).numel() == 0 and all(shape):
                setattr(self, name, self._identity(name, shape))

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """Merge another metric's (or a ``metric_state`` dict's) statistics exactly into this one."""
        if isinstance(incoming_state, Metric):
            if not isinstance(incoming_state, type(self)):
                raise ValueError(
                    f"Expected incoming state to be an instance of {type(self).__name__} but got {type(incoming_state)}"
                )
            state, count = dict(incoming_state.metric_state), incoming_state._update_count
        elif isinstance(incoming_state, dict):
            state, count = dict(incoming_state), 1
        else:
            raise ValueError(f"Expected incoming state to be a dict or an instance of Metric but got {type(incoming_state)}")
        for name in self._lazy:  # sizes: a never-updated side is the identity of the other's size
            if name not in state:
                continue
            local, other = getattr(self, name), state[name]
            if local.numel() == 0 and other.numel() > 0:
                self._fill_lazy({name: tuple(other.shape)})
            elif other.numel() == 0 and local.numel() > 0:
                state[name] = self._identity(name, tuple(local.shape))
        super().merge_state(state)
        self._update_count += count
        self._computed = None

    def _sync_dist(self, dist_sync_fn: Callable = None, process_group: Any | None = None) -> None:
        if self._lazy:
            import torch.distributed as dist

            names = sorted(self._lazy)
            dims = torch.zeros(len(names), 2, dtype=torch.int64, device=self.device)
            for j, name in enumerate(names):
                shape = tuple(getattr(self, name).shape)
                dims[j, : len(shape)] = torch.tensor(shape, dtype=torch.int64)
            dist.all_reduce(dims, op=dist.ReduceOp.MAX, group=process_group or self.process_group)
            shapes = {}
            for j, name in enumerate(names):
                ndim = getattr(self, name).ndim
                shapes[name] = tuple(int(v) for v in dims[j, :ndim])
            self._fill_lazy(shapes)
        kwargs = {} if dist_sync_fn is None else {"dist_sync_fn": dist_sync_fn}
        super()._sync_dist(process_group=process_group, **kwargs)


__all__ = [
    "META",
    "NAN_STRATEGIES",
    "StreamingMetric",
    "buffer_content",
    "buffer_insert",
    "bottom_k",
    "empty_buffer",
    "empty_moments",
    "finite_rows",
    "flatten_rows",
    "fold_buffers",
    "fold_moments",
    "hash_keys",
    "moments_add",
    "moments_covariance",
    "moments_size",
    "pack_moments",
    "row_selector",
    "unpack_moments",
]


# ----------------------------------------------------------------------------------------------
# candidate inputs for the input-set search (shared by LLVDistance and SVDDissimilarity)
# ----------------------------------------------------------------------------------------------
class CandidateMixin:
    """The bounded candidate buffer of a :class:`StreamingMetric` and the candidate sets drawn from it.

    Two modes: *sketch* (default) keeps the ``buffer_size`` inputs with the smallest seeded hash of
    their content, or of their ``ids`` when given; *pinned* (``input_sets`` of ids given) keeps exactly
    the inputs whose ids occur in ``input_sets``, so explicit candidate sets can be evaluated.
    """

    def _init_candidates(self, buffer_size: int, input_sets: Tensor | None, set_size: int | None, width: int | None,
                         num_input_sets: int, seed: int) -> None:
        if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1:
            raise ValueError(f"`buffer_size` must be a positive int, got {buffer_size!r}")
        if isinstance(num_input_sets, bool) or not isinstance(num_input_sets, int) or num_input_sets < 1:
            raise ValueError(f"`num_input_sets` must be >= 1, got {num_input_sets!r}")
        self.seed = int(seed)
        self.num_input_sets = num_input_sets
        self.input_sets = None
        self._pinned = None
        if input_sets is not None:
            sets = torch.as_tensor(input_sets)
            if sets.dtype.is_floating_point or sets.dtype == torch.bool:
                raise TypeError(f"`input_sets` must hold integer input ids, got dtype {sets.dtype}")
            sets = sets.to(torch.long)
            if sets.ndim == 1:
                sets = sets[None]
            if sets.ndim != 2 or sets.numel() == 0 or (set_size is not None and sets.shape[1] != set_size):
                expect = "(S, M+1)" if set_size is None else f"(S, M+1) = (S, {set_size})"
                raise ValueError(f"`input_sets` must have shape {expect}, got {tuple(sets.shape)}")
            if bool((sets.sort(dim=1).values.diff(dim=1) == 0).any()):
                raise ValueError("`input_sets`: every candidate set must hold M+1 distinct inputs")
            if bool((sets < 0).any()):
                raise ValueError("`input_sets` must hold non-negative input ids")
            self.input_sets = sets
            self._pinned = torch.unique(sets)
            buffer_size = self._pinned.numel()
        self.buffer_size = buffer_size
        self._add_buffer("candidates", buffer_size, width)

    def _insert_candidates(self, content: Tensor, data: Tensor, ids: Tensor | None) -> None:
        """Offer inputs to the buffer: ``content`` is hashed (unless ``ids``), ``data`` is stored."""
        if self._pinned is not None:
            if ids is None:
                raise ValueError("`input_sets` hold input ids: pass the inputs' `ids` to update()")
            sel = torch.isin(ids, self._pinned.to(ids.device)).nonzero().flatten()
            ids, data = ids.index_select(0, sel), data.index_select(0, sel)
            key = key2 = ids.to(torch.float64)
        else:
            key, key2 = hash_keys(ids if ids is not None else content, self.seed)
        id_col = ids.to(torch.float64) if ids is not None else torch.full_like(key, -1.0)
        rows = torch.cat([key[:, None], key2[:, None], id_col[:, None], data], dim=1)
        buf = self._size_state("candidates", (self.buffer_size, META + data.shape[1]))
        self.candidates = buffer_insert(buf, rows)

    def _candidate_rows(self) -> Tensor:
        return buffer_content(self.candidates) if self.candidates.numel() else self.candidates.new_zeros(0, META)

    def _candidate_sets(self, rows: Tensor, set_size: int) -> tuple[Tensor, Tensor]:
        """``(positions, reported)``: candidate sets as row positions in ``rows`` and as reported in the
        result (input ids when every buffered input has one, else buffer positions)."""
        ids = rows[:, 2].to(torch.long)
        if self.input_sets is not None:
            sets = self.input_sets.to(rows.device)
            pos = torch.searchsorted(ids, sets.reshape(-1)).clamp_max(max(ids.numel() - 1, 0))
            found = ids.numel() > 0 and bool((ids[pos] == sets.reshape(-1)).all())
            if not found:
                seen = set(ids.tolist())
                missing = sorted({int(i) for i in sets.reshape(-1).tolist()} - seen)
                raise ValueError(
                    f"`input_sets` refer to input ids never passed to update(): {missing[:10]}"
                    + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else "")
                )
            return pos.reshape(sets.shape), sets.clone()
        if rows.shape[0] < set_size:
            raise ValueError(
                f"the candidate buffer holds {rows.shape[0]} distinct inputs, fewer than the M+1 = {set_size} of an "
                "input set: update() with more (distinct) inputs"
            )
        from lightning_repsim.functional.llv import draw_input_sets

        pos = draw_input_sets(rows.shape[0], set_size, self.num_input_sets, self.seed).to(rows.device)
        reported = ids[pos] if bool((ids >= 0).all()) else pos
        return pos, reported


def logit_rows(
    metric: StreamingMetric, logits_p: Tensor, logits_q: Tensor, mask: Tensor | None, ids: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Validated, masked, finite float64 (N, K) logits of both models and their ids (non-finite rows
    dropped and counted under ``nan_strategy="ignore"``; shape and finiteness errors as the functional layer)."""
    p = flatten_rows(logits_p, "logits_p")
    q = flatten_rows(logits_q, "logits_q")
    check_same_shape(logits_p, logits_q, "logits_p", "logits_q")
    keep, ids = row_selector(logits_p.shape[:-1], mask, ids, p.device)
    if keep is not None:
        p, q = take_rows(p, keep), take_rows(q, keep)
        ids = None if ids is None else take_rows(ids, keep)
    (p, q), ok, dropped = finite_rows([(p, "logits_p"), (q, "logits_q")], metric.nan_strategy)
    metric._drop(dropped)
    if ok is not None and ids is not None:
        ids = take_rows(ids, ok)
    return p, q, ids
