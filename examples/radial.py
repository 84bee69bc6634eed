"""Reproduce Figure 3 (right) of the paper (Section 5.2): wider models are more similar, in d_LLV and d_SVD.

Command::

    python examples/radial.py              # full: K in {4, 6}, W in {16, 32, 64, 128}, 5 seeds, 15k steps
    python examples/radial.py --seeds 10   # the committed results (examples/results/radial.*)
    python examples/radial.py --quick      # K = 4, W in {16, 32}, 2 seeds, 300 steps (tests use this; 2-15 s)
    python examples/radial.py --steps 5000 --seeds 20 --workers 2   # other settings
    python examples/radial.py --layers     # layer-wise CKA between two seeds (K = 6, W = 64): a heatmap
    python examples/radial.py --layers --quick   # the same, 300 steps (tests use this)

Runtime (measured on a 2-core CPU shared with other jobs, one thread per model, Lightning): the default
5 seeds (40 models of 15,000 Adam steps) took 43 min (2593 s of training, machine heavily loaded);
``--seeds 10`` reuses those 40 cached models and trained 40 more in 18 min (less load): 3682 s of
training for the 80 models. The 2 x 4 x 45 pairwise comparisons take about 10 s. ``--workers N``
trains N models at a time in separate processes (only worth it with more than 2 free cores).

Expected output: a markdown table with one row per (K, W): how many of the models reached test
accuracy > 0.9, and over all pairs of such models d_LLV and d_SVD (mean ± std and median) and, for
comparison, mean KL and mCCA; a plot ``radial.png`` of d_LLV and d_SVD against the width, one line per
K. Written to ``--out`` (default ``examples/results/``): ``radial.md``, ``radial.png`` and
``radial_pairs.csv`` (every pair). The paper's trend is that both shrink as the width grows (wider
models are closer to being linearly identifiable). The committed 10-seed run (all 80 models at
test accuracy ≥ 0.985, 45 pairs per cell) shows it: from W = 16 to W = 128, mean d_LLV 0.52 -> 0.34
(K = 4) and 0.72 -> 0.48 (K = 6), mean d_SVD 0.117 -> 0.043 and 0.212 -> 0.105; most of the drop is
between W = 16 and 32, and the curves are not monotone everywhere (K = 6, W = 64 has a higher mean
d_SVD than W = 32; one K = 6, W = 128 seed is far from the others and widens that cell's spread).

Recipe (SPEC §7): data from :func:`lightning_repsim.radial_dataset` (20k training points, data seed 0;
2k test points, data seed 1); the models are :func:`lightning_repsim.models.radial_model` (f and g are
MLPs with 3 hidden layers of width W, LeakyReLU, output M = 2, last layer bias-free; g takes the
(K-1)-dim one-hot of a label), trained by :class:`lightning_repsim.models.Classifier` (cross-entropy,
Adam, lr 1e-4, batch 128) with a Lightning ``Trainer``; seed s fixes the initialisation and the order of
the batches. The pairwise distances are computed on the test set by the streaming metrics
:class:`~lightning_repsim.metrics.SVDDissimilarity` (d_SVD on the sets chosen by d_LLV, and d_LLV itself,
from the embeddings and unembeddings), :class:`~lightning_repsim.metrics.MeanKLDivergence` and
:class:`~lightning_repsim.metrics.MeanCCA`, fed in batches of 500 test points.

Differences from the paper: 5 seeds by default and 10 in the committed run (the paper: 20), K in
{4, 6} only (the paper also has 10 and 18), to fit a CPU budget; the 15k steps are the paper's.
Trained models are cached in ``--work-dir`` (default ``outputs/radial``): rerunning resumes.

**Layer-wise mode** (``--layers``): trains two seeds of one (K, W) (default K = 6, W = 64, 15k steps, the same
recipe) and compares them with :class:`~lightning_repsim.callbacks.ReferenceComparison` in one
``trainer.validate`` on the test set, with ``layers=`` the four layers of the embedding network ``f`` (the three
LeakyReLU activations, ``net.f.1``, ``net.f.3``, ``net.f.5``, and the embedding ``net.f.6``) and
``layer_matrix=True``: linear CKA between every layer of seed 0 (rows) and every layer of seed 1 (columns), exact
over the test set, captured by forward hooks during the validation forwards. Writes ``radial_layers.png`` (the
heatmap the callback logs to wandb) and ``radial_layers.md`` (the matrix, per-layer debiased CKA and Procrustes,
and d_LLV / d_SVD / KL of the same run). The committed run: see ``examples/results/radial_layers.md``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
METRIC_COLUMNS = ("d_llv", "d_svd", "kl", "mcca")


# ---------------------------------------------------------------------------------------------
# training one model
# ---------------------------------------------------------------------------------------------
def batch_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int):
    """Shuffled mini-batches of in-memory tensors, one indexing operation per batch (no per-item collate)."""
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

    ds = TensorDataset(x, y)
    sampler = BatchSampler(RandomSampler(ds, generator=torch.Generator().manual_seed(seed)), batch_size, drop_last=False)
    return DataLoader(ds, sampler=sampler, batch_size=None)


def new_model(num_classes: int, width: int, seed: int, lr: float):
    """The seeded, untrained :class:`~lightning_repsim.models.Classifier` of one radial model."""
    import lightning.pytorch as pl

    from lightning_repsim.models import Classifier, radial_model

    pl.seed_everything(seed, verbose=False)
    return Classifier(radial_model(num_classes, width), lr=lr, train_log_every=100)


def fit_model(num_classes: int, width: int, seed: int, steps: int, n_train: int, lr: float, batch_size: int,
              data_seed: int = 0):
    """``(model, training seconds)``: one radial model trained with Lightning (seed s: initialisation and batches)."""
    import lightning.pytorch as pl

    from lightning_repsim import radial_dataset

    x, y = radial_dataset(n_train, num_classes, seed=data_seed)
    model = new_model(num_classes, width, seed, lr)
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(model, batch_loader(x, y, batch_size, seed))
    return model, time.perf_counter() - start


def train_model(num_classes: int, width: int, seed: int, steps: int, n_train: int, n_test: int,
                lr: float = 1e-4, batch_size: int = 128, data_seed: int = 0) -> dict:
    """Train one radial model with Lightning; return its test accuracy and test representations."""
    from lightning_repsim import radial_dataset

    x_test, y_test = radial_dataset(n_test, num_classes, seed=data_seed + 1)
    model, seconds = fit_model(num_classes, width, seed, steps, n_train, lr, batch_size, data_seed)
    model.eval()
    with torch.no_grad():
        emb = model.embed(x_test)
        unemb = model.unembed()
        acc = float(((emb @ unemb.T).argmax(-1) == y_test).float().mean())
    return {"K": num_classes, "W": width, "seed": seed, "steps": steps, "acc": acc, "seconds": seconds,
            "emb": emb.double(), "unemb": unemb.double(), "labels": y_test}


# ---------------------------------------------------------------------------------------------
# layer-wise CKA between two seeds (--layers)
# ---------------------------------------------------------------------------------------------
LAYERS = ("net.f.1", "net.f.3", "net.f.5", "net.f.6")


def trained_module(num_classes: int, width: int, seed: int, steps: int, n_train: int, lr: float, batch_size: int,
                   cache: Path | None):
    """A trained :class:`~lightning_repsim.models.Classifier` (weights cached in ``cache``)."""
    if cache is not None and cache.exists():
        model = new_model(num_classes, width, seed, lr)
        model.load_state_dict(torch.load(cache, weights_only=True))
        return model, 0.0
    model, seconds = fit_model(num_classes, width, seed, steps, n_train, lr, batch_size)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cache)
    return model, seconds


def layer_comparison(args, k: int, w: int, steps: int, lr: float, n_train: int, n_test: int) -> dict:
    """Train (or load) seeds 0 and 1, compare them layer by layer with ReferenceComparison; write the heatmap."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_repsim import ReferenceComparison, radial_dataset
    from lightning_repsim.models import EmbedUnembed

    start = time.perf_counter()
    models, train_seconds = [], 0.0
    for seed in (0, 1):
        cache = None if args.no_cache else args.work_dir / f"layers_K{k}_W{w}_seed{seed}_steps{steps}_lr{lr:g}_n{n_train}.pt"
        model, seconds = trained_module(k, w, seed, steps, n_train, lr, args.batch_size, cache)
        models.append(model)
        train_seconds += seconds
        print(f"seed {seed}: {'trained in ' + format(seconds, '.0f') + ' s' if seconds else 'loaded from the cache'}",
              flush=True)
    reference, student = models
    x_test, y_test = radial_dataset(n_test, k, seed=1)
    test = DataLoader(TensorDataset(x_test, y_test), batch_size=500)
    cb = ReferenceComparison(reference, reference_extractor=EmbedUnembed(), student_extractor=EmbedUnembed(),
                             layers=list(LAYERS), layer_matrix=True, log_media=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[cb])
    compare_start = time.perf_counter()
    metrics = trainer.validate(student, test, verbose=False)[0]
    compare_seconds = time.perf_counter() - compare_start
    h = cb.history[-1]
    matrix = h["layer_matrix"]
    with torch.no_grad():
        accuracy = [float((m.eval()(x_test).argmax(-1) == y_test).float().mean()) for m in models]
    stem = "radial_layers_quick" if args.quick else "radial_layers"
    args.out.mkdir(parents=True, exist_ok=True)
    from lightning_repsim.callbacks.plotting import plot_layer_matrix

    fig = plot_layer_matrix(matrix["values"], matrix["reference"], matrix["student"], "cka",
                            title=f"linear CKA between the layers of f: seed 0 (rows) vs seed 1 (columns)\n"
                                  f"radial data, K={k}, W={w}, {steps} steps; {h['num_inputs']} test points")
    fig.savefig(args.out / f"{stem}.png", dpi=110)
    header = "| seed 0 \\ seed 1 | " + " | ".join(f"`{n}`" for n in matrix["student"]) + " |"
    lines = [header, "|---|" + "---:|" * len(matrix["student"])]
    for name, row in zip(matrix["reference"], matrix["values"]):
        lines.append(f"| `{name}` | " + " | ".join(f"{v:.4f}" for v in row) + " |")
    per_layer = ["| layer | CKA | debiased CKA | Procrustes |", "|---|---:|---:|---:|"]
    for name, vals in h["layers"].items():
        per_layer.append(f"| `{name}` | {vals['cka']:.4f} | {vals['cka_debiased']:.4f} | {vals['procrustes']:.4f} |")
    elapsed = time.perf_counter() - start
    command = "python examples/radial.py " + " ".join(sys.argv[1:] if args.argv is None else args.argv)
    text = (
        f"# Layer-wise CKA between two seeds (radial data, K = {k}, W = {w})\n\nCommand: `{command.strip()}`\n\n"
        f"Two-tower models of seeds 0 and 1 ({steps} Adam steps, lr {lr:g}, {n_train} training points; test accuracy "
        f"{accuracy[0]:.4f} and {accuracy[1]:.4f}), compared on "
        f"{h['num_inputs']} test points by `ReferenceComparison(layers={list(LAYERS)}, layer_matrix=True)` in one "
        f"`trainer.validate`. Rows: seed 0 (reference), columns: seed 1 (student); linear CKA, exact over the test "
        f"set.\n\n" + "\n".join(lines) + "\n\nThe matching layers (the diagonal):\n\n" + "\n".join(per_layer)
        + f"\n\nThe same run's output-level values: KL {h['kl']:.4g}, d_logit {h['d_logit']:.4g}, "
        f"d_LLV {h['d_llv']:.4g}, d_SVD {h['d_svd']:.4g}, mCCA {h['mcca']:.4g}.\n\n"
        f"Runtime: {elapsed:.0f} s in total, of which training {train_seconds:.0f} s (0 when loaded from the cache in "
        f"`{args.work_dir}`) and the comparison (`trainer.validate` with the callback) {compare_seconds:.1f} s "
        f"({torch.get_num_threads()} torch thread(s), {os.cpu_count()} CPU cores).\n"
    )
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    print(f"wrote {args.out / (stem + '.md')} and {args.out / (stem + '.png')}")
    return {"history": h, "metrics": metrics, "matrix": matrix, "accuracy": accuracy, "seconds": elapsed}


