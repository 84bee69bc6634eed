"""First-run demo: two students that *predict* like their teacher; only one of them *represents* like it.

Command::

    python -m lightning_repsim.demo                 # or: make demo
    python -m lightning_repsim.demo --quick         # 3 epochs: a smoke test (tests use it)
    python -m lightning_repsim.demo --seed 1        # another teacher/student initialisation
    python -m lightning_repsim.demo --data digits   # the same recipe on scikit-learn's digits (see below)
    python -m lightning_repsim.demo --epochs 60 --out /tmp/demo --no-wandb

What it does. A *teacher* is trained with cross-entropy; then two *students* (the same architecture and the same
initialisation, fed the same batches) are distilled from it, side by side in one Lightning ``Trainer``:

* the **KL student** with :class:`~lightning_repsim.losses.KDLoss` at ``temperature=1``, i.e. KL(teacher || student),
  the usual distillation loss;
* the **logit student** with :class:`~lightning_repsim.losses.LogitDistanceLoss`, the squared distance of the centred
  logits (Nielsen et al., arXiv 2602.15438).

Each student has its own :class:`lightning_repsim.callbacks.ReferenceComparison` with the teacher as reference, which
compares them on the held-out points after every epoch. A row per epoch puts the two students side by side (agreement
with the teacher, KL, d_LLV, d_SVD, mCCA); the demo ends with a table of the final values, a picture of the three
embeddings, and says where everything went (``--out``, default ``./outputs/demo``): the picture ``embeddings.png``,
the numbers ``summary.json``, the per-epoch metrics of both callbacks (CSV logger) and an offline wandb run (no
account, no network; the callbacks also log their tables, curves and pictures there).

The point (Nielsen, Marconato, Dittadi & Gresele, NeurIPS 2025): both students end up predicting like the teacher
(KL of a few hundredths of a nat, >= 99 % agreement), so KL cannot tell them apart, but only the logit student
*represents* like it: its 2-D embedding is a linear map of the teacher's (d_LLV ~ 0.01, d_SVD ~ 1e-5, mCCA 1.000),
the KL student's is not (d_LLV ~ 1.2, d_SVD ~ 0.3, mCCA ~ 0.9).

Data: the "radial" task of SPEC §7 (:func:`lightning_repsim.radial_dataset`: 2-D points, K = 6 antipodal wedges;
generated, nothing downloaded), 8000 training points (data seed 0) and 2000 held-out points (data seed 1). Why not
the bundled digits (``--data digits``, scikit-learn's 8x8 images, K = 10): with the 2-D embedding the picture needs,
the KL student does not get close to the teacher's predictions on held-out digits (test KL 0.19-0.24 nats after 40
to 200 epochs, 0.09-0.14 with mixup augmentation; ``examples/results/demo_seeds.md``), so the demo would not show
"predictions alike". On the radial data both students reach KL <= 0.05 and the contrast holds on every seed tried.

Model (teacher and students): an MLP ``2 -> 64 -> 64 -> 64 -> 2`` (the embedding f) followed by ``nn.Linear(2, 6)``
(g; the callbacks' extractor reads it); Adam with a one-cycle schedule (peak lr 3e-3), batch 64, 30 epochs for the
teacher and 30 for the students. ``--seed S`` (default 0) initialises the teacher with S and both students with S + 1.

Runtime (measured with ``time``, 2 shared CPU cores, one torch thread): see the README (about a minute on an idle
machine). No GPU, no network.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

__all__ = [
    "main",
    "DemoData",
    "load_data",
    "load_radial_split",
    "load_digits_split",
    "DistilledStudents",
    "StudentsTable",
    "EpochTable",
    "STUDENTS",
]

DEFAULT_SEED = 0
QUICK_EPOCHS = 3
#: the two students: name -> (what the table calls it, the loss in words)
STUDENTS = {
    "kl": ("KL student", "KDLoss(temperature=1) = KL(teacher || student), the usual distillation loss"),
    "logit": ("logit student", "LogitDistanceLoss() = squared distance of the centred logits"),
}
#: acceptance of the demo's message (tested on the default seed; examples/demo_seeds.py checks other seeds)
KL_MAX, D_LLV_RATIO_MIN, MCCA_GAP_MIN = 0.05, 10.0, 0.05
#: Lightning warnings that say nothing to a demo user (silenced inside the demo only).
_QUIET = (".*does not have many workers.*", ".*no `val_dataloader`.*", ".*LeafSpec.*is deprecated.*",
          ".*number of training batches.*")


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def load_radial_split(num_classes: int = 6, n_train: int = 8000, n_test: int = 2000) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)`` of the SPEC §7 radial task (data seeds 0 and 1; generated, no download)."""
    from lightning_repsim.constructions import radial_dataset

    x_train, y_train = radial_dataset(n_train, num_classes, seed=0)
    x_test, y_test = radial_dataset(n_test, num_classes, seed=1)
    return x_train, y_train, x_test, y_test


