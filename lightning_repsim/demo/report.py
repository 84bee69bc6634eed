"""What the demo shows: the progress lines, the final tables and message, where the outputs went, and the picture of
the three embeddings. Printing and plotting only; the numbers come from training and comparison."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_repsim.demo.comparison import D_LLV_RATIO_MIN, KL_MAX, MCCA_GAP_MIN
from lightning_repsim.demo.data import DemoData
from lightning_repsim.demo.tables import StudentsTable, fmt_small
from lightning_repsim.demo.training import STUDENTS

__all__ = ["announce_students", "announce_teacher", "plot_three", "print_outputs", "print_results", "save_picture",
           "teacher_trained"]

#: the epochs whose rows the final per-epoch table repeats (and always the last one)
SHOWN_EPOCHS = (1, 2, 3, 5, 10, 20)


def announce_teacher(data: DemoData, seed: int, epochs: int) -> None:
    k, hidden = data.num_classes, "-".join(str(h) for h in data.hidden)
    print(data.description)
    print(f"Model (teacher and students): MLP {data.in_dim}-{hidden} -> 2-D embedding f(x) -> nn.Linear(2, {k}) "
          "(unembedding g = its weight rows).\n")
    print(f"[1/2] Training the teacher (seed {seed}, {epochs} epochs, cross-entropy on the labels)...", flush=True)


def teacher_trained(accuracy: float, num_test: int) -> None:
    print(f"      teacher accuracy on the {num_test} held-out points: {accuracy:.4f}\n", flush=True)


def announce_students(seed: int, epochs: int) -> None:
    print(f"[2/2] Distilling two students from the teacher (seed {seed} for both: same initialisation, same "
          f"batches; {epochs} epochs), each with ReferenceComparison(teacher):", flush=True)
    for label, loss in STUDENTS.values():
        print(f"      {label + ':':<15} {loss}")
    print(flush=True)


def print_results(table: StudentsTable, summary: Mapping[str, Any], check: Mapping[str, Any], full_epochs: int) -> None:
    """The per-epoch rows again (a selection), the final table, and the message with the acceptance check
    (``full_epochs``: the recipe's number of epochs, to say when a shorter run could not converge)."""
    n, epochs, students = summary["num_test"], summary["epochs"], summary["students"]
    shown = [r for r in table.rows if r["epoch"] in SHOWN_EPOCHS or r is table.rows[-1]]
    print(f"\nTeacher vs students on the {n} held-out points (every epoch: see the CSV / wandb):")
    print(table.header())
    for r in shown:
        print(table.format_row(r))
    print(f"\nFinal ({epochs} epochs), on the {n} held-out points:")
    print(f"{'':<15} {'accuracy':>8} {'agree':>6} {'KL':>7} {'d_LLV':>7} {'d_SVD':>8} {'mCCA':>6}")
    print(f"{'teacher':<15} {summary['teacher_accuracy']:>8.4f}")
    for name, s in students.items():
        print(f"{STUDENTS[name][0]:<15} {s['accuracy']:>8.4f} {s['agreement']:>6.3f} {s['kl']:>7.4f} {s['d_llv']:>7.4f} "
              f"{fmt_small(s['d_svd']):>8} {s['mcca']:>6.4f}")
    kl_s, lg_s = students["kl"], students["logit"]
    near, far = ("logit", "kl") if lg_s["d_llv"] <= kl_s["d_llv"] else ("kl", "logit")
    print()
    print(f"Predictions alike:      KL {kl_s['kl']:.3f} and {lg_s['kl']:.3f} nats; the same class as the teacher for "
          f"{kl_s['agreement']:.1%} and {lg_s['agreement']:.1%} of the points.")
    print(f"Representations differ: d_LLV {kl_s['d_llv']:.3f} vs {lg_s['d_llv']:.4f} ({check['d_llv_ratio']:.0f}x apart), "
          f"d_SVD {fmt_small(kl_s['d_svd'])} vs {fmt_small(lg_s['d_svd'])}, mCCA {kl_s['mcca']:.3f} vs {lg_s['mcca']:.4f}.")
    if check["ok"]:
        print(f"                        The {STUDENTS[near][0]}'s embedding is nearly a linear map of the teacher's, the "
              f"{STUDENTS[far][0]}'s is not (d_LLV = d_SVD = 0 and mCCA = 1 for an exact one; see the picture).")
    print(f"Check (both KL <= {KL_MAX}, d_LLV ratio >= {D_LLV_RATIO_MIN:.0f}, mCCA gap >= {MCCA_GAP_MIN}): "
          f"{'holds' if check['ok'] else 'does NOT hold'} (max KL {check['max_kl']:.3f}, ratio {check['d_llv_ratio']:.0f}, "
          f"gap {check['mcca_gap']:.3f})" + ("." if check["ok"] or epochs >= full_epochs
                                              else f"; {epochs} epochs are too few to converge."))
    if check["ok"]:
        print("Small KL did not mean similar representations: d_LLV told the two students apart.")


def print_outputs(seconds: float, out: Path, png: Path, summary_path: Path, csv_path: Path, wandb_dir: Path | None) -> None:
    print(f"\nDone in {seconds:.0f} s. Outputs in {out}:")
    print(f"  embeddings (teacher, KL student, logit student): {png}")
    print(f"  final numbers (JSON):                            {summary_path}")
    print(f"  per-epoch metrics of both comparisons (CSV):     {csv_path}")
    if wandb_dir is not None:
        print(f"  wandb offline run:                               {wandb_dir}")
        print(f"    view it online with:  wandb sync {wandb_dir}")


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


def save_picture(path: Path, data: DemoData, teacher: nn.Module, students: Mapping[str, nn.Module],
                 summary: Mapping[str, Any]) -> Path:
    """The teacher's and the students' embeddings of the held-out points side by side, with their final numbers,
    saved as ``path`` (PNG)."""
    with torch.no_grad():
        embeddings = {"teacher": teacher.embed(data.x_test)}
        embeddings.update({STUDENTS[name][0]: net.embed(data.x_test) for name, net in students.items()})
    subtitles = {"teacher": f"accuracy {summary['teacher_accuracy']:.3f}"}
    for name, s in summary["students"].items():
        subtitles[STUDENTS[name][0]] = (f"KL {s['kl']:.3f}, agree {s['agreement']:.3f}\n"
                                        f"d_LLV {s['d_llv']:.3f}, d_SVD {fmt_small(s['d_svd'])}, mCCA {s['mcca']:.3f}")
    title = (f"{data.name}: embeddings f(x) of {min(2000, len(data.y_test))} held-out points after {summary['epochs']} "
             "epochs (coloured by class)")
    plot_three(embeddings, data.y_test, subtitles, title).savefig(path, dpi=110)
    return path