def _train_job(args: tuple) -> dict:
    torch.set_num_threads(1)
    cache, kwargs = args
    if cache is not None and cache.exists():
        return {**torch.load(cache, weights_only=False), "cached": True}
    result = train_model(**kwargs)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save(result, tmp)
        os.replace(tmp, cache)
    return {**result, "cached": False}


# ---------------------------------------------------------------------------------------------
# comparing two models with the streaming metrics
# ---------------------------------------------------------------------------------------------
def compare_pair(a: dict, b: dict, chunk: int = 500) -> dict[str, float]:
    """d_LLV, d_SVD, mean KL and mCCA between two trained models on the test set (a = p, b = q)."""
    from lightning_repsim.metrics import MeanCCA, MeanKLDivergence, SVDDissimilarity

    svd = SVDDissimilarity(rep_dim=a["emb"].shape[1], unemb_p=a["unemb"], unemb_q=b["unemb"])
    kl, cca = MeanKLDivergence(), MeanCCA()
    for i in range(0, a["emb"].shape[0], chunk):
        fa, fb = a["emb"][i : i + chunk], b["emb"][i : i + chunk]
        svd.update(fa, fb)
        kl.update(fa @ a["unemb"].T, fb @ b["unemb"].T)
        cca.update(fa, fb)
    res = svd.compute_result()
    return {"d_llv": float(res.llv.value), "d_svd": float(res.value), "kl": float(kl.compute()), "mcca": float(cca.compute())}


