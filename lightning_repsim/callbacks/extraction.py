"""Representation extraction: embeddings f(x), unembeddings g(y) and logits from an ``nn.Module``.

A model whose logits are produced by an ``nn.Linear`` is in the model family of SPEC §1: the
embedding is the *input* of that layer and the unembedding its weight rows, with the bias as an
extra coordinate (``g~ = [g, b]``, ``f~ = [f, 1]``). :class:`FinalLinear` finds that layer by a
probing forward pass: it hooks every ``nn.Linear``, runs the model once, and picks the last layer
whose output *is* the model's logits (same values, up to a reshape). That covers a torchvision
ResNet (``fc``), a custom MLP head and an LM's ``lm_head`` over ``(B, T, V)``, and refuses to guess
when the logits are not the output of a linear layer (then only the logits are used: d_LLV and KL).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "Extractor",
    "Representations",
    "FinalLinear",
    "LogitsOnly",
    "as_extractor",
    "default_logits_fn",
    "default_label_fn",
    "default_mask_fn",
    "is_dtensor",
    "unembedding_of",
]


@dataclass
class Representations:
    """What one forward pass of a model gives the comparison.

    Attributes:
        logits: ``(..., K)``.
        embeddings: ``(..., M)`` with the same leading dimensions as ``logits``, or None (logits only).
        unembedding: ``(K, M)`` or ``(K, M+1)`` (bias as last column), or None.
    """

    logits: Tensor
    embeddings: Tensor | None = None
    unembedding: Tensor | None = None

    @property
    def has_representations(self) -> bool:
        return self.embeddings is not None and self.unembedding is not None

    @property
    def num_labels(self) -> int:
        """K: the unembedding's rows, else the logits' last dimension."""
        return int(self.unembedding.shape[0] if self.unembedding is not None else self.logits.shape[-1])

    @property
    def leading_shape(self) -> tuple[int, ...]:
        """The leading shape of the outputs (the inputs, or (B, T) tokens)."""
        return tuple((self.logits if self.logits is not None else self.embeddings).shape[:-1])


class Extractor:
    """What the comparison asks of a model: ``extractor(model, inputs) -> Representations`` for a batch, and, to reuse
    the student's own forward instead of running it again, the layer that produces its logits.

    Subclass it (override :meth:`__call__`, and :meth:`head`/:meth:`is_located` when the logits come from an
    ``nn.Linear`` that a hook can watch), or pass any callable ``(model, inputs) -> Representations``:
    :func:`as_extractor` wraps it (no head: the student then runs its own forward for the comparison).
    """

    def __call__(self, model: nn.Module, inputs: Any) -> Representations:
        raise NotImplementedError

    def head(self, model: nn.Module) -> nn.Linear | None:
        """The ``nn.Linear`` whose input is the embedding and whose output is the logits, if known, else None."""
        return None

    def is_located(self, model: nn.Module) -> bool:
        """Whether :meth:`head` is final for ``model`` (False while a probing forward has yet to find it)."""
        return True


class _CallableExtractor(Extractor):
    """A plain ``(model, inputs) -> Representations`` function as an :class:`Extractor` (no head to watch)."""

    def __init__(self, fn: Callable[[nn.Module, Any], Representations]) -> None:
        self.fn = fn

    def __call__(self, model: nn.Module, inputs: Any) -> Representations:
        return self.fn(model, inputs)

    def __repr__(self) -> str:
        return repr(self.fn)


def as_extractor(obj: Extractor | Callable[[nn.Module, Any], Representations] | None) -> Extractor:
    """``obj`` as an :class:`Extractor`: None is :class:`FinalLinear`, a plain callable is wrapped."""
    if obj is None:
        return FinalLinear()
    if isinstance(obj, Extractor):
        return obj
    if callable(obj):
        return _CallableExtractor(obj)
    raise TypeError(f"an extractor must be an Extractor or a callable (model, inputs) -> Representations, got {obj!r}")


def default_logits_fn(output: Any) -> Tensor:
    """The logits in a model's output: the tensor itself, ``output["logits"]``, ``output.logits``
    (Hugging Face ``ModelOutput``) or the first element of a tuple/list."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"cannot find the logits in a model output of type {type(output).__name__}; pass `logits_fn` to the "
        "extractor (e.g. FinalLinear(logits_fn=lambda out: out['scores']))"
    )


def default_label_fn(batch: Any) -> Tensor | None:
    """Class labels for colouring the embedding plot: ``batch[1]`` of a tuple/list or ``batch["labels"]``/
    ``batch["y"]`` of a mapping, when it is an integer tensor; otherwise None."""
    labels = None
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        labels = batch[1]
    elif isinstance(batch, Mapping):
        labels = batch.get("labels", batch.get("y"))
    if isinstance(labels, Tensor) and not labels.is_floating_point() and not labels.is_complex():
        return labels
    return None


def default_mask_fn(batch: Any) -> Tensor | None:
    """Which positions count (LM padding): ``batch["attention_mask"]`` of a mapping, else None (all rows)."""
    if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), Tensor):
        return batch["attention_mask"]
    return None


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a mapping of keyword arguments (e.g. ``input_ids`` and ``attention_mask``), else
    ``model(inputs)`` (a module-level function, so extractors stay picklable for ``ddp_spawn``)."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed`` DTensor (a parameter sharded by FSDP2 or tensor parallelism)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def unembedding_of(linear: nn.Linear) -> Tensor:
    """``[W, b]`` (K x (M+1)) of a linear layer, or ``W`` (K x M) when it has no bias (detached). Sharded parameters
    give a sharded (DTensor) result, which :class:`~lightning_repsim.callbacks.ModelComparison` gathers once per
    comparison."""
    w = linear.weight.detach()
    if linear.bias is None:
        return w
    return torch.cat([w, linear.bias.detach()[:, None].to(w.dtype)], dim=1)


