"""Layer-wise comparison: linear CKA (biased and debiased) and the Procrustes distance between named layers of the
reference and the student, from forward hooks during the forward passes the comparison runs anyway.

**Which rows.** A layer's output (the first tensor of a tuple or of a ``ModelOutput``) becomes one row per input:

* an output whose leading shape is the logits' (``(B, D)`` for a classifier, ``(B, T, D)`` for a language model
  whose logits are ``(B, T, K)``) gives one row per position, masked exactly like the logits (padding tokens and
  DDP padding duplicates are left out);
* any other output with the batch as first dimension gives one row per example: ``reduce="flatten"`` (default)
  flattens everything after the batch dimension (``(B, C, H, W)`` -> ``C*H*W`` features, ``(B, T, D)`` -> ``T*D``);
  ``reduce="mean"`` averages over every dimension except the batch and the feature dimension (the channels ``C``
  of ``(B, C, ...)`` convolution maps, the last dimension ``D`` of ``(B, T, D)`` sequences). An example is kept
  when any of its positions is.

**Bounded memory.** Each compared pair of layers holds one statistic of ``(d_p + d_q + 2)^2`` float64 numbers,
independent of the number of inputs. A layer wider than ``max_width`` features is refused with a message
(``too_wide="refuse"``, default) or mapped to ``max_width`` features by a seeded CountSketch
(``too_wide="project"``): feature ``i`` is added with a random sign ``s_i`` to output ``h(i)``, a sparse random
projection that preserves inner products in expectation (Charikar et al. 2002; Weinberger et al. 2009), so CKA is
approximated, not exact. ``h`` and ``s`` are drawn from a generator seeded with ``seed`` and the CRC-32 of the model
side and layer name, so a projection is the same in every process, epoch and run.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_repsim.functional.inputs import check_choice

__all__ = ["LAYER_MEASURES", "LayerComparison", "layer_rows", "parse_layers"]

#: The values logged per pair of layers.
LAYER_MEASURES = ("cka", "cka_debiased", "procrustes")
REDUCTIONS = ("flatten", "mean")
TOO_WIDE = ("refuse", "project")


def parse_layers(layers: Sequence[str | tuple[str, str]] | None) -> list[tuple[str, str]]:
    """``[(reference_name, student_name), ...]`` from names (the same in both models) or pairs."""
    if layers is None:
        return []
    if isinstance(layers, str):
        raise TypeError(f"`layers` must be a list of module names or (reference_name, student_name) pairs, got {layers!r}")
    pairs = []
    for item in layers:
        if isinstance(item, str):
            pairs.append((item, item))
        elif isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(n, str) for n in item):
            pairs.append((item[0], item[1]))
        else:
            raise TypeError(f"`layers` entries must be module names or (reference_name, student_name) pairs, got {item!r}")
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"`layers` lists a pair twice: {pairs}")
    return pairs


def pair_name(ref: str, stu: str) -> str:
    return ref if ref == stu else f"{ref}~{stu}"


def first_tensor(output: Any) -> Tensor | None:
    """The tensor a layer produced: itself, the first tensor of a tuple/list, or of a mapping (``ModelOutput``)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, Tensor):
                return item
    return None


def layer_rows(output: Tensor, lead: tuple[int, ...], keep: Tensor | None, reduce: str, name: str) -> Tensor:
    """One row per input from a layer's output (see the module docstring); ``keep`` is the bool mask over the
    flattened leading positions of the logits (None: all)."""
    n_lead = len(lead)
    if tuple(output.shape[:n_lead]) == tuple(lead) and output.ndim == n_lead + 1:
        rows = output.reshape(-1, output.shape[-1])
        return rows if keep is None else rows[keep.to(rows.device)]
    if output.ndim >= 2 and output.shape[0] == lead[0]:
        if reduce == "mean" and output.ndim >= 3:
            feature = 1 if output.ndim >= 4 else output.ndim - 1
            dims = [d for d in range(1, output.ndim) if d != feature]
            rows = output.to(torch.float64).mean(dim=dims)  # averaged in float64, like every statistic
        else:
            rows = output.reshape(output.shape[0], -1)
        if keep is not None and n_lead > 1:
            keep = keep.reshape(lead[0], -1).any(1)
        return rows if keep is None else rows[keep.to(rows.device)]
    raise ValueError(
        f"layer `{name}` gave an output of shape {tuple(output.shape)}, which has neither the logits' leading shape "
        f"{tuple(lead)} nor the batch ({lead[0]}) as first dimension: it cannot be matched to the inputs"
    )