def load_digits_split(test_fraction: float = 0.25, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)``: scikit-learn's bundled digits scaled to [0, 1], a stratified split
    fixed by ``seed``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test = round(test_fraction * len(idx))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tr, te = torch.cat(train_idx), torch.cat(test_idx)
    return x[tr], y[tr], x[te], y[te]


class ShiftAugment:
    """Collate function for 8x8 digits: stack a batch and shift each image by up to one pixel (zero fill), with
    probability 1/2."""

    def __call__(self, items: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        x = torch.stack([it[0] for it in items]).view(-1, 1, 8, 8)
        y = torch.stack([it[1] for it in items])
        padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
        offsets = torch.randint(0, 3, (x.shape[0], 2))
        offsets[torch.rand(x.shape[0]) < 0.5] = 1  # no shift
        out = torch.empty_like(x)
        for dy in range(3):
            for dx in range(3):
                sel = (offsets[:, 0] == dy) & (offsets[:, 1] == dx)
                if sel.any():
                    out[sel] = padded[sel, :, dy : dy + 8, dx : dx + 8]
        return out.view(-1, 64), y


@dataclass
class DemoData:
    """A data set and the training recipe the demo uses on it."""

    name: str
    description: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    hidden: tuple[int, ...]
    epochs: int
    batch_size: int
    lr: float = 3e-3
    weight_decay: float = 0.0
    collate: Callable | None = None

    @property
    def num_classes(self) -> int:
        return int(self.y_train.max()) + 1

    @property
    def in_dim(self) -> int:
        return int(self.x_train.shape[1])

    def model(self) -> nn.Module:
        """MLP ``in -> hidden (ReLU) -> 2`` (the embedding f) then ``nn.Linear(2, K)`` (the unembedding g)."""
        from lightning_repsim.models import BottleneckClassifier

        return BottleneckClassifier(self.in_dim, self.num_classes, hidden=self.hidden, rep_dim=2)


def load_data(name: str = "radial") -> DemoData:
    """The demo's data and recipe: ``"radial"`` (default, SPEC §7) or ``"digits"`` (scikit-learn, bundled)."""
    if name == "radial":
        x_tr, y_tr, x_te, y_te = load_radial_split()
        return DemoData("radial", "Radial data (SPEC §7, lightning_repsim.radial_dataset; generated, no download): "
                        f"{len(y_tr)} training and {len(y_te)} held-out points in 2-D, 6 classes (antipodal wedges).",
                        x_tr, y_tr, x_te, y_te, hidden=(64, 64, 64), epochs=30, batch_size=64)
    if name == "digits":
        x_tr, y_tr, x_te, y_te = load_digits_split()
        return DemoData("digits", f"Digits (scikit-learn, bundled): {len(y_tr)} training and {len(y_te)} held-out "
                        "images of 8x8 pixels, 10 classes.", x_tr, y_tr, x_te, y_te, hidden=(256, 256, 256), epochs=40,
                        batch_size=32, weight_decay=1e-4, collate=ShiftAugment())
    raise ValueError(f"unknown data set {name!r} (radial or digits)")


# ---------------------------------------------------------------------------------------------
# the students
# ---------------------------------------------------------------------------------------------
def student_losses() -> dict[str, nn.Module]:
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


class _Member:
    """``forward_fn`` of a student's extractor: run ``module.students[name]``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, module: nn.Module, inputs: Tensor) -> Tensor:
        return module.students[self.name](inputs)

    def __repr__(self) -> str:
        return f"students[{self.name!r}]"


def student_comparison(teacher: nn.Module, name: str, **kwargs: Any):
    """``ReferenceComparison(teacher)`` for ``students[name]``: logged as ``{name}_student/...``."""
    from lightning_repsim.callbacks import ReferenceComparison
    from lightning_repsim.callbacks.extraction import FinalLinear

    extractor = FinalLinear(module_name=f"students.{name}.head", forward_fn=_Member(name))
    return ReferenceComparison(teacher, prefix=f"{name}_student", student_extractor=extractor, **kwargs)


# ---------------------------------------------------------------------------------------------
# the per-epoch tables
# ---------------------------------------------------------------------------------------------
def _fmt(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def _small(value: float) -> str:
    """d_SVD and other values that go to ~1e-5: 4 decimals, or 2 significant digits below 1e-3."""
    if not (isinstance(value, (int, float)) and math.isfinite(value)):
        return "-"
    return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"


class _Printer:
    def __init__(self, printer: Any = None) -> None:
        self.printer = printer

    def _print(self, trainer: Any, text: str) -> None:
        bar = trainer.progress_bar_callback
        if self.printer is not None:
            self.printer(text)
        elif bar is not None and hasattr(bar, "print"):
            bar.print(text)
        else:
            print(text, flush=True)


class StudentsTable(Callback, _Printer):
    """Prints, after every compared epoch, one row with the students side by side: agreement with the teacher and
    the comparisons' KL, d_LLV, d_SVD and mCCA (read from each :class:`ReferenceComparison`'s ``history``; agreement
    and accuracy from the module's ``counts``). Register it *after* the comparisons. The rows are kept in ``rows``
    (``{"epoch": e, name: {"acc", "agree", "kl", "d_llv", "d_svd", "mcca"}}``).
    """

    KEYS = ("kl", "d_llv", "d_svd", "mcca")

    def __init__(self, comparisons: Mapping[str, Any], printer: Any = None) -> None:
        _Printer.__init__(self, printer)
        self.comparisons = dict(comparisons)
        self.rows: list[dict[str, Any]] = []
        self._printed_header = False

    def header(self) -> str:
        top = f"{'':>5} |" + "|".join(f" {STUDENTS[n][0]:<38}" for n in self.comparisons)
        cols = f"{'epoch':>5} |" + "|".join(f" {'agree':>6} {'KL':>7} {'d_LLV':>7} {'d_SVD':>8} {'mCCA':>6} "
                                            for _ in self.comparisons)
        return f"{top}\n{cols}"

    def format_row(self, row: Mapping[str, Any]) -> str:
        parts = [f" {_fmt(r['agree'], '6.3f')} {_fmt(r['kl'], '7.4f')} {_fmt(r['d_llv'], '7.4f')} {_small(r['d_svd']):>8} "
                 f"{_fmt(r['mcca'], '6.4f')} " for r in (row[n] for n in self.comparisons)]
        return f"{row['epoch']:>5} |" + "|".join(parts)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        row: dict[str, Any] = {"epoch": trainer.current_epoch + 1}
        for name, comparison in self.comparisons.items():
            history = comparison.history
            if not history or history[-1]["global_step"] != trainer.global_step:
                return
            correct, agree, seen = getattr(pl_module, "counts", {}).get(name, (0, 0, 0))
            row[name] = {"acc": correct / seen if seen else math.nan, "agree": agree / seen if seen else math.nan,
                         **{k: history[-1][k] for k in self.KEYS}}
        self.rows.append(row)
        if not self._printed_header:
            self._print(trainer, self.header())
            self._printed_header = True
        self._print(trainer, self.format_row(row))


class EpochTable(Callback, _Printer):
    """Prints one row per comparison of a single :class:`ReferenceComparison` (reads its ``history``) with the
    student's accuracy on the compared inputs and the share of them where the reference and the student
    predict the same class (both computed here from the student's ``validation_step`` output
    ``{"logits": ...}`` and one reference forward per batch). Register it *after* the comparison callback.
    The rows are kept in ``rows``. (Used by ``examples/cifar10.py``.)

    Args:
        comparison: the :class:`ReferenceComparison` callback.
        agreement: run the reference on each validation batch to compute ``agree`` (else ``nan``).
        printer: ``str -> None`` (default: the progress bar's ``print``, or ``print``).
    """

    HEADER = (f"{'epoch':>5} {'acc':>6} {'agree':>6} {'KL':>7} {'d_LLV':>7} {'d_SVD':>7} {'mCCA':>6} "
              f"{'2M·d_LLV':>9} {'2·d_LLV²':>9}")

    def __init__(self, comparison: Any, agreement: bool = True, printer: Any = None) -> None:
        _Printer.__init__(self, printer)
        self.comparison = comparison
        self.agreement = agreement
        self.rows: list[dict[str, Any]] = []
        self._counts = [0, 0, 0]  # correct, agreeing, seen
        self._printed_header = False

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._counts = [0, 0, 0]

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking or not isinstance(outputs, dict) or "logits" not in outputs:
            return
        pred = outputs["logits"].argmax(-1)
        self._counts[0] += int((pred == batch[1]).sum())
        if self.agreement:
            with torch.no_grad():
                ref = self.comparison.reference(batch[0].to(pl_module.device))
            self._counts[1] += int((ref.argmax(-1) == pred).sum())
        self._counts[2] += int(pred.shape[0])

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        history = self.comparison.history
        if trainer.sanity_checking or not history or history[-1]["global_step"] != trainer.global_step:
            return
        h = history[-1]
        seen = max(1, self._counts[2])
        row = {
            "epoch": h["epoch"] + 1,
            "global_step": h["global_step"],
            "stage": h["stage"],
            "acc": self._counts[0] / seen if self._counts[2] else math.nan,
            "agree": self._counts[1] / seen if self._counts[2] and self.agreement else math.nan,
            **{k: h[k] for k in ("kl", "d_llv", "d_svd", "mcca", "bound_paper", "bound_sharp")},
        }
        self.rows.append(row)
        if not self._printed_header:
            self._print(trainer, self.HEADER)
            self._printed_header = True
        self._print(trainer, self.format_row(row))

    @staticmethod
    def format_row(r: dict[str, Any]) -> str:
        return (f"{r['epoch']:>5} {_fmt(r['acc'], '6.3f')} {_fmt(r['agree'], '6.3f')} {_fmt(r['kl'], '7.3f')} "
                f"{_fmt(r['d_llv'], '7.3f')} {_fmt(r['d_svd'], '7.3f')} {_fmt(r['mcca'], '6.3f')} "
                f"{_fmt(r['bound_paper'], '9.2f')} {_fmt(r['bound_sharp'], '9.2f')}")


# ---------------------------------------------------------------------------------------------
# the picture: teacher and students side by side
# ---------------------------------------------------------------------------------------------
def plot_three(embeddings: Mapping[str, Tensor], labels: Tensor, subtitles: Mapping[str, str], title: str,
               max_points: int = 2000) -> Any:
    """One panel per model (teacher first): its 2-D embeddings of the same inputs, coloured by class.
    Rendered with Agg, without pyplot."""
    import matplotlib
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lab = labels[:max_points].cpu().numpy()
    classes = np.unique(lab)
    cmap = matplotlib.colormaps["tab10"]
    fig = Figure(figsize=(4.0 * len(embeddings) + 0.8, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(embeddings))
    for ax, (name, emb) in zip(axes, embeddings.items()):
        e = emb[:max_points].detach().double().cpu().numpy()
        for i, c in enumerate(classes):
            sel = lab == c
            ax.scatter(e[sel, 0], e[sel, 1], s=3, color=cmap(i % cmap.N), label=str(c), linewidths=0)
        ax.set_title(f"{name}\n{subtitles.get(name, '')}", fontsize=9)
        ax.set_aspect("equal", adjustable="datalim")
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    axes[-1].legend(title="class", loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# environment: wandb offline, one torch thread (restored afterwards)
# ---------------------------------------------------------------------------------------------
@contextmanager
def _demo_environment(threads: int):
    """WANDB_MODE=offline (unless set), quiet wandb, ``threads`` torch threads; the environment (wandb and
    Lightning's seeding write variables too) and the thread count are restored afterwards."""
    import logging
    import warnings

    saved_env = dict(os.environ)
    saved_threads = torch.get_num_threads()
    pl_logger = logging.getLogger("lightning.pytorch")
    saved_level = pl_logger.level
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    torch.set_num_threads(threads)
    pl_logger.setLevel(logging.WARNING)  # no "GPU available: False" banners
    try:
        with warnings.catch_warnings():
            for message in _QUIET:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        pl_logger.setLevel(saved_level)
        torch.set_num_threads(saved_threads)
        for k in set(os.environ) - set(saved_env):
            del os.environ[k]
        for k, v in saved_env.items():
            if os.environ.get(k) != v:
                os.environ[k] = v


def _loaders(data: DemoData, seed: int):
    from torch.utils.data import DataLoader, TensorDataset

    gen = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=data.batch_size, shuffle=True,
                       generator=gen, collate_fn=data.collate)
    test = DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=500)
    return train, test


def _trainer(epochs: int, callbacks: list, loggers: list | bool, progress: bool):
    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, callbacks=callbacks, logger=loggers, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=progress, num_sanity_val_steps=0, log_every_n_steps=25,
        deterministic=True,
    )


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def acceptance(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The demo's message as numbers: both students' final KL <= 0.05 nats, their d_LLV at least 10x apart and
    their mCCA at least 0.05 apart (``ok`` when all three hold)."""
    kl, logit = summary["students"]["kl"], summary["students"]["logit"]
    hi, lo = max(kl["d_llv"], logit["d_llv"]), min(kl["d_llv"], logit["d_llv"])
    out = {
        "max_kl": max(kl["kl"], logit["kl"]),
        "d_llv_ratio": hi / lo if lo > 0 else math.inf,
        "mcca_gap": abs(kl["mcca"] - logit["mcca"]),
    }
    out["ok"] = out["max_kl"] <= KL_MAX and out["d_llv_ratio"] >= D_LLV_RATIO_MIN and out["mcca_gap"] >= MCCA_GAP_MIN
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the demo; returns the summary, the comparisons' histories, the printed rows and the output paths."""
    parser = argparse.ArgumentParser(prog="python -m lightning_repsim.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=None, help="epochs of the teacher and of the students "
                        "(default 30 on radial, 40 on digits)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="teacher seed S; both students use S + 1 "
                        f"(default {DEFAULT_SEED})")
    parser.add_argument("--data", choices=("radial", "digits"), default="radial", help="data set (default radial)")
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output directory (default ./outputs/demo)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_EPOCHS} epochs: a smoke test")
    parser.add_argument("--no-wandb", action="store_true", help="CSV logging only")
    parser.add_argument("--no-progress", action="store_true", help="hide Lightning's progress bars")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: fastest for these small MLPs)")
    args = parser.parse_args(argv)
    with _demo_environment(args.threads):
        data = load_data(args.data)
        epochs = args.epochs or (QUICK_EPOCHS if args.quick else data.epochs)
        return _run(args, data, epochs)