def summarise(models: list[dict], pairs: list[dict], ks, widths, min_acc: float) -> list[dict]:
    rows = []
    for k, w in itertools.product(ks, widths):
        mine = [m for m in models if m["K"] == k and m["W"] == w]
        good = [m for m in mine if m["acc"] > min_acc]
        sel = [p for p in pairs if p["K"] == k and p["W"] == w]
        row = {"K": k, "W": w, "models": len(mine), "accurate": len(good), "pairs": len(sel),
               "acc_mean": sum(m["acc"] for m in mine) / max(1, len(mine))}
        for c in METRIC_COLUMNS:
            vals = torch.tensor([p[c] for p in sel], dtype=torch.float64)
            row[f"{c}_mean"] = float(vals.mean()) if len(sel) else math.nan
            row[f"{c}_std"] = float(vals.std()) if len(sel) > 1 else (0.0 if len(sel) == 1 else math.nan)
            row[f"{c}_median"] = float(vals.quantile(0.5)) if len(sel) else math.nan
        rows.append(row)
    return rows


def to_markdown(rows: list[dict], min_acc: float) -> str:
    lines = [
        f"| K | W | models with acc > {min_acc:g} | pairs | mean test acc | d_LLV mean ± std | d_LLV median "
        "| d_SVD mean ± std | d_SVD median | mean KL | mCCA |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["pairs"]:
            cells = [f"{r['d_llv_mean']:.4f} ± {r['d_llv_std']:.4f}", f"{r['d_llv_median']:.4f}",
                     f"{r['d_svd_mean']:.4f} ± {r['d_svd_std']:.4f}", f"{r['d_svd_median']:.4f}",
                     f"{r['kl_mean']:.4f} ± {r['kl_std']:.4f}", f"{r['mcca_mean']:.4f} ± {r['mcca_std']:.4f}"]
        else:
            cells = ["–"] * 6
        lines.append(f"| {r['K']} | {r['W']} | {r['accurate']}/{r['models']} | {r['pairs']} | {r['acc_mean']:.4f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (key, label) in zip(axes, (("d_llv", "d_LLV"), ("d_svd", "d_SVD"))):
        for k in sorted({r["K"] for r in rows}):
            mine = [r for r in rows if r["K"] == k and r["pairs"]]
            if not mine:
                continue
            ws = [r["W"] for r in mine]
            bars = ax.errorbar(ws, [r[f"{key}_mean"] for r in mine], yerr=[r[f"{key}_std"] for r in mine],
                               marker="o", capsize=4, label=f"K = {k}: mean ± std")
            ax.plot(ws, [r[f"{key}_median"] for r in mine], ls=":", marker="x", color=bars[0].get_color(),
                    label=f"K = {k}: median")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["W"] for r in rows}))
        ax.set_xticklabels([str(w) for w in sorted({r["W"] for r in rows})])
        ax.set_xlabel("width W")
        ax.set_ylabel(label)
        ax.set_title(f"{label} between seeds (pairs of models)")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_pairs(pairs: list[dict], path: Path) -> None:
    cols = ["K", "W", "seed_a", "seed_b", "acc_a", "acc_b", *METRIC_COLUMNS]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols)
        writer.writeheader()
        for p in pairs:
            writer.writerow({c: (f"{p[c]:.6g}" if isinstance(p[c], float) else p[c]) for c in cols})


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="K=4, W in {16, 32}, 2 seeds, 300 steps, lr 1e-3, small data")
    parser.add_argument("--classes", type=int, nargs="+", default=None, help="K values (default 4 6)")
    parser.add_argument("--widths", type=int, nargs="+", default=None, help="W values (default 16 32 64 128)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5)")
    parser.add_argument("--steps", type=int, default=None, help="Adam steps per model (default 15000, the paper's)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-4, the paper's)")
    parser.add_argument("--n-train", type=int, default=None, help="training points (default 20000)")
    parser.add_argument("--n-test", type=int, default=None, help="test points (default 2000)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--min-acc", type=float, default=0.9, help="keep pairs whose two models have test accuracy above this")
    parser.add_argument("--workers", type=int, default=1, help="models trained at a time (processes)")
    parser.add_argument("--work-dir", type=Path, default=Path("outputs/radial"), help="cache of trained models")
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--layers", action="store_true",
                        help="layer-wise CKA heatmap between two seeds of one (K, W) (default K=6, W=64)")
    args = parser.parse_args(argv)
    args.argv = argv
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-model "GPU available" banners
    quick = args.quick
    ks = args.classes or ([4] if quick else [4, 6])
    widths = args.widths or ([16, 32] if quick else [16, 32, 64, 128])
    n_seeds = args.seeds or (2 if quick else 5)
    steps = args.steps or (300 if quick else 15000)
    lr = args.lr or (1e-3 if quick else 1e-4)
    n_train = args.n_train or (4000 if quick else 20000)
    n_test = args.n_test or (500 if quick else 2000)

    saved_threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():  # the reference / radial models are fitted without a validation loader
            warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")
            if args.layers:
                k = args.classes[0] if args.classes else (4 if quick else 6)
                w = args.widths[0] if args.widths else (32 if quick else 64)
                return layer_comparison(args, k, w, steps, lr, n_train, n_test)
            return _run(args, argv, ks, widths, n_seeds, steps, lr, n_train, n_test)
    finally:
        torch.set_num_threads(saved_threads)


