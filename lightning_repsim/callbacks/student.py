"""The student's representations for the callback: its own validation forward reused when possible, checked before it
is trusted, else a forward of the comparison's own (:mod:`.capture` has the mechanisms: the head's hook, the check).

:class:`StudentForwards` owns the head capture and the reuse check of one callback and counts the student forwards it
reused or ran (``stats``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lightning_repsim.callbacks.capture import HeadCapture, ReuseCheck, first_samples, reused_representations
from lightning_repsim.callbacks.comparison import ModelComparison
from lightning_repsim.callbacks.extraction import Extractor, Representations

__all__ = ["StudentForwards"]

_MISMATCH = (
    "ReferenceComparison: the student's validation_step did not run its head on the batch's inputs as given to the "
    "reference ({problem}): inputs transformed or noised in the step? The comparison runs the student's own forward on "
    "the batch instead (one more forward per batch), so both models see the same inputs. Pass `input_fn` to feed both "
    "models what validation_step feeds the student, or reuse_student_outputs=False."
)


class StudentForwards:
    """Where the student's representations of a batch come from.

    Args:
        extractor: the student's :class:`~lightning_repsim.callbacks.Extractor` (its ``head`` is watched).
        enabled: whether to reuse the student's validation forward at all (``reuse_student_outputs`` and the
            validation batches are the compared ones).
        stats: the counters ``reused_student_forward`` and ``own_student_forward`` (updated in place).
        warn_once: ``(key, message)`` for the one warning of a refused reuse.
    """

    def __init__(self, extractor: Extractor, enabled: bool, stats: dict[str, int],
                 warn_once: Callable[[str, str], None]) -> None:
        self.extractor, self.enabled, self.stats, self.warn_once = extractor, enabled, stats, warn_once
        self.capture = HeadCapture()
        self.check = ReuseCheck()

    def start(self, student: nn.Module) -> None:
        """A new comparison: the reuse is checked again on its first batch; watch the head if it is known."""
        self.check.reset()
        self.install(student)

    def install(self, student: nn.Module) -> None:
        """Watch the student's head during ``validation_step``, when the head is known and reuse is on."""
        self.capture.remove()
        if self.enabled and self.check.state != "refused" and self.extractor.is_located(student):
            head = self.extractor.head(student)
            if head is not None:
                self.capture.install(head)

    def locate(self, batch: Any, student: nn.Module, comparison: ModelComparison) -> None:
        """Before the first compared ``validation_step``: locate the head by one probing forward (which also checks
        this batch's reuse), so that the step's own forward is already captured."""
        if self.enabled and not self.capture.installed and not self.extractor.is_located(student):
            self.check.own = self.own(student, batch, comparison)

    def clear(self) -> None:
        """Forget the head calls (and the probe's forward) of the current batch."""
        self.capture.clear()
        self.check.own = None

    def remove(self) -> None:
        self.capture.remove()

    def representations(self, student: nn.Module, batch: Any, outputs: Any, lead: tuple[int, ...],
                        comparison: ModelComparison) -> Representations:
        """The student's representations of ``batch``: its reused validation forward (``outputs`` or the captured head
        call; checked on the first batch of the comparison), else a forward of the comparison's own."""
        if self.enabled and self.check.state != "refused":
            located = self.extractor.is_located(student)
            head = self.extractor.head(student) if located else None
            reps = reused_representations(outputs, located, head, self.capture, lead)
            if reps is not None and self.check.state == "unverified":
                reps = self._verify(student, batch, reps, comparison)
            if reps is not None:
                self.stats["reused_student_forward"] += 1
                return reps
        return self.own(student, batch, comparison)

    def own(self, student: nn.Module, batch: Any, comparison: ModelComparison) -> Representations:
        """A forward of the comparison's own (counted, not captured as the student's); the head's calls captured again
        after it, for reuse from the next batch on."""
        self.stats["own_student_forward"] += 1
        self.capture.remove()
        reps = comparison.student_representations(batch, student)
        self.install(student)  # the head is known now
        return reps

    def _verify(self, student: nn.Module, batch: Any, reused: Representations,
                comparison: ModelComparison) -> Representations | None:
        """Compare the reused representations with the student's own forward on the batch's first samples (or the
        probing forward's, when it ran on this batch): trusted for the rest of the comparison when they agree, else
        None (own forwards from now on) and one warning saying why."""
        own = self.check.own
        if own is None:  # the check's forward must not be captured as the student's, nor feed the layers
            rows = self.check.rows(reused.leading_shape)
            with comparison.layers_paused():
                own = self.own(student, first_samples(batch, reused.leading_shape[0], rows), comparison)
        problem = self.check.decide(reused, own)
        if problem is None:
            return reused
        self.warn_once("reuse-mismatch", _MISMATCH.format(problem=problem))
        return None
