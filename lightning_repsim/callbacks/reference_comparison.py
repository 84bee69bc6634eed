"""``ReferenceComparison``: compare the model in training with a frozen reference on every validation epoch.

Direction: ``p`` is the **reference** (model 1), ``q`` the **student** (model 2); the KL is
``KL(reference || student)``, the distillation reading. The concerns live in their own modules:
:mod:`.reference` (loading, freezing, precision, inputs), :mod:`.positions` (global sample ids, DDP padding),
:mod:`.capture` (reusing the student's forward), :mod:`.metric_suite` (feeding the metrics), :mod:`.layers`
(layer-wise CKA from forward hooks), :mod:`.media` (the pictures and wandb media).
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_repsim.callbacks.capture import HeadCapture, reused_representations
from lightning_repsim.callbacks.extraction import FinalLinear, Representations, default_label_fn, default_mask_fn
from lightning_repsim.callbacks.layers import LayerComparison, parse_layers
from lightning_repsim.callbacks.media import EmbeddingPoints, log_wandb_layer_matrix, log_wandb_media
from lightning_repsim.callbacks.metric_suite import METRIC_KEYS, MetricSuite
from lightning_repsim.callbacks.positions import SamplePositions, rows_and_ids
from lightning_repsim.callbacks.reference import (
    batch_size_of,
    check_separate,
    load_reference,
    model_inputs,
    move_inputs,
    prepare_reference,
    weights_fingerprint,
)
from lightning_repsim.functional.svd import DiversityWarning

__all__ = ["ReferenceComparison", "weights_fingerprint", "METRIC_KEYS"]

_STATE_VERSION = 1
_DEFAULT_PROG_BAR = ("kl", "d_llv", "d_svd")


class ReferenceComparison(Callback):
    """Compare the model in training (the *student*) with a frozen *reference* model each validation epoch.

    KL says whether the two models *predict* alike; d_LLV, d_SVD and mCCA say whether they *represent*
    alike (Nielsen et al., NeurIPS 2025). Everything is accumulated with the streaming metrics of
    :mod:`lightning_repsim.metrics` (exact for any batch size, synced across DDP processes) and logged
    with ``pl_module.log`` under ``prefix`` (epoch level). With a ``WandbLogger`` the callback also
    logs a table of all epochs, line plots and, when M = 2, a picture of both models' embeddings.

    Direction: ``p`` = the reference (model 1), ``q`` = the student (model 2); ``kl`` is
    ``mean_x KL(reference(.|x) || student(.|x))``.

    Args:
        reference: an ``nn.Module`` / ``LightningModule``, or a checkpoint path loaded with the
            student's class (``type(student).load_from_checkpoint(path, **reference_load_kwargs)``).
            It is frozen (``eval()``, ``requires_grad_(False)``), kept on the callback (never a
            submodule of the student, so never in its optimizer, checkpoint or DDP wrapper), moved to the
            student's device and converted by the trainer's precision plugin like the student (e.g. to
            float64 under ``"64-true"``); its forward runs in the student's precision context (autocast under
            ``"bf16-mixed"``), so identical models compare as identical. Its weights are not saved, only a
            fingerprint (SHA-256, taken before any conversion) that resuming checks.
        every_n_epochs: compare on validation runs of epochs ``e`` with ``(e + 1) % every_n_epochs == 0``
            (Lightning's ``check_val_every_n_epoch`` convention). ``trainer.validate()`` always compares.
            The sanity check never does (it only checks that both models' outputs can be compared).
        dataloader: compare on this dataloader (iterated at the end of the validation epoch; under DDP
            each process takes every ``world_size``-th batch) instead of the validation batches.
        dataloader_idx: which validation dataloader to use when ``dataloader`` is None.
        prefix: logged keys are ``f"{prefix}/{key}"``.
        prog_bar: show ``kl``, ``d_llv``, ``d_svd`` in the progress bar (True), none (False) or the
            listed keys.
        input_fn: ``batch -> model input`` for both models (a dict is passed as keyword arguments). Default:
            ``batch[0]`` of a tuple; for a mapping batch (a tokenizer's output) the keys each model's ``forward``
            accepts, except ``labels`` (so the ``attention_mask`` reaches both models).
        label_fn: ``batch -> class labels`` for colouring the embedding plot (default ``batch[1]``).
        mask_fn: ``batch -> mask`` (bool or 0/1) over the leading dimensions of the logits (e.g. ``(B, T)``
            padding mask of an LM; default ``batch["attention_mask"]`` of a mapping, else all rows).
        reference_extractor, student_extractor: ``(model, inputs) -> Representations``. Default
            :class:`FinalLinear` (embedding = input of the ``nn.Linear`` that produces the logits,
            unembedding = its weight rows with the bias as last column). Use
            :class:`~lightning_repsim.callbacks.LogitsOnly` for models without embedding access (then
            only d_LLV and KL are reported) or any callable returning ``Representations``.
        reuse_student_outputs: avoid a second student forward when possible: use ``"embeddings"`` (and
            ``"logits"``) of a dict returned by ``validation_step``, or the input and output of the student's
            head captured by a forward hook while ``validation_step`` ran (accepted only when the head ran
            exactly once with the batch's shape). Otherwise (or when False) the student is run under
            ``no_grad`` in eval mode on the batch.
        rep_dim: the representation dimension M (input sets of M + 1 inputs, d_SVD's label subsets of M labels).
            Default: with embeddings, the larger rank of the two models' embeddings, ``max(r_p, r_q)``, whatever
            their widths (a smaller student compares at the teacher's dimension, see ``docs/smaller_student.md``);
            from logits only, ``K - 1``. The M used and why are in ``history[i]["rep_dim"]`` /
            ``["rep_dim_reason"]`` and in one log line per fit.
        metric_kwargs: passed to the streaming metrics (the d_LLV options ``lam``, ``reduce``, ``combine``,
            ``num_input_sets``, ``seed``, ... of :class:`~lightning_repsim.functional.LLVOptions`, and
            ``nan_strategy``: by default ``"ignore"`` here, so rows with non-finite outputs (a diverging
            student) are skipped, counted in ``history[i]["num_dropped"]`` and warned about, and values that
            cannot be computed are skipped with a warning instead of stopping the fit).
        log_media: with a ``WandbLogger``: log the table, the line plots and the embedding image.
        plot_max_points: at most this many points (of process 0) in the embedding image.
        reference_load_kwargs: keyword arguments of ``load_from_checkpoint`` for a path ``reference``.
        layers: compare these layers too: module names present in both models (``"body.1"``; names as in
            ``named_modules()`` of the reference and of the LightningModule), or ``(reference_name, student_name)``
            pairs. Their outputs are captured by forward hooks during the forward passes the comparison runs anyway
            (no extra pass) and compared with linear CKA, debiased CKA and the Procrustes distance, exact over the
            epoch, logged as ``f"{prefix}/layers/{name}/{measure}"`` (``name`` is ``ref~student`` for a pair of
            different names). How outputs become rows (tokens masked like the logits; ``(B, C, H, W)`` flattened or
            pooled): :mod:`lightning_repsim.callbacks.layers`.
        layer_matrix: also compare every listed reference layer with every listed student layer: the matrix (of
            ``"cka"`` for True, or of the named measure) goes to ``history[i]["layer_matrix"]`` and, with a
            ``WandbLogger``, to a heatmap image ``f"{prefix}/layers/{measure}_matrix"`` and a table.
        layer_reduce: ``"flatten"`` (default) or ``"mean"``: per-example outputs (a conv map ``(B, C, H, W)``) give
            ``C*H*W`` features, or ``C`` after averaging over positions.
        layer_max_width: the most features per input a layer may give (each pair of layers holds
            ``(d_p + d_q + 2)^2`` float64 numbers: 134 MB at 2 x 2,048).
        layer_too_wide: ``"refuse"`` (default) a wider layer with a clear error, or ``"project"`` it to
            ``layer_max_width`` features with a seeded CountSketch (CKA then approximate).

    Attributes:
        history: one dict per comparison: ``epoch``, ``global_step``, ``stage`` (``"fit"``/``"validate"``),
            ``num_inputs`` (the inputs the values were computed on, over all processes), ``num_dropped``
            (inputs skipped for non-finite outputs), every key of :data:`METRIC_KEYS` (``nan`` when undefined),
            the chosen sets ``label_pivot``, ``leave_out``, ``input_set``, the representation dimension ``rep_dim``
            and ``rep_dim_reason`` (why that M), ``mode`` (``"representations"`` or ``"logits"``), the embeddings'
            ``widths`` and ``embedding_rank`` (reference, student) when both have embeddings, and ``state_bytes``
            (the metrics' statistics while the epoch was accumulated).
        last_embeddings: ``(reference, student, labels)`` plotted last (M = 2 only), or None.
        last_results: the metrics' full results of the last comparison (``"kl"``; ``"svd"``, an
            ``SVDDissimilarityResult`` whose ``.llv`` is the ``LLVResult``, or ``"llv"``; ``"cca"``: their
            ``compute_result()``). Not saved in checkpoints.
        stats: counters: student forwards reused / run by the callback, padded duplicate rows dropped.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_repsim.callbacks import ReferenceComparison
        >>> # trainer = pl.Trainer(callbacks=[ReferenceComparison(teacher)], logger=WandbLogger())
        >>> # trainer.fit(student, datamodule=dm); then: callback.history[-1]["d_llv"]
    """

    def __init__(
        self,
        reference: nn.Module | str | os.PathLike,
        every_n_epochs: int = 1,
        dataloader: Iterable | None = None,
        dataloader_idx: int = 0,
        prefix: str = "repsim",
        prog_bar: bool | Sequence[str] = False,
        input_fn: Callable[[Any], Any] | None = None,
        label_fn: Callable[[Any], Tensor | None] | None = None,
        mask_fn: Callable[[Any], Tensor | None] | None = None,
        reference_extractor: Callable[[nn.Module, Any], Representations] | None = None,
        student_extractor: Callable[[nn.Module, Any], Representations] | None = None,
        reuse_student_outputs: bool = True,
        rep_dim: int | None = None,
        metric_kwargs: Mapping[str, Any] | None = None,
        log_media: bool = True,
        plot_max_points: int = 2000,
        reference_load_kwargs: Mapping[str, Any] | None = None,
        layers: Sequence[str | tuple[str, str]] | None = None,
        layer_matrix: bool | str = False,
        layer_reduce: str = "flatten",
        layer_max_width: int = 2048,
        layer_too_wide: str = "refuse",
    ) -> None:
        super().__init__()
        if not isinstance(reference, (nn.Module, str, os.PathLike)):
            raise TypeError(f"`reference` must be an nn.Module or a checkpoint path, got {type(reference).__name__}")
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"`every_n_epochs` must be a positive int, got {every_n_epochs!r}")
        if rep_dim is not None and (isinstance(rep_dim, bool) or not isinstance(rep_dim, int) or rep_dim < 1):
            raise ValueError(f"`rep_dim` must be a positive int or None, got {rep_dim!r}")
        self._reference_source = reference
        self.reference: nn.Module | None = reference if isinstance(reference, nn.Module) else None
        self.every_n_epochs = every_n_epochs
        self.dataloader = dataloader
        self.dataloader_idx = int(dataloader_idx)
        self.prefix = prefix.rstrip("/")
        if prog_bar is True:
            self.prog_bar_keys: tuple[str, ...] = _DEFAULT_PROG_BAR
        elif prog_bar is False:
            self.prog_bar_keys = ()
        else:
            self.prog_bar_keys = tuple(prog_bar)
            unknown = set(self.prog_bar_keys) - set(METRIC_KEYS)
            if unknown:
                raise ValueError(f"`prog_bar` keys must be among {METRIC_KEYS}, got unknown {sorted(unknown)}")
        self.input_fn = input_fn
        self.label_fn = label_fn or default_label_fn
        self.mask_fn = mask_fn or default_mask_fn
        self.reference_extractor = reference_extractor or FinalLinear()
        self.student_extractor = student_extractor or FinalLinear()
        self.reuse_student_outputs = bool(reuse_student_outputs)
        self.rep_dim = rep_dim
        self.metric_kwargs = {"nan_strategy": "ignore", **dict(metric_kwargs or {})}
        MetricSuite(rep_dim=rep_dim, **self.metric_kwargs)  # unknown keys fail here, not at the first validation
        self.log_media = bool(log_media)
        self.reference_load_kwargs = dict(reference_load_kwargs or {})
        self._layers: LayerComparison | None = None
        if layers is not None and len(parse_layers(layers)):
            layer_kwargs = {k: v for k, v in self.metric_kwargs.items() if k in ("nan_strategy", "memory_budget_gb")}
            self._layers = LayerComparison(layers, matrix=layer_matrix, reduce=layer_reduce, max_width=layer_max_width,
                                           too_wide=layer_too_wide, metric_kwargs=layer_kwargs)
        elif layer_matrix:
            raise ValueError("`layer_matrix` needs `layers`: the layers to compare")

        self.history: list[dict[str, Any]] = []
        self.last_results: dict[str, Any] = {}
        self.reference_fingerprint: str | None = None
        self._pending_fingerprint: str | None = None
        self._suite: MetricSuite | None = None
        self._active = False
        self._checked = False
        self._warned: set[str] = set()
        self._capture = HeadCapture()
        self._positions = SamplePositions()
        self._points = EmbeddingPoints(int(plot_max_points))
        self.stats = {"reused_student_forward": 0, "own_student_forward": 0, "padded_rows_dropped": 0}

    @property
    def last_embeddings(self) -> tuple[Tensor, Tensor, Tensor | None] | None:
        return self._points.last

    # ------------------------------------------------------------------------------------------
    # identity, config, state
    # ------------------------------------------------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    def config(self) -> dict[str, Any]:
        """The JSON-friendly configuration stored in the callback's ``state_dict``."""
        return {
            "prefix": self.prefix,
            "every_n_epochs": self.every_n_epochs,
            "dataloader_idx": self.dataloader_idx,
            "custom_dataloader": self.dataloader is not None,
            "reuse_student_outputs": self.reuse_student_outputs,
            "rep_dim": self.rep_dim,
            "metric_kwargs": {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v))
                              for k, v in self.metric_kwargs.items()},
            "layers": [list(p) for p in self._layers.pairs] if self._layers else [],
            "layer_matrix": self._layers.matrix_measure if self._layers else None,
            "reference_extractor": repr(self.reference_extractor),
            "student_extractor": repr(self.student_extractor),
            "reference": str(self._reference_source) if not isinstance(self._reference_source, nn.Module)
            else type(self._reference_source).__name__,
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        """History, configuration and the reference's fingerprint (never its weights)."""
        return {
            "version": _STATE_VERSION,
            "config": self.config(),
            "history": copy.deepcopy(self.history),
            "reference_fingerprint": self.reference_fingerprint,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the saved history; the reference's fingerprint is checked once the reference is loaded."""
        saved = state_dict.get("reference_fingerprint")
        if saved is not None:
            if self.reference_fingerprint is None:
                self._pending_fingerprint = saved
            else:
                self._check_fingerprint(saved)
        old = state_dict.get("config", {})
        mine = self.config()
        changed = sorted(k for k in ("every_n_epochs", "metric_kwargs", "rep_dim", "layers") if k in old and old[k] != mine[k])
        if changed:
            rank_zero_warn(
                f"ReferenceComparison: resuming with a different configuration ({', '.join(changed)}); "
                "the history mixes both settings."
            )
        self.history = copy.deepcopy(list(state_dict.get("history", [])))

    def _check_fingerprint(self, saved: str) -> None:
        if saved != self.reference_fingerprint:
            raise RuntimeError(
                "ReferenceComparison: the checkpoint was written while comparing with a different reference model "
                f"(weights fingerprint {saved[:16]}...), but this callback's reference has fingerprint "
                f"{self.reference_fingerprint[:16]}... . Resume with the same reference weights, or start a new "
                "run (or a callback with another `prefix`) to compare with a different reference."
            )
        self._pending_fingerprint = None

    # ------------------------------------------------------------------------------------------
    # the reference
    # ------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Load the reference (from a checkpoint path if given one), check it is separate, fingerprint it."""
        if self.reference is None:
            self.reference = load_reference(self._reference_source, pl_module, self.reference_load_kwargs)
        check_separate(self.reference, pl_module)
        self.reference.eval()
        self.reference.requires_grad_(False)
        if self.reference_fingerprint is None:
            self.reference_fingerprint = weights_fingerprint(self.reference)
        if self._pending_fingerprint is not None:
            self._check_fingerprint(self._pending_fingerprint)

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending_fingerprint is not None:
            self._check_fingerprint(self._pending_fingerprint)
        assert self.reference is not None
        self.reference = prepare_reference(self.reference, trainer, pl_module.device)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Move the reference to the student's device and precision; warnings are given once per fit."""
        self._warned.clear()
        self._prepare(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Move the reference to the student's device and precision (``trainer.validate`` has no fit start)."""
        self._prepare(trainer, pl_module)

    # ------------------------------------------------------------------------------------------
    # when to compare
    # ------------------------------------------------------------------------------------------
    def _should_compare(self, trainer: pl.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.state.fn == TrainerFn.VALIDATING:
            return True
        if trainer.state.fn == TrainerFn.FITTING:
            return (trainer.current_epoch + 1) % self.every_n_epochs == 0
        return False

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Decide whether this validation compares; reset the metrics, positions and the head capture."""
        self._active = self._should_compare(trainer)
        if not self._active:
            return
        self.reference.eval()  # type: ignore[union-attr]
        if self._suite is None:
            self._suite = MetricSuite(rep_dim=self.rep_dim, **self.metric_kwargs)
        self._suite.reset()
        self._suite.to(pl_module.device)
        self._points.start()
        self._positions.reset()
        if self.dataloader is None:
            warning = self._positions.configure(trainer, self.dataloader_idx)
            if warning:
                self._warn_once("no-distributed-sampler", warning)
        self._install_capture(pl_module)
        if self._layers is not None:
            self._layers.reset()
            self._layers.to(pl_module.device)
            self._layers.install(self.reference, pl_module)  # type: ignore[arg-type]

    def _install_capture(self, pl_module: pl.LightningModule) -> None:
        self._capture.remove()
        if not self.reuse_student_outputs or self.dataloader is not None:
            return
        _, head = self._student_head(pl_module)
        if head is not None:
            self._capture.install(head)

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Forget the head calls of the previous batch; if the student's head is not located yet, locate it now
        (one probing forward), so that this batch's own validation forward is already captured and reused: every
        compared batch then takes the same path, whether or not a sanity check ran before."""
        self._capture.clear()
        if (self._active and self.reuse_student_outputs and self.dataloader is None and dataloader_idx == self.dataloader_idx
                and not self._capture.installed and not self._student_head(pl_module)[0]):
            with self._isolated_rng(pl_module.device), torch.no_grad(), trainer.precision_plugin.val_step_context():
                self.stats["own_student_forward"] += 1
                self.student_extractor(pl_module, move_inputs(model_inputs(batch, pl_module, self.input_fn), pl_module))
            self._install_capture(pl_module)
        if self._layers is not None:
            self._layers.clear()  # outputs of the probe (or of a previous batch) are not this batch's

    @override
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Feed the batch to the metrics (or, in the sanity check, check once that both models can be compared)."""
        if dataloader_idx == self.dataloader_idx and not self._checked and trainer.sanity_checking and self.dataloader is None:
            self._check_outputs(trainer, pl_module, batch)
        if self._active and self.dataloader is None and dataloader_idx == self.dataloader_idx:
            self._process_batch(trainer, pl_module, batch, outputs, reuse=True)
        self._capture.clear()

    # ------------------------------------------------------------------------------------------
    # per batch
    # ------------------------------------------------------------------------------------------
    @contextmanager
    def _isolated_rng(self, device: torch.device):
        """The callback must not change the training's random stream (same gradients with and without it)."""
        devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            yield

    def _representations(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, outputs: Any,
                         reuse: bool) -> tuple[Representations, Representations]:
        with self._isolated_rng(pl_module.device), torch.no_grad(), trainer.precision_plugin.val_step_context():
            ref = self.reference
            ref_reps = self.reference_extractor(ref, move_inputs(model_inputs(batch, ref, self.input_fn), ref))
            stu_reps = self._student_reps(pl_module, batch, outputs, ref_reps.leading_shape, reuse)
        return ref_reps, stu_reps

    def _check_outputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """Run both models on one sanity-check batch: different label sets fail here, before any training."""
        self._checked = True
        ref_reps, stu_reps = self._representations(trainer, pl_module, batch, None, reuse=False)
        MetricSuite.check_compatible(ref_reps, stu_reps)

    def _process_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, outputs: Any, reuse: bool,
                       positions: Tensor | None = None) -> None:
        ref_reps, stu_reps = self._representations(trainer, pl_module, batch, outputs, reuse)
        self._checked = True
        lead, lead_s = ref_reps.leading_shape, stu_reps.leading_shape
        if lead != lead_s:
            raise ValueError(f"reference and student outputs have different leading shapes {lead} and {lead_s}")
        if not lead:
            raise ValueError("the logits must have a batch dimension, got a single vector")
        if positions is None:
            positions = self._positions.next(lead[0])
        keep, ids, padded = rows_and_ids(self.mask_fn(batch), lead, positions, self._positions.length)
        self.stats["padded_rows_dropped"] += padded
        assert self._suite is not None
        added = self._suite.update(ref_reps, stu_reps, keep, ids)
        if self._layers is not None:
            self._layers.update(lead, keep)
        if self.log_media and added:
            self._points.add(ref_reps, stu_reps, self.label_fn(batch), keep, lead)

    def _student_head(self, pl_module: pl.LightningModule) -> tuple[bool, nn.Linear | None]:
        """(whether the student's head is known, the head or None for a logits-only student)."""
        extractor = self.student_extractor
        is_located = getattr(extractor, "is_located", None)
        head_of = getattr(extractor, "head", None)
        if is_located is None or head_of is None or not is_located(pl_module):
            return False, None
        return True, head_of(pl_module)

    def _student_reps(self, pl_module: pl.LightningModule, batch: Any, outputs: Any, lead: tuple[int, ...],
                      reuse: bool) -> Representations:
        if reuse and self.reuse_student_outputs:
            known, head = self._student_head(pl_module)
            reps = reused_representations(outputs, known, head, self._capture, lead)
            if reps is not None:
                self.stats["reused_student_forward"] += 1
                return reps
        self.stats["own_student_forward"] += 1
        self._capture.remove()  # the callback's own forward must not be captured as the student's
        reps = self.student_extractor(pl_module, move_inputs(model_inputs(batch, pl_module, self.input_fn), pl_module))
        if self.reuse_student_outputs and self.dataloader is None and self._active:
            self._install_capture(pl_module)  # the head is known now: reuse from the next batch on
        return reps

    def _run_custom_dataloader(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank, world = trainer.global_rank, trainer.world_size
        cursor = 0
        with self._isolated_rng(pl_module.device):  # a shuffling loader draws from the global RNG
            for i, batch in enumerate(self.dataloader):  # type: ignore[union-attr]
                size = batch_size_of(model_inputs(batch, pl_module, self.input_fn))
                positions = cursor + torch.arange(size)
                cursor += size
                if i % world != rank:  # batch i belongs to process i mod world_size: no input is seen twice
                    continue
                batch = trainer.precision_plugin.convert_input(move_data_to_device(batch, pl_module.device))
                self._process_batch(trainer, pl_module, batch, None, reuse=False, positions=positions)

    # ------------------------------------------------------------------------------------------
    # end of the validation epoch: compute, log, record
    # ------------------------------------------------------------------------------------------
    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compute every value over the whole epoch (synced across processes), log and record it."""
        if not self._active:
            return
        self._active = False
        self._capture.remove()
        if self.dataloader is not None:
            with torch.no_grad():
                self._run_custom_dataloader(trainer, pl_module)
        layer_values: dict[str, float] = {}
        layer_info: dict[str, Any] = {}
        if self._layers is not None:
            self._layers.remove()
            layer_values, layer_info, layer_problems = self._layers.compute()
            self._layers.reset()
            for key, message in layer_problems.items():
                self._warn_once(f"{key}:{message[:48]}",
                                f"ReferenceComparison: `{key}` is not defined here and is not logged: {message}")
        assert self._suite is not None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DiversityWarning)
            values, info, problems = self._suite.compute()
        for warning in caught:  # a near-singular diversity set is reported once per fit, not every epoch
            if issubclass(warning.category, DiversityWarning):
                self._warn_once(f"diversity:{str(warning.message)[:48]}", str(warning.message), DiversityWarning)
            else:
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        self.last_results = dict(self._suite.results)
        self._suite.reset()
        for key, message in problems.items():
            self._warn_once(f"{key}:{message}", f"ReferenceComparison: `{key}` is not defined here and is not logged: {message}")
        if info.get("num_dropped"):
            self._warn_once("dropped", f"ReferenceComparison: {info['num_dropped']} validation input(s) had non-finite outputs "
                            "and were skipped (history: `num_dropped`); the values use the other inputs.")
        if info.get("rep_dim") is not None:
            widths = f", embedding widths {tuple(info['widths'])}" if info.get("widths") else ""
            self._info_once("rep_dim", f"ReferenceComparison: comparing at representation dimension M={info['rep_dim']} "
                            f"({info.get('rep_dim_reason', '')}{widths})")
        entry: dict[str, Any] = {
            "epoch": int(trainer.current_epoch),
            "global_step": int(trainer.global_step),
            "stage": "validate" if trainer.state.fn == TrainerFn.VALIDATING else "fit",
            **info,
            **{k: values.get(k, float("nan")) for k in METRIC_KEYS},
            **layer_info,
        }
        self._record(entry)
        with warnings.catch_warnings():
            # logger=True even without a logger, so that trainer.validate() returns the values too
            warnings.filterwarnings("ignore", message=".*but have no logger configured.*")
            for key in (*METRIC_KEYS, *layer_values):
                value = values.get(key, layer_values.get(key))
                if value is None or not math.isfinite(value):
                    continue
                pl_module.log(
                    f"{self.prefix}/{key}", torch.tensor(value, dtype=torch.float64, device=pl_module.device),
                    on_step=False, on_epoch=True, prog_bar=key in self.prog_bar_keys, logger=True,
                    # the value is already reduced over all processes (synced metrics): "max" keeps it exact
                    sync_dist=True, reduce_fx="max", batch_size=1, add_dataloader_idx=False,
                )
        self._points.finish()
        if self.log_media and trainer.global_rank == 0:
            log_wandb_media(trainer, self.prefix, self.history, METRIC_KEYS, entry, lambda: self.embedding_figure(entry))
            if "layer_matrix" in entry:
                log_wandb_layer_matrix(trainer, self.prefix, entry, self.layer_figure(entry))

    def _record(self, entry: dict[str, Any]) -> None:
        if entry["stage"] == "fit":  # a resumed run that validates an epoch again replaces its entry
            key = ("fit", entry["epoch"], entry["global_step"])
            self.history = [h for h in self.history if (h.get("stage"), h.get("epoch"), h.get("global_step")) != key]
        self.history.append(entry)

    def _info_once(self, key: str, message: str) -> None:
        if f"info:{key}" not in self._warned:
            self._warned.add(f"info:{key}")
            rank_zero_info(message)

    def _warn_once(self, key: str, message: str, category: type[Warning] = UserWarning) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=category)

    def embedding_figure(self, entry: Mapping[str, Any] | None = None) -> Any | None:
        """The figure of the last compared embeddings (M = 2 only), or None."""
        if self.last_embeddings is None:
            return None
        from lightning_repsim.callbacks.plotting import plot_embeddings

        ref, stu, labels = self.last_embeddings
        entry = entry or (self.history[-1] if self.history else {})
        title = f"epoch {entry.get('epoch', '?')} ({entry.get('stage', '')}): reference vs student"
        shown = {k: entry[k] for k in ("kl", "d_llv", "d_svd", "mcca") if k in entry}
        return plot_embeddings(ref, stu, labels, title=title, metrics=shown)

    def layer_figure(self, entry: Mapping[str, Any] | None = None) -> Any | None:
        """The heatmap of the last layer-by-layer matrix (``layer_matrix=...``), or None."""
        entry = entry or (self.history[-1] if self.history else {})
        matrix = entry.get("layer_matrix")
        if not matrix:
            return None
        from lightning_repsim.callbacks.plotting import plot_layer_matrix

        title = f"{matrix['measure']}, epoch {entry.get('epoch', '?')} ({entry.get('stage', '')}): reference vs student"
        return plot_layer_matrix(matrix["values"], matrix["reference"], matrix["student"], matrix["measure"], title)

    def _remove_hooks(self) -> None:
        self._capture.remove()
        if self._layers is not None:
            self._layers.remove()
        self._active = False

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the hooks."""
        self._remove_hooks()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Remove the hooks."""
        self._remove_hooks()
