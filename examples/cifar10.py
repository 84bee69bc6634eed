"""Reproduce Figure 3 (left) of the paper (Section 5.1): two CIFAR-10 ResNets, same predictions, permuted stars.

Command::

    python examples/cifar10.py                          # full: real CIFAR-10, 20k steps per model (GPU territory)
    python examples/cifar10.py --quick                  # generated CIFAR-format data, 3 steps (tests use this; ~30 s)
    python examples/cifar10.py --data-root /data --steps 2000 --accelerator gpu
    python examples/cifar10.py --fake 50000 --steps 500 --accelerator gpu   # throughput on generated data, offline

Runtime: full mode is 2 x 20,000 Adam steps of a ResNet-18 at batch 32 (the paper's setting), i.e.
2 x 640,000 training images: GPU territory. On the 2-core CPU machine this example was written on, the
ResNet trained at about 7 images/s (one thread, machine shared), so one full-size model would take about
a day there. The full mode has NOT been run for this repository (no GPU was available); ``--quick`` runs
anywhere in under a minute (about 15 s of work plus imports). The CSV logs go to
``--out/<stem>_logs``; ``--wandb`` adds an offline wandb run there.

Expected output (full mode, following the paper): both models reach virtually the same test loss and
accuracy, yet their 2-D embeddings are stars with the classes in a different order: small KL, large
d_LLV and d_SVD, mCCA around 0.55. Written to ``--out`` (default ``examples/results/``):
``cifar10.md`` (one row per comparison: the student's validation accuracy and the callback's KL,
d_LLV, d_SVD, mCCA) and ``cifar10_embeddings.png`` (reference vs student, coloured by class); the
quick mode writes ``cifar10_quick.*`` (its numbers mean nothing: 3 steps on generated images).

Recipe (SPEC §7): f = ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool) ending in
``Linear(512, 2)``; g = MLP of three 128-wide LeakyReLU layers on the 9-dim one-hot of the label
(:func:`lightning_repsim.models.cifar_model`); Adam, lr 1e-4, batch 32, inputs normalised to [-1, 1]
(as the authors do), no augmentation. The reference (seed 0) is trained first; the student (seed 1)
is trained with :class:`~lightning_repsim.callbacks.ReferenceComparison`, which compares it with the
reference on the test set after every epoch. The two-tower model has no final ``nn.Linear`` producing
the logits, so the example passes :class:`~lightning_repsim.models.EmbedUnembed` as the callback's
extractors (f = ``model.embed(x)``, g = ``model.unembed()``).

Data: ``torchvision.datasets.CIFAR10(root, download=True)`` (downloads when a network is available).
``--quick`` / ``--fake N`` write a generated data set in the CIFAR-10 on-disk format
(``cifar-10-batches-py/`` with the pickled ``data_batch_1..5``, ``test_batch``, ``batches.meta``) and
read it with the same torchvision class (``download=False``; only the md5 check of the real files is
skipped, since generated files cannot match it).
"""

from __future__ import annotations

import argparse
import logging
import math
import pickle
import sys
import time
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

RESULTS = Path(__file__).resolve().parent / "results"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def write_fake_cifar10(root: Path | str, n_train: int = 250, n_test: int = 50, seed: int = 0) -> Path:
    """Write a generated data set in the CIFAR-10 on-disk format under ``root/cifar-10-batches-py``.

    ``n_train`` images split over ``data_batch_1..5`` and ``n_test`` in ``test_batch``, uint8, 3x32x32 in
    the original layout (rows of 3072 bytes: the red plane, then green, then blue, each row-major). Each
    class is a coloured grating of its own orientation plus noise, so a model can learn it. Returns the
    folder.
    """
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")

    def images(n: int) -> tuple[torch.Tensor, list[int]]:
        labels = torch.arange(n) % 10
        labels = labels[torch.randperm(n, generator=gen)]
        theta = labels.double() * math.pi / 10
        phase = 2 * math.pi * torch.rand(n, generator=gen, dtype=torch.float64)
        along = xx[None] * theta.cos()[:, None, None] + yy[None] * theta.sin()[:, None, None]
        wave = torch.sin(0.5 * along + phase[:, None, None])
        tint = torch.stack([(labels * 37 % 10), (labels * 53 % 10), (labels * 71 % 10)], dim=1).double() / 9.0
        noise = torch.randn(n, 3, 32, 32, generator=gen, dtype=torch.float64)
        img = 128 + 60 * wave[:, None] * (0.4 + tint[:, :, None, None]) + 20 * noise
        return img.clamp(0, 255).round().to(torch.uint8).reshape(n, 3072), labels.tolist()

    def dump(name: str, batch_label: str, data: torch.Tensor, labels: list[int]) -> None:
        entry = {"batch_label": batch_label, "labels": labels, "data": data.numpy(),
                 "filenames": [f"generated_{name}_{i:05d}.png" for i in range(len(labels))]}
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh, protocol=2)

    data, labels = images(n_train)
    bounds = [round(i * n_train / 5) for i in range(6)]
    for i in range(5):
        lo, hi = bounds[i], bounds[i + 1]
        dump(f"data_batch_{i + 1}", f"training batch {i + 1} of 5", data[lo:hi], labels[lo:hi])
    data, labels = images(n_test)
    dump("test_batch", "testing batch 1 of 1", data, labels)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"num_cases_per_batch": bounds[1], "label_names": list(CLASSES), "num_vis": 3072}, fh, protocol=2)
    return folder


