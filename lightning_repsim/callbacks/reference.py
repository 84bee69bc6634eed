"""The frozen reference model: loading, freezing, fingerprinting, precision, and the inputs it is called with.

The reference is kept on the callback (never a submodule of the student, so never in its optimizer,
checkpoint or DDP wrapper). It runs at the student's precision: Lightning's precision plugin converts it
like the student (``"64-true"``, ``"bf16-true"``, ...; a converted copy, the user's module keeps its dtype) and its
forward runs inside the same precision context (autocast for ``"16-mixed"``/``"bf16-mixed"``), so two identical
models give identical outputs.
It receives the same model inputs as the student: for a mapping batch (a tokenizer's output) the keys
its ``forward`` accepts, ``attention_mask`` included.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

__all__ = [
    "EXCLUDED_INPUT_KEYS",
    "batch_size_of",
    "cast_floats",
    "check_separate",
    "load_reference",
    "model_inputs",
    "PreparedReference",
    "converts_modules",
    "prepare_reference",
    "weights_fingerprint",
]

#: Keys of a mapping batch never passed to the models by default (they make a Hugging Face model compute its loss).
EXCLUDED_INPUT_KEYS = frozenset({"labels", "label"})
#: Keys tried, in order, for the model input of a mapping batch when the model's forward takes one positional input.
_INPUT_KEYS = ("input_ids", "x", "input", "inputs", "pixel_values")


def weights_fingerprint(module: nn.Module) -> str:
    """SHA-256 of a module's ``state_dict`` (names, dtypes, shapes and raw bytes, in name order).

    Two modules have the same fingerprint iff their parameters and buffers are bit-identical. Sharded (DTensor)
    parameters are gathered one at a time, so a sharded module has the fingerprint of its unsharded weights (a
    collective: every process must call it).

    Example:
        >>> import torch
        >>> a = torch.nn.Linear(3, 2)
        >>> weights_fingerprint(a) == weights_fingerprint(a), len(weights_fingerprint(a))
        (True, 64)
    """
    from lightning_repsim.callbacks.extraction import is_dtensor

    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        if not isinstance(tensor, Tensor):
            h.update(repr(tensor).encode())
            continue
        if is_dtensor(tensor):  # a sharded reference (FSDP2): the full tensor, one at a time (every process calls this)
            tensor = tensor.full_tensor()
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FingerprintCheck:
    """The reference's weights fingerprint (taken once, before any conversion) and the one a checkpoint saved:
    resuming with other reference weights fails with a message that says what to do."""

    def __init__(self) -> None:
        self.value: str | None = None
        self.pending: str | None = None

    def take(self, reference: nn.Module) -> None:
        """Fingerprint the reference (once) and check a fingerprint loaded before it existed."""
        if self.value is None:
            self.value = weights_fingerprint(reference)
        self.check_pending()

    def expect(self, saved: str | None) -> None:
        """A checkpoint's fingerprint: checked now, or once the reference is fingerprinted."""
        if saved is not None:
            self.pending = saved
            if self.value is not None:
                self.check_pending()

    def check_pending(self) -> None:
        if self.pending is None:
            return
        if self.pending != self.value:
            raise RuntimeError(
                "ReferenceComparison: the checkpoint was written while comparing with a different reference model "
                f"(weights fingerprint {self.pending[:16]}...), but this callback's reference has fingerprint "
                f"{self.value[:16]}... . Resume with the same reference weights, or start a new "
                "run (or a callback with another `prefix`) to compare with a different reference."
            )
        self.pending = None


def load_reference(
    source: nn.Module | str | os.PathLike, student: pl.LightningModule, load_kwargs: Mapping[str, Any]
) -> nn.Module:
    """The reference module: ``source`` itself, or the checkpoint at that path loaded with the student's class."""
    if isinstance(source, nn.Module):
        return source
    kwargs = {"map_location": "cpu", **load_kwargs}
    return type(student).load_from_checkpoint(os.fspath(source), **kwargs)


def check_separate(reference: nn.Module, student: nn.Module) -> None:
    """Refuse a reference that is the student or shares parameters with it (freezing it would freeze the student)."""
    if reference is student:
        raise ValueError("ReferenceComparison: the reference is the student itself; pass a separate (copied) model")
    student_params = {id(p) for p in student.parameters()}
    shared = [n for n, p in reference.named_parameters() if id(p) in student_params]
    if shared:
        raise ValueError(
            f"ReferenceComparison: the reference shares {len(shared)} parameter(s) with the student (e.g. "
            f"{shared[:3]}); freezing it would freeze the student. Pass a deep copy (copy.deepcopy(model))."
        )


