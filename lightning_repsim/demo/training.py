"""Training: the teacher (cross-entropy), then two students distilled from it side by side. Nothing here prints or
plots; the per-epoch comparisons are callbacks given by the caller."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_repsim.demo.data import DemoData

__all__ = ["STUDENTS", "DistilledStudents", "accuracy", "distil_students", "student_losses", "train_teacher"]

#: the two students: name -> (what the tables call it, the loss in words)
STUDENTS = {
    "kl": ("KL student", "KDLoss(temperature=1) = KL(teacher || student), the usual distillation loss"),
    "logit": ("logit student", "LogitDistanceLoss() = squared distance of the centred logits"),
}


def student_losses() -> dict[str, nn.Module]:
    """``{name: loss}`` of the students of :data:`STUDENTS`, each called as ``loss(student_logits, teacher_logits)``."""
    from lightning_repsim.losses import KDLoss, LogitDistanceLoss

    return {"kl": KDLoss(temperature=1.0), "logit": LogitDistanceLoss()}


class DistilledStudents(pl.LightningModule):
    """One student per loss (``students[name]``: the same architecture and the same initialisation), trained side
    by side on the same batches against a frozen teacher.

    ``training_step`` returns the sum of the students' losses (their parameters are disjoint and Adam is
    per-parameter, so this is the same as training each alone on the same batches with the same schedule).
    ``validation_step`` counts, per student, correct predictions and agreements with the teacher (``counts``); it
    returns nothing, so each :class:`ReferenceComparison` reuses the call of its student's head captured during the
    step. The teacher is kept out of the module's submodules (the callbacks require a separate reference).

    Args:
        make_net: builds one student network (an ``nn.Module`` giving logits).
        teacher: the frozen teacher (its logits are the distillation targets).
        losses: ``{name: loss}``, each called as ``loss(student_logits, teacher_logits)``.
        lr, weight_decay: Adam with a one-cycle schedule peaking at ``lr``.
        seed: the students' initialisation seed.
    """

    def __init__(self, make_net: Callable[[], nn.Module], teacher: nn.Module, losses: Mapping[str, nn.Module],
                 lr: float, weight_decay: float, seed: int) -> None:
        super().__init__()
        self.students = nn.ModuleDict()
        for name in losses:
            torch.manual_seed(seed)  # the same initialisation for every student
            self.students[name] = make_net()
        self.objectives = nn.ModuleDict(dict(losses))
        self._teacher = (teacher,)  # a tuple: not registered as a submodule
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.counts: dict[str, list[int]] = {}

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {name: net(x) for name, net in self.students.items()}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0]
        with torch.no_grad():
            target = self.teacher(x)
        total = x.new_zeros(())
        for name, net in self.students.items():
            loss = self.objectives[name](net(x), target)
            total = total + loss
            if batch_idx % 25 == 0:
                self.log(f"train_loss/{name}", loss, on_step=True, on_epoch=False, batch_size=len(x))
        return total

    def on_validation_epoch_start(self) -> None:
        self.counts = {name: [0, 0, 0] for name in self.students}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        ref = self.teacher(x).argmax(-1)
        for name, net in self.students.items():
            pred = net(x).argmax(-1)
            c = self.counts[name]
            c[0] += int((pred == y).sum())
            c[1] += int((pred == ref).sum())
            c[2] += int(len(y))

    def on_validation_epoch_end(self) -> None:
        for name, (correct, agree, seen) in self.counts.items():
            if seen:
                self.log(f"val_acc/{name}", correct / seen, on_epoch=True)
                self.log(f"agreement/{name}", agree / seen, on_epoch=True)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.students.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.lr, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def _trainer(epochs: int, callbacks: Sequence[Any], loggers: Sequence[Any] | bool, progress: bool) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, callbacks=list(callbacks), logger=loggers,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress, num_sanity_val_steps=0,
        log_every_n_steps=25, deterministic=True,
    )


def train_teacher(data: DemoData, epochs: int, seed: int, progress: bool = True) -> nn.Module:
    """The teacher: ``data.model()`` initialised with ``seed`` and trained with cross-entropy for ``epochs`` (Adam,
    one-cycle schedule); returned frozen in eval mode."""
    from lightning_repsim.models import Classifier

    pl.seed_everything(seed, verbose=False)
    teacher = Classifier(data.model(), lr=data.lr, weight_decay=data.weight_decay, one_cycle=True)
    train, _ = data.loaders(seed)
    _trainer(epochs, [], False, progress).fit(teacher, train)
    return teacher.eval()


def distil_students(data: DemoData, teacher: nn.Module, epochs: int, seed: int, callbacks: Sequence[Any] = (),
                    loggers: Sequence[Any] | bool = False, progress: bool = True) -> DistilledStudents:
    """The students of :data:`STUDENTS`, initialised with ``seed`` and distilled from ``teacher`` side by side for
    ``epochs`` (validated on the held-out points after every epoch, where ``callbacks`` compare them); returned in
    eval mode."""
    pl.seed_everything(seed, verbose=False)
    module = DistilledStudents(data.model, teacher, student_losses(), data.lr, data.weight_decay, seed)
    train, test = data.loaders(seed)
    _trainer(epochs, callbacks, loggers, progress).fit(module, train, test)
    return module.eval()


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Share of the rows whose largest logit is at ``labels``."""
    return float((logits.argmax(-1) == labels).double().mean())
