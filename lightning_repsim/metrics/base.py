"""``StreamingMetric``: the torchmetrics plumbing every metric of this package shares, on torchmetrics' public API.

* **States** are float64 sufficient statistics registered with ``add_state``; each has a kind
  (:mod:`~lightning_repsim.metrics.state_kinds`: moments, buffer, statistic, count, dims, config) that sizes it, adds
  ``update`` contributions, merges states and gives torchmetrics its ``dist_reduce_fx``. The same merge serves
  ``update``, ``merge_state`` and DDP sync, so the result does not depend on batching or on the number of processes.
  States are not persistent (torchmetrics' default); ``metric.persistent(True)`` puts them into ``state_dict``, and a
  ``load_state_dict`` post-hook refuses states that do not fit the metric.
* **compute()** returns the headline value as a scalar tensor, so ``self.log(name, metric)``, ``MetricCollection``,
  ``MetricTracker`` and the other torchmetrics wrappers work; :meth:`~StreamingMetric.compute_result` returns the full,
  structured result of the same ``compute()`` (same sync). One cache holds that result until a state changes.
* **forward** is torchmetrics' full-state forward (``full_state_update = True``: ``update`` checks every batch against
  the accumulated state): it accumulates the batch and returns the batch's own value.
* States may be sized lazily at the first ``update`` (K or M unknown before); a process that saw no data contributes
  the empty statistic at sync time (:func:`~lightning_repsim.metrics.state_kinds.gather_states`).

One private torchmetrics hook is overridden, ``_apply``, with its reason on the line; it is tested against the lowest
torchmetrics release allowed (``tests/test_torchmetrics_lowest.py``).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.prints import rank_zero_warn

from lightning_repsim.functional.inputs import NAN_STRATEGIES, check_choice
from lightning_repsim.metrics.state_kinds import (
    AUTOMATIC,
    Config,
    ConfigMismatch,
    Count,
    SizeMismatch,
    StateKind,
    gather_states,
    state_kind,
)

__all__ = ["DEFAULT_MEMORY_BUDGET_GB", "MetricResult", "StreamingMetric", "gather_states"]

#: Default ``memory_budget_gb``: the most a metric may hold in states plus its compute temporaries.
DEFAULT_MEMORY_BUDGET_GB = 8.0


@dataclass(frozen=True)
class MetricResult:
    """The result of a metric whose headline is one scalar: ``value`` (float64) and ``num_inputs``; subclasses add
    their details. ``key`` is the name the callback logs ``value`` under."""

    value: Tensor
    num_inputs: int
    key: ClassVar[str] = "value"

    def as_dict(self) -> dict[str, float]:
        return {self.key: float(self.value)}
_GB = 1e9


class _ResultCache:
    """The last result and the states it was computed from: weak references and in-place version counters, so any
    change of a state (an update, a merge, a reset, a load, a device move, a sync) invalidates it. Not pickled: a copy
    recomputes."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.result: Any = None

    @staticmethod
    def key_of(states: list[Tensor]) -> tuple | None:
        if any(t.is_inference() for t in states):  # inference tensors count no in-place changes: never cached
            return None
        return tuple((weakref.ref(t), t._version) for t in states)

    def lookup(self, states: list[Tensor]) -> Any:
        key = self.key
        if key is None or len(key) != len(states) or any(t.is_inference() for t in states):
            return None
        if all(ref() is t and version == t._version for (ref, version), t in zip(key, states)):
            return self.result
        return None

    def store(self, states: list[Tensor], result: Any) -> None:
        self.key, self.result = self.key_of(states), result

    def __getstate__(self) -> dict:
        return {}  # weak references do not pickle

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def _refuse_unfit_loaded_states(metric: StreamingMetric, incompatible_keys: Any) -> None:
    """``load_state_dict`` post-hook (see :meth:`StreamingMetric._adopt_loaded_states`)."""
    metric._adopt_loaded_states()


