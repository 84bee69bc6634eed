"""CPU time and memory of the distillation losses at a language model's shape, against plain torch losses.

Student and teacher logits ``(B, T, V)`` (default 8 x 512 x 32,000, float32: 0.5 GB each), the first tokens of
every sequence masked as left padding (0, 16, ..., 112 tokens), forward + backward to the student's logits, **one
thread**. Each case runs in its own fresh Python process (``--repeats`` processes per case, median reported):
the inputs are built in place (no temporaries), the peak resident memory is reset (``/proc/self/clear_refs``),
and the case reports ``time.process_time`` of its forward + backward and its peak RSS above the inputs
(the student's gradient included: the logits' gradient is part of any backward).

Cases:

* ``F.cross_entropy`` (for scale; padding as ``ignore_index``) and the plain KL
  ``F.kl_div(log_softmax(s), log_softmax(t), log_target=True, reduction="batchmean")``: the baseline of issue 23's
  targets (the losses at most 1.2x its CPU time and no more memory; LLVLoss and the README recipe at most 2.5x and
  1.5x its memory). It ignores the mask (its cheapest form); the masked per-row form is shown too;
* every loss of :mod:`lightning_repsim.losses` with its default blocks (about 1 MB each on the CPU) and, marked
  with an asterisk (``LogitDistanceLoss``, ``KDLoss``), as on an accelerator (the rows' device path, forced
  here: the mask applied inside the blocks, no finiteness check), unchunked (``chunk_size`` = all 4,096 rows in one
  block) and with ``chunk_size=1024``. On
  the CPU the default blocks are already far smaller, so ``chunk_size=1024`` changes nothing there; on an
  accelerator the default blocks hold 2^26 numbers (2,097 rows here);
* the hidden-state variants against the same loss on logits formed by the heads (heads included in both:
  student hidden width ``--student-width``, teacher ``--teacher-width``, gradients to the student's hidden states
  and head).

``--before REV`` adds the losses of ``lightning_repsim/losses.py`` at git revision ``REV`` (e.g. the commit before
issue 23), run in the same way. ``--sweep`` prints where the hidden-state logit distance wins (CPU time of the
hidden route vs heads + logit loss, over tokens per step, V and widths), one process per point.

Usage::

    python benchmarks/bench_losses.py                      # the table (about 10 min on 2 shared cores)
    python benchmarks/bench_losses.py --before 929b342~1   # with the implementation before issue 23
    python benchmarks/bench_losses.py --sweep              # break-even of the hidden-state logit distance
    python benchmarks/bench_losses.py --quick              # B, T, V = 2, 64, 2,000: a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import machine_info  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = ('LLVLoss(rep_dim=M, label_pivot="mean", input_set_search="sample", input_terms=False, reduce="softmax", '
          'combine="sum", lam=0.01, softmax_temperature=0.1) + 0.1 * KDLoss(temperature=4.0)')

# case name -> (label in the table, kind): kind "logits" takes (B, T, V) logits, "hidden" hidden states and heads
CASES = {
    "ce": ("`F.cross_entropy` (for scale)", "logits"),
    "kl": ('`F.kl_div(log_softmax(s), log_softmax(t), log_target=True, reduction="batchmean")` (**baseline**)',
           "logits"),
    "kl_masked": ('the same KL per row (`reduction="none"`, `.sum(-1)`), averaged over the kept rows', "logits"),
    "ld": ("`LogitDistanceLoss()`", "logits"),
    "ld_one": ("`LogitDistanceLoss(chunk_size=4096)`: unchunked, one block of all rows\\*", "logits"),
    "ld_one_chunk": ("`LogitDistanceLoss(chunk_size=1024)`\\*", "logits"),
    "ld_mean": ('`LogitDistanceLoss(class_reduction="mean")`', "logits"),
    "kd": ("`KDLoss(temperature=2.0)`", "logits"),
    "kd_one": ("`KDLoss(temperature=2.0, chunk_size=4096)`: unchunked\\*", "logits"),
    "kd_one_chunk": ("`KDLoss(temperature=2.0, chunk_size=1024)`\\*", "logits"),
    "llv": ("`LLVLoss(rep_dim=2)`", "logits"),
    "llv_big_m": ("`LLVLoss(rep_dim=127)` (input sets of 128 rows)", "logits"),
    "llv_mean": ('`LLVLoss(input_set_search="mean", reduce="softmax")`', "logits"),
    "recipe": ("README recipe: `LLVLoss(...)` + 0.1 `KDLoss(temperature=4.0)`", "logits"),
    "heads_ld": ("heads + `LogitDistanceLoss()`", "hidden"),
    "hidden_ld": ("`HiddenStateLogitDistanceLoss()` (first call: builds the teacher's block)", "hidden"),
    "hidden_ld_cached": ("`HiddenStateLogitDistanceLoss()` (teacher's block cached, as in training)", "hidden"),
    "heads_kd": ("heads + `KDLoss(temperature=2.0)`", "hidden"),
    "hidden_kd": ("`HiddenStateKDLoss(temperature=2.0)`", "hidden"),
}
BEFORE = {"before_ld": "ld", "before_kd": "kd", "before_llv": "llv", "before_recipe": "recipe"}


def _status(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024
    return 0.0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _mask(b: int, t: int) -> torch.Tensor:
    mask = torch.ones(b, t, dtype=torch.bool)
    for i in range(b):
        mask[i, : min(16 * i, t - 1)] = False  # left padding: 0, 16, 32, ... tokens
    return mask


def _logit_inputs(b: int, t: int, v: int):
    g = torch.Generator().manual_seed(0)
    teacher = torch.empty(b, t, v).normal_(generator=g).mul_(2.0)
    student = torch.empty(b, t, v).normal_(generator=g).add_(teacher, alpha=0.7)
    return student.requires_grad_(), teacher, _mask(b, t)


def _hidden_inputs(b: int, t: int, v: int, m_s: int, m_t: int):
    g = torch.Generator().manual_seed(0)
    hs = torch.empty(b, t, m_s).normal_(generator=g).requires_grad_()
    ht = torch.empty(b, t, m_t).normal_(generator=g)
    ws = torch.empty(v, m_s).normal_(generator=g).div_(m_s**0.5).requires_grad_()
    bs = torch.empty(v).normal_(generator=g).requires_grad_()
    wt = torch.empty(v, m_t).normal_(generator=g).div_(m_t**0.5)
    bt = torch.empty(v).normal_(generator=g)
    return hs, ht, (ws, bs), (wt, bt), _mask(b, t)


def _old_module(rev: str):
    """``lightning_repsim/losses.py`` at git revision ``rev``, imported from a temporary file."""
    import importlib.util

    text = subprocess.run(["git", "show", f"{rev}:lightning_repsim/losses.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "losses_before.py")
    with open(path, "w") as fh:
        fh.write(text)
    spec = importlib.util.spec_from_file_location("losses_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _logits_case(name: str, student, teacher, mask, losses):
    import torch.nn.functional as F

    v = student.shape[-1]
    if name == "ce":
        target = torch.randint(v, mask.shape, generator=torch.Generator().manual_seed(1))
        target[~mask] = -100
        return F.cross_entropy(student.reshape(-1, v), target.reshape(-1), ignore_index=-100)
    if name == "kl":  # as issue 23 states it (the padding rows are included: the same work)
        return F.kl_div(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1), log_target=True,
                        reduction="batchmean")
    if name == "kl_masked":
        per_row = F.kl_div(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1), log_target=True,
                           reduction="none").sum(-1)
        return (per_row * mask).sum() / mask.sum()
    chunk = {"chunk_size": 1024} if name.endswith("_chunk") else {}
    if name.endswith("_one"):  # unchunked: every row in one block
        chunk = {"chunk_size": student.shape[0] * student.shape[1]}
    base = name.removesuffix("_chunk").removesuffix("_one")
    if base == "ld":
        return losses.LogitDistanceLoss(**chunk)(student, teacher, mask=mask)
    if base == "ld_mean":
        return losses.LogitDistanceLoss(class_reduction="mean")(student, teacher, mask=mask)
    if base == "kd":
        return losses.KDLoss(temperature=2.0, **chunk)(student, teacher, mask=mask)
    if base == "llv":
        return losses.LLVLoss(rep_dim=2, **chunk)(student, teacher, mask=mask)
    if base == "llv_big_m":  # as examples/language_model.py (n_embd - 1); 15 in a --quick run
        return losses.LLVLoss(rep_dim=127 if student.shape[1] > 128 else 15)(student, teacher, mask=mask)
    if base == "llv_mean":
        return losses.LLVLoss(input_set_search="mean", reduce="softmax")(student, teacher, mask=mask)
    if base == "recipe":
        llv = losses.LLVLoss(rep_dim=127, label_pivot="mean", input_set_search="sample", input_terms=False,
                             reduce="softmax", combine="sum", lam=0.01, softmax_temperature=0.1, **chunk)
        kd = losses.KDLoss(temperature=4.0, **chunk)
        return llv(student, teacher, mask=mask) + 0.1 * kd(student, teacher, mask=mask)
    raise ValueError(name)


def _hidden_loss(name: str):
    from lightning_repsim import losses

    if name.startswith("hidden_ld"):
        return losses.HiddenStateLogitDistanceLoss()
    if name == "hidden_kd":
        return losses.HiddenStateKDLoss(temperature=2.0)
    return None


def _hidden_case(name: str, hs, ht, head_s, head_t, mask, loss=None):
    from lightning_repsim import losses

    if loss is not None:
        return loss(hs, ht, head_s, head_t, mask=mask)
    zs = torch.addmm(head_s[1], hs.reshape(-1, hs.shape[-1]), head_s[0].T)
    with torch.no_grad():
        zt = torch.addmm(head_t[1], ht.reshape(-1, ht.shape[-1]), head_t[0].T)
    flat = None if mask is None else mask.reshape(-1)
    if name == "heads_ld":
        return losses.LogitDistanceLoss()(zs, zt, mask=flat)
    return losses.KDLoss(temperature=2.0)(zs, zt, mask=flat)


def run_case(args) -> dict:
    """One case in this process: build the inputs, reset the peak, time forward + backward."""
    torch.set_num_threads(1)
    name = args.case
    base_name = BEFORE.get(name, name)
    kind = CASES[base_name][1]
    if kind == "logits":
        inputs = _logit_inputs(args.batch, args.seq, args.vocab)
    else:
        inputs = _hidden_inputs(args.batch, args.seq, args.vocab, args.student_width, args.teacher_width)
    if name in BEFORE:
        losses = _old_module(args.before)
    else:
        from lightning_repsim import losses
    if "_one" in name:  # as on an accelerator: the mask applied inside one block of all rows (or chunk_size rows)
        import lightning_repsim.distillation.rows as rows_module

        rows_module.compiling = lambda: True  # the rows' "not on the host" path (the finiteness check is skipped)
    hidden_loss = _hidden_loss(name) if kind == "hidden" else None
    if name == "hidden_ld_cached":
        with torch.no_grad():
            hidden_loss(*inputs[:4], mask=inputs[4])  # a first step: the teacher's block is cached
    gc.collect()
    exact_peak = _reset_peak()
    rss0 = _status("VmRSS")
    c0, w0 = time.process_time(), time.perf_counter()
    if kind == "logits":
        value = _logits_case(base_name, *inputs, losses)
    else:
        value = _hidden_case(base_name, *inputs, loss=hidden_loss)
    value.backward()
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    peak = _status("VmHWM")
    grads = inputs[:1] if kind == "logits" else (inputs[0], *inputs[2])  # the student's logits, or h_s, W_s, b_s
    copies = 2 if base_name == "recipe" else 1  # two losses: autograd holds both gradients while it adds them
    grad_mb = copies * sum(x.numel() * x.element_size() for x in grads) / 2**20
    return {"case": name, "cpu": cpu, "wall": wall, "extra_mb": peak - rss0, "grad_mb": grad_mb,
            "value": float(value.detach()), "exact_peak": exact_peak}


def run_sweep_point(args) -> dict:
    """CPU time of heads + LogitDistanceLoss vs HiddenStateLogitDistanceLoss at one (N, V, M_s, M_t)."""
    torch.set_num_threads(1)
    n, v, m_s, m_t = args.point
    hs, ht, head_s, head_t, _ = _hidden_inputs(1, n, v, m_s, m_t)
    out = {}
    hidden = _hidden_loss("hidden_ld")
    with torch.no_grad():
        hidden(hs, ht, head_s, head_t)  # a first step: the teacher's block is cached, as in training
    for name, loss in (("heads_ld", None), ("hidden_ld", hidden)):
        for x in (hs, head_s[0], head_s[1]):
            x.grad = None
        c0 = time.process_time()
        _hidden_case(name, hs, ht, head_s, head_t, None, loss=loss).backward()
        out[name] = time.process_time() - c0
    return out


def _child(args, extra: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *extra, "--batch", str(args.batch), "--seq", str(args.seq),
           "--vocab", str(args.vocab), "--student-width", str(args.student_width),
           "--teacher-width", str(args.teacher_width)]
    if args.before:
        cmd += ["--before", args.before]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(extra)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _command() -> str:
    return " ".join(["python", "benchmarks/bench_losses.py", *sys.argv[1:]])


def table(args) -> str:
    names = list(CASES) + (list(BEFORE) if args.before else [])
    results = {}
    for name in names:
        runs = [_child(args, ["--case", name]) for _ in range(args.repeats)]
        results[name] = {
            "cpu": statistics.median(r["cpu"] for r in runs),
            "extra_mb": statistics.median(r["extra_mb"] for r in runs),
            "grad_mb": runs[0]["grad_mb"],
            "value": runs[0]["value"],
            "exact_peak": all(r["exact_peak"] for r in runs),
        }
        print(f"  {name}: {results[name]['cpu']:.2f} s, {results[name]['extra_mb']:.0f} MB", file=sys.stderr, flush=True)
    kl = results["kl"]
    n_tokens = args.batch * args.seq
    kept = int(_mask(args.batch, args.seq).sum())
    lines = [
        f"### Distillation losses: (B, T, V) = ({args.batch}, {args.seq}, {args.vocab:,}) float32, "
        f"{kept:,} of {n_tokens:,} tokens kept (left padding), forward + backward, one thread",
        "",
        f"Machine: {machine_info()}",
        f"Date: {datetime.date.today().isoformat()}. Command: `{_command()}`",
        f"CPU time (`time.process_time`) and peak RSS above the inputs (gradient included), each case in {args.repeats} "
        "fresh processes, median; \"beyond the gradient\": the extra memory less the size of the gradient of the "
        "student's inputs (twice for the recipe, whose two losses each give one), i.e. the work memory. LLVLoss finds "
        "the kept rows on the host on every device, so its blocks never span two sequences (at most 512 rows here). "
        "Hidden-state rows: student width "
        f"{args.student_width}, teacher width {args.teacher_width}, heads with bias; their inputs are the hidden "
        "states and heads, so the logits (and their gradient) count as extra memory there.",
        "",
        "\\* as on an accelerator (the mask applied inside the blocks; see the script's docstring): unchunked "
        "(`chunk_size` = all rows) or blocks of 1,024 rows.",
        "",
        "| loss | CPU (s) | CPU / KL | extra memory (MB) | memory / KL | beyond the gradient (MB) | value |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        r = results[name]
        label = CASES[name][0] if name in CASES else f"before ({args.before}): {CASES[BEFORE[name]][0]}"
        lines.append(f"| {label} | {r['cpu']:.2f} | {r['cpu'] / kl['cpu']:.2f} | {r['extra_mb']:.0f} | "
                     f"{r['extra_mb'] / kl['extra_mb']:.2f} | {r['extra_mb'] - r['grad_mb']:.0f} | {r['value']:.6g} |")
    if not all(r["exact_peak"] for r in results.values()):
        lines.append("\n(peak memory could not be reset: figures include the inputs' construction)")
    return "\n".join(lines)


def sweep(args) -> str:
    points = [(n, v, m_s, m_t) for v in (8192, 32000) for m_s, m_t in ((128, 256), (256, 768))
              for n in (512, 2048, 8192)]
    lines = ["### Where the hidden-state logit distance wins: CPU s of heads + `LogitDistanceLoss()` vs "
             "`HiddenStateLogitDistanceLoss()` (forward + backward to h_s, W_s, b_s, teacher's block cached by a "
             "first step; one thread, one process per point)",
             "", f"Machine: {machine_info()}", f"Date: {datetime.date.today().isoformat()}. Command: `{_command()}`", "",
             "| tokens N | V | M_s | M_t | heads + logits (s) | hidden states (s) | speed-up |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for point in points:
        r = _child(args, ["--point", *map(str, point)])
        lines.append(f"| {point[0]:,} | {point[1]:,} | {point[2]} | {point[3]} | {r['heads_ld']:.2f} | "
                     f"{r['hidden_ld']:.2f} | {r['heads_ld'] / r['hidden_ld']:.1f}x |")
        print("  ", lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--student-width", type=int, default=256)
    parser.add_argument("--teacher-width", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before", default=None, help="also run lightning_repsim/losses.py at this git revision")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--point", type=int, nargs=4, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/losses_<date>_cpu.md)")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.seq, args.vocab, args.repeats = 2, 64, 2000, 1
    if args.case:
        print(json.dumps(run_case(args)))
        return
    if args.point:
        print(json.dumps(run_sweep_point(args)))
        return
    torch.set_num_threads(1)  # as in every case's process (and so reported by machine_info)
    text = sweep(args) if args.sweep else table(args)
    print(text)
    if not args.quick:
        stem = "losses_sweep" if args.sweep else "losses"
        out = args.out or os.path.join(ROOT, "benchmarks", "results", f"{stem}_{datetime.date.today().isoformat()}_cpu.md")
        with open(out, "w") as fh:
            fh.write(text + "\n")
        print(f"\nwritten to {os.path.relpath(out, ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