def _run(args: argparse.Namespace, data: DemoData, epochs: int) -> dict[str, Any]:
    from lightning.pytorch.loggers import CSVLogger

    from lightning_repsim.models import Classifier

    start = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    seed, student_seed = args.seed, args.seed + 1
    k, hidden = data.num_classes, "-".join(str(h) for h in data.hidden)

    print(data.description)
    print(f"Model (teacher and students): MLP {data.in_dim}-{hidden} -> 2-D embedding f(x) -> nn.Linear(2, {k}) "
          "(unembedding g = its weight rows).\n")

    # 1. the teacher
    print(f"[1/2] Training the teacher (seed {seed}, {epochs} epochs, cross-entropy on the labels)...", flush=True)
    pl.seed_everything(seed, verbose=False)
    teacher = Classifier(data.model(), lr=data.lr, weight_decay=data.weight_decay, one_cycle=True)
    train, test = _loaders(data, seed)
    _trainer(epochs, [], False, progress).fit(teacher, train)
    teacher.eval()
    teacher_acc = _accuracy(teacher, data.x_test, data.y_test)
    print(f"      teacher accuracy on the {len(data.y_test)} held-out points: {teacher_acc:.4f}\n", flush=True)

    # 2. the students, side by side, each compared with the teacher after every epoch
    print(f"[2/2] Distilling two students from the teacher (seed {student_seed} for both: same initialisation, same "
          f"batches; {epochs} epochs), each with ReferenceComparison(teacher):", flush=True)
    for label, loss in STUDENTS.values():
        print(f"      {label + ':':<15} {loss}")
    print(flush=True)
    pl.seed_everything(student_seed, verbose=False)
    module = DistilledStudents(data.model, teacher, student_losses(), data.lr, data.weight_decay, student_seed)
    train, test = _loaders(data, student_seed)
    comparisons = {name: student_comparison(teacher, name, prog_bar=["kl", "d_llv"]) for name in STUDENTS}
    table = StudentsTable(comparisons)
    loggers: list[Any] = [CSVLogger(save_dir=str(out), name="csv")]
    wandb_logger = None
    if not args.no_wandb:
        from lightning.pytorch.loggers import WandbLogger

        wandb_logger = WandbLogger(project="lightning_repsim-demo", name=f"{data.name}-students-seed{seed}",
                                   save_dir=str(out), offline=True)
        wandb_logger.log_hyperparams({"data": data.name, "epochs": epochs, "batch_size": data.batch_size,
                                      "teacher_seed": seed, "student_seed": student_seed, "teacher_test_acc": teacher_acc,
                                      "students": {n: loss for n, (_, loss) in STUDENTS.items()}})
        loggers.append(wandb_logger)
    _trainer(epochs, [*comparisons.values(), table], loggers, progress).fit(module, train, test)
    module.eval()

    # the final numbers: each comparison's last entry (held-out points), accuracy and agreement on the same points
    with torch.no_grad():
        z_teacher = teacher(data.x_test)
        students = {name: module.students[name](data.x_test) for name in STUDENTS}
    summary: dict[str, Any] = {"students": {}, "teacher_accuracy": teacher_acc}
    for name, logits in students.items():
        last = comparisons[name].history[-1]
        summary["students"][name] = {
            "kl": last["kl"], "d_llv": last["d_llv"], "d_svd": last["d_svd"], "mcca": last["mcca"],
            "accuracy": float((logits.argmax(-1) == data.y_test).double().mean()),
            "agreement": float((logits.argmax(-1) == z_teacher.argmax(-1)).double().mean()),
        }
    summary.update({"data": data.name, "seed": seed, "student_seed": student_seed, "epochs": epochs,
                    "num_test": len(data.y_test), "losses": {n: loss for n, (_, loss) in STUDENTS.items()}})
    summary_path = out / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    check = acceptance(summary)

    # the picture: teacher and both students
    png = out / "embeddings.png"
    with torch.no_grad():
        embeddings = {"teacher": teacher.embed(data.x_test)}
        embeddings.update({STUDENTS[n][0]: module.students[n].embed(data.x_test) for n in STUDENTS})
    subtitles = {"teacher": f"accuracy {teacher_acc:.3f}"}
    for name, s in summary["students"].items():
        subtitles[STUDENTS[name][0]] = (f"KL {s['kl']:.3f}, agree {s['agreement']:.3f}\n"
                                        f"d_LLV {s['d_llv']:.3f}, d_SVD {_small(s['d_svd'])}, mCCA {s['mcca']:.3f}")
    fig = plot_three(embeddings, data.y_test, subtitles,
                     f"{data.name}: embeddings f(x) of {min(2000, len(data.y_test))} held-out points after {epochs} "
                     "epochs (coloured by class)")
    fig.savefig(png, dpi=110)
    csv_path = Path(loggers[0].log_dir) / "metrics.csv"
    wandb_dir = None
    if wandb_logger is not None:
        wandb_logger.log_image(key="demo/embeddings", images=[str(png)],
                               caption=["teacher, KL student, logit student (coloured by class)"])
        wandb_logger.experiment.summary.update({f"final/{n}/{key}": v for n, s in summary["students"].items()
                                                for key, v in s.items()})
        wandb_dir = Path(wandb_logger.experiment.dir).parent
        wandb_logger.experiment.finish()
    elapsed = time.perf_counter() - start

    # the report
    shown = [r for r in table.rows if r["epoch"] in (1, 2, 3, 5, 10, 20) or r is table.rows[-1]]
    print(f"\nTeacher vs students on the {len(data.y_test)} held-out points (every epoch: see the CSV / wandb):")
    print(table.header())
    for r in shown:
        print(table.format_row(r))
    print(f"\nFinal ({epochs} epochs), on the {len(data.y_test)} held-out points:")
    print(f"{'':<15} {'accuracy':>8} {'agree':>6} {'KL':>7} {'d_LLV':>7} {'d_SVD':>8} {'mCCA':>6}")
    print(f"{'teacher':<15} {teacher_acc:>8.4f}")
    for name, s in summary["students"].items():
        print(f"{STUDENTS[name][0]:<15} {s['accuracy']:>8.4f} {s['agreement']:>6.3f} {s['kl']:>7.4f} {s['d_llv']:>7.4f} "
              f"{_small(s['d_svd']):>8} {s['mcca']:>6.4f}")
    kl_s, lg_s = summary["students"]["kl"], summary["students"]["logit"]
    near, far = ("logit", "kl") if lg_s["d_llv"] <= kl_s["d_llv"] else ("kl", "logit")
    print()
    print(f"Predictions alike:      KL {kl_s['kl']:.3f} and {lg_s['kl']:.3f} nats; the same class as the teacher for "
          f"{kl_s['agreement']:.1%} and {lg_s['agreement']:.1%} of the points.")
    print(f"Representations differ: d_LLV {kl_s['d_llv']:.3f} vs {lg_s['d_llv']:.4f} ({check['d_llv_ratio']:.0f}x apart), "
          f"d_SVD {_small(kl_s['d_svd'])} vs {_small(lg_s['d_svd'])}, mCCA {kl_s['mcca']:.3f} vs {lg_s['mcca']:.4f}.")
    if check["ok"]:
        print(f"                        The {STUDENTS[near][0]}'s embedding is nearly a linear map of the teacher's, the "
              f"{STUDENTS[far][0]}'s is not (d_LLV = d_SVD = 0 and mCCA = 1 for an exact one; see the picture).")
    print(f"Check (both KL <= {KL_MAX}, d_LLV ratio >= {D_LLV_RATIO_MIN:.0f}, mCCA gap >= {MCCA_GAP_MIN}): "
          f"{'holds' if check['ok'] else 'does NOT hold'} (max KL {check['max_kl']:.3f}, ratio {check['d_llv_ratio']:.0f}, "
          f"gap {check['mcca_gap']:.3f})" + ("." if check["ok"] or epochs >= data.epochs
                                              else f"; {epochs} epochs are too few to converge."))
    if check["ok"]:
        print("Small KL did not mean similar representations: d_LLV told the two students apart.")
    print(f"\nDone in {elapsed:.0f} s. Outputs in {out}:")
    print(f"  embeddings (teacher, KL student, logit student): {png}")
    print(f"  final numbers (JSON):                            {summary_path}")
    print(f"  per-epoch metrics of both comparisons (CSV):     {csv_path}")
    if wandb_dir is not None:
        print(f"  wandb offline run:                               {wandb_dir}")
        print(f"    view it online with:  wandb sync {wandb_dir}")
    return {
        "summary": summary,
        "acceptance": check,
        "histories": {name: c.history for name, c in comparisons.items()},
        "rows": table.rows,
        "teacher_acc": teacher_acc,
        "out": out,
        "png": png,
        "summary_path": summary_path,
        "csv": csv_path,
        "wandb_dir": wandb_dir,
        "seconds": elapsed,
    }


if __name__ == "__main__":
    main(sys.argv[1:])
