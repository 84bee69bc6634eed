"""Reusing the student's own validation forward instead of running it again.

While ``validation_step`` runs, a forward hook on the student's head (the ``nn.Linear`` that produces the
logits, found by the extractor) records its input (the embedding) and output (the logits). The comparison
uses them when the head ran exactly once with the batch's shape; a ``validation_step`` may instead return
``{"embeddings": ..., "logits": ..., "unembedding": ...}``. A logits-only student is reused from
``{"logits": ...}``. Otherwise the callback runs the student itself (under ``no_grad``, in eval mode).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from lightning_repsim.callbacks.extraction import Representations, unembedding_of

__all__ = ["HeadCapture", "reused_representations"]


def leading(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape[:-1])


class HeadCapture:
    """A forward hook on one head that keeps ``(input, output)`` of each call (detached) until :meth:`clear`."""

    def __init__(self) -> None:
        self.calls: list[tuple[Tensor, Tensor]] = []
        self._handle: Any = None

    def install(self, head: nn.Module) -> None:
        self.remove()

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if args and isinstance(args[0], Tensor) and isinstance(output, Tensor):
                self.calls.append((args[0].detach(), output.detach()))

        self._handle = head.register_forward_hook(hook)

    @property
    def installed(self) -> bool:
        return self._handle is not None

    def clear(self) -> None:
        self.calls = []

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.calls = []

    def __getstate__(self) -> dict[str, Any]:  # hooks do not travel to other processes (ddp_spawn)
        return {"calls": [], "_handle": None}


def reused_representations(
    outputs: Any, head_known: bool, head: nn.Linear | None, capture: HeadCapture, lead: tuple[int, ...]
) -> Representations | None:
    """The student's representations from its own ``validation_step`` (its returned dict or the captured head
    call), or None when they are not available for a batch whose outputs have leading shape ``lead``."""
    if isinstance(outputs, Mapping) and isinstance(outputs.get("embeddings"), Tensor):
        emb = outputs["embeddings"]
        unemb = outputs.get("unembedding")
        if unemb is None and head is not None:
            unemb = unembedding_of(head)
        if isinstance(unemb, Tensor) and leading(emb) == lead:
            logits = outputs.get("logits")
            return Representations(logits.detach() if isinstance(logits, Tensor) else None, emb.detach(), unemb.detach())
    if head is not None and len(capture.calls) == 1 and leading(capture.calls[0][0]) == lead:
        emb, logits = capture.calls[0]
        return Representations(logits, emb, unembedding_of(head))
    logits = outputs.get("logits") if isinstance(outputs, Mapping) else None
    if head_known and head is None and isinstance(logits, Tensor) and leading(logits) == lead:
        return Representations(logits.detach())  # logits-only student
    return None
