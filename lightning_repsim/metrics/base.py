"""``StreamingMetric``: the torchmetrics plumbing every metric of this package shares.

* **States** are float64 sufficient statistics of five kinds: packed centred moments (merged by an exact
  Chan merge), candidate buffers (bottom-k union), counters (sum), dimensions (must agree) and ``merged``
  statistics with their own exact merge (the shifted CKA statistic). The same
  merge serves ``update``, ``merge_state`` and DDP sync, so the result does not depend on batching or on
  the number of processes. States are not persistent (torchmetrics' default); ``metric.persistent(True)``
  puts them into ``state_dict`` (checkpoints), and loading checks that they fit the metric.
* **compute()** returns the headline value as a scalar tensor, so ``self.log(name, metric)``,
  ``MetricCollection``, ``MetricTracker`` and the other torchmetrics wrappers work;
  :meth:`~StreamingMetric.compute_result` returns the full, structured result (same sync, same cache).
* **forward** accumulates the batch and returns the batch's own value (see :meth:`~StreamingMetric.forward`).
* States may be sized lazily at the first ``update`` (K or M unknown before); a process that saw no data
  contributes the empty statistic at sync time (:func:`gather_states`).

Private torchmetrics attributes are touched only where no public hook exists, each with its reason on the
line (``_forward_cache``, ``_update_count``, ``_computed``, the ``_apply`` override).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors
from torchmetrics.utilities.prints import rank_zero_warn

from lightning_repsim.functional._validation import check_choice
from lightning_repsim.metrics.inputs import NAN_STRATEGIES
from lightning_repsim.metrics.moment_state import empty_moments, fold_moments, moments_add, moments_dim, moments_merge_
from lightning_repsim.metrics.sketch import META, buffer_insert, empty_buffer, fold_buffers

__all__ = ["DEFAULT_MEMORY_BUDGET_GB", "StreamingMetric", "gather_states"]

#: Default ``memory_budget_gb``: the most a metric may hold in states plus its compute temporaries.
DEFAULT_MEMORY_BUDGET_GB = 8.0
_GB = 1e9


def _fold_dims(stacked: Tensor) -> Tensor:
    """Dimensions gathered from all processes: every non-zero entry must agree (0 = not seen yet)."""
    if stacked.ndim == 1:
        return stacked
    seen = stacked.amax(dim=0)
    if bool(((stacked != 0) & (stacked != seen)).any()):
        raise ValueError(f"the processes accumulated inputs of different sizes: {stacked.tolist()}")
    return seen


def _fold_config(stacked: Tensor) -> Tensor:
    """Configurations gathered from all processes: they must be identical."""
    if stacked.ndim == 1:
        return stacked
    if bool((stacked != stacked[:1]).any()):
        raise ValueError(f"the processes run this metric with different configurations: {stacked.tolist()}")
    return stacked[0]


def _fold_merged(merge: Callable[[Tensor, Tensor], Tensor], stacked: Tensor) -> Tensor:
    """States of a ``merged`` kind gathered from all processes, folded with their own exact merge."""
    if stacked.ndim == 1:
        return stacked
    out = stacked[0]
    for state in stacked[1:]:
        out = merge(out, state)
    return out


_REDUCE = {"moments": fold_moments, "buffer": fold_buffers, "count": "sum", "dims": _fold_dims, "config": _fold_config}


def gather_states(result: Tensor, group: Any | None = None) -> list[Tensor]:
    """The metrics' default ``dist_sync_fn``: torchmetrics' ``gather_all_tensors`` (which pads tensors of
    different shapes), then the empty statistic in place of a lazily sized state that a process never sized
    (shape ``(0,)``: the empty moment triple, zeros; ``(0, 0)``: an empty candidate buffer)."""
    gathered = gather_all_tensors(result, group)
    sized = [t for t in gathered if t.numel() > 0]
    if not sized or len(sized) == len(gathered):
        return gathered
    shape = sized[0].shape
    if len(shape) == 1:
        return [t if t.numel() else torch.zeros(shape, dtype=t.dtype, device=t.device) for t in gathered]
    return [t if t.numel() else empty_buffer(shape[0], shape[1] - META, t.device) for t in gathered]


class StreamingMetric(Metric):
    """Base class: float64 sufficient statistics with exact merges (see the module docstring).

    Subclasses declare states with :meth:`_add_state_kind`, turn a batch into per-state contributions in
    ``update`` (then call :meth:`_accumulate`), and compute their result object from a dict of states in
    :meth:`_result_from` (a result with a ``value`` field, the headline number).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False
    plot_lower_bound: float | None = 0.0
    plot_upper_bound: float | None = None

    def __init__(self, nan_strategy: str = "error", memory_budget_gb: float | None = DEFAULT_MEMORY_BUDGET_GB,
                 config: dict[str, int] | None = None, **kwargs: Any) -> None:
        if kwargs.get("dist_sync_on_step"):
            raise ValueError(
                f"{type(self).__name__} does not support `dist_sync_on_step=True`: forward returns the process's own "
                "batch value; compute() and compute_result() are synced across processes"
            )
        kwargs.setdefault("dist_sync_fn", gather_states)
        super().__init__(**kwargs)
        self.nan_strategy = check_choice(nan_strategy, "nan_strategy", NAN_STRATEGIES)
        if memory_budget_gb is not None and not (isinstance(memory_budget_gb, (int, float)) and memory_budget_gb > 0):
            raise ValueError(f"`memory_budget_gb` must be a positive number or None, got {memory_budget_gb!r}")
        self.memory_budget_gb = None if memory_budget_gb is None else float(memory_budget_gb)
        self._kinds: dict[str, str] = {}
        self._empty: dict[str, Tensor] = {}
        self._capacity: dict[str, int] = {}
        self._merge: dict[str, Callable[[Tensor, Tensor], Tensor]] = {}
        self._config_names: tuple[str, ...] = ()
        self._version = 0
        self._result: Any = None
        self._result_version = -1
        self._capture = False
        self._batch: dict[str, Any] | None = None
        self._warned: set[str] = set()
        if config:
            # the configuration is the first state: torchmetrics < 1.9 compares only the first state of two metrics
            # with the same state names when it forms a MetricCollection's compute groups
            self._config_names = tuple(config)
            self._add_state_kind("config", "config", torch.tensor([int(v) for v in config.values()], dtype=torch.int64))
        self._add_state_kind("num_dropped", "count", torch.zeros((), dtype=torch.int64))

    # -- states ---------------------------------------------------------------------------------
    def _add_state_kind(self, name: str, kind: str, default: Tensor, capacity: int | None = None,
                        merge: Callable[[Tensor, Tensor], Tensor] | None = None) -> None:
        """Declare a state of one of the kinds ``moments``, ``buffer`` (of ``capacity`` rows), ``count``, ``dims``,
        ``config``, or ``merged``: a flat statistic with its own exact ``merge(a, b)`` whose all-zero value is the
        empty statistic (contributions are whole batch statistics). Not persistent, like every torchmetrics state;
        ``persistent(True)`` changes that."""
        if kind == "merged":
            if merge is None:
                raise ValueError("a `merged` state needs its `merge` function")
            self._merge[name] = merge
            reduce: Any = functools.partial(_fold_merged, merge)
        else:
            reduce = _REDUCE[kind]
        self.add_state(name, default, dist_reduce_fx=reduce, persistent=False)
        self._kinds[name] = kind
        self._empty[name] = default.detach().clone()
        if capacity is not None:
            self._capacity[name] = capacity

    def _identity(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """The empty (merge-identity) value of a lazily sized state of the given shape."""
        if self._kinds[name] == "moments":
            return empty_moments(moments_dim(shape[0]), self.device)
        if self._kinds[name] == "merged":
            return torch.zeros(shape, dtype=torch.float64, device=self.device)
        return empty_buffer(shape[0], shape[1] - META, self.device)

    def _sized(self, name: str, shape: tuple[int, ...], state: Tensor | None = None) -> Tensor:
        """``state`` (default: the metric's) with the given shape: allocated at its first use when lazily sized;
        a different size later is refused with a message that says what the sizes mean."""
        state = getattr(self, name) if state is None else state
        if state.numel() == 0:
            return self._identity(name, shape)
        if tuple(state.shape) != tuple(shape):
            raise ValueError(
                f"{type(self).__name__}: the inputs changed size between updates ({self._describe(name, tuple(state.shape))} "
                f"so far, {self._describe(name, tuple(shape))} now); call reset() first"
            )
        return state

    def _describe(self, name: str, shape: tuple[int, ...]) -> str:
        """What a state's shape means (e.g. ``K=6``); subclasses say it in their own terms."""
        return f"state `{name}` of shape {shape}"

    def _accumulate(self, contributions: dict[str, Any]) -> None:
        """Add one batch: ``moments`` states take float64 rows (B, D), ``buffer`` states keyed rows
        ``[key, key2, id, data...]``, ``count`` states an int, ``dims`` states a dimension tensor. Every size is
        checked before any state changes, so a refused batch leaves the metric as it was."""
        targets = {name: self._target(name, getattr(self, name), value) for name, value in contributions.items()}
        for name, value in contributions.items():
            setattr(self, name, self._add_to(name, targets[name], value))
        self._version += 1
        if self._capture:
            self._batch = contributions

    def _target(self, name: str, state: Tensor, value: Any) -> Tensor:
        """``state`` checked (and, if lazily sized and still empty, allocated) for the contribution ``value``."""
        kind = self._kinds[name]
        if kind == "moments":
            dim = value.shape[1]
            return self._sized(name, (1 + dim + dim * dim,), state)
        if kind == "buffer":
            return self._sized(name, (self._capacity[name], value.shape[1]), state)
        if kind == "merged":
            return self._sized(name, tuple(value.shape), state)
        if kind == "dims":
            value = value.to(state.device)
            if bool(((state != 0) & (value != 0) & (state != value)).any()):
                before, now = self._describe(name, tuple(state.tolist())), self._describe(name, tuple(value.tolist()))
                raise ValueError(
                    f"{type(self).__name__}: the inputs changed size between updates ({before} so far, {now} now); "
                    "call reset() first"
                )
        return state

    def _add_to(self, name: str, state: Tensor, value: Any) -> Tensor:
        """``state`` (already checked by :meth:`_target`) plus the contribution ``value`` (moments: in place)."""
        kind = self._kinds[name]
        if kind == "moments":
            return moments_add(state, value)
        if kind == "buffer":
            return buffer_insert(state, value)
        if kind == "merged":
            return self._merge[name](state, value.to(state.device))
        if kind == "count":
            return state + value
        if kind == "dims":
            return torch.maximum(state, value.to(state.device))
        raise ValueError(f"state `{name}` of kind {kind} takes no contributions")

    def _states(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in self._kinds}

    def _fresh_states(self, contributions: dict[str, Any]) -> dict[str, Tensor]:
        """The states of one batch alone: the empty statistics plus ``contributions``."""
        states = {name: empty.to(self.device, copy=True) for name, empty in self._empty.items()}
        for name, value in contributions.items():
            states[name] = self._add_to(name, self._target(name, states[name], value), value)
        return states

    # -- results ---------------------------------------------------------------------------------
    def _result_from(self, states: dict[str, Tensor]) -> Any:
        """The full result computed from a dict of states (synced or not)."""
        raise NotImplementedError

    def compute(self) -> Tensor:
        """The headline value (float64 scalar tensor) over everything accumulated, synced across processes."""
        self._result = self._result_from(self._states())  # torchmetrics' wrapper has synced the states
        self._result_version = self._version
        return self._result.value

    def compute_result(self) -> Any:
        """The full result (terms, chosen sets, parts, ...) whose ``value`` :meth:`compute` returns. Synced across
        processes like ``compute()`` (every process must call it), cached until the next update, merge or reset."""
        if self._result is None or self._result_version != self._version:
            if not self.update_called:
                rank_zero_warn(
                    f"The ``compute`` method of metric {type(self).__name__} was called before the ``update`` method "
                    "which may lead to errors, as metric states have not yet been updated.",
                    UserWarning,
                )
            with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self.sync_on_compute):
                self._result = self._result_from(self._states())
                self._result_version = self._version
        return self._result

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """Accumulate the batch (as ``update``) and return the batch's own value (float64 scalar tensor).

        The batch value is computed from the batch's statistics alone, at the cost of one ``compute()`` on a
        batch-sized state (for d_LLV and d_SVD: the label search, so prefer ``update`` in tight loops). When the
        batch alone cannot define the value (too few inputs, a constant log-odds), the value over everything
        accumulated so far is returned instead, with a warning (once per reason); if that is undefined too,
        NaN with a warning. Never synced (``dist_sync_on_step`` is not supported).
        """
        self._capture = True
        try:
            self.update(*args, **kwargs)
        finally:
            self._capture = False
        batch, self._batch = self._batch, None
        value = self._batch_value(batch)
        self._forward_cache = value  # Lightning reads `_forward_cache` when a Metric object is logged with on_step
        return value

    def _batch_value(self, batch: dict[str, Any] | None) -> Tensor:
        reason = "the batch had no (unmasked, finite) inputs"
        if batch is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # per-batch diagnostics would repeat every step
                try:
                    return self._result_from(self._fresh_states(batch)).value.clone()
                except (ValueError, torch.linalg.LinAlgError) as err:
                    reason = str(err)
        self._warn_once(
            f"batch:{reason[:60]}",
            f"{type(self).__name__}.forward: the batch alone does not define the value ({reason}); returning the "
            "value over everything accumulated so far instead.",
        )
        try:
            return self._result_from(self._states()).value.clone()
        except (ValueError, torch.linalg.LinAlgError) as err:
            self._warn_once(f"running:{str(err)[:60]}", f"{type(self).__name__}.forward: returning NaN: {err}")
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.device)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, UserWarning)

    def plot(self, val: Tensor | list[Tensor] | None = None, ax: Any | None = None) -> Any:
        """Plot a value (default: ``compute()``) or a sequence of values (e.g. one per epoch, from
        ``torchmetrics.wrappers.MetricTracker``) with torchmetrics' plotting helper; returns ``(fig, ax)``.

        Example:
            >>> import torch
            >>> from lightning_repsim.metrics import MeanKLDivergence
            >>> metric = MeanKLDivergence()
            >>> values = [metric(torch.randn(20, 5), torch.randn(20, 5)) for _ in range(3)]
            >>> fig, ax = metric.plot(values)
        """
        return self._plot(val, ax)

    # -- memory ------------------------------------------------------------------------------------
    def _check_memory(self, state_bytes: float, compute_bytes: float, what: str, advice: str) -> None:
        """Refuse, before allocating, a configuration that would need more than ``memory_budget_gb``."""
        if self.memory_budget_gb is None:
            return
        total = state_bytes + compute_bytes
        if total > self.memory_budget_gb * _GB:
            raise ValueError(
                f"{type(self).__name__} {what} would need about {total / _GB:.1f} GB (states {state_bytes / _GB:.1f} GB, "
                f"compute() about {compute_bytes / _GB:.1f} GB more), above `memory_budget_gb={self.memory_budget_gb:g}`. "
                f"{advice} (Or raise `memory_budget_gb`, or pass None to skip this check.)"
            )

    def state_nbytes(self) -> int:
        """Bytes held by the metric states (what is synced, merged and, if persistent, checkpointed)."""
        return sum(getattr(self, k).numel() * getattr(self, k).element_size() for k in self._kinds)

    @property
    def num_inputs(self) -> int:
        """Inputs accumulated so far on this process (after masking and dropping)."""
        state = getattr(self, self._count_state)
        return int(state[0]) if state.numel() else 0

    _count_state = "moments"

    # -- merging, loading, resetting -----------------------------------------------------------
    def _config_of(self, state: dict[str, Any]) -> dict[str, int] | None:
        config = state.get("config")
        return None if config is None else dict(zip(self._config_names, (int(v) for v in config)))

    def _check_compatible(self, state: dict[str, Any], source: str) -> None:
        """Refuse states that do not fit this metric, naming the mismatch."""
        missing = sorted(set(self._kinds) - set(state))
        if missing:
            raise ValueError(f"{type(self).__name__}: {source} lacks the state(s) {missing}")
        mine, theirs = self._config_of(self._states()), self._config_of(state)
        if mine is not None and theirs is not None and mine != theirs:
            diff = ", ".join(f"{k}={theirs[k]} (this metric: {mine[k]})" for k in mine if mine[k] != theirs[k])
            raise ValueError(f"{type(self).__name__}: cannot combine with {source}, configured differently: {diff}")
        for name, kind in self._kinds.items():
            local, other = getattr(self, name), state[name]
            if not isinstance(other, Tensor):
                raise ValueError(f"{type(self).__name__}: state `{name}` of {source} is not a tensor")
            if kind in ("moments", "buffer", "merged") and local.numel() and other.numel() and local.shape != other.shape:
                raise ValueError(
                    f"{type(self).__name__}: cannot combine with {source}: it has {self._describe(name, tuple(other.shape))}, "
                    f"this metric {self._describe(name, tuple(local.shape))}"
                )
            if kind == "dims" and bool(((local != 0) & (other.to(local.device) != 0) & (local != other.to(local.device))).any()):
                raise ValueError(
                    f"{type(self).__name__}: cannot combine with {source}: it has {self._describe(name, tuple(other.tolist()))}, "
                    f"this metric {self._describe(name, tuple(local.tolist()))}"
                )

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """Merge another metric's (or a ``metric_state`` dict's) statistics exactly into this one, after checking
        that they fit (same configuration and sizes; a clear ``ValueError`` names any mismatch)."""
        if isinstance(incoming_state, Metric):
            if not isinstance(incoming_state, type(self)):
                raise ValueError(
                    f"Expected incoming state to be an instance of {type(self).__name__} but got {type(incoming_state)}"
                )
            state, count = dict(incoming_state.metric_state), incoming_state.update_count
        elif isinstance(incoming_state, dict):
            state, count = dict(incoming_state), 1
        else:
            raise ValueError(f"Expected incoming state to be a dict or an instance of Metric but got {type(incoming_state)}")
        self._check_compatible(state, "the incoming state")
        for name, kind in self._kinds.items():
            local, other = getattr(self, name), state[name].to(self.device)
            if kind == "moments":
                if other.numel() and other[0] > 0:
                    setattr(self, name, moments_merge_(self._sized(name, tuple(other.shape)), other))
            elif kind == "buffer":
                if other.numel():
                    setattr(self, name, buffer_insert(self._sized(name, tuple(other.shape)), other))
            elif kind == "merged":
                if other.numel():
                    setattr(self, name, self._merge[name](self._sized(name, tuple(other.shape)), other))
            elif kind == "count":
                setattr(self, name, local + other)
            elif kind == "dims":
                setattr(self, name, _fold_dims(torch.stack([local, other])))
        self._update_count += count  # no public setter: compute() must not warn "before update" after a merge
        self._computed = None  # torchmetrics' merge_state leaves a stale cached compute() value
        self._version += 1

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        present = {name: state_dict[prefix + name] for name in self._kinds if prefix + name in state_dict}
        if present:
            self._check_compatible({**self._states(), **present}, "the loaded state_dict")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        for key in self._kinds:  # states are updated in place: never share the caller's tensors
            setattr(self, key, getattr(self, key).to(self.device).clone())
        self._computed = None  # a loaded state invalidates torchmetrics' cached compute() value
        if present:
            self._update_count = max(self._update_count, 1)  # no public setter: loaded statistics count as updated
        self._version += 1

    def reset(self) -> None:
        super().reset()
        self._version += 1
        self._result = None

    # -- dtype and device ------------------------------------------------------------------------
    def _apply(self, fn: Callable, exclude_state: Any = "") -> torch.nn.Module:
        # Lightning's "16-true"/"bf16-true" call module.to(dtype), which torchmetrics applies to states: exact
        # statistics stay float64, so states are excluded there and only follow the device here.
        this = super()._apply(fn, exclude_state=tuple(self._kinds))
        for key in self._kinds:
            setattr(this, key, getattr(this, key).to(this.device))
        return this

    def set_dtype(self, dst_type: Any) -> Metric:
        """States stay float64 (the statistics are exact only in float64); nothing is cast."""
        return self
