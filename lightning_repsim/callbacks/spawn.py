"""Bringing a callback's results back from processes that Lightning spawned (``strategy="ddp_spawn"``, ``"ddp_fork"``).

With a spawning strategy, ``trainer.fit``/``trainer.validate`` run in worker processes that received a *copy* of the
callback; when they end, Lightning sends back only the trainer's ``callback_metrics`` (and the weights), so the
callback object in the main process would keep an empty ``history``. :class:`WorkerResults` closes that gap with a
file: the callback made in the main process picks a private path (nothing is written yet); at ``teardown`` the worker
of local rank 0 writes its results there (``torch.save``, written to a temporary name and renamed, so a reader never
sees half a file); the main process reads them, and removes the file, the next time it looks at its results (the
values are synced across processes, so rank 0's are every rank's). A file the main process never reads is removed
when the callback is garbage collected or the interpreter exits.
"""

from __future__ import annotations

import os
import tempfile
import uuid
import weakref
from typing import Any

import torch

__all__ = ["SpawnedResults", "WorkerResults"]


def _remove(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # a forked worker inherits the finalizer: only the main process removes the file
        for name in (path, path + ".tmp"):
            try:
                os.remove(name)
            except OSError:
                pass


def spawned_by(trainer: Any) -> bool:
    """Whether the trainer's processes were started by Lightning's multiprocessing launcher (spawn or fork)."""
    try:
        from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
    except ImportError:  # pragma: no cover - another Lightning layout
        return False
    return isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher)


class WorkerResults:
    """A mailbox from a spawned worker to the process that created the callback (see the module docstring)."""

    def __init__(self) -> None:
        self.owner_pid = os.getpid()
        self.path = os.path.join(tempfile.gettempdir(), f"lightning_repsim-{uuid.uuid4().hex}.pt")
        weakref.finalize(self, _remove, self.path, self.owner_pid)

    @property
    def in_worker(self) -> bool:
        """Whether this copy lives in another process than the one that created it."""
        return os.getpid() != self.owner_pid

    def send(self, payload: dict[str, Any]) -> None:
        """Write ``payload`` for the creating process (from a worker)."""
        tmp = self.path + ".tmp"
        torch.save(payload, tmp)
        os.replace(tmp, self.path)

    def receive(self) -> dict[str, Any] | None:
        """The payload a worker sent, if any (read once: the file is removed in the creating process)."""
        if not os.path.exists(self.path):
            return None
        payload = torch.load(self.path, map_location="cpu", weights_only=False)  # written by our own worker
        _remove(self.path, self.owner_pid)  # only in the creating process (a pickled copy has no finalizer either)
        return payload


class SpawnedResults:
    """Mixin of :class:`~lightning_repsim.callbacks.ReferenceComparison`: ``history``, ``last_results`` and ``stats``
    that come back from a spawned worker. The class sets ``_history``, ``_last_results``, ``_stats`` and ``_mailbox``
    (a :class:`WorkerResults`) and calls :meth:`_send` at ``teardown``; reading a result first takes what a worker
    sent."""

    _history: list[dict[str, Any]]
    _last_results: dict[str, Any]
    _stats: dict[str, int]
    _mailbox: WorkerResults

    @property
    def history(self) -> list[dict[str, Any]]:
        self._receive()
        return self._history

    @history.setter
    def history(self, value: list[dict[str, Any]]) -> None:
        self._history = value

    @property
    def last_results(self) -> dict[str, Any]:
        self._receive()
        return self._last_results

    @last_results.setter
    def last_results(self, value: dict[str, Any]) -> None:
        self._last_results = value

    @property
    def stats(self) -> dict[str, int]:
        self._receive()
        return self._stats

    def _extra_results(self) -> dict[str, Any]:
        """More of the class's results to send back (override)."""
        return {}

    def _restore_extra(self, payload: dict[str, Any]) -> None:
        """Take back what :meth:`_extra_results` sent (override)."""

    def _receive(self) -> None:
        """Take the results a spawned worker sent back (``strategy="ddp_spawn"``), if any."""
        payload = self._mailbox.receive()
        if payload is None:
            return
        self._history, self._last_results = payload["history"], payload["last_results"]
        self._stats.clear()
        self._stats.update(payload["stats"])  # the same dict: collaborators hold it
        self._restore_extra(payload)

    def _send(self, trainer: Any) -> None:
        """In the worker of local rank 0 of a spawning strategy: send the results back to the main process."""
        if self._mailbox.in_worker and trainer.local_rank == 0 and spawned_by(trainer):
            self._mailbox.send({"history": self._history, "last_results": self._last_results, "stats": self._stats,
                                **self._extra_results()})

    def __getstate__(self) -> dict[str, Any]:
        self._receive()  # a second ddp_spawn run starts from the first one's history
        return self.__dict__.copy()
