"""Distillation with KL vs logit distances: which students *represent* like their teacher?

Command::

    python examples/distillation.py            # full: digits + radial, 5 student seeds per loss (see runtime below)
    python examples/distillation.py --quick    # digits only, 2 seeds, 2 epochs (tests use this; ~10 s)
    python examples/distillation.py --datasets digits --seeds 10   # other settings

Runtime: about 25-30 min on 2 shared CPU cores (see the committed ``distillation.md`` for the measured one): 80
trainings with Lightning, one after the other (per data set: 1 teacher, 3 LLV-setting runs, 1 KD and 4 recipe runs on
the selection seed, 6 losses x 5 seeds).
``--quick`` takes about 10 s. ``--report examples/results/distillation.json`` rewrites the table and the plot
from saved numbers without training.

The claim tested (Nielsen et al., arXiv 2602.15438, a follow-up of the NeurIPS 2025 paper): students
distilled with a *logit distance* have representations far more linearly similar to the teacher's
(higher mCCA, lower d_SVD) than students distilled with KL, at the same accuracy.

Setup, per data set:

* **Data.** ``digits``: scikit-learn's bundled 8x8 digits (1797 images, 64 features, K = 10), split
  60/20/20 train/validation/test, stratified, ``random_state=0``, features standardised with the
  training statistics. ``radial``: the antipodal-wedge task of SPEC §7 (:func:`lightning_repsim.radial_dataset`,
  K = 6, 2-D inputs), 8000/2000/2000 points drawn with data seeds 0/1/2.
* **Model** (teacher and students alike): an MLP ``inputs -> hidden (ReLU) -> M -> Linear(M, K)`` with a
  low-dimensional embedding (the input of the last layer; M = 5 for digits, M = 2 for radial; K >= M + 2
  as d_SVD needs). The unembedding is ``[weight, bias]`` of the last layer, which the callback's default
  extractor finds.
* **Teacher**: seed 0, cross-entropy on the labels. **Students**: seeds 1..5, each from its own random
  init (the same init and batch order for every loss of a given seed), trained on the training inputs with

  (a) ``labels``: cross-entropy on the labels only (an independently trained model: the baseline);
  (b) ``kd``: :class:`~lightning_repsim.losses.KDLoss` (T = 4), pure distillation (no label term);
  (b') ``kd1``: the same with T = 1, i.e. plain KL(teacher || student) (the "KL" of the follow-up paper);
  (c) ``logit``: :class:`~lightning_repsim.losses.LogitDistanceLoss` (p = 2, centred), pure distillation;
  (d) ``llv``: :class:`~lightning_repsim.losses.LLVLoss` (``label_pivot="mean"``, ``input_set_search="sample"``,
      ``rep_dim=M``), pure distillation; its aggregation and ``lam`` are chosen among
      :data:`LLV_CANDIDATES` by one run per setting on a separate seed (100), judged on *validation*
      data (see :func:`select_llv`); the sweep is reported;
  (e) ``recipe``: LLVLoss as a practical distillation loss (:class:`Recipe`): ``LLVLoss`` (smooth aggregation,
      ``lam=1e-2``, with or without its input terms) plus a small weight of ``KDLoss(T=4)`` or of the cross-entropy
      on the labels. Pure LLVLoss (d) leaves each label's log-odds scale (with a small ``lam``) and offset (always:
      d_LLV compares variances) free, and the argmax drifts; the added term pins them. The recipe is chosen among
      :data:`RECIPE_CANDIDATES` on the validation split of seed 100 against a KD (T = 4) student of the same seed
      (:func:`select_recipe`, :data:`RECIPE_RULE`); the sweep is reported.

  Same optimiser for all: Adam, lr 1e-3, cosine decay to 0 over the run; 150 epochs of batch 64 (digits),
  120 epochs of batch 128 (radial).
* **Monitoring**: :class:`~lightning_repsim.callbacks.ReferenceComparison` with the teacher as reference,
  on the validation split, every epoch (and once before training, "epoch 0"); its ``history`` gives the
  curves of mCCA and d_SVD over epochs.
* **Evaluation** on the test split: accuracy, agreement with the teacher (same argmax), and
  :func:`lightning_repsim.functional.compare` (teacher = p, student = q: KL(teacher || student),
  d_LLV, d_SVD, mCCA) on the test embeddings; mean +- std (unbiased) over the student seeds.

Expected output (full mode; see the committed ``distillation.md`` for the numbers): the centred-logit
students reach mCCA ~0.995 (digits) and ~1.0000 (radial) with d_SVD 10-10^4 times lower than the KD
students, at accuracy within about a point; KD with T = 1 gives mCCA ~0.76 / ~0.89; pure LLVLoss (d) loses about
3 points of accuracy on digits, the recipe (e) does not (see the results file). Files:
``distillation.md`` (one table per data set, the LLV sweep, settings, runtime),
``distillation.png`` (validation mCCA, d_SVD and disagreement with the teacher over epochs, mean +- std band, one line per
loss, one row per data set) and ``distillation.json`` (every number, per seed), written to ``--out``
(default ``examples/results/``; ``distillation_quick.*`` in quick mode).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the examples' shared helpers
from _results import compact, shown_args  # noqa: E402

from lightning_repsim.models import BottleneckClassifier

RESULTS = Path(__file__).resolve().parent / "results"
LOSSES = ("labels", "kd", "kd1", "logit", "llv", "recipe")
LOSS_LABELS = {
    "labels": "(a) labels only (CE)",
    "kd": "(b) KD, T=4",
    "kd1": "(b') KD, T=1 (plain KL)",
    "logit": "(c) centred logit distance",
    "llv": "(d) LLVLoss",
    "recipe": "(e) LLVLoss recipe",
}
METRICS = ("acc", "agree", "kl", "d_llv", "d_svd", "mcca")
#: the callback's history entries kept per epoch (ReferenceComparison logs more)
HISTORY_KEYS = ("epoch", "stage", "kl", "d_llv", "d_svd", "mcca")
#: LLVLoss settings tried on one seed (validation data); all with label_pivot="mean", input_set_search="sample".
LLV_CANDIDATES = {
    "paper": {"reduce": "max", "combine": "max", "lam": 1e-5},
    "smooth": {"reduce": "softmax", "combine": "sum", "lam": 1e-5, "softmax_temperature": 0.1},
    "smooth_lam1e-2": {"reduce": "softmax", "combine": "sum", "lam": 1e-2, "softmax_temperature": 0.1},
}
#: LLVLoss-based recipes for (e), tried on one seed (validation data). ``llv``: the LLVLoss keywords (all with
#: label_pivot="mean", input_set_search="sample", reduce="softmax", combine="sum", softmax_temperature=0.1, lam=1e-2,
#: plus these); ``kd``: weight of KDLoss(T=4) added to it; ``ce``: weight of the cross-entropy on the labels.
#: ``input_terms=False`` keeps the label terms T1, T3 only: the sampled input sets of T2/T4 (M+1 rows of a batch of
#: 64) are a noisy estimate (see the results' notes).
RECIPE_BASE = {"reduce": "softmax", "combine": "sum", "lam": 1e-2, "softmax_temperature": 0.1}
RECIPE_CANDIDATES = {
    "llv+kd0.3": {"llv": {}, "kd": 0.3, "ce": 0.0},
    "llv_label+ce": {"llv": {"input_terms": False}, "kd": 0.0, "ce": 1.0},
    "llv_label+kd0.1": {"llv": {"input_terms": False}, "kd": 0.1, "ce": 0.0},
    "llv_label+kd0.3": {"llv": {"input_terms": False}, "kd": 0.3, "ce": 0.0},
}
RECIPE_KD_TEMPERATURE = 4.0
SELECTION_SEED = 100
SELECTION_RULE = ("lowest validation d_LLV among the settings whose validation accuracy is within 0.01 of the teacher's; "
                  "if there is none, the highest validation accuracy")
RECIPE_RULE = ("lowest validation d_LLV among the recipes whose validation accuracy is at least that of a KD (T=4) student "
               "of the same seed minus 0.005; if there is none, the highest validation accuracy")


@dataclass
class Config:
    name: str
    rep_dim: int
    hidden: tuple[int, ...]
    epochs: int
    batch_size: int
    lr: float = 1e-3
    select_epochs: int = 0  # epochs of the LLV-setting runs (0: same as `epochs`)
    extra: dict = field(default_factory=dict)


FULL = {
    "digits": Config("digits", rep_dim=5, hidden=(128, 128), epochs=150, batch_size=64),
    "radial": Config("radial", rep_dim=2, hidden=(64, 64, 64), epochs=120, batch_size=128,
                     extra={"num_classes": 6, "n": (8000, 2000, 2000)}),
}


def quick_config(cfg: Config) -> Config:
    return Config(cfg.name, cfg.rep_dim, (32,), epochs=2, batch_size=cfg.batch_size, lr=cfg.lr, select_epochs=1,
                  extra={**cfg.extra, "n": (1000, 300, 300)})


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def load_data(cfg: Config) -> dict[str, tuple[Tensor, Tensor]]:
    """``{"train"|"val"|"test": (x float32, y long)}``."""
    if cfg.name == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        from sklearn.preprocessing import StandardScaler

        x, y = load_digits(return_X_y=True)
        x_tr, x_rest, y_tr, y_rest = train_test_split(x, y, test_size=0.4, stratify=y, random_state=0)
        x_va, x_te, y_va, y_te = train_test_split(x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=0)
        scaler = StandardScaler().fit(x_tr)
        parts = {"train": (x_tr, y_tr), "val": (x_va, y_va), "test": (x_te, y_te)}
        return {k: (torch.tensor(scaler.transform(a), dtype=torch.float32), torch.tensor(b, dtype=torch.long))
                for k, (a, b) in parts.items()}
    if cfg.name == "radial":
        from lightning_repsim import radial_dataset

        k = cfg.extra["num_classes"]
        return {split: radial_dataset(n, k, seed=s) for s, (split, n) in enumerate(zip(("train", "val", "test"), cfg.extra["n"]))}
    raise ValueError(f"unknown data set {cfg.name!r}")


def num_classes(data) -> int:
    return int(data["train"][1].max()) + 1


def batches(tensors: tuple[Tensor, ...], batch_size: int, seed: int | None):
    """A DataLoader of in-memory tensors, one indexing per batch (shuffled with ``seed``, or in order)."""
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

    ds = TensorDataset(*tensors)
    base = SequentialSampler(ds) if seed is None else RandomSampler(ds, generator=torch.Generator().manual_seed(seed))
    return DataLoader(ds, sampler=BatchSampler(base, batch_size, drop_last=False), batch_size=None)


# ---------------------------------------------------------------------------------------------
# model and training
# ---------------------------------------------------------------------------------------------
def make_loss(name: str, rep_dim: int, llv_setting: dict | None) -> nn.Module | None:
    from lightning_repsim.losses import KDLoss, LLVLoss, LogitDistanceLoss

    if name == "labels":
        return None
    if name == "kd":
        return KDLoss(temperature=4.0)
    if name == "kd1":
        return KDLoss(temperature=1.0)
    if name == "logit":
        return LogitDistanceLoss(p=2, centered=True)
    if name == "llv":
        return LLVLoss(rep_dim=rep_dim, label_pivot="mean", input_set_search="sample", **(llv_setting or {}))
    if name == "recipe":
        return Recipe(rep_dim, **(llv_setting or RECIPE_CANDIDATES["llv_label+kd0.1"]))
    raise ValueError(name)


class Recipe(nn.Module):
    """An LLVLoss-based distillation objective: ``LLVLoss(**RECIPE_BASE, **llv) + kd * KDLoss(T=4) + ce * CE(labels)``,
    called as ``recipe(student_logits, teacher_logits, labels)``."""

    def __init__(self, rep_dim: int, llv: dict, kd: float = 0.0, ce: float = 0.0) -> None:
        from lightning_repsim.losses import KDLoss, LLVLoss

        super().__init__()
        self.llv = LLVLoss(rep_dim=rep_dim, label_pivot="mean", input_set_search="sample", **{**RECIPE_BASE, **llv})
        self.kd_weight, self.ce_weight = float(kd), float(ce)
        self.kd = KDLoss(temperature=RECIPE_KD_TEMPERATURE)

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        loss = self.llv(student, teacher)
        if self.kd_weight:
            loss = loss + self.kd_weight * self.kd(student, teacher)
        if self.ce_weight:
            loss = loss + self.ce_weight * F.cross_entropy(student, labels)
        return loss


def lightning_module(net: nn.Module, loss: nn.Module | None, lr: float, epochs: int):
    import lightning.pytorch as pl

    class Distil(pl.LightningModule):
        """Trains ``net`` on batches ``(x, y, teacher_logits)``: CE on ``y`` when ``loss`` is None, a :class:`Recipe`
        with the labels, else ``loss(student_logits, teacher_logits)`` (pure distillation). Tracks validation
        accuracy/agreement."""

        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.loss = loss
            self.val_curve: list[dict[str, float]] = []
            self._counts = torch.zeros(3)

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y, t = batch
            logits = self.net(x)
            if self.loss is None:
                return F.cross_entropy(logits, y)
            return self.loss(logits, t, y) if isinstance(self.loss, Recipe) else self.loss(logits, t)

        def on_validation_epoch_start(self) -> None:
            self._counts = torch.zeros(3)

        def validation_step(self, batch, batch_idx):
            x, y, t = batch
            pred = self.net(x).argmax(-1)
            self._counts += torch.tensor([float((pred == y).sum()), float((pred == t.argmax(-1)).sum()), float(len(y))])

        def on_validation_epoch_end(self) -> None:
            c = self._counts
            self.val_curve.append({"acc": float(c[0] / c[2]), "agree": float(c[1] / c[2])})

        def configure_optimizers(self):
            opt = torch.optim.Adam(self.net.parameters(), lr=lr)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)}

    return Distil()


def quiet_lightning() -> None:
    import lightning.pytorch  # noqa: F401  (configures its loggers on import: quieten them afterwards)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=".*number of training batches.*")


def fit(cfg: Config, data, teacher_logits, seed: int, loss_name: str, reference: nn.Module | None,
        llv_setting: dict | None = None, epochs: int | None = None):
    """Train one model; returns ``(net, val_curve, callback_history)`` (the last two start at epoch 0 = init
    when a reference is given)."""
    import lightning.pytorch as pl

    from lightning_repsim.callbacks import ReferenceComparison

    epochs = epochs or cfg.epochs
    pl.seed_everything(seed, verbose=False)
    k, in_dim = num_classes(data), data["train"][0].shape[1]
    net = BottleneckClassifier(in_dim, k, cfg.hidden, cfg.rep_dim)
    module = lightning_module(net, make_loss(loss_name, cfg.rep_dim, llv_setting), cfg.lr, epochs)
    train = batches((*data["train"], teacher_logits["train"]), cfg.batch_size, seed)
    val = batches((*data["val"], teacher_logits["val"]), 1000, None)
    callbacks = []
    if reference is not None:
        callbacks.append(ReferenceComparison(reference, log_media=False))
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
    )
    if reference is not None:
        trainer.validate(module, val, verbose=False)  # epoch 0: the random init
    trainer.fit(module, train, val)
    history = callbacks[0].history if callbacks else []
    return net.eval(), module.val_curve, history


@torch.no_grad()
def evaluate(student: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
    """Test metrics: accuracy, agreement, and ``functional.compare(teacher, student)`` on the embeddings."""
    from lightning_repsim.functional import compare

    f_t, f_s = teacher.embed(x).double(), student.embed(x).double()
    z_t, z_s = teacher(x), student(x)
    rep = compare(f_t, teacher.unembed().double(), f_s, student.unembed().double(), seed=0).as_dict()
    return {
        "acc": float((z_s.argmax(-1) == y).double().mean()),
        "agree": float((z_s.argmax(-1) == z_t.argmax(-1)).double().mean()),
        **{key: rep[key] for key in ("kl", "d_llv", "d_svd", "d_svd_f", "d_svd_g", "mcca")},
    }


def select_llv(cfg: Config, data, teacher, teacher_logits, log) -> tuple[str, list[dict]]:
    """Train one student (seed :data:`SELECTION_SEED`) per :data:`LLV_CANDIDATES` setting; evaluate on the
    *validation* split. Pick: among settings whose validation accuracy is within 1 point of the teacher's,
    the one with the lowest validation d_LLV (the quantity LLVLoss estimates); if none, the most accurate."""
    x, y = data["val"]
    t_acc = float((teacher(x).argmax(-1) == y).double().mean())
    rows = sweep(cfg, data, teacher, teacher_logits, log, "llv", LLV_CANDIDATES)
    ok = [r for r in rows if r["acc"] >= t_acc - 0.01 and math.isfinite(r["d_llv"])]
    best = min(ok, key=lambda r: r["d_llv"]) if ok else max(rows, key=lambda r: r["acc"])
    return best["setting"], rows


def select_recipe(cfg: Config, data, teacher, teacher_logits, log) -> tuple[str, list[dict], dict]:
    """Train one student (seed :data:`SELECTION_SEED`) per :data:`RECIPE_CANDIDATES` recipe and one KD (T=4) student
    of the same seed; evaluate on the *validation* split. Pick (:data:`RECIPE_RULE`): among recipes whose validation
    accuracy is at least the KD student's minus half a point, the lowest validation d_LLV; if none, the most accurate.
    Returns ``(chosen, rows, kd_row)``."""
    x, y = data["val"]
    start = time.perf_counter()
    net, _, _ = fit(cfg, data, teacher_logits, SELECTION_SEED, "kd", None, epochs=cfg.select_epochs or cfg.epochs)
    kd_row = {"setting": "KD, T=4 (reference)", **evaluate(net, teacher, x, y), "seconds": time.perf_counter() - start}
    log(f"  [{cfg.name}] KD (T=4) reference on seed {SELECTION_SEED}: val acc {kd_row['acc']:.4f} d_LLV {kd_row['d_llv']:.4f} "
        f"mCCA {kd_row['mcca']:.4f}")
    rows = sweep(cfg, data, teacher, teacher_logits, log, "recipe", RECIPE_CANDIDATES)
    ok = [r for r in rows if r["acc"] >= kd_row["acc"] - 0.005 and math.isfinite(r["d_llv"])]
    best = min(ok, key=lambda r: r["d_llv"]) if ok else max(rows, key=lambda r: r["acc"])
    return best["setting"], rows, kd_row


def sweep(cfg: Config, data, teacher, teacher_logits, log, loss_name: str, candidates: dict) -> list[dict]:
    """One student (seed :data:`SELECTION_SEED`) per candidate setting of ``loss_name``, evaluated on validation."""
    x, y = data["val"]
    rows = []
    for name, setting in candidates.items():
        start = time.perf_counter()
        net, _, _ = fit(cfg, data, teacher_logits, SELECTION_SEED, loss_name, None, setting,
                        epochs=cfg.select_epochs or cfg.epochs)
        row = {"setting": name, **flat_setting(setting), **evaluate(net, teacher, x, y), "seconds": time.perf_counter() - start}
        rows.append(row)
        log(f"  [{cfg.name}] {loss_name} setting {name}: val acc {row['acc']:.4f} d_LLV {row['d_llv']:.4f} "
            f"d_SVD {row['d_svd']:.4f} mCCA {row['mcca']:.4f} KL {row['kl']:.3g} ({row['seconds']:.0f} s)")
    return rows


def flat_setting(setting: dict) -> dict:
    """A candidate as flat columns (the LLVLoss keywords of a recipe merged with :data:`RECIPE_BASE`)."""
    if "llv" not in setting:
        return dict(setting)
    llv = {**RECIPE_BASE, **setting["llv"]}
    return {**llv, "input_terms": llv.get("input_terms", True), "kd": setting["kd"], "ce": setting["ce"]}


# ---------------------------------------------------------------------------------------------
# one data set
# ---------------------------------------------------------------------------------------------
def run_dataset(cfg: Config, seeds: list[int], log) -> dict:
    start = time.perf_counter()
    data = load_data(cfg)
    k = num_classes(data)
    dummy = {s: torch.zeros(len(data[s][1]), k) for s in data}
    teacher, teacher_curve, _ = fit(cfg, data, dummy, 0, "labels", None)
    with torch.no_grad():
        teacher_logits = {s: teacher(data[s][0]) for s in data}
    x_te, y_te = data["test"]
    teacher_test = {"acc": float((teacher_logits["test"].argmax(-1) == y_te).double().mean())}
    teacher_val_acc = float((teacher_logits["val"].argmax(-1) == data["val"][1]).double().mean())
    log(f"[{cfg.name}] teacher: test acc {teacher_test['acc']:.4f}, val acc {teacher_val_acc:.4f} "
        f"({time.perf_counter() - start:.0f} s)")
    chosen, llv_sweep = select_llv(cfg, data, teacher, teacher_logits, log)
    log(f"[{cfg.name}] LLVLoss setting chosen on validation data: {chosen} {LLV_CANDIDATES[chosen]}")
    recipe, recipe_sweep, kd_reference = select_recipe(cfg, data, teacher, teacher_logits, log)
    log(f"[{cfg.name}] LLVLoss recipe chosen on validation data: {recipe} {RECIPE_CANDIDATES[recipe]}")
    settings = {"llv": LLV_CANDIDATES[chosen], "recipe": RECIPE_CANDIDATES[recipe]}
    runs: dict[str, list[dict]] = {name: [] for name in LOSSES}
    for seed in seeds:
        for name in LOSSES:
            t0 = time.perf_counter()
            net, curve, history = fit(cfg, data, teacher_logits, seed, name, teacher, settings.get(name))
            test = evaluate(net, teacher, x_te, y_te)
            # the callback's last (validation) entry against the exact functional call on the same split
            val = evaluate(net, teacher, *data["val"])
            check = {key: abs(history[-1][key] - val[key]) for key in ("kl", "d_llv", "d_svd", "mcca")}
            runs[name].append({
                "seed": seed, "test": test, "val": val, "callback_vs_functional_val": check,
                "seconds": time.perf_counter() - t0,
                # per-epoch columns; entry 0 = the validation run before training, entry e = after epoch e
                "val_curve": {key: [c[key] for c in curve] for key in ("acc", "agree")},
                "history": {key: [h[key] for h in history] for key in HISTORY_KEYS},
            })
            log(f"[{cfg.name}] seed {seed} {name:6s}: acc {test['acc']:.4f} agree {test['agree']:.4f} KL {test['kl']:.3g} "
                f"d_LLV {test['d_llv']:.4f} d_SVD {test['d_svd']:.4f} mCCA {test['mcca']:.4f} ({time.perf_counter() - t0:.0f} s)")
    summary = {name: {m: mean_std([r["test"][m] for r in runs[name]]) for m in METRICS} for name in LOSSES}
    result = {
        "config": asdict(cfg), "num_classes": k, "sizes": {s: len(data[s][1]) for s in data},
        "teacher": {"test_acc": teacher_test["acc"], "val_acc": teacher_val_acc, "val_curve": teacher_curve},
        "llv_selection": {"chosen": chosen, "setting": LLV_CANDIDATES[chosen], "sweep": llv_sweep,
                          "criterion": SELECTION_RULE},
        "recipe_selection": {"chosen": recipe, "setting": RECIPE_CANDIDATES[recipe], "sweep": recipe_sweep,
                             "kd_reference": kd_reference, "criterion": RECIPE_RULE,
                             "kd_temperature": RECIPE_KD_TEMPERATURE, "llv_base": RECIPE_BASE},
        "runs": runs, "summary": summary, "seconds": time.perf_counter() - start,
    }
    result["verdict"] = verdict(result)[1]
    result["recipe_acceptance"] = recipe_acceptance(result)[1]
    return result


def mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------
def fmt(ms: tuple[float, float], digits: int = 4, sci: bool = False) -> str:
    m, s = ms
    return f"{m:.2e} ± {s:.1e}" if sci else f"{m:.{digits}f} ± {s:.{digits}f}"


def table(result: dict) -> str:
    lines = [
        "| student loss | test acc | agreement | KL(teacher‖student) | d_LLV | d_SVD | mCCA |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in losses_of(result):
        s = result["summary"][name]
        label = LOSS_LABELS[name] + chosen_tag(result, name)
        lines.append(f"| {label} | {fmt(s['acc'])} | {fmt(s['agree'])} | {fmt(s['kl'], sci=True)} | "
                     f"{fmt(s['d_llv'])} | {fmt(s['d_svd'], sci=True)} | {fmt(s['mcca'])} |")
    return "\n".join(lines)


def losses_of(result: dict) -> list[str]:
    """The losses of a result, in :data:`LOSSES` order (results saved before (e) existed have no ``recipe``)."""
    return [name for name in LOSSES if name in result["runs"]]


def chosen_tag(result: dict, name: str) -> str:
    key = {"llv": "llv_selection", "recipe": "recipe_selection"}.get(name)
    return f" [{result[key]['chosen']}]" if key and key in result else ""


def sweep_table(result: dict) -> str:
    lines = ["| setting | reduce | combine | lam | val acc | val d_LLV | val d_SVD | val mCCA | val KL |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["llv_selection"]["sweep"]:
        mark = " **(chosen)**" if r["setting"] == result["llv_selection"]["chosen"] else ""
        lines.append(f"| {r['setting']}{mark} | {r['reduce']} | {r['combine']} | {r['lam']:g} | {r['acc']:.4f} | "
                     f"{r['d_llv']:.4f} | {r['d_svd']:.2e} | {r['mcca']:.4f} | {r['kl']:.3g} |")
    return "\n".join(lines)


def recipe_table(result: dict) -> str:
    sel = result["recipe_selection"]
    lines = ["| recipe | LLVLoss input terms | + KD (T=4) weight | + CE weight | val acc | val d_LLV | val d_SVD | val mCCA "
             "| val KL |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    kd = sel["kd_reference"]
    lines.append(f"| {kd['setting']} | – | – | – | {kd['acc']:.4f} | {kd['d_llv']:.4f} | {kd['d_svd']:.2e} | "
                 f"{kd['mcca']:.4f} | {kd['kl']:.3g} |")
    for r in sel["sweep"]:
        mark = " **(chosen)**" if r["setting"] == sel["chosen"] else ""
        lines.append(f"| {r['setting']}{mark} | {'yes' if r['input_terms'] else 'no (T1, T3 only)'} | {r['kd']:g} | "
                     f"{r['ce']:g} | {r['acc']:.4f} | {r['d_llv']:.4f} | {r['d_svd']:.2e} | {r['mcca']:.4f} | "
                     f"{r['kl']:.3g} |")
    return "\n".join(lines)


def recipe_acceptance(result: dict) -> tuple[str, dict]:
    """(e) against KD (T=4), seed by seed: mean test accuracy within one point, mCCA >= 0.98, d_SVD below KD's."""
    runs = result["runs"]
    if "recipe" not in runs:
        return "", {}
    rec, kd = runs["recipe"], runs["kd"]
    n = len(rec)
    d_acc = mean_std([a["test"]["acc"] - b["test"]["acc"] for a, b in zip(rec, kd)])
    mcca = mean_std([r["test"]["mcca"] for r in rec])
    mcca_ok = sum(r["test"]["mcca"] >= 0.98 for r in rec)
    lower = sum(a["test"]["d_svd"] < b["test"]["d_svd"] for a, b in zip(rec, kd))
    out = {"d_acc": d_acc, "mcca": mcca, "seeds_mcca_ge_0.98": mcca_ok, "seeds_lower_d_svd": lower, "n": n,
           "holds": abs(d_acc[0]) <= 0.01 and mcca[0] >= 0.98 and lower == n}
    text = (f"| {LOSS_LABELS['recipe']}{chosen_tag(result, 'recipe')} vs (b) KD, T=4 | {100 * d_acc[0]:+.2f} ± "
            f"{100 * d_acc[1]:.2f} | {fmt(mcca)} | {mcca_ok}/{n} | {lower}/{n} | {'yes' if out['holds'] else 'no'} |")
    header = ("| acceptance (paired by seed) | Δ test acc (points) | mCCA | seeds with mCCA ≥ 0.98 | seeds with d_SVD below "
              "KD's | holds? |\n|---|---:|---:|---:|---:|---|\n")
    return header + text, out


