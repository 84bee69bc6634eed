"""How each kind of metric state is sized, added to, merged and reduced across processes: one small object per kind.

Every state of a :class:`~lightning_repsim.metrics.base.StreamingMetric` is a float64 (or int64) tensor registered
with torchmetrics' ``add_state``; its kind says what that tensor means and gives torchmetrics the ``dist_reduce_fx``
that folds the states of all processes (stacked along dim 0) exactly:

* :class:`Moments` -- a packed centred moment triple ``[n, mean, m2]`` of row vectors (Chan merge);
* :class:`Buffer` -- a bottom-k candidate buffer of keyed rows (the bottom-k of the union);
* :class:`Statistic` -- a flat statistic with its own exact merge (the shifted CKA statistic);
* :class:`Count` -- an integer counter (sum);
* :class:`Dims` -- sizes seen so far, 0 = not seen yet (must agree);
* :class:`Fingerprint` -- positive hash keys of what the statistics were computed with besides the inputs (e.g. the
  unembeddings of :class:`~lightning_repsim.metrics.SVDDissimilarity`), 0 = nothing accumulated yet (must agree);
* :class:`Config` -- the metric's configuration (must be identical).

``update`` contributions, ``merge_state`` and DDP sync all go through the same merge, so a result does not depend on
batching or on the number of processes. States whose size is unknown before the first ``update`` are *lazily sized*:
shape ``(0,)`` until then, and :func:`gather_states` gives a process that saw no data the empty statistic at sync time.
A contribution or a state that does not fit raises :class:`SizeMismatch` / :class:`ConfigMismatch`, which the metric
turns into a message in its own terms. :meth:`StateKind.invalid` says what is wrong with a state's *values* (NaN or
infinite statistics, a negative or fractional count): a loaded or merged state must be one that ``update`` could have
produced.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torchmetrics.utilities.distributed import gather_all_tensors

from lightning_repsim.metrics.moment_state import fold_moments, moments_add, moments_merge_, moments_size
from lightning_repsim.metrics.sketch import META, buffer_insert, empty_buffer, fold_buffers

__all__ = [
    "AUTOMATIC",
    "Buffer",
    "Config",
    "ConfigMismatch",
    "Count",
    "Dims",
    "Fingerprint",
    "Moments",
    "SizeMismatch",
    "StateKind",
    "Statistic",
    "gather_states",
    "state_kind",
]


#: A configuration entry the metric chooses itself (given as None: ``rep_dim``, the default buffer, no label subset, no
#: input sets): stored as this integer, shown as ``default`` in a mismatch.
AUTOMATIC = -1


class SizeMismatch(ValueError):
    """Two sizes that cannot be combined: ``ours`` (the state's) and ``theirs`` (a contribution's or another state's),
    each a tuple the metric describes in its own terms (a shape, or the dimensions of a :class:`Dims` state)."""

    def __init__(self, ours: tuple[int, ...], theirs: tuple[int, ...]) -> None:
        super().__init__(f"sizes {ours} and {theirs} differ")
        self.ours, self.theirs = ours, theirs


class ConfigMismatch(ValueError):
    """Two configurations that differ; the message lists the entries, ``name=theirs (this metric: ours)``."""


class StateKind:
    """What a state means. ``reduce`` is torchmetrics' ``dist_reduce_fx``; ``prepare`` checks (and sizes) the state for
    a contribution, ``add`` adds it, ``merge`` merges another state of the same kind (after ``check``)."""

    reduce: Callable[[Tensor], Tensor] | str

    def prepare(self, state: Tensor, value: Any, device: torch.device) -> Tensor:
        """``state`` ready to take the contribution ``value`` (sized if it was lazily sized and empty)."""
        return state

    def add(self, state: Tensor, value: Any) -> Tensor:
        raise TypeError(f"a {type(self).__name__} state takes no update contributions")

    def check(self, ours: Tensor, theirs: Tensor) -> None:
        """Raise :class:`SizeMismatch` or :class:`ConfigMismatch` if ``theirs`` cannot be merged into ``ours``."""

    def invalid(self, state: Tensor) -> str | None:
        """What is wrong with the values of ``state`` (a loaded or incoming one), or None: every entry of a float
        statistic must be finite."""
        return _non_finite(state) if state.is_floating_point() else None

    def merge(self, ours: Tensor, theirs: Tensor) -> Tensor:
        raise NotImplementedError


def _non_finite(values: Tensor) -> str | None:
    bad = int((~torch.isfinite(values)).sum())
    return f"{bad} non-finite value(s) (NaN or infinite) among its {values.numel()} entries" if bad else None


def _bad_count(count: Tensor) -> str | None:
    value = float(count)
    if not math.isfinite(value) or value < 0 or value != math.floor(value):
        return f"a count of {value!r} inputs (a count is a non-negative integer)"
    return None


class _Sized(StateKind):
    """A statistic whose shape follows from its first contribution; ``(0,)`` until then (lazily sized)."""

    def identity(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """The empty statistic of the given shape (the merge identity)."""
        return torch.zeros(shape, dtype=torch.float64, device=device)

    def shape_for(self, value: Tensor) -> tuple[int, ...]:
        return tuple(value.shape)

    def sized(self, state: Tensor, shape: tuple[int, ...], device: torch.device) -> Tensor:
        if state.numel() == 0:
            return self.identity(shape, device)
        if tuple(state.shape) != tuple(shape):
            raise SizeMismatch(tuple(state.shape), tuple(shape))
        return state

    def prepare(self, state: Tensor, value: Tensor, device: torch.device) -> Tensor:
        return self.sized(state, self.shape_for(value), device)

    def check(self, ours: Tensor, theirs: Tensor) -> None:
        if ours.numel() and theirs.numel() and ours.shape != theirs.shape:
            raise SizeMismatch(tuple(ours.shape), tuple(theirs.shape))

    def merge(self, ours: Tensor, theirs: Tensor) -> Tensor:
        if theirs.numel() == 0:  # never sized: the empty statistic
            return ours
        return self._merge(self.sized(ours, tuple(theirs.shape), theirs.device), theirs)

    def _merge(self, ours: Tensor, theirs: Tensor) -> Tensor:
        raise NotImplementedError


class Moments(_Sized):
    """A packed centred moment triple of row vectors (:mod:`~lightning_repsim.metrics.moment_state`); contributions
    are float64 rows (B, D), added in place; states merge by Chan's exact formula."""

    reduce = staticmethod(fold_moments)

    def shape_for(self, value: Tensor) -> tuple[int, ...]:
        return (moments_size(value.shape[1]),)

    def add(self, state: Tensor, value: Tensor) -> Tensor:
        return moments_add(state, value)

    def invalid(self, state: Tensor) -> str | None:
        if state.numel() == 0:
            return None
        return _bad_count(state[0]) or _non_finite(state)

    def _merge(self, ours: Tensor, theirs: Tensor) -> Tensor:
        return moments_merge_(ours, theirs) if float(theirs[0]) > 0 else ours


class Buffer(_Sized):
    """A bottom-k buffer of ``capacity`` keyed rows ``[key, key2, id, data...]`` (:mod:`~lightning_repsim.metrics.sketch`);
    contributions are keyed rows; buffers merge to the bottom-k of their union."""

    reduce = staticmethod(fold_buffers)

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity

    def identity(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        return empty_buffer(shape[0], shape[1] - META, device)

    def shape_for(self, value: Tensor) -> tuple[int, ...]:
        return (self.capacity, value.shape[1])

    def add(self, state: Tensor, value: Tensor) -> Tensor:
        return buffer_insert(state, value)

    def invalid(self, state: Tensor) -> str | None:
        """Keys finite or ``+inf`` (an empty slot), every other entry finite."""
        if state.numel() == 0:
            return None
        keys, rest = state[:, :2], state[:, 2:]
        bad = int((torch.isnan(keys) | (keys == float("-inf"))).sum()) + int((~torch.isfinite(rest)).sum())
        if not bad:
            return None
        return f"{bad} invalid value(s) (NaN, or infinite outside the keys of empty slots) among its {state.numel()} entries"

    def _merge(self, ours: Tensor, theirs: Tensor) -> Tensor:
        return buffer_insert(ours, theirs)


class Statistic(_Sized):
    """A flat float64 statistic with its own exact ``merge(a, b)`` whose all-zero value is the empty statistic;
    contributions are whole batch statistics."""

    def __init__(self, merge: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.merge_fn = merge

    def reduce(self, stacked: Tensor) -> Tensor:
        if stacked.ndim == 1:
            return stacked
        out = stacked[0]
        for state in stacked[1:]:
            out = self.merge_fn(out, state)
        return out

    def add(self, state: Tensor, value: Tensor) -> Tensor:
        return self.merge_fn(state, value.to(state.device))

    def _merge(self, ours: Tensor, theirs: Tensor) -> Tensor:
        return self.merge_fn(ours, theirs)


class Count(StateKind):
    """An integer counter (e.g. dropped rows): contributions are ints, states add."""

    reduce = "sum"

    def add(self, state: Tensor, value: int) -> Tensor:
        return state + value

    def invalid(self, state: Tensor) -> str | None:
        return f"a negative count {state.tolist()}" if bool((state < 0).any()) else None

    def merge(self, ours: Tensor, theirs: Tensor) -> Tensor:
        return ours + theirs


def _conflict(ours: Tensor, theirs: Tensor) -> bool:
    return bool(((ours != 0) & (theirs != 0) & (ours != theirs)).any())


class Dims(StateKind):
    """Sizes seen so far (e.g. K), 0 where not seen yet: every process and every batch must agree."""

    #: what the processes disagree on, when they do (``{values}``: the gathered states)
    conflict_message = "the processes accumulated inputs of different sizes: {values}"

    def reduce(self, stacked: Tensor) -> Tensor:
        if stacked.ndim == 1:
            return stacked
        seen = stacked.amax(dim=0)
        if _conflict(stacked, seen):
            raise ValueError(self.conflict_message.format(values=stacked.tolist()))
        return seen

    def prepare(self, state: Tensor, value: Tensor, device: torch.device) -> Tensor:
        self.check(state, value.to(state.device))
        return state

    def add(self, state: Tensor, value: Tensor) -> Tensor:
        return torch.maximum(state, value.to(state.device))

    def check(self, ours: Tensor, theirs: Tensor) -> None:
        if _conflict(ours, theirs):
            raise SizeMismatch(tuple(ours.tolist()), tuple(theirs.tolist()))

    def merge(self, ours: Tensor, theirs: Tensor) -> Tensor:
        return torch.maximum(ours, theirs)


class Fingerprint(Dims):
    """Positive hash keys of something the statistics depend on besides the inputs (a model's unembedding, with which
    each input's log-partition was computed), 0 where nothing was accumulated yet: states accumulated with different
    ones mix two models, so every process and every merged or loaded state must agree."""

    conflict_message = ("the processes accumulated their inputs with different unembeddings (fingerprints {values}): "
                        "the statistics would mix two models")


class Config(StateKind):
    """The metric's configuration as integers (``names`` in order; :data:`AUTOMATIC` for an entry given as None):
    states of differently configured metrics refuse to merge. It is a metric's first state: torchmetrics < 1.9
    compares only the first state of two metrics with the same state names when it forms a ``MetricCollection``'s
    compute groups."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names

    @staticmethod
    def reduce(stacked: Tensor) -> Tensor:
        if stacked.ndim == 1:
            return stacked
        if bool((stacked != stacked[:1]).any()):
            raise ValueError(f"the processes run this metric with different configurations: {stacked.tolist()}")
        return stacked[0]

    def check(self, ours: Tensor, theirs: Tensor) -> None:
        mine, other = ours.tolist(), theirs.tolist()
        if mine != other:
            diff = ", ".join(f"{k}={_shown(b)} (this metric: {_shown(a)})" for k, a, b in zip(self.names, mine, other)
                             if a != b)
            raise ConfigMismatch(diff or f"{other} (this metric: {mine})")

    def merge(self, ours: Tensor, theirs: Tensor) -> Tensor:
        return ours


def _shown(value: int) -> int | str:
    """A configuration entry as a message shows it: :data:`AUTOMATIC` is ``default``."""
    return "default" if value == AUTOMATIC else value


#: The kinds by name, for the shorthand ``_add_state_kind(name, "moments", ...)``.
_BY_NAME: dict[str, Callable[..., StateKind]] = {
    "moments": lambda capacity, merge: Moments(),
    "buffer": lambda capacity, merge: Buffer(capacity),
    "merged": lambda capacity, merge: Statistic(merge),
    "count": lambda capacity, merge: Count(),
    "dims": lambda capacity, merge: Dims(),
    "fingerprint": lambda capacity, merge: Fingerprint(),
}


def state_kind(name: str, capacity: int | None = None, merge: Callable[[Tensor, Tensor], Tensor] | None = None) -> StateKind:
    """The kind called ``name`` (``moments``, ``buffer`` of ``capacity`` rows, ``merged`` with its ``merge``,
    ``count``, ``dims``)."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown state kind {name!r}: one of {sorted(_BY_NAME)}")
    if name == "buffer" and capacity is None:
        raise ValueError("a `buffer` state needs its `capacity`")
    if name == "merged" and merge is None:
        raise ValueError("a `merged` state needs its `merge` function")
    return _BY_NAME[name](capacity, merge)


def gather_states(result: Tensor, group: Any | None = None) -> list[Tensor]:
    """The metrics' ``dist_sync_fn``: torchmetrics' ``gather_all_tensors`` (which pads tensors of different shapes),
    then the empty statistic in place of a lazily sized state that a process never sized (shape ``(0,)``: zeros, the
    empty moment triple or statistic; ``(0, 0)``: an empty candidate buffer), so that the states stack."""
    gathered = gather_all_tensors(result, group)
    sized = [t for t in gathered if t.numel() > 0]
    if not sized or len(sized) == len(gathered):
        return gathered
    shape = sized[0].shape
    if len(shape) == 1:
        return [t if t.numel() else torch.zeros(shape, dtype=t.dtype, device=t.device) for t in gathered]
    return [t if t.numel() else empty_buffer(shape[0], shape[1] - META, t.device) for t in gathered]
