"""Reusing the student's own validation forward instead of running it again.

While ``validation_step`` runs, a forward hook on the student's head (the ``nn.Linear`` that produces the
logits, found by the extractor) records its input (the embedding) and output (the logits). The comparison
uses them when the head ran exactly once with the batch's shape; a ``validation_step`` may instead return
``{"embeddings": ..., "logits": ..., "unembedding": ...}``. A logits-only student is reused from
``{"logits": ...}``. Otherwise the callback runs the student itself (under ``no_grad``, in eval mode).

Reuse is verified before it is trusted (:class:`ReuseCheck`): on the first batch of every comparison the callback also
runs the student's own forward on the batch's first :data:`CHECK_ROWS` samples, as it runs the reference, and
:func:`reuse_mismatch` compares them with the reused rows. A ``validation_step`` that transforms its inputs
(``self(x * 2.0)``, added noise, a normalisation done in the step) fed the head other inputs than the reference's: the
callback then runs the student's own forward for the rest of the comparison.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from lightning_repsim.callbacks.extraction import Representations, unembedding_of

__all__ = ["CHECK_ROWS", "HeadCapture", "REUSE_RTOL", "ReuseCheck", "first_samples", "reuse_mismatch",
           "reused_representations"]

#: Samples of the first batch of a comparison that the student's own forward checks the reused outputs on (a forward
#: of a few samples: the check costs a small part of one batch's forward per comparison).
CHECK_ROWS = 8

#: Relative tolerance of the reuse check per dtype: float noise of the same computation passes, other inputs do not.
REUSE_RTOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
_BLOCK = 1 << 22  # numbers per block of the difference (no full-size temporary for (B, T, V) logits)


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


def _relative_difference(reused: Tensor, own: Tensor) -> float:
    """``max |reused - own| / max |own|``, in blocks of rows, in the tensors' own dtype."""
    a, b = reused.reshape(-1, reused.shape[-1]), own.reshape(-1, own.shape[-1]).to(reused.device, reused.dtype)
    step = max(1, _BLOCK // max(1, a.shape[1]))
    diff = scale = 0.0
    for start in range(0, a.shape[0], step):
        block_a, block_b = a[start : start + step], b[start : start + step]
        diff = max(diff, float((block_a - block_b).abs().max()))
        scale = max(scale, float(block_b.abs().max()))
    return diff / max(scale, torch.finfo(torch.float64).tiny)


def reuse_mismatch(reused: Representations, own: Representations) -> str | None:
    """Why the reused representations are not the student's own on this batch (None when they are, up to float noise:
    :data:`REUSE_RTOL` of the larger absolute value). The embeddings are compared when both have them (the logits are
    the same head's output), else the logits."""
    pairs = [(reused.embeddings, own.embeddings, "embeddings"), (reused.logits, own.logits, "logits")]
    for mine, theirs, what in pairs:
        if mine is None or theirs is None:
            continue
        if tuple(mine.shape) != tuple(theirs.shape):
            return f"its {what} have shape {tuple(mine.shape)}, the student's own forward gives {tuple(theirs.shape)}"
        if mine.numel() == 0:
            return None
        rtol = REUSE_RTOL.get(mine.dtype, 1e-5)
        rel = _relative_difference(mine, theirs)
        if not rel <= rtol:  # NaN too
            return (f"its {what} differ from the student's own forward on the batch by {rel:.3g} relative (tolerance "
                    f"{rtol:g} for {str(mine.dtype).replace('torch.', '')})")
        return None
    return None


def first_samples(batch: Any, batch_size: int, rows: int) -> Any:
    """``batch`` with every tensor whose first dimension is the batch cut to its first ``rows`` samples."""
    return apply_to_collection(batch, Tensor, lambda t: t[:rows] if t.ndim and t.shape[0] == batch_size else t)


def _first_rows(reps: Representations, rows: int) -> Representations:
    def cut(t: Tensor | None) -> Tensor | None:
        return None if t is None else t[:rows]

    return Representations(cut(reps.logits), cut(reps.embeddings), reps.unembedding)


class ReuseCheck:
    """Whether the reused student forward of the current comparison can be trusted: ``"unverified"`` until the first
    batch is checked, then ``"verified"`` or ``"refused"`` (the comparison runs the student's own forward)."""

    def __init__(self) -> None:
        self.state = "unverified"
        self.own: Representations | None = None  # the student's own forward on the current batch, when one ran

    def reset(self) -> None:
        self.state, self.own = "unverified", None

    def rows(self, lead: tuple[int, ...]) -> int:
        """How many samples of a batch with outputs of leading shape ``lead`` the check's forward runs."""
        return min(lead[0], CHECK_ROWS) if lead else 0

    def decide(self, reused: Representations, own: Representations) -> str | None:
        """Compare the reused representations with the student's own on the same first samples; returns why they
        differ (the comparison then stops reusing), or None."""
        problem = reuse_mismatch(_first_rows(reused, own.leading_shape[0]) if own.leading_shape else reused, own)
        self.state = "verified" if problem is None else "refused"
        return problem
