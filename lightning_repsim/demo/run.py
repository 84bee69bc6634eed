"""The demo's command line and its three steps: train (teacher, then students), compare (summary, acceptance),
report (tables, picture, outputs)."""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lightning_repsim.demo import report
from lightning_repsim.demo.comparison import acceptance, student_comparison, students_settings, summarise
from lightning_repsim.demo.data import DemoData, load_data
from lightning_repsim.demo.outputs import close_wandb_run, make_loggers, write_summary
from lightning_repsim.demo.tables import StudentsTable
from lightning_repsim.demo.training import STUDENTS, accuracy, distil_students, train_teacher

__all__ = ["DEFAULT_SEED", "QUICK_EPOCHS", "main", "run_demo"]

DEFAULT_SEED = 0
QUICK_EPOCHS = 3
#: wandb's pointer to its service process: left as wandb leaves it (the demo may have shut that service down, and a
#: restored pointer to it would break the next ``wandb.init`` of the process)
_WANDB_SERVICE = "WANDB_SERVICE"
#: Lightning warnings that say nothing to a demo user (silenced inside the demo only).
_QUIET = (".*does not have many workers.*", ".*no `val_dataloader`.*", ".*LeafSpec.*is deprecated.*",
          ".*number of training batches.*")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from lightning_repsim import demo as package

    parser = argparse.ArgumentParser(prog="python -m lightning_repsim.demo", description=package.__doc__,
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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the demo; returns the summary, the comparisons' histories, the printed rows and the output paths. When it
    returns, every output is complete on disk (the wandb run included)."""
    args = parse_args(argv)
    with _demo_environment(args.threads):
        data = load_data(args.data)
        epochs = args.epochs or (QUICK_EPOCHS if args.quick else data.epochs)
        return run_demo(data, epochs, args.seed, args.out.resolve(), use_wandb=not args.no_wandb,
                        progress=not args.no_progress)


def run_demo(data: DemoData, epochs: int, seed: int, out: Path, use_wandb: bool = True,
             progress: bool = True) -> dict[str, Any]:
    """Train the teacher (seed ``seed``) and the two students (seed ``seed + 1``) for ``epochs`` each, compare them,
    write the outputs under ``out`` and print the report (see :func:`main`)."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)

    # train: the teacher, then the students, each compared with the teacher after every epoch
    report.announce_teacher(data, seed, epochs)
    teacher = train_teacher(data, epochs, seed, progress)
    with torch.no_grad():
        teacher_acc = accuracy(teacher(data.x_test), data.y_test)
    report.teacher_trained(teacher_acc, len(data.y_test))
    report.announce_students(seed + 1, epochs)
    comparisons = {name: student_comparison(teacher, name, prog_bar=["kl", "d_llv"]) for name in STUDENTS}
    table = StudentsTable(comparisons)
    config = {"data": data.name, "epochs": epochs, "batch_size": data.batch_size, "teacher_seed": seed,
              "student_seed": seed + 1, "teacher_test_acc": teacher_acc,
              "students": {name: loss for name, (_, loss) in STUDENTS.items()}}
    loggers, wandb_logger = make_loggers(out, f"{data.name}-students-seed{seed}", config, use_wandb)
    module = distil_students(data, teacher, epochs, seed + 1, [*comparisons.values(), table], loggers, progress)

    # compare: the final numbers and the demo's acceptance
    summary = summarise(data, teacher, module, comparisons, students_settings(data, seed, epochs))
    summary_path = write_summary(summary, out)
    check = acceptance(summary)

    # report: the picture, the run's files, the tables
    png = report.save_picture(out / "embeddings.png", data, teacher, dict(module.students.items()), summary)
    csv_path = Path(loggers[0].log_dir) / "metrics.csv"
    wandb_dir = close_wandb_run(wandb_logger, summary, png) if wandb_logger is not None else None
    elapsed = time.perf_counter() - start
    report.print_results(table, summary, check, data.epochs)
    report.print_outputs(elapsed, out, png, summary_path, csv_path, wandb_dir)
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


@contextmanager
def _demo_environment(threads: int):
    """WANDB_MODE=offline (unless set), quiet wandb, ``threads`` torch threads; the environment (wandb and
    Lightning's seeding write variables too; all but wandb's service pointer) and the thread count are restored
    afterwards."""
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
        for k in set(os.environ) - set(saved_env) - {_WANDB_SERVICE}:
            del os.environ[k]
        for k, v in saved_env.items():
            if os.environ.get(k) != v and k != _WANDB_SERVICE:
                os.environ[k] = v
