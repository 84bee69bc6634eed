"""The options of a comparison, defined and validated once: :class:`ComparisonConfig` (what to feed, how to read the
models, which metrics, how to log) and :class:`LayerOptions` (the layer-wise CKA family).

:class:`~lightning_repsim.callbacks.ReferenceComparison` and :class:`~lightning_repsim.callbacks.ModelComparison`
take ``config=ComparisonConfig(...)`` or the same fields as keyword arguments (``ReferenceComparison(teacher,
prefix="val_repsim", layers=["body.1"])``); an unknown keyword is an error naming the accepted ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torch import Tensor

from lightning_repsim.callbacks.extraction import Extractor, as_extractor, default_label_fn, default_mask_fn
from lightning_repsim.functional.inputs import check_positive_int

__all__ = ["ComparisonConfig", "LayerOptions", "METRIC_KEYS", "split_config"]

#: Keys of the logged values (``ComparisonReport.as_dict()`` order).
METRIC_KEYS = (
    "kl",
    "d_logit",
    "d_llv",
    "llv_t1",
    "llv_t2",
    "llv_t3",
    "llv_t4",
    "d_svd",
    "d_svd_f",
    "d_svd_g",
    "mcca",
    "bound_paper",
    "bound_sharp",
)
_DEFAULT_PROG_BAR = ("kl", "d_llv", "d_svd")


@dataclass(frozen=True)
class LayerOptions:
    """Layer-wise comparison (linear CKA, debiased CKA, Procrustes) of named layers, from forward hooks.

    Attributes:
        names: module names present in both models (``"body.1"``), or ``(reference_name, student_name)`` pairs.
        matrix: also compare every listed reference layer with every listed student layer (True: ``"cka"``, or a
            measure's name); the matrix goes to the history and, with a ``WandbLogger``, to a heatmap and a table.
        reduce: ``"flatten"`` (default) or ``"mean"``: per-example outputs ``(B, C, H, W)`` give ``C*H*W``
            features, or ``C`` after averaging over positions.
        max_width: the most features per input a layer may give (each pair holds ``(d_p + d_q + 2)^2`` numbers).
        too_wide: ``"refuse"`` a wider layer with a clear error, or ``"project"`` it to ``max_width`` features with
            a seeded CountSketch (CKA then approximate).
    """

    names: Sequence[str | tuple[str, str]] = ()
    matrix: bool | str = False
    reduce: str = "flatten"
    max_width: int = 2048
    too_wide: str = "refuse"

    def __post_init__(self) -> None:  # the values are checked by LayerComparison, which uses them
        if self.matrix and not self.names:
            raise ValueError("`layer_matrix` needs `layers`: the layers to compare")

    @property
    def enabled(self) -> bool:
        return bool(self.names)


@dataclass(frozen=True)
class ComparisonConfig:
    """Everything a comparison of a student with a reference can be told, besides the reference and when to compare.

    Attributes:
        dataloader_idx: which validation dataloader the callback compares on (its own ``dataloader=`` aside).
        prefix: logged keys are ``f"{prefix}/{key}"``.
        prog_bar: show ``kl``, ``d_llv``, ``d_svd`` in the progress bar (True), none (False) or the listed keys.
        input_fn: ``batch -> model input`` for both models (a dict is passed as keyword arguments). Default:
            ``batch[0]`` of a tuple; for a mapping batch (a tokenizer's output) the keys each model's ``forward``
            accepts, except ``labels``.
        label_fn: ``batch -> class labels`` for colouring the embedding plot (default ``batch[1]``).
        mask_fn: ``batch -> mask`` (bool or 0/1) over the leading dimensions of the logits (default
            ``batch["attention_mask"]`` of a mapping, else all rows).
        reference_extractor, student_extractor: an :class:`~lightning_repsim.callbacks.Extractor` (default
            :class:`~lightning_repsim.callbacks.FinalLinear`) or any ``(model, inputs) -> Representations``.
        reuse_student_outputs: reuse the student's own validation forward (its returned ``{"embeddings": ...}`` or
            the call of its head captured by a hook) instead of running it again; checked against the student's own
            forward on the first batch of every comparison.
        rep_dim: the representation dimension M (default: ``max(r_p, r_q)`` of the embeddings, ``K - 1`` from
            logits only).
        metric_kwargs: passed to the streaming metrics (the d_LLV options of
            :class:`~lightning_repsim.functional.LLVOptions`, ``buffer_size``, ``max_label_subsets``,
            ``nan_strategy`` (``"ignore"`` by default here: non-finite outputs are skipped and counted), ...).
        log_media: with a ``WandbLogger``: log the table, the line plots and the embedding image.
        plot_max_points: at most this many points (of process 0) in the embedding image.
        reference_load_kwargs: keyword arguments of ``load_from_checkpoint`` for a path ``reference``.
        layers: :class:`LayerOptions`, or a sequence of layer names (shorthand for ``LayerOptions(names)``).
    """

    dataloader_idx: int = 0
    prefix: str = "repsim"
    prog_bar: bool | Sequence[str] = False
    input_fn: Callable[[Any], Any] | None = None
    label_fn: Callable[[Any], Tensor | None] = default_label_fn
    mask_fn: Callable[[Any], Tensor | None] = default_mask_fn
    reference_extractor: Extractor | Callable | None = None
    student_extractor: Extractor | Callable | None = None
    reuse_student_outputs: bool = True
    rep_dim: int | None = None
    metric_kwargs: Mapping[str, Any] = field(default_factory=dict)
    log_media: bool = True
    plot_max_points: int = 2000
    reference_load_kwargs: Mapping[str, Any] = field(default_factory=dict)
    layers: LayerOptions = field(default_factory=LayerOptions)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if isinstance(self.dataloader_idx, bool) or not isinstance(self.dataloader_idx, int) or self.dataloader_idx < 0:
            raise ValueError(f"`dataloader_idx` must be an int >= 0, got {self.dataloader_idx!r}")
        set_(self, "prefix", str(self.prefix).rstrip("/"))
        if self.prog_bar is True:
            set_(self, "prog_bar", _DEFAULT_PROG_BAR)
        elif self.prog_bar is False:
            set_(self, "prog_bar", ())
        else:
            keys = tuple(self.prog_bar)
            unknown = set(keys) - set(METRIC_KEYS)
            if unknown:
                raise ValueError(f"`prog_bar` keys must be among {METRIC_KEYS}, got unknown {sorted(unknown)}")
            set_(self, "prog_bar", keys)
        if self.rep_dim is not None and (isinstance(self.rep_dim, bool) or not isinstance(self.rep_dim, int) or self.rep_dim < 1):
            raise ValueError(f"`rep_dim` must be a positive int or None, got {self.rep_dim!r}")
        set_(self, "label_fn", self.label_fn or default_label_fn)
        set_(self, "mask_fn", self.mask_fn or default_mask_fn)
        set_(self, "reference_extractor", as_extractor(self.reference_extractor))
        set_(self, "student_extractor", as_extractor(self.student_extractor))
        set_(self, "reuse_student_outputs", bool(self.reuse_student_outputs))
        set_(self, "metric_kwargs", {"nan_strategy": "ignore", **dict(self.metric_kwargs or {})})
        set_(self, "reference_load_kwargs", dict(self.reference_load_kwargs or {}))
        set_(self, "log_media", bool(self.log_media))
        check_positive_int(int(self.plot_max_points), "plot_max_points")
        if self.layers is None:
            set_(self, "layers", LayerOptions())
        elif not isinstance(self.layers, LayerOptions):
            set_(self, "layers", LayerOptions(names=self.layers))

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly description (the callback's ``state_dict`` stores it; a resume compares it)."""
        plain = (int, float, str, bool, type(None))
        out: dict[str, Any] = {
            "prefix": self.prefix, "dataloader_idx": self.dataloader_idx,
            "reuse_student_outputs": self.reuse_student_outputs, "rep_dim": self.rep_dim,
            "metric_kwargs": {k: (v if isinstance(v, plain) else repr(v)) for k, v in self.metric_kwargs.items()},
            "reference_extractor": repr(self.reference_extractor), "student_extractor": repr(self.student_extractor),
        }
        layers = asdict(self.layers)
        out["layers"] = [list(n) if isinstance(n, (tuple, list)) else n for n in layers["names"]]
        out["layer_matrix"] = self.layers.matrix
        return out


#: Keyword names accepted for the layer options besides ``layers`` itself (the flat spelling of earlier versions).
_LAYER_KEYWORDS = {"layer_matrix": "matrix", "layer_reduce": "reduce", "layer_max_width": "max_width",
                   "layer_too_wide": "too_wide"}


def split_config(config: ComparisonConfig | None, options: Mapping[str, Any]) -> ComparisonConfig:
    """The :class:`ComparisonConfig` of ``config`` or of keyword ``options`` (its field names, and the layer options
    as ``layer_matrix``, ``layer_reduce``, ``layer_max_width``, ``layer_too_wide``), never both."""
    if config is not None:
        if options:
            raise ValueError(f"pass either `config` or keyword options, not both (got {sorted(options)})")
        if not isinstance(config, ComparisonConfig):
            raise TypeError(f"`config` must be a ComparisonConfig, got {type(config).__name__}")
        return config
    names = {f.name for f in fields(ComparisonConfig)}
    unknown = sorted(set(options) - names - set(_LAYER_KEYWORDS))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; accepted: {sorted(names | set(_LAYER_KEYWORDS))}")
    kwargs = {k: v for k, v in options.items() if k in names}
    layer_kwargs = {_LAYER_KEYWORDS[k]: v for k, v in options.items() if k in _LAYER_KEYWORDS}
    layers = kwargs.get("layers")
    if layer_kwargs or (layers is not None and not isinstance(layers, LayerOptions)):
        if isinstance(layers, LayerOptions):
            raise ValueError("pass the layer options inside `layers=LayerOptions(...)` or as keywords, not both")
        kwargs["layers"] = LayerOptions(names=() if layers is None else layers, **layer_kwargs)
    return ComparisonConfig(**kwargs)
