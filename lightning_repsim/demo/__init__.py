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
account, no network; the callbacks also log their tables, curves and pictures there), complete on disk when the demo
returns.

The point (Nielsen, Marconato, Dittadi & Gresele, NeurIPS 2025), on the default seed (the README's run): both students
end up predicting like the teacher (KL 0.019 and 0.009 nats, the teacher's class for 99.7 % and 99.1 % of the
held-out points), so KL cannot tell them apart, but only the logit student *represents* like it: its 2-D embedding is
nearly a linear map of the teacher's (d_LLV 0.0098, d_SVD 6e-5, mCCA 0.9999), the KL student's is not (d_LLV 1.21,
d_SVD 0.28, mCCA 0.888). Another machine gives other last digits (30 epochs amplify the CPU kernels' rounding; the
README says how far they go); seeds 1 and 2 tell the same story (``examples/results/demo_seeds.md``).

Data: the "radial" task of SPEC §7 (:func:`lightning_repsim.radial_dataset`: 2-D points, K = 6 antipodal wedges;
generated, nothing downloaded), 8000 training points (data seed 0) and 2000 held-out points (data seed 1). Why not
the bundled digits (``--data digits``, scikit-learn's 8x8 images, K = 10): with the 2-D embedding the picture needs,
the KL student does not get close to the teacher's predictions on held-out digits (final KL 0.20-0.27 nats after 40
epochs on seeds 0-2; ``examples/results/demo_seeds.md``), so the demo would not show "predictions alike". On the
radial data both students reach KL <= 0.05 on every seed tried.

Model (teacher and students): an MLP ``2 -> 64 -> 64 -> 64 -> 2`` (the embedding f) followed by ``nn.Linear(2, 6)``
(g; the callbacks' extractor reads it); Adam with a one-cycle schedule (peak lr 3e-3), batch 64, 30 epochs for the
teacher and 30 for the students. ``--seed S`` (default 0) initialises the teacher with S and both students with S + 1.

Runtime: about 35 s wall on 2 idle CPU cores with one torch thread (the README's measurement), no GPU, no network.

Modules: ``data`` (data sets and recipe), ``training`` (teacher, students), ``comparison`` (the callbacks, the final
numbers, the acceptance rule), ``tables`` (the per-epoch rows), ``report`` (printing, the picture), ``outputs``
(summary.json, CSV and wandb loggers), ``run`` (the command line and the three steps).
"""

from lightning_repsim.demo.comparison import (
    D_LLV_RATIO_MIN,
    KL_MAX,
    MCCA_GAP_MIN,
    acceptance,
    student_comparison,
    summarise,
)
from lightning_repsim.demo.data import DemoData, ShiftAugment, load_data, load_digits_split, load_radial_split
from lightning_repsim.demo.report import plot_three
from lightning_repsim.demo.run import DEFAULT_SEED, QUICK_EPOCHS, main, run_demo
from lightning_repsim.demo.tables import EpochTable, StudentsTable
from lightning_repsim.demo.training import STUDENTS, DistilledStudents, distil_students, student_losses, train_teacher

__all__ = [
    "main",
    "run_demo",
    "DemoData",
    "ShiftAugment",
    "load_data",
    "load_radial_split",
    "load_digits_split",
    "DistilledStudents",
    "train_teacher",
    "distil_students",
    "student_losses",
    "student_comparison",
    "summarise",
    "acceptance",
    "StudentsTable",
    "EpochTable",
    "plot_three",
    "STUDENTS",
    "DEFAULT_SEED",
    "QUICK_EPOCHS",
    "KL_MAX",
    "D_LLV_RATIO_MIN",
    "MCCA_GAP_MIN",
]
