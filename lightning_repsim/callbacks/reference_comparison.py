"""``ReferenceComparison``: compare the model in training with a frozen reference on every validation epoch.

Direction: ``p`` is the **reference** (model 1), ``q`` the **student** (model 2); the KL is
``KL(reference || student)``, the distillation reading. This module is the Lightning adapter of
:class:`~lightning_repsim.callbacks.ModelComparison` (the comparison itself, usable without a Trainer); the concerns
live in their own modules: :mod:`.config` (the options), :mod:`.reference` (loading, freezing, precision, inputs),
:mod:`.positions` (global sample ids, DDP padding), :mod:`.capture` (reusing the student's forward),
:mod:`.metric_suite` (feeding the metrics), :mod:`.layers` (layer-wise CKA from forward hooks), :mod:`.media` (the
pictures and wandb media).
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_repsim.callbacks.comparison import ModelComparison
from lightning_repsim.callbacks.config import METRIC_KEYS, ComparisonConfig, split_config
from lightning_repsim.callbacks.extraction import Extractor
from lightning_repsim.callbacks.media import embedding_figure, layer_figure, log_wandb_layer_matrix, log_wandb_media
from lightning_repsim.callbacks.notices import Notices
from lightning_repsim.callbacks.positions import SamplePositions
from lightning_repsim.callbacks.reference import (
    FingerprintCheck,
    PreparedReference,
    batch_size_of,
    check_separate,
    load_reference,
    model_inputs,
    weights_fingerprint,
)
from lightning_repsim.callbacks.spawn import SpawnedResults, WorkerResults
from lightning_repsim.callbacks.student import StudentForwards

__all__ = ["ReferenceComparison", "weights_fingerprint", "METRIC_KEYS"]

_STATE_VERSION = 2


class ReferenceComparison(SpawnedResults, Callback):
    """Compare the model in training (the *student*) with a frozen *reference* model each validation epoch.

    KL says whether the two models *predict* alike; d_LLV, d_SVD and mCCA say whether they *represent* alike (Nielsen
    et al., NeurIPS 2025). Everything is accumulated by a :class:`~lightning_repsim.callbacks.ModelComparison`
    (the streaming metrics of :mod:`lightning_repsim.metrics`: exact for any batch size, synced across DDP processes)
    and logged with ``pl_module.log`` under ``prefix`` (epoch level). With a ``WandbLogger`` the callback also logs a
    table of all epochs, line plots and, when M = 2, a picture of both models' embeddings.

    Args:
        reference: an ``nn.Module`` / ``LightningModule``, or a checkpoint path loaded with the student's class
            (``type(student).load_from_checkpoint(path, **reference_load_kwargs)``). It is frozen (``eval()``,
            ``requires_grad_(False)``), kept on the callback (never a submodule of the student, so never in its
            optimizer, checkpoint or DDP wrapper), moved to the student's device and converted by the trainer's
            precision plugin like the student; its forward runs in the student's precision context, so identical
            models compare as identical. Only a fingerprint of its weights (SHA-256) is saved; resuming checks it.
        every_n_epochs: compare on validation runs of epochs ``e`` with ``(e + 1) % every_n_epochs == 0``.
            ``trainer.validate()`` always compares; the sanity check never does (it only checks, on one batch, that
            both models predict over the same labels).
        dataloader: compare on this dataloader (iterated at the end of the validation epoch; under DDP each process
            takes every ``world_size``-th batch) instead of the validation batches.
        config: a :class:`~lightning_repsim.callbacks.ComparisonConfig` (what each option does), or its fields as
            keyword ``options``: ``prefix`` (default ``"repsim"``), ``prog_bar``, ``input_fn``, ``mask_fn``,
            ``label_fn``, ``reference_extractor``/``student_extractor``, ``reuse_student_outputs``, ``rep_dim``
            (default ``max(r_p, r_q)``: ``docs/smaller_student.md``), ``metric_kwargs``, ``layers`` (+ ``layer_matrix``,
            ``layer_reduce``, ``layer_max_width``, ``layer_too_wide``), ``log_media``, ``dataloader_idx``, ...

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

    Under ``strategy="ddp_spawn"`` (or ``"ddp_fork"``) the comparisons run in worker processes; ``history``,
    ``last_results``, ``stats`` and ``last_embeddings`` of the callback in the main process are those of the worker of
    rank 0 once ``fit``/``validate`` returns (:mod:`~lightning_repsim.callbacks.spawn`).

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_repsim.callbacks import ReferenceComparison
        >>> # trainer = pl.Trainer(callbacks=[ReferenceComparison(teacher)], logger=WandbLogger())
        >>> # trainer.fit(student, datamodule=dm); then: callback.history[-1]["d_llv"]
    """

    def __init__(self, reference: nn.Module | str | os.PathLike, every_n_epochs: int = 1, dataloader: Iterable | None = None,
                 config: ComparisonConfig | None = None, **options: Any) -> None:
        super().__init__()
        if not isinstance(reference, (nn.Module, str, os.PathLike)):
            raise TypeError(f"`reference` must be an nn.Module or a checkpoint path, got {type(reference).__name__}")
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"`every_n_epochs` must be a positive int, got {every_n_epochs!r}")
        self.config = split_config(config, options)
        self._reference_source = reference
        self.every_n_epochs = every_n_epochs
        self.dataloader = dataloader
        self._history: list[dict[str, Any]] = []
        self._last_results: dict[str, Any] = {}
        self._mailbox = WorkerResults()  # ddp_spawn: the results of rank 0's worker come back to this object
        self._fingerprint = FingerprintCheck()
        # the comparison is built now for an nn.Module (bad options fail here), at setup for a checkpoint path
        self.comparison: ModelComparison | None = None
        self._prepared: PreparedReference | None = None  # the user's reference and its converted copy, if any
        if isinstance(reference, nn.Module):
            self.comparison = ModelComparison(reference, self.config)
            self._prepared = PreparedReference(reference)
        else:
            ModelComparison.collaborators(self.config)
        self._active = False
        self._checked = False
        self._notices = Notices()  # warnings and notes, once per fit
        self._positions = SamplePositions()
        self._stats = {"reused_student_forward": 0, "own_student_forward": 0, "padded_rows_dropped": 0}
        # the student's reused forward (checked on the first batch of each comparison) or the comparison's own
        self._student = StudentForwards(self.student_extractor, self.config.reuse_student_outputs and dataloader is None,
                                        self._stats, self._notices.warn_once)

    def _extra_results(self) -> dict[str, Any]:  # ddp_spawn: the picture's points travel back too (see .spawn)
        return {"last_embeddings": self.last_embeddings}

    def _restore_extra(self, payload: dict[str, Any]) -> None:
        if self.comparison is not None and payload.get("last_embeddings") is not None:
            self.comparison.points.last = payload["last_embeddings"]

    # ------------------------------------------------------------------------------------------
    # read-only views
    # ------------------------------------------------------------------------------------------
    @property
    def reference_fingerprint(self) -> str | None:
        """SHA-256 of the reference's weights (taken before any conversion), saved in checkpoints."""
        return self._fingerprint.value

    @property
    def reference(self) -> nn.Module | None:
        return None if self.comparison is None else self.comparison.reference

    @property
    def prefix(self) -> str:
        return self.config.prefix

    @property
    def reference_extractor(self) -> Extractor:
        return self.config.reference_extractor  # type: ignore[return-value]

    @property
    def student_extractor(self) -> Extractor:
        return self.config.student_extractor  # type: ignore[return-value]

    @property
    def last_embeddings(self) -> tuple[Tensor, Tensor, Tensor | None] | None:
        return None if self.comparison is None else self.comparison.points.last

    # ------------------------------------------------------------------------------------------
    # identity, state
    # ------------------------------------------------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    def describe(self) -> dict[str, Any]:
        """The JSON-friendly configuration stored in the callback's ``state_dict``."""
        source = self._reference_source
        return {**self.config.describe(), "every_n_epochs": self.every_n_epochs, "custom_dataloader": self.dataloader is not None,
                "reference": type(source).__name__ if isinstance(source, nn.Module) else str(source)}

    @override
    def state_dict(self) -> dict[str, Any]:
        """History, configuration and the reference's fingerprint (never its weights)."""
        return {"version": _STATE_VERSION, "config": self.describe(), "history": copy.deepcopy(self.history),
                "reference_fingerprint": self.reference_fingerprint}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the saved history; the reference's fingerprint is checked once the reference is loaded."""
        self._fingerprint.expect(state_dict.get("reference_fingerprint"))
        old, mine = state_dict.get("config", {}), self.describe()
        changed = sorted(k for k in ("every_n_epochs", "metric_kwargs", "rep_dim", "layers") if k in old and old[k] != mine[k])
        if changed:
            rank_zero_warn(f"ReferenceComparison: resuming with a different configuration ({', '.join(changed)}); "
                           "the history mixes both settings.")
        self.history = copy.deepcopy(list(state_dict.get("history", [])))

    # ------------------------------------------------------------------------------------------
    # the reference
    # ------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Load the reference (from a checkpoint path if given one), check it is separate, fingerprint it."""
        self._receive()  # a forked worker: results of an earlier run that the main process has not read yet
        if self.comparison is None:
            reference = load_reference(self._reference_source, pl_module, self.config.reference_load_kwargs)
            self.comparison = ModelComparison(reference, self.config)
            self._prepared = PreparedReference(reference)
        check_separate(self._prepared.original, pl_module)
        self._fingerprint.take(self._prepared.original)

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The reference on the student's device, converted by the precision plugin (a copy: the user's module keeps
        its dtype), forwards in its context."""
        self._fingerprint.check_pending()
        comparison = self.comparison
        comparison.reference = self._prepared.prepare(trainer, pl_module.device)
        comparison.context = trainer.precision_plugin.val_step_context

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Move the reference to the student's device and precision; warnings are given once per fit."""
        self._notices.clear()
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
        return trainer.state.fn == TrainerFn.FITTING and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _mine(self, dataloader_idx: int) -> bool:
        """Whether a validation batch of ``dataloader_idx`` is one this callback compares on (a combined batch of
        several loaders always holds a part of the compared one)."""
        return self.dataloader is None and (self._positions.combined or dataloader_idx == self.config.dataloader_idx)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Decide whether this validation compares; read the compared loader (its sampler, how loaders are combined);
        reset the comparison and the head capture."""
        self._active = self._should_compare(trainer)
        self._positions.reset()
        if self.dataloader is None:
            self._positions.configure(trainer, self.config.dataloader_idx)
        if not self._active:
            return
        comparison = self.comparison
        comparison.reference.eval()
        comparison.reset()
        comparison.to(pl_module.device)
        self._student.start(pl_module)
        comparison.watch_layers(pl_module)

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Forget the head calls of the previous batch; if the student's head is not located yet, locate it now (one
        probing forward), so that this batch's own validation forward is already captured and reused."""
        self._student.clear()
        batch = self._positions.select(batch) if self._mine(dataloader_idx) else None
        if batch is not None and self._active:
            with self._isolated_rng(pl_module.device):
                self._student.locate(batch, pl_module, self.comparison)
        if self.comparison is not None and self.comparison.layers is not None:
            self.comparison.layers.clear()  # outputs of the probe (or of a previous batch) are not this batch's

    @override
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Feed the batch to the comparison (or, in the sanity check, check once that both models can be compared)."""
        batch = self._positions.select(batch) if self._mine(dataloader_idx) else None
        if batch is not None and not self._checked and trainer.sanity_checking:
            self._check_outputs(pl_module, batch)
        if batch is not None and self._active:
            self._process_batch(pl_module, batch, outputs, positions=None)
        self._student.clear()

    # ------------------------------------------------------------------------------------------
    # per batch
    # ------------------------------------------------------------------------------------------
    @contextmanager
    def _isolated_rng(self, device: torch.device):
        """The callback must not change the training's random stream (same gradients with and without it)."""
        devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            yield

    def _check_outputs(self, pl_module: pl.LightningModule, batch: Any) -> None:
        """Run both models on one sanity-check batch: different label sets fail here, before any training."""
        self._checked = True
        self._stats["own_student_forward"] += 1
        with self._isolated_rng(pl_module.device):
            ref = self.comparison.reference_representations(batch)
            stu = self.comparison.student_representations(batch, pl_module)
        self.comparison.suite.check_compatible(ref, stu)

    def _process_batch(self, pl_module: pl.LightningModule, batch: Any, outputs: Any, positions: Tensor | None) -> None:
        comparison = self.comparison
        with self._isolated_rng(pl_module.device):
            ref = comparison.reference_representations(batch)
            if positions is None:  # a validation batch: the student's own validation forward may be reused
                stu = self._student.representations(pl_module, batch, outputs, ref.leading_shape, comparison)
            else:
                stu = self._student.own(pl_module, batch, comparison)
        self._checked = True
        if positions is None:
            positions = self._positions.next(ref.leading_shape[0] if ref.leading_shape else 0)
        before = comparison.padded_rows_dropped
        comparison.add(batch, ref, stu, positions, self._positions.length)
        self._stats["padded_rows_dropped"] += comparison.padded_rows_dropped - before

    def _run_custom_dataloader(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank, world = trainer.global_rank, trainer.world_size
        cursor = 0
        with self._isolated_rng(pl_module.device):  # a shuffling loader draws from the global RNG
            for i, batch in enumerate(self.dataloader):  # type: ignore[union-attr]
                size = batch_size_of(model_inputs(batch, pl_module, self.config.input_fn))
                positions = cursor + torch.arange(size)
                cursor += size
                if i % world != rank:  # batch i belongs to process i mod world_size: no input is seen twice
                    continue
                batch = trainer.precision_plugin.convert_input(move_data_to_device(batch, pl_module.device))
                self._process_batch(pl_module, batch, None, positions=positions)

    # ------------------------------------------------------------------------------------------
    # end of the validation epoch: compute, log, record
    # ------------------------------------------------------------------------------------------
    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compute every value over the whole epoch (synced across processes), log and record it."""
        if not self._active:
            return
        self._active = False
        self._student.remove()
        comparison = self.comparison
        comparison.unwatch_layers()
        if self.dataloader is not None:
            with torch.no_grad():
                self._run_custom_dataloader(trainer, pl_module)
        outcome = comparison.compute()
        comparison.reset()
        self.last_results = outcome.results
        self._notices.report(outcome)
        entry: dict[str, Any] = {
            "epoch": int(trainer.current_epoch),
            "global_step": int(trainer.global_step),
            "stage": "validate" if trainer.state.fn == TrainerFn.VALIDATING else "fit",
            **outcome.info,
            **{k: outcome.values.get(k, float("nan")) for k in METRIC_KEYS},
        }
        self._record(entry)
        self._log(pl_module, outcome.values)
        if self.config.log_media and trainer.global_rank == 0:
            log_wandb_media(trainer, self.prefix, self.history, METRIC_KEYS, entry, lambda: self.embedding_figure(entry))
            if "layer_matrix" in entry:
                log_wandb_layer_matrix(trainer, self.prefix, entry, self.layer_figure(entry))

    def _log(self, pl_module: pl.LightningModule, values: Mapping[str, float]) -> None:
        with warnings.catch_warnings():
            # logger=True even without a logger, so that trainer.validate() returns the values too
            warnings.filterwarnings("ignore", message=".*but have no logger configured.*")
            for key, value in values.items():
                if value is None or not math.isfinite(value):
                    continue
                pl_module.log(
                    f"{self.prefix}/{key}", torch.tensor(value, dtype=torch.float64, device=pl_module.device),
                    on_step=False, on_epoch=True, prog_bar=key in self.config.prog_bar, logger=True,
                    # the value is already reduced over all processes (synced metrics): "max" keeps it exact
                    sync_dist=True, reduce_fx="max", batch_size=1, add_dataloader_idx=False,
                )

    def _record(self, entry: dict[str, Any]) -> None:
        if entry["stage"] == "fit":  # a resumed run that validates an epoch again replaces its entry
            key = ("fit", entry["epoch"], entry["global_step"])
            self.history = [h for h in self.history if (h.get("stage"), h.get("epoch"), h.get("global_step")) != key]
        self.history.append(entry)

    def embedding_figure(self, entry: Mapping[str, Any] | None = None) -> Any | None:
        """The figure of the last compared embeddings (M = 2 only), or None."""
        return embedding_figure(self.last_embeddings, entry or (self.history[-1] if self.history else {}))

    def layer_figure(self, entry: Mapping[str, Any] | None = None) -> Any | None:
        """The heatmap of the last layer-by-layer matrix (``layer_matrix=...``), or None."""
        return layer_figure(entry or (self.history[-1] if self.history else {}))

    def _remove_hooks(self) -> None:
        self._student.remove()
        if self.comparison is not None:
            self.comparison.unwatch_layers()
        self._active = False

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the hooks; under ``ddp_spawn``, send the results back to the main process."""
        self._remove_hooks()
        self._send(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Remove the hooks."""
        self._remove_hooks()