def cifar10(root: Path | str, train: bool, download: bool, verify_checksums: bool = True):
    """``torchvision.datasets.CIFAR10`` with the authors' transform (to tensor, normalise to [-1, 1]).

    ``verify_checksums=False`` reads the same files with the same class but skips the md5 check of the
    real archive's files (for data written by :func:`write_fake_cifar10`).
    """
    from torchvision import transforms
    from torchvision.datasets import CIFAR10

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    cls = CIFAR10
    if not verify_checksums:

        class UncheckedCIFAR10(CIFAR10):
            train_list = [[name, None] for name, _ in CIFAR10.train_list]
            test_list = [[name, None] for name, _ in CIFAR10.test_list]
            meta = {**CIFAR10.meta, "md5": None}

        cls = UncheckedCIFAR10
    return cls(root=str(root), train=train, download=download, transform=transform)


# ---------------------------------------------------------------------------------------------
# training and comparison
# ---------------------------------------------------------------------------------------------
def _trainer(args, steps: int, callbacks: list, loggers, validate: bool):
    import lightning.pytorch as pl

    return pl.Trainer(
        max_steps=steps, accelerator=args.accelerator, devices=1, precision=args.precision, callbacks=callbacks,
        logger=loggers, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=not args.no_progress,
        num_sanity_val_steps=0, limit_val_batches=None if validate else 0, val_check_interval=args.val_every,
        check_val_every_n_epoch=None if args.val_every else 1, log_every_n_steps=10,
    )


class StepTimer(Callback):
    """Training throughput after a warm-up: images per second over the steps after the first ``warmup``."""

    def __init__(self, warmup: int = 2) -> None:
        self.warmup = warmup
        self.images = 0
        self.start: float | None = None
        self.end: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)
            self.start = time.perf_counter()
        elif trainer.global_step > self.warmup:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)
            self.images += int(batch[0].shape[0])
            self.end = time.perf_counter()

    @property
    def images_per_second(self) -> float:
        if self.start is None or self.end is None or self.end <= self.start:
            return math.nan
        return self.images / (self.end - self.start)


