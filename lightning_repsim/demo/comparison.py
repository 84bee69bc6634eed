"""Comparing the students with the teacher: one :class:`ReferenceComparison` per student (after every epoch, on the
held-out points), the final numbers of ``summary.json`` and the demo's acceptance rule."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_repsim.demo.data import DemoData
from lightning_repsim.demo.training import STUDENTS, accuracy

__all__ = ["D_LLV_RATIO_MIN", "KL_MAX", "MCCA_GAP_MIN", "acceptance", "student_comparison", "summarise"]

#: acceptance of the demo's message (tested on the default seed; examples/demo_seeds.py checks other seeds)
KL_MAX, D_LLV_RATIO_MIN, MCCA_GAP_MIN = 0.05, 10.0, 0.05
#: the comparisons' values that summary.json keeps for each student
SUMMARY_METRICS = ("kl", "d_llv", "d_svd", "mcca")


class _Member:
    """``forward_fn`` of a student's extractor: run ``module.students[name]``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, module: nn.Module, inputs: Tensor) -> Tensor:
        return module.students[self.name](inputs)

    def __repr__(self) -> str:
        return f"students[{self.name!r}]"


def student_comparison(teacher: nn.Module, name: str, **kwargs: Any):
    """``ReferenceComparison(teacher)`` for ``students[name]`` of a :class:`DistilledStudents`: logged as
    ``{name}_student/...``."""
    from lightning_repsim.callbacks import ReferenceComparison
    from lightning_repsim.callbacks.extraction import FinalLinear

    extractor = FinalLinear(module_name=f"students.{name}.head", forward_fn=_Member(name))
    return ReferenceComparison(teacher, prefix=f"{name}_student", student_extractor=extractor, **kwargs)


def summarise(data: DemoData, teacher: nn.Module, module: nn.Module, comparisons: Mapping[str, Any],
              settings: Mapping[str, Any]) -> dict[str, Any]:
    """The content of ``summary.json``: per student the last comparison's KL, d_LLV, d_SVD and mCCA (held-out points)
    and its accuracy and agreement with the teacher on the same points; the teacher's accuracy; then ``settings``
    (data, seeds, epochs, ...)."""
    with torch.no_grad():
        z_teacher = teacher(data.x_test)
        students = {name: module.students[name](data.x_test) for name in comparisons}
    summary: dict[str, Any] = {"students": {}, "teacher_accuracy": accuracy(z_teacher, data.y_test)}
    for name, logits in students.items():
        last = comparisons[name].history[-1]
        summary["students"][name] = {
            **{key: last[key] for key in SUMMARY_METRICS},
            "accuracy": accuracy(logits, data.y_test),
            "agreement": accuracy(logits, z_teacher.argmax(-1)),
        }
    summary.update(settings)
    return summary


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


def students_settings(data: DemoData, seed: int, epochs: int) -> dict[str, Any]:
    """The run's settings, as summary.json and the wandb run's config record them."""
    return {"data": data.name, "seed": seed, "student_seed": seed + 1, "epochs": epochs, "num_test": len(data.y_test),
            "losses": {name: loss for name, (_, loss) in STUDENTS.items()}}