class StreamingMetric(Metric):
    """Base class: float64 sufficient statistics with exact merges (see the module docstring).

    Subclasses declare states with :meth:`_add_state_kind`, turn a batch into per-state contributions in
    ``update`` (then call :meth:`_accumulate`), and compute their result object from a dict of states in
    :meth:`_result_from` (a result with a ``value`` field, the headline number).
    """

    full_state_update = True
    is_differentiable = False
    higher_is_better = False
    plot_lower_bound: float | None = 0.0
    plot_upper_bound: float | None = None

    def __init__(self, nan_strategy: str = "error", memory_budget_gb: float | None = DEFAULT_MEMORY_BUDGET_GB,
                 config: dict[str, int | None] | None = None, **kwargs: Any) -> None:
        if kwargs.get("dist_sync_on_step"):
            raise ValueError(
                f"{type(self).__name__} does not support `dist_sync_on_step=True`: forward returns the process's own "
                "batch value; compute() and compute_result() are synced across processes"
            )
        if kwargs.get("compute_with_cache"):
            raise ValueError(
                f"{type(self).__name__} caches its result itself (one cache for compute() and compute_result(), valid "
                "until a state changes): leave `compute_with_cache` out"
            )
        kwargs["compute_with_cache"] = False
        kwargs.setdefault("dist_sync_fn", gather_states)
        super().__init__(**kwargs)
        self.nan_strategy = check_choice(nan_strategy, "nan_strategy", NAN_STRATEGIES)
        if memory_budget_gb is not None and not (isinstance(memory_budget_gb, (int, float)) and memory_budget_gb > 0):
            raise ValueError(f"`memory_budget_gb` must be a positive number or None, got {memory_budget_gb!r}")
        self.memory_budget_gb = None if memory_budget_gb is None else float(memory_budget_gb)
        self._kinds: dict[str, StateKind] = {}
        self._initial: dict[str, Tensor] = {}
        self._results = _ResultCache()
        self._result: Any = None  # what the last compute() computed (or found in the cache)
        self._running: dict[str, Tensor] | None = None  # during forward: the states with the batch, for its fallback
        self._warned: set[str] = set()
        if config:
            self._add_state_kind("config", Config(tuple(config)),
                                 torch.tensor([AUTOMATIC if v is None else int(v) for v in config.values()], dtype=torch.int64))
        self._add_state_kind("num_dropped", Count(), torch.zeros((), dtype=torch.int64))
        self.register_load_state_dict_post_hook(_refuse_unfit_loaded_states)

    # -- states ---------------------------------------------------------------------------------
    def _add_state_kind(self, name: str, kind: StateKind | str, default: Tensor, capacity: int | None = None,
                        merge: Callable[[Tensor, Tensor], Tensor] | None = None) -> None:
        """Declare a state of a :class:`~lightning_repsim.metrics.state_kinds.StateKind` (or its name: ``moments``,
        ``buffer`` of ``capacity`` rows, ``merged`` with its exact ``merge(a, b)``, ``count``, ``dims``). Not persistent,
        like every torchmetrics state; ``persistent(True)`` changes that."""
        if isinstance(kind, str):
            kind = state_kind(kind, capacity=capacity, merge=merge)
        self.add_state(name, default, dist_reduce_fx=kind.reduce, persistent=False)
        self._kinds[name] = kind
        self._initial[name] = default.detach().clone()

    def _describe(self, name: str, shape: tuple[int, ...]) -> str:
        """What a state's shape means (e.g. ``K=6``); subclasses say it in their own terms."""
        return f"state `{name}` of shape {shape}"

    def _accumulate(self, contributions: dict[str, Any]) -> None:
        """Add one batch: ``moments`` states take float64 rows (B, D), ``buffer`` states keyed rows
        ``[key, key2, id, data...]``, ``count`` states an int, ``dims`` states a dimension tensor, ``merged`` states a
        batch statistic. Every size is checked before any state changes, so a refused batch leaves the metric as it
        was."""
        targets = {}
        for name, value in contributions.items():
            try:
                targets[name] = self._kinds[name].prepare(getattr(self, name), value, self.device)
            except SizeMismatch as err:
                raise ValueError(
                    f"{type(self).__name__}: the inputs changed size between updates ({self._describe(name, err.ours)} "
                    f"so far, {self._describe(name, err.theirs)} now); call reset() first"
                ) from None
        for name, value in contributions.items():
            setattr(self, name, self._kinds[name].add(targets[name], value))
        if self._running == {}:  # the first of forward's two updates: the states with the batch
            self._running = self._states()

    def _states(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in self._kinds}

    # -- results ---------------------------------------------------------------------------------
    def _result_from(self, states: dict[str, Tensor]) -> Any:
        """The full result computed from a dict of states (synced or not)."""
        raise NotImplementedError

    def compute(self) -> Tensor:
        """The headline value (float64 scalar tensor) over everything accumulated, synced across processes."""
        if self._running is not None:  # inside forward: the states hold the batch alone
            return self._batch_value(self._running)
        states = self._states()  # torchmetrics' compute has synced them
        tensors = list(states.values())
        result = self._results.lookup(tensors)
        if result is None:
            result = self._result_from(states)
            self._results.store(tensors, result)
        self._result = result
        return result.value

    def compute_result(self) -> Any:
        """The full result (terms, chosen sets, parts, ...) whose ``value`` :meth:`compute` returns: it runs
        ``compute()`` (synced across processes, so every process must call it) and returns its result, which is
        cached until a state changes (an update, merge, reset or load)."""
        self.compute()
        return self._result

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """Accumulate the batch (as ``update``) and return the batch's own value (float64 scalar tensor).

        This is torchmetrics' full-state forward (``update`` on the accumulated state, then on the batch alone, and
        ``compute()`` of the batch: for d_LLV and d_SVD the label search, so prefer ``update`` in tight loops). When the
        batch alone cannot define the value (too few inputs, a constant log-odds), the value over everything
        accumulated so far is returned instead, with a warning (once per reason); if that is undefined too, NaN with a
        warning. Never synced (``dist_sync_on_step`` is not supported). The metrics are not differentiable: tensor
        arguments are detached (torchmetrics enables gradients for the batch's update).
        """
        args = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
        kwargs = {k: v.detach() if isinstance(v, Tensor) else v for k, v in kwargs.items()}
        self._running = {}
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._running = None

    def _batch_value(self, running: dict[str, Tensor]) -> Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # per-batch diagnostics would repeat every step
            try:
                return self._result_from(self._states()).value
            except (ValueError, torch.linalg.LinAlgError) as err:
                reason = str(err)
        self._warn_once(
            f"batch:{reason[:60]}",
            f"{type(self).__name__}.forward: the batch alone does not define the value ({reason}); returning the "
            "value over everything accumulated so far instead.",
        )
        try:
            return self._result_from(running or self._states()).value
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
        return sum(t.numel() * t.element_size() for t in self._states().values())

    @property
    def num_inputs(self) -> int:
        """Inputs accumulated so far on this process (after masking and dropping)."""
        state = getattr(self, self._count_state)
        return int(state[0]) if state.numel() else 0

    _count_state = "moments"

    # -- merging and loading -----------------------------------------------------------------------
    def _check_compatible(self, ours: dict[str, Tensor], theirs: dict[str, Any], source: str) -> None:
        """Refuse states ``theirs`` that do not fit ``ours``, naming the mismatch (the configuration first)."""
        missing = sorted(set(self._kinds) - set(theirs))
        if missing:
            raise ValueError(f"{type(self).__name__}: {source} lacks the state(s) {missing}")
        for name, kind in self._kinds.items():
            other = theirs[name]
            if not isinstance(other, Tensor):
                raise ValueError(f"{type(self).__name__}: state `{name}` of {source} is not a tensor")
            try:
                kind.check(ours[name], other.to(ours[name].device))
            except ConfigMismatch as err:
                raise ValueError(f"{type(self).__name__}: cannot combine with {source}, configured differently: {err}") from None
            except SizeMismatch as err:
                raise ValueError(
                    f"{type(self).__name__}: cannot combine with {source}: it has {self._describe(name, err.theirs)}, "
                    f"this metric {self._describe(name, err.ours)}"
                ) from None
            problem = kind.invalid(other)
            if problem is not None:  # e.g. NaN moments: refused here, not as "cannot convert float NaN" at compute()
                raise ValueError(
                    f"{type(self).__name__}: state `{name}` of {source} has {problem}; no update produces such a state "
                    "(a corrupted or edited checkpoint?), so it is not used"
                )

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """Merge another metric's (or a ``metric_state`` dict's) statistics exactly into this one, after checking
        that they fit (same configuration and sizes; a clear ``ValueError`` names any mismatch and nothing is merged).

        torchmetrics asks metrics with ``full_state_update = True`` to provide their own merge: this is it, the
        kinds' exact merges. As with torchmetrics' own ``merge_state``, the update count stays this metric's.
        """
        if isinstance(incoming_state, Metric):
            if not isinstance(incoming_state, type(self)):
                raise ValueError(
                    f"Expected incoming state to be an instance of {type(self).__name__} but got {type(incoming_state)}"
                )
            theirs = dict(incoming_state.metric_state)
        elif isinstance(incoming_state, dict):
            theirs = dict(incoming_state)
        else:
            raise ValueError(f"Expected incoming state to be a dict or an instance of Metric but got {type(incoming_state)}")
        ours = self._states()
        self._check_compatible(ours, theirs, "the incoming state")
        for name, kind in self._kinds.items():
            setattr(self, name, kind.merge(ours[name], theirs[name].to(self.device)))

    def _adopt_loaded_states(self) -> None:
        """After ``load_state_dict`` (torchmetrics has put any states found there in place): refuse states that do not
        fit the metric as constructed (configuration, sizes known at construction) -- the metric is then reset and a
        ``ValueError`` names the mismatch -- and keep copies on the metric's device (states are updated in place, so
        they never share the caller's tensors)."""
        loaded = self._states()
        try:
            self._check_compatible(self._initial, loaded, "the loaded state_dict")
        except ValueError:
            self.reset()
            raise
        for name, state in loaded.items():
            setattr(self, name, state.to(self.device, copy=True))

    # -- dtype and device ------------------------------------------------------------------------
    def _apply(self, fn: Callable, exclude_state: Any = "") -> torch.nn.Module:
        # Reason: module.to(dtype) (Lightning's "16-true") casts torchmetrics states; exact statistics stay float64.
        excluded = (exclude_state,) if isinstance(exclude_state, str) else tuple(exclude_state)
        kinds = getattr(self, "_kinds", {})
        this = super()._apply(fn, exclude_state=(*excluded, *kinds))  # torchmetrics' hook for self-handled states
        for name in kinds:
            if name not in excluded:
                setattr(this, name, getattr(this, name).to(this.device))  # they follow the device only
        return this