class _Hooks:
    """Forward hooks on named modules of one model, keeping each module's last output (detached) of the batch."""

    def __init__(self, side: str) -> None:
        self.side = side
        self.outputs: dict[str, Tensor] = {}
        self.calls: dict[str, int] = {}
        self._handles: list[Any] = []
        self.paused = False

    def install(self, model: nn.Module, names: Sequence[str]) -> None:
        self.remove()
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            available = [n for n in modules if n][:30]
            raise ValueError(
                f"ReferenceComparison(layers=...): the {self.side} ({type(model).__name__}) has no module named "
                f"{missing}; its modules include {available}"
            )
        for name in dict.fromkeys(names):
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self.paused:
                return
            tensor = first_tensor(output)
            if tensor is not None:
                self.outputs[name] = tensor.detach()
                self.calls[name] = self.calls.get(name, 0) + 1

        return hook

    def clear(self) -> None:
        self.outputs, self.calls = {}, {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def __getstate__(self) -> dict[str, Any]:  # hooks do not travel to other processes (ddp_spawn)
        return {"side": self.side, "outputs": {}, "calls": {}, "_handles": [], "paused": False}


class LayerComparison:
    """The per-layer CKA family of one comparison: hooks on both models, one :class:`~lightning_repsim.metrics.
    LinearCKA` statistic per compared pair of layers (exact, synced across processes), the logged values and the
    layer-by-layer matrix.

    Args:
        layers: module names present in both models, or ``(reference_name, student_name)`` pairs.
        matrix: also compare every listed reference layer with every listed student layer (True: the matrix of
            ``"cka"``; or the name of one of :data:`LAYER_MEASURES`).
        reduce: ``"flatten"`` or ``"mean"`` (how per-example outputs become rows; module docstring).
        max_width: the most features a layer may give per input (after ``reduce``).
        too_wide: ``"refuse"`` a wider layer with a clear error, or ``"project"`` it to ``max_width`` features with
            the seeded CountSketch of the module docstring.
        seed: seed of the projections.
        metric_kwargs: passed to every :class:`~lightning_repsim.metrics.LinearCKA` (``nan_strategy``,
            ``memory_budget_gb``, torchmetrics arguments).
    """

    def __init__(self, layers: Sequence[str | tuple[str, str]], matrix: bool | str = False, reduce: str = "flatten",
                 max_width: int = 2048, too_wide: str = "refuse", seed: int = 0,
                 metric_kwargs: Mapping[str, Any] | None = None) -> None:
        self.pairs = parse_layers(layers)
        if not self.pairs:
            raise ValueError("`layers` must name at least one layer")
        if matrix is True:
            matrix = "cka"
        if matrix is not False and matrix not in LAYER_MEASURES:
            raise ValueError(f"`layer_matrix` must be a bool or one of {LAYER_MEASURES}, got {matrix!r}")
        self.matrix_measure: str | None = matrix or None
        self.reduce = check_choice(reduce, "layer_reduce", REDUCTIONS)
        if isinstance(max_width, bool) or not isinstance(max_width, int) or max_width < 1:
            raise ValueError(f"`layer_max_width` must be a positive int, got {max_width!r}")
        self.max_width = max_width
        self.too_wide = check_choice(too_wide, "layer_too_wide", TOO_WIDE)
        self.seed = int(seed)
        self.metric_kwargs = dict(metric_kwargs or {})
        self.reference_layers = list(dict.fromkeys(r for r, _ in self.pairs))
        self.student_layers = list(dict.fromkeys(s for _, s in self.pairs))
        keys = list(self.pairs)
        if self.matrix_measure:
            keys += [(r, s) for r in self.reference_layers for s in self.student_layers if (r, s) not in self.pairs]
        self.keys = keys
        self.metrics: dict[tuple[str, str], Any] = {}
        self._sketches: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}
        self._ref_hooks, self._stu_hooks = _Hooks("reference"), _Hooks("student")
        self.device = torch.device("cpu")

    # -- hooks -------------------------------------------------------------------------------------
    def install(self, reference: nn.Module, student: nn.Module) -> None:
        self._ref_hooks.install(reference, self.reference_layers)
        self._stu_hooks.install(student, self.student_layers)

    def clear(self) -> None:
        self._ref_hooks.clear()
        self._stu_hooks.clear()

    @contextlib.contextmanager
    def paused(self):
        """The hooks ignore the forwards run inside this context."""
        self._ref_hooks.paused = self._stu_hooks.paused = True
        try:
            yield
        finally:
            self._ref_hooks.paused = self._stu_hooks.paused = False

    def remove(self) -> None:
        self._ref_hooks.remove()
        self._stu_hooks.remove()

    # -- metrics -------------------------------------------------------------------------------------
    def to(self, device: torch.device) -> LayerComparison:
        self.device = torch.device(device)
        self.metrics = {k: m.to(self.device) for k, m in self.metrics.items()}
        return self

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()

    def _metric(self, key: tuple[str, str]) -> Any:
        if key not in self.metrics:
            from lightning_repsim.metrics import LinearCKA

            self.metrics[key] = LinearCKA(**self.metric_kwargs).to(self.device)
        return self.metrics[key]

    def _sketch(self, side: str, name: str, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
        key = (side, name)
        if key not in self._sketches or self._sketches[key][0].numel() != width:
            g = torch.Generator().manual_seed(self.seed + zlib.crc32(f"{side}:{name}".encode()))
            bucket = torch.randint(0, self.max_width, (width,), generator=g)
            sign = torch.randint(0, 2, (width,), generator=g).to(torch.float64) * 2 - 1
            self._sketches[key] = (bucket, sign)
        bucket, sign = self._sketches[key]
        return bucket.to(device), sign.to(device)

    def _fit_width(self, rows: Tensor, side: str, name: str) -> Tensor:
        width = rows.shape[1]
        if width <= self.max_width:
            return rows
        if self.too_wide == "refuse":
            hint = "" if self.reduce == "mean" else "layer_reduce='mean' (average over positions), "
            raise ValueError(
                f"ReferenceComparison(layers=...): the {side}'s layer `{name}` gives {width:,} features per input "
                f"(layer_reduce={self.reduce!r}), above layer_max_width={self.max_width:,} (its CKA statistic would hold "
                f"about {8 * (width + self.max_width) ** 2 / 1e9:.1f} GB). Use {hint}a larger layer_max_width, or "
                "layer_too_wide='project' (a seeded random projection to layer_max_width features; CKA then approximate)."
            )
        bucket, sign = self._sketch(side, name, width, rows.device)
        out = rows.new_zeros(rows.shape[0], self.max_width, dtype=torch.float64)
        return out.index_add_(1, bucket, rows.to(torch.float64) * sign)

    def update(self, lead: tuple[int, ...], keep: Tensor | None) -> None:
        """Feed the captured outputs of this batch (both models' forwards have run), then forget them."""
        ref_out, stu_out = self._ref_hooks.outputs, self._stu_hooks.outputs
        missing = [f"reference `{n}`" for n in self.reference_layers if n not in ref_out]
        missing += [f"student `{n}`" for n in self.student_layers if n not in stu_out]
        if missing:
            self.clear()
            raise RuntimeError(
                f"ReferenceComparison(layers=...): no output was captured for {', '.join(missing)} in this batch: the "
                "layer did not run in the model's forward (or returned no tensor)"
            )
        ref_rows = {n: self._fit_width(layer_rows(ref_out[n], lead, keep, self.reduce, n), "reference", n)
                    for n in self.reference_layers}
        stu_rows = {n: self._fit_width(layer_rows(stu_out[n], lead, keep, self.reduce, n), "student", n)
                    for n in self.student_layers}
        self.clear()
        for r, s in self.keys:
            x, y = ref_rows[r], stu_rows[s].to(ref_rows[r].device)
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"ReferenceComparison(layers=...): reference layer `{r}` gives {x.shape[0]} rows but student layer "
                    f"`{s}` {y.shape[0]} for the same batch"
                )
            if x.shape[0]:
                self._metric((r, s)).update(x, y)

    def compute(self) -> tuple[dict[str, float], dict[str, Any], dict[str, str]]:
        """``(values, info, problems)``: the logged values ``layers/<name>/<measure>``, the history entries (``layers``:
        per pair; ``layer_matrix``: the matrix) and why missing values are missing. A collective under DDP."""
        results: dict[tuple[str, str], dict[str, float]] = {}
        problems: dict[str, str] = {}
        for key in self.keys:
            metric = self.metrics.get(key)
            name = pair_name(*key)
            if metric is None:
                from lightning_repsim.metrics import LinearCKA

                metric = self._metric(key)  # never fed on this process: the others' statistics still arrive
                assert isinstance(metric, LinearCKA)
            try:
                results[key] = metric.compute_result().as_dict()
            except (ValueError, torch.linalg.LinAlgError) as err:
                problems[f"layers/{name}"] = str(err)
        values: dict[str, float] = {}
        per_layer: dict[str, dict[str, float]] = {}
        for key in self.pairs:
            name = pair_name(*key)
            res = results.get(key, {m: float("nan") for m in LAYER_MEASURES})
            per_layer[name] = dict(res)
            values.update({f"layers/{name}/{m}": v for m, v in res.items() if math.isfinite(v)})
        info: dict[str, Any] = {"layers": per_layer}
        if self.matrix_measure:
            m = self.matrix_measure
            info["layer_matrix"] = {
                "measure": m,
                "reference": list(self.reference_layers),
                "student": list(self.student_layers),
                "values": [[results.get((r, s), {}).get(m, float("nan")) for s in self.student_layers]
                           for r in self.reference_layers],
            }
        return values, info, problems

    def state_nbytes(self) -> int:
        """Bytes held by all pair statistics (independent of the number of inputs)."""
        return sum(metric.state_nbytes() for metric in self.metrics.values())