def to_markdown(rows: list[dict]) -> str:
    lines = ["| epoch | step | student test acc | agreement | KL | d_LLV | d_SVD | mCCA |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        epoch = "end" if r.get("stage") == "validate" else r["epoch"]
        lines.append(f"| {epoch} | {r['global_step']} | {r['acc']:.4f} | {r['agree']:.4f} | {r['kl']:.4f} | "
                     f"{r['d_llv']:.4f} | {r['d_svd']:.4f} | {r['mcca']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="generated data (200 train / 30 test), 3 steps, batch 8")
    parser.add_argument("--fake", type=int, default=None, metavar="N", help="generated CIFAR-format data with N training images")
    parser.add_argument("--data-root", type=Path, default=None, help="where CIFAR-10 is (or is downloaded to); default ./data")
    parser.add_argument("--steps", type=int, default=None, help="Adam steps per model (default 20000, the paper's)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 (the paper's)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--val-every", type=int, default=None, help="compare every N steps (default: every epoch)")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 4; 0 in --quick)")
    parser.add_argument("--wandb", action="store_true", help="also log to wandb (offline unless WANDB_MODE says otherwise)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    saved_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        with warnings.catch_warnings():  # the reference / radial models are fitted without a validation loader
            warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")
            return _run(args, argv)
    finally:
        torch.set_num_threads(saved_threads)


def _run(args: argparse.Namespace, argv) -> dict:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    from lightning_repsim.callbacks import ReferenceComparison
    from lightning_repsim.demo import EpochTable
    from lightning_repsim.models import Classifier, EmbedUnembed, cifar_model

    start = time.perf_counter()
    quick = args.quick
    steps = args.steps or (3 if quick else 20000)
    batch_size = args.batch_size or (8 if quick else 32)
    workers = args.workers if args.workers is not None else (0 if quick else 4)
    fake = args.fake or (200 if quick else None)
    root = args.data_root or (args.out / "cifar10_quick_data" if quick else Path("data"))
    if fake:
        if not (quick and (Path(root) / "cifar-10-batches-py" / "batches.meta").exists()):  # --quick reuses its data
            write_fake_cifar10(root, n_train=fake, n_test=30 if quick else max(50, fake // 5))
        train_set, test_set = (cifar10(root, train=t, download=False, verify_checksums=False) for t in (True, False))
        source = f"generated CIFAR-10-format data ({len(train_set)} train / {len(test_set)} test images) in {root}"
    else:
        train_set, test_set = (cifar10(root, train=t, download=True) for t in (True, False))
        source = f"CIFAR-10 ({len(train_set)} train / {len(test_set)} test images) from {root}"
    print(f"data: {source}", flush=True)

    def loaders(seed: int):
        gen = torch.Generator().manual_seed(seed)
        train = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=gen, num_workers=workers,
                           drop_last=True, persistent_workers=workers > 0)
        test = DataLoader(test_set, batch_size=256, num_workers=workers, persistent_workers=workers > 0)
        return train, test

    # the reference (seed 0)
    print(f"training the reference (seed 0): {steps} steps, batch {batch_size}", flush=True)
    pl.seed_everything(0, verbose=False)
    reference = Classifier(cifar_model(), lr=args.lr, train_log_every=50)
    train, _ = loaders(0)
    timer = StepTimer()
    t0 = time.perf_counter()
    _trainer(args, steps, [timer], False, validate=False).fit(reference, train)
    ref_seconds = time.perf_counter() - t0

    # the student (seed 1), compared with the reference by the callback
    print(f"training the student (seed 1) with ReferenceComparison: {steps} steps, batch {batch_size}", flush=True)
    pl.seed_everything(1, verbose=False)
    student = Classifier(cifar_model(), lr=args.lr, train_log_every=50)
    train, test = loaders(1)
    comparison = ReferenceComparison(reference, reference_extractor=EmbedUnembed(), student_extractor=EmbedUnembed(),
                                     prog_bar=True)
    table = EpochTable(comparison)
    stem = "cifar10_quick" if quick else ("cifar10_fake" if fake else "cifar10")
    loggers = [CSVLogger(save_dir=str(args.out / f"{stem}_logs"), name="")]
    if args.wandb:
        import os

        from lightning.pytorch.loggers import WandbLogger

        os.environ.setdefault("WANDB_MODE", "offline")
        loggers.append(WandbLogger(project="lightning_repsim-cifar10", save_dir=str(args.out / f"{stem}_logs")))
    t0 = time.perf_counter()
    trainer = _trainer(args, steps, [comparison, table], loggers, validate=True)
    trainer.fit(student, train, test)
    stu_seconds = time.perf_counter() - t0
    if not comparison.history or comparison.history[-1]["global_step"] != trainer.global_step:
        trainer.validate(student, test, verbose=False)  # compare the final models too
    if args.wandb:
        loggers[-1].experiment.finish()

    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / f"{stem}_embeddings.png"
    fig = comparison.embedding_figure()
    if fig is not None:
        fig.savefig(png, dpi=110)
    markdown = to_markdown(table.rows)
    elapsed = time.perf_counter() - start
    device = str(trainer.strategy.root_device)
    if device.startswith("cuda"):
        device += f" ({torch.cuda.get_device_name(trainer.strategy.root_device)})"
    throughput = timer.images_per_second
    (args.out / f"{stem}.md").write_text(
        f"# Figure 3 left (Section 5.1): CIFAR-10 ResNet-18, reference (seed 0) vs student (seed 1)\n\n"
        f"Command: `python examples/cifar10.py{' ' + ' '.join(argv) if argv else ''}`\n\n"
        f"Device: {device}{'' if device.startswith('cuda') else ' (no GPU: numbers of a CPU run)'}.\n\n"
        f"Data: {source}. {steps} steps per model, batch {batch_size}, Adam lr {args.lr:g}.\n\n"
        f"{markdown}\n\nRuntime: {elapsed:.0f} s; reference training {ref_seconds:.0f} s "
        f"({throughput:.1f} training images/s after {timer.warmup} warm-up steps), student training with the "
        f"comparisons {stu_seconds:.0f} s.\n"
    )
    print(markdown)
    print(f"\nreference training throughput: {throughput:.1f} images/s on {device}")
    print(f"wrote {args.out / (stem + '.md')} and {png} in {elapsed:.0f} s")
    return {"history": comparison.history, "rows": table.rows, "png": png if fig is not None else None,
            "md": args.out / f"{stem}.md", "throughput": throughput, "seconds": elapsed}


if __name__ == "__main__":
    main()