def curves(result: dict, name: str, key: str) -> tuple[list[int], Tensor]:
    """``(epochs, values (seeds x epochs))`` of a history key, or of the module's val curve for acc/agree."""
    runs = result["runs"][name]
    if key in ("acc", "agree", "disagree"):
        vals = torch.tensor([r["val_curve"][key.removeprefix("dis")] for r in runs], dtype=torch.float64)
        if key == "disagree":  # 1 - agreement, floored at 1/(2 n) for the log scale
            vals = (1 - vals).clamp_min(0.5 / result["sizes"]["val"])
        return list(range(vals.shape[1])), vals  # entry 0 = the validation run before training
    vals = torch.tensor([r["history"][key] for r in runs], dtype=torch.float64)
    return list(range(vals.shape[1])), vals


LOG_KEYS = ("d_svd", "disagree")


def plot(results: dict[str, dict], path: Path) -> None:
    """Validation curves per data set (rows) of mCCA, d_SVD and 1 - agreement (columns), one line per loss:
    mean +- std over the seeds (for the log-scaled d_SVD and disagreement: geometric mean, band in log10)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (("mcca", "mCCA (teacher, student)"), ("d_svd", "d_SVD"), ("disagree", "disagreement with teacher"))
    fig, axes = plt.subplots(len(results), len(keys), figsize=(4.6 * len(keys), 3.4 * len(results)), squeeze=False)
    for row, (ds, result) in enumerate(results.items()):
        for col, (key, title) in enumerate(keys):
            ax = axes[row][col]
            for name in losses_of(result):
                epochs, vals = curves(result, name, key)
                log = key in LOG_KEYS  # log axes: geometric mean, band = mean +- std of log10
                vals = vals.clamp_min(1e-9).log10() if log else vals
                mean = vals.mean(0)
                std = vals.std(0) if vals.shape[0] > 1 else torch.zeros_like(mean)
                lo, mid, hi = (10 ** t if log else t for t in (mean - std, mean, mean + std))
                (line,) = ax.plot(epochs, mid, label=LOSS_LABELS[name], lw=1.5)
                ax.fill_between(epochs, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
            ax.set_title(f"{ds}: {title} (validation)", fontsize=10)
            ax.set_xlabel("epoch (0 = init)")
            if key in LOG_KEYS:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdict(result: dict) -> tuple[str, dict]:
    """Paired (same seed) comparisons of (c), (d) and (e) with (b) and (b'), as a markdown table and a dict.

    Rule for "holds": mCCA higher and d_SVD lower than the KD student for *every* seed, and mean test
    accuracies within one point (|mean difference| <= 0.01)."""
    runs = result["runs"]
    lines = ["| comparison (paired by seed) | Δ mCCA | seeds with higher mCCA | Δ d_SVD | d_SVD ratio (KD / this) "
             "| seeds with lower d_SVD | Δ test acc (points) | claim holds? |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    out = {}
    for name in [n for n in ("logit", "llv", "recipe") if n in runs]:
        for base in ("kd", "kd1"):
            d = {m: [a["test"][m] - b["test"][m] for a, b in zip(runs[name], runs[base])] for m in ("mcca", "d_svd", "acc")}
            n = len(d["mcca"])
            higher = sum(v > 0 for v in d["mcca"])
            lower = sum(v < 0 for v in d["d_svd"])
            acc = mean_std(d["acc"])
            ratio = result["summary"][base]["d_svd"][0] / max(result["summary"][name]["d_svd"][0], 1e-300)
            holds = higher == n and lower == n and abs(acc[0]) <= 0.01
            out[f"{name}_vs_{base}"] = {"d_mcca": mean_std(d["mcca"]), "d_d_svd": mean_std(d["d_svd"]), "d_acc": acc,
                                         "higher_mcca": higher, "lower_d_svd": lower, "n": n, "holds": holds}
            lines.append(
                f"| {LOSS_LABELS[name]}{chosen_tag(result, name)} − {LOSS_LABELS[base]} | {fmt(mean_std(d['mcca']))} | "
                f"{higher}/{n} | "
                f"{fmt(mean_std(d['d_svd']), sci=True)} | {ratio:.3g} | {lower}/{n} | {100 * acc[0]:+.2f} ± {100 * acc[1]:.2f} | "
                f"{'yes' if holds else 'no'} |"
            )
    return "\n".join(lines), out


def markdown(results: dict[str, dict], argv: list[str], runtime: float, seeds: list[int]) -> str:
    cmd = "python examples/distillation.py" + ("" if not argv else " " + " ".join(argv))
    out = [
        "# Distillation: KL vs logit distances, teacher-student representational similarity",
        "",
        f"Command: `{cmd}` — runtime {runtime / 60:.1f} min on the machine it ran on (2 shared CPU cores).",
        f"Student seeds {seeds}; teacher seed 0. Test-split numbers, mean ± std (unbiased) over the seeds; "
        "KL, d_LLV, d_SVD, mCCA from `functional.compare(teacher, student)` on the test embeddings.",
        "",
    ]
    for ds, result in results.items():
        cfg = result["config"]
        out += [
            f"## {ds}",
            "",
            f"K = {result['num_classes']}, M = {cfg['rep_dim']}, hidden {list(cfg['hidden'])}, splits {result['sizes']}; "
            f"{cfg['epochs']} epochs, batch {cfg['batch_size']}, Adam lr {cfg['lr']:g} with cosine decay. "
            f"Teacher test accuracy {result['teacher']['test_acc']:.4f}.",
            "",
            table(result),
            "",
            "The claim, (c), (d) and (e) against (b) and (b'), seed by seed (rule: higher mCCA and lower d_SVD for "
            "every seed and mean test accuracies within one point):",
            "",
            verdict(result)[0],
            "",
        ]
        if "recipe_selection" in result:
            sel = result["recipe_selection"]
            out += [
                "The LLVLoss recipe (e) against KD (T = 4), the acceptance of issue 13 (mean test accuracy within one "
                "point of KD's, mean mCCA ≥ 0.98, d_SVD below KD's on every seed):",
                "",
                recipe_acceptance(result)[0],
                "",
                f"LLVLoss recipe (e) chosen on validation data (seed {SELECTION_SEED}, "
                f"{cfg['select_epochs'] or cfg['epochs']} epochs; {sel['criterion']}). Every recipe is "
                f"`LLVLoss(rep_dim=M, label_pivot=\"mean\", input_set_search=\"sample\", "
                + ", ".join(f"{k}={v!r}" for k, v in sel["llv_base"].items())
                + f", [input_terms=False]) + w_kd · KDLoss(temperature={sel['kd_temperature']:g}) + w_ce · CE(labels)`:",
                "",
                recipe_table(result),
                "",
            ]
        out += [
            f"Pure LLVLoss setting (d) chosen on validation data (seed {SELECTION_SEED}, "
            f"{cfg['select_epochs'] or cfg['epochs']} epochs; {result['llv_selection']['criterion']}):",
            "",
            sweep_table(result),
            "",
        ]
    return "\n".join(out)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="digits only, 2 seeds, 2 epochs, small model")
    parser.add_argument("--datasets", nargs="+", choices=sorted(FULL), default=None)
    parser.add_argument("--seeds", type=int, default=None, help="number of student seeds (1..N)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (small MLPs: 1 is fastest)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--report", type=Path, default=None, metavar="JSON",
                        help="no training: rewrite the markdown and the plot from a JSON written by an earlier run")
    argv = list(argv) if argv is not None else None
    args = parser.parse_args(argv)
    if args.report is not None:
        return write_report(json.loads(args.report.read_text()), args.out, args.report.stem)
    torch.set_num_threads(args.threads)
    quiet_lightning()
    start = time.perf_counter()
    names = args.datasets or (["digits"] if args.quick else ["digits", "radial"])
    seeds = list(range(1, 1 + (args.seeds or (2 if args.quick else 5))))
    cfgs = [quick_config(FULL[n]) if args.quick else FULL[n] for n in names]

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {msg}", flush=True)

    results = {cfg.name: run_dataset(cfg, seeds, log) for cfg in cfgs}
    raw = {"runtime_s": time.perf_counter() - start, "seeds": seeds,
           "args": shown_args(sys.argv[1:] if argv is None else argv), "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "distillation_quick" if args.quick else "distillation"
    (args.out / f"{stem}.json").write_text(json.dumps(compact(raw), separators=(",", ":")))
    write_report(raw, args.out, stem)
    log(f"wrote {args.out / stem}.{{md,json,png}}")
    return results


def write_report(raw: dict, out: Path, stem: str) -> dict:
    """``stem.md`` and ``stem.png`` in ``out`` from the raw numbers (as saved in ``stem.json``)."""
    results = raw["results"]
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(results, raw.get("args", []), raw["runtime_s"], raw["seeds"])
    (out / f"{stem}.md").write_text(text + "\n")
    plot(results, out / f"{stem}.png")
    print(text)
    return results


if __name__ == "__main__":
    main()