def _run(args, argv, ks, widths, n_seeds, steps, lr, n_train, n_test) -> list[dict]:
    quick = args.quick
    start = time.perf_counter()
    jobs = []
    for k, w, s in itertools.product(ks, widths, range(n_seeds)):
        cache = None
        if not args.no_cache:
            cache = args.work_dir / f"K{k}_W{w}_seed{s}_steps{steps}_lr{lr:g}_n{n_train}_t{n_test}_b{args.batch_size}.pt"
        jobs.append((cache, dict(num_classes=k, width=w, seed=s, steps=steps, n_train=n_train, n_test=n_test,
                                 lr=lr, batch_size=args.batch_size)))
    models: list[dict] = []
    if args.workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.workers) as pool:
            for i, m in enumerate(pool.imap(_train_job, jobs)):
                models.append(m)
                print(f"[{i + 1}/{len(jobs)}] K={m['K']} W={m['W']} seed={m['seed']}: test acc {m['acc']:.4f} "
                      f"({m['seconds']:.0f} s)", flush=True)
    else:
        for i, job in enumerate(jobs):
            m = _train_job(job)
            models.append(m)
            print(f"[{i + 1}/{len(jobs)}] K={m['K']} W={m['W']} seed={m['seed']}: test acc {m['acc']:.4f} "
                  f"({m['seconds']:.0f} s)", flush=True)
    train_seconds = sum(m["seconds"] for m in models)
    n_cached = sum(m["cached"] for m in models)
    per_process_threads = torch.get_num_threads()

    pairs = []
    for k, w in itertools.product(ks, widths):
        good = [m for m in models if m["K"] == k and m["W"] == w and m["acc"] > args.min_acc]
        for a, b in itertools.combinations(good, 2):
            pairs.append({"K": k, "W": w, "seed_a": a["seed"], "seed_b": b["seed"], "acc_a": a["acc"], "acc_b": b["acc"],
                          **compare_pair(a, b)})
    rows = summarise(models, pairs, ks, widths, args.min_acc)
    elapsed = time.perf_counter() - start

    table = to_markdown(rows, args.min_acc)
    setting = (f"K in {ks}, W in {widths}, {n_seeds} seeds, {steps} steps, lr {lr:g}, batch {args.batch_size}, "
               f"{n_train} train / {n_test} test points")
    stem = "radial_quick" if quick else "radial"
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python examples/radial.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (args.out / f"{stem}.md").write_text(
        f"# Figure 3 right (Section 5.2): radial data, pairwise distances between seeds\n\n"
        f"Command: `{command.strip()}`\n\nSetting: {setting}; pairs kept when both models have test accuracy "
        f"> {args.min_acc:g}. Mean ± std over the kept pairs.\n\n{table}\n\n"
        f"Runtime: {elapsed:.0f} s for this invocation"
        + (f", which loaded {n_cached} of the {len(models)} models from the cache in `{args.work_dir}`" if n_cached else "")
        + f". Training time of the {len(models)} models: {train_seconds:.0f} s in total "
        f"(Lightning, {per_process_threads} torch thread per model, {args.workers} process(es), {os.cpu_count()} CPU cores).\n"
    )
    plot(rows, args.out / f"{stem}.png", setting)
    write_pairs(pairs, args.out / f"{stem}_pairs.csv")
    print(table)
    print(f"\nwrote {args.out / (stem + '.md')}, {args.out / (stem + '.png')} and {args.out / (stem + '_pairs.csv')} "
          f"in {elapsed:.0f} s")
    return rows


if __name__ == "__main__":
    main()