def converts_modules(trainer: pl.Trainer | None) -> bool:
    """Whether the trainer's precision plugin converts modules (``"64-true"``, ``"bf16-true"``, ``"16-true"``,
    quantisation...): it overrides ``Precision.convert_module``; the mixed-precision plugins run in autocast instead."""
    from lightning.pytorch.plugins.precision import Precision

    plugin = None if trainer is None else trainer.precision_plugin
    return plugin is not None and type(plugin).convert_module is not Precision.convert_module


class PreparedReference:
    """The reference as one run needs it -- frozen, at the student's precision, on its device -- made from the user's
    module, which is never converted in place.

    A precision plugin that converts modules (``"bf16-true"``, ``"64-true"``) converts a *copy* (made once per
    precision setting and kept): the user's object keeps its dtype, so reusing it in a later run at another precision
    compares the model it is (an fp32 copy of the student after a ``"bf16-true"`` run still gives KL = d_LLV = 0 in a
    ``"32-true"`` run). The cost is the converted copy's memory besides the user's module (half of it for bf16). With
    any other plugin the user's module itself is moved to the device, as ``model.to(device)`` would.
    """

    def __init__(self, module: nn.Module) -> None:
        self.original = module
        self._copy: nn.Module | None = None
        self._copy_key: tuple | None = None

    def prepare(self, trainer: pl.Trainer | None, device: torch.device) -> nn.Module:
        """The module to run: frozen, converted by the trainer's precision plugin, on ``device``."""
        original = self.original.eval().requires_grad_(False)
        if not converts_modules(trainer):
            return original.to(device)
        plugin = trainer.precision_plugin  # type: ignore[union-attr]
        key = (type(plugin), getattr(plugin, "precision", None))
        if self._copy is None or self._copy_key != key:
            self._copy = None  # the previous copy is released before the next is made
            self._copy = plugin.convert_module(copy.deepcopy(original)).eval().requires_grad_(False)
            self._copy_key = key
        return self._copy.to(device)


def prepare_reference(reference: nn.Module, trainer: pl.Trainer | None, device: torch.device) -> nn.Module:
    """Frozen (``eval()``, no gradients), converted like the student by the trainer's precision plugin (a converted
    copy: ``reference`` keeps its dtype), on ``device`` (see :class:`PreparedReference`, which keeps the copy)."""
    return PreparedReference(reference).prepare(trainer, device)


def cast_floats(data: Any, dtype: torch.dtype) -> Any:
    """Floating-point tensors in ``data`` cast to ``dtype`` (integer ones, e.g. token ids and masks, untouched)."""
    return apply_to_collection(data, Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t)


def _accepted_keys(model: nn.Module) -> set[str] | None:
    """Parameter names of ``model.forward`` (None when it takes ``**kwargs``: any key)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return {name for name, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def model_inputs(batch: Any, model: nn.Module, input_fn: Callable[[Any], Any] | None = None) -> Any:
    """What ``model`` is called with for ``batch``: ``input_fn(batch)`` when given; else, for a mapping batch, the
    keys ``model.forward`` accepts (all when it takes ``**kwargs``) except ``labels`` -- a dict, passed as keyword
    arguments, so an ``attention_mask`` reaches the model --, or the first of ``input_ids``/``x``/``input``/...
    when only one would be passed positionally; ``batch[0]`` of a tuple or list; the batch itself otherwise."""
    if input_fn is not None:
        return input_fn(batch)
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, Mapping):
        accepted = _accepted_keys(model)
        inputs = {k: v for k, v in batch.items() if k not in EXCLUDED_INPUT_KEYS and (accepted is None or k in accepted)}
        if inputs:
            return inputs
        for key in _INPUT_KEYS:
            if key in batch:
                return batch[key]
        raise KeyError(
            f"cannot find the model input in a batch with keys {sorted(batch)} for {type(model).__name__}.forward; "
            "pass `input_fn` (e.g. input_fn=lambda batch: {'input_ids': batch['ids']})"
        )
    return batch


def move_inputs(inputs: Any, model: nn.Module) -> Any:
    """Inputs on the model's device, floating-point ones in its parameters' dtype."""
    param = next(iter(model.parameters()), None)
    if param is None:
        return inputs
    return cast_floats(move_data_to_device(inputs, param.device), param.dtype)


def batch_size_of(inputs: Any) -> int:
    """Leading size of the first tensor in a model input."""
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0])
    found: list[int] = []
    apply_to_collection(inputs, Tensor, lambda t: found.append(int(t.shape[0])) if t.ndim else None)
    if not found:
        raise TypeError("cannot find the batch size of the model input (no tensor in it); pass `input_fn`")
    return found[0]
