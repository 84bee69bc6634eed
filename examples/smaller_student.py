"""Distilling into a smaller student: what d_LLV, d_SVD, its floor and mCCA say when the widths differ.

Command (under a minute on 2 CPU cores; ``--quick``: a few seconds)::

    python examples/smaller_student.py                 # writes examples/results/smaller_student.md

A teacher on scikit-learn's bundled digits (10 classes, no download) with an 8-dimensional embedding
(``BottleneckClassifier``: MLP 64 -> 256 -> 256 -> 8, then ``nn.Linear(8, 10)``) is trained with cross-entropy; then
students with embeddings of width 8, 4 and 2 are distilled from it with ``LogitDistanceLoss`` (the centred logit
distance), each with ``ReferenceComparison(teacher)`` attached. The callback compares every student at the
teacher's representation dimension ``M = max(r_teacher, r_student)`` (docs/smaller_student.md) and logs KL, d_LLV,
d_SVD and mCCA; the table adds the floor of d_SVD a student of that rank cannot go below,
``1 - sqrt(Lambda_r / M)`` for the worst label subset (``Lambda_r``: the r largest eigenvalues of the correlation
matrix of the teacher's log-odds), and its worst case ``1 - sqrt(r / M)``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_repsim import LogitDistanceLoss, ReferenceComparison
from lightning_repsim.demo.data import load_digits_split
from lightning_repsim.models import BottleneckClassifier, Classifier

RESULTS = Path(__file__).resolve().parent / "results"
TEACHER_WIDTH = 8
STUDENT_WIDTHS = (8, 4, 2)


class Distilled(pl.LightningModule):
    """A student trained on the teacher's logits only (the teacher is kept out of the module's submodules)."""

    def __init__(self, net: nn.Module, teacher: nn.Module, lr: float = 3e-3) -> None:
        super().__init__()
        self.net, self._teacher, self.lr = net, (teacher,), lr
        self.loss = LogitDistanceLoss()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        with torch.no_grad():
            target = self._teacher[0](batch[0])
        return self.loss(self(batch[0]), target)

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", (self(batch[0]).argmax(-1) == batch[1]).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def trainer(epochs: int, callbacks=()) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
                      num_sanity_val_steps=0, deterministic=True)


def floor_of_d_svd(teacher: nn.Module, x: Tensor, entry: dict, rank: int) -> float:
    """``1 - sqrt(Lambda_rank / M)`` for the label subset d_SVD's f-part found worst (docs/smaller_student.md §3)."""
    svd = entry["svd"].svd
    with torch.no_grad():
        f = teacher.embed(x).double()
    w = teacher.unembed().double()[:, : f.shape[1]]
    log_odds = f @ (w[svd.worst_subset] - w[svd.label_pivot]).T
    eig = torch.linalg.eigvalsh(torch.corrcoef(log_odds.T)).flip(0)
    return float(1 - (eig[:rank].sum() / log_odds.shape[1]).sqrt())


def run(epochs: int, seed: int = 0) -> list[dict]:
    x_train, y_train, x_test, y_test = load_digits_split()
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=32, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    test = DataLoader(TensorDataset(x_test, y_test), batch_size=500)
    pl.seed_everything(seed, verbose=False)
    teacher = Classifier(BottleneckClassifier(64, 10, hidden=(256, 256), rep_dim=TEACHER_WIDTH), lr=3e-3)
    trainer(epochs).fit(teacher, train)
    teacher.eval()
    with torch.no_grad():
        teacher_acc = float((teacher(x_test).argmax(-1) == y_test).double().mean())
    rows = []
    for width in STUDENT_WIDTHS:
        pl.seed_everything(seed + 1, verbose=False)
        student = Distilled(BottleneckClassifier(64, 10, hidden=(256, 256), rep_dim=width), teacher)
        compare = ReferenceComparison(teacher, every_n_epochs=epochs)
        trainer(epochs, [compare]).fit(student, train, test)
        entry = compare.history[-1]
        r_t, r_s = entry["embedding_rank"]
        student.eval()
        with torch.no_grad():
            acc = float((student(x_test).argmax(-1) == y_test).double().mean())
        rows.append({
            "width": width, "rank": r_s, "teacher_rank": r_t, "M": entry["rep_dim"], "accuracy": acc,
            "teacher_accuracy": teacher_acc, **{k: entry[k] for k in ("kl", "d_llv", "d_svd", "mcca", "bound_sharp")},
            "floor": floor_of_d_svd(teacher, x_test, compare.last_results, r_s),
            "worst_floor": 1 - math.sqrt(r_s / entry["rep_dim"]),
        })
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| student width (rank) | test acc | KL | d_LLV | d_SVD | floor of d_SVD (worst case) | mCCA | 2 d_LLV² |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['width']} ({r['rank']}) | {r['accuracy']:.4f} | {r['kl']:.4f} | {r['d_llv']:.4f} | "
                     f"{r['d_svd']:.4f} | {r['floor']:.4f} ({r['worst_floor']:.3f}) | {r['mcca']:.4f} | {r['bound_sharp']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="3 epochs, no results file")
    parser.add_argument("--out", type=Path, default=RESULTS / "smaller_student.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()
    rows = run(3 if args.quick else args.epochs)
    text = table(rows)
    print(text)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            f"# Distilling into a smaller student (digits, teacher width {TEACHER_WIDTH})\n\n"
            f"Command: `python examples/smaller_student.py` ({args.epochs} epochs per model, {time.time() - start:.0f} s "
            f"wall on 2 CPU cores). Teacher test accuracy {rows[0]['teacher_accuracy']:.4f}, rank {rows[0]['teacher_rank']}; "
            f"every student is compared at M = {rows[0]['M']}.\n\n{text}\n"
        )
    return rows


if __name__ == "__main__":
    main()