def _same_values(a: Tensor, b: Tensor) -> bool:
    if a is b:
        return True
    if a.numel() != b.numel() or a.shape[-1] != b.shape[-1]:
        return False
    return bool(torch.equal(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]).to(a.dtype)))


class FinalLinear(Extractor):
    """Default extractor: embeddings = input of the ``nn.Linear`` that produces the logits, unembedding =
    its ``[weight, bias]``.

    Args:
        module_name: the head's name in ``model.named_modules()`` (e.g. ``"fc"``, ``"lm_head"``); found by
            a probing forward pass when None.
        logits_fn: maps the model output to the logits (default :func:`default_logits_fn`).
        forward_fn: ``forward_fn(model, inputs)`` runs the model (default ``model(inputs)``).

    Calling the extractor returns :class:`Representations`. When no linear layer produces the logits,
    it warns once and returns logits only (the callback then reports d_LLV and KL).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 5))
        >>> reps = FinalLinear()(net, torch.randn(8, 4))
        >>> reps.embeddings.shape, reps.unembedding.shape, reps.logits.shape
        (torch.Size([8, 3]), torch.Size([5, 4]), torch.Size([8, 5]))
    """

    def __init__(
        self,
        module_name: str | None = None,
        logits_fn: Callable[[Any], Tensor] | None = None,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    ) -> None:
        self.module_name = module_name
        self.logits_fn = logits_fn or default_logits_fn
        self.forward_fn = forward_fn or call_model
        self._located: dict[int, str | None] = {}

    def __repr__(self) -> str:
        return f"FinalLinear(module_name={self.module_name!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_located"] = {}  # keyed by id(model): meaningless in another process
        return state

    # -- locating the head ------------------------------------------------------------------------
    def head(self, model: nn.Module) -> nn.Linear | None:
        """The head of ``model`` if already known (given or located), else None."""
        name = self.module_name if self.module_name is not None else self._located.get(id(model))
        if name is None:
            return None
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise TypeError(f"`{name}` of {type(model).__name__} is a {type(module).__name__}, not an nn.Linear")
        return module

    def is_located(self, model: nn.Module) -> bool:
        return self.module_name is not None or id(model) in self._located

    def _probe(self, model: nn.Module, inputs: Any) -> tuple[Representations, str | None]:
        calls: list[tuple[str, Tensor, Tensor]] = []
        handles = []

        def make_hook(name: str):
            def hook(module: nn.Module, args: tuple, output: Any) -> None:
                if isinstance(output, Tensor) and args and isinstance(args[0], Tensor):
                    calls.append((name, args[0], output))

            return hook

        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                handles.append(module.register_forward_hook(make_hook(name)))
        try:
            logits = self.logits_fn(self.forward_fn(model, inputs))
        finally:
            for h in handles:
                h.remove()
        for name, emb, out in reversed(calls):
            if _same_values(out, logits):
                module = model.get_submodule(name)
                return Representations(logits, emb, unembedding_of(module)), name
        return Representations(logits), None

    # -- extraction -------------------------------------------------------------------------------
    def __call__(self, model: nn.Module, inputs: Any) -> Representations:
        if not self.is_located(model):
            reps, name = self._probe(model, inputs)
            self._located[id(model)] = name
            if name is None:
                warnings.warn(
                    f"{type(model).__name__}: no nn.Linear layer produces the logits, so embeddings are not "
                    "available; only d_LLV and KL are computed. Pass a custom extractor "
                    "(FinalLinear(module_name=...) or any callable returning Representations) to get d_SVD and mCCA.",
                    UserWarning,
                    stacklevel=2,
                )
            return reps
        head = self.head(model)
        if head is None:
            return Representations(self.logits_fn(self.forward_fn(model, inputs)))
        captured: list[Tensor] = []

        def capture(module: nn.Module, args: tuple, output: Any) -> None:
            captured.append(args[0])

        handle = head.register_forward_hook(capture)
        try:
            logits = self.logits_fn(self.forward_fn(model, inputs))
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(
                f"the head `{self.module_name or self._located.get(id(model))}` of {type(model).__name__} was "
                f"called {len(captured)} times in one forward pass; pass a custom extractor"
            )
        return Representations(logits, captured[0], unembedding_of(head))


class LogitsOnly(Extractor):
    """Extractor for models without embedding access: only the logits (d_LLV and KL are computed).

    Args:
        logits_fn: maps the model output to the logits (default :func:`default_logits_fn`).
        forward_fn: ``forward_fn(model, inputs)`` (default ``model(inputs)``).
    """

    def __init__(
        self,
        logits_fn: Callable[[Any], Tensor] | None = None,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    ) -> None:
        self.logits_fn = logits_fn or default_logits_fn
        self.forward_fn = forward_fn or call_model

    def __repr__(self) -> str:
        return "LogitsOnly()"

    def head(self, model: nn.Module) -> None:
        return None

    def is_located(self, model: nn.Module) -> bool:
        return True

    def __call__(self, model: nn.Module, inputs: Any) -> Representations:
        return Representations(self.logits_fn(self.forward_fn(model, inputs)))
