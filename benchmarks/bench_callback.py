"""Overhead of the ReferenceComparison callback on a validation epoch.

A CIFAR-shaped ResNet-18 (torchvision, CIFAR stem: 3x3 conv1, no max-pool; ``weights=None``, no
download) as student and as reference, random 32x32 images, 10 classes. Three validation epochs are
timed (``trainer.validate``; the clock runs from ``on_validation_epoch_start`` to the end of
``on_validation_epoch_end``, after the callback's compute and logging):

* ``student only``: no callback;
* ``+ reference forward``: a minimal callback that only runs the reference on every batch (the cost
  that any comparison must pay);
* ``+ ReferenceComparison``: the callback (default settings: the student's own validation forward is
  reused through a hook on its ``fc``; KL, d_LLV via the logits route since K = 10 < M + 2 = 514, mCCA
  of the 512-d embeddings; d_SVD is undefined for K < M + 2 and skipped).

The callback's own overhead is ``(t_callback - t_reference) / t_reference`` (the acceptance bound is
20 %), also shown relative to ``student only``. ``--no-reuse`` adds a row where the callback runs the
student again itself. ``--layers`` adds two rows: the callback with ``layers=`` the four residual stages
(``model.layer1`` ... ``model.layer4``, ``layer_reduce="mean"``: 64/128/256/512 channels averaged over positions;
4 pairs of layers, linear CKA + debiased CKA + Procrustes each) and with ``layer_matrix=True`` as well (all 16
pairs of stages).

Usage::

    python benchmarks/bench_callback.py                  # 576 images, CIFAR stem (~3 min on 2 CPU cores)
    python benchmarks/bench_callback.py --imagenet-stem  # 16x cheaper forward: the callback's share is larger
    python benchmarks/bench_callback.py --quick          # 256 images, ImageNet stem: a smoke run
    python benchmarks/bench_callback.py --layers --threads 1   # the cost of layer-wise CKA (README), one thread
    python benchmarks/bench_callback.py --device cuda    # on a GPU
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


class ResNetModule(pl.LightningModule):
    def __init__(self, cifar_stem: bool = True, num_classes: int = 10):
        super().__init__()
        import torchvision

        self.model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
        if cifar_stem:
            self.model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.model.maxpool = nn.Identity()

    def forward(self, x):
        return self.model(x)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("val_loss", loss)


class EpochTimer(pl.Callback):
    """Wall and process CPU time of each validation epoch (put it last: its end hook then runs after the
    other callbacks'). CPU time (all threads of this process) is less sensitive to other processes
    competing for the cores than wall time."""

    def __init__(self):
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def _sync(self, pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_validation_epoch_start(self, trainer, pl_module):
        self._sync(pl_module)
        self._start = time.perf_counter()
        self._cpu = time.process_time()

    def on_validation_epoch_end(self, trainer, pl_module):
        self._sync(pl_module)
        self.times.append(time.perf_counter() - self._start)
        self.cpu_times.append(time.process_time() - self._cpu)


class ReferenceForwardOnly(pl.Callback):
    """The unavoidable part: the reference's forward on every validation batch, nothing else."""

    def __init__(self, reference: nn.Module):
        self.reference = reference.eval().requires_grad_(False)

    def on_validation_start(self, trainer, pl_module):
        self.reference.to(pl_module.device)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        with torch.no_grad():
            self.reference(batch[0])


def make_trainer(callbacks, device):
    timer = EpochTimer()
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=[*callbacks, timer],
    )
    return trainer, timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=576, help="validation images (>= 514 so that d_LLV and mCCA are defined)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="timed epochs per configuration")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--imagenet-stem", action="store_true", help="torchvision's stem (16x cheaper on 32x32 images)")
    parser.add_argument("--no-reuse", action="store_true", help="also time the callback running the student itself")
    parser.add_argument("--quick", action="store_true", help="256 images, ImageNet stem")
    parser.add_argument("--layers", action="store_true", help="also time layers= (4 stages) and layer_matrix=True")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.images, args.imagenet_stem = 256, True

    from _machine import machine_info

    from lightning_repsim.callbacks import ReferenceComparison

    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.manual_seed(0)
    student = ResNetModule(cifar_stem=not args.imagenet_stem)
    reference = ResNetModule(cifar_stem=not args.imagenet_stem)
    x = torch.randn(args.images, 3, 32, 32)
    y = torch.randint(0, 10, (args.images,))
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size)
    warmup = DataLoader(TensorDataset(x[: args.batch_size], y[: args.batch_size]), batch_size=args.batch_size)

    configs = [
        ("student only", []),
        ("+ reference forward", [ReferenceForwardOnly(reference)]),
        ("+ ReferenceComparison", [ReferenceComparison(reference, log_media=False)]),
    ]
    if args.no_reuse:
        configs.append(("+ ReferenceComparison (no reuse)", [ReferenceComparison(reference, log_media=False,
                                                                                 reuse_student_outputs=False)]))
    # the configurations take turns (round robin) so that a burst of load from other processes does not hit
    # one configuration only; a one-batch epoch of each warms up (allocations, the callback's probing forward)
    if args.layers:
        stages = [f"model.layer{i}" for i in range(1, 5)]
        configs.append(("+ ReferenceComparison(layers=4 stages)",
                        [ReferenceComparison(reference, log_media=False, layers=stages, layer_reduce="mean")]))
        configs.append(("+ ReferenceComparison(layers, layer_matrix)",
                        [ReferenceComparison(reference, log_media=False, layers=stages, layer_reduce="mean",
                                             layer_matrix=True)]))
    runs = {name: make_trainer(callbacks, args.device) for name, callbacks in configs}
    for repeat in range(args.repeats + 1):
        for name, (trainer, timer) in runs.items():
            trainer.validate(student, loader if repeat else warmup, verbose=False)
            if repeat:
                print(f"  repeat {repeat}: {name:36s} wall {timer.times[-1]:7.3f}s  cpu {timer.cpu_times[-1]:7.3f}s",
                      file=sys.stderr, flush=True)
    cb = configs[2][1][0]
    h = cb.history[-1]

    def best(name: str, cpu: bool = False) -> float:
        timer = runs[name][1]
        return min((timer.cpu_times if cpu else timer.times)[1:])  # [0] is the warm-up

    print(f"\n### ReferenceComparison overhead: ResNet-18 ({'ImageNet' if args.imagenet_stem else 'CIFAR'} stem), "
          f"{args.images} random 32x32 images, batch {args.batch_size}, {args.device}\n")
    print(f"Machine: {machine_info()}\n")
    print(f"| validation epoch (best of {args.repeats}) | wall [s] | CPU [s] | wall vs student only | "
          "wall vs + reference | CPU vs + reference |")
    print("|---|---:|---:|---:|---:|---:|")
    base, ref, ref_cpu = best("student only"), best("+ reference forward"), best("+ reference forward", True)
    for name in runs:
        wall, cpu = best(name), best(name, True)
        print(f"| {name} | {wall:.3f} | {cpu:.3f} | {wall / base - 1:+.1%} | {wall / ref - 1:+.1%} | {cpu / ref_cpu - 1:+.1%} |")
    wall, cpu = best("+ ReferenceComparison"), best("+ ReferenceComparison", True)
    print(f"\nCallback overhead beyond the reference forward: {wall / ref - 1:+.1%} wall, {cpu / ref_cpu - 1:+.1%} CPU "
          f"of the validation epoch (bound: +20%); {(wall - ref) / base:+.1%} of the student-only epoch (wall).")
    print(f"Student forwards reused / run by the callback: {cb.stats['reused_student_forward']} / "
          f"{cb.stats['own_student_forward']} (one probing forward to find `fc`).")
    print(f"Logged values (last epoch): kl={h['kl']:.4g} d_llv={h['d_llv']:.4g} mcca={h['mcca']:.4g} "
          f"d_svd={h['d_svd']} (K=10 < M+2: undefined), N={h['num_inputs']}")
    if args.layers:
        name = "+ ReferenceComparison(layers=4 stages)"
        for label in (name, "+ ReferenceComparison(layers, layer_matrix)"):
            wall, cpu = best(label), best(label, True)
            base_wall, base_cpu = best("+ ReferenceComparison"), best("+ ReferenceComparison", True)
            print(f"{label}: {wall / base_wall - 1:+.1%} wall, {cpu / base_cpu - 1:+.1%} CPU over the callback without "
                  f"layers; {cpu / ref_cpu - 1:+.1%} CPU over the reference forward.")
        layers = [cfg for n, cfg in configs if n == name][0][0].history[-1]["layers"]
        print("Per-stage CKA (random initialisations): "
              + ", ".join(f"{k.split('.')[-1]} {v['cka']:.3f}" for k, v in layers.items()))


if __name__ == "__main__":
    main()
