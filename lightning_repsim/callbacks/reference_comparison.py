"""``ReferenceComparison``: compare the model in training with a frozen reference on every validation epoch.

Direction: ``p`` is the **reference** (model 1), ``q`` the **student** (model 2); the KL is
``KL(reference || student)``, the distillation reading.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

from lightning_repsim.callbacks.extraction import (
    FinalLinear,
    Representations,
    default_input_fn,
    default_label_fn,
    default_mask_fn,
    unembedding_of,
)
from lightning_repsim.callbacks.metric_suite import METRIC_KEYS, MetricSuite

__all__ = ["ReferenceComparison", "weights_fingerprint", "METRIC_KEYS"]

_STATE_VERSION = 1
_DEFAULT_PROG_BAR = ("kl", "d_llv", "d_svd")


def weights_fingerprint(module: nn.Module) -> str:
    """SHA-256 of a module's ``state_dict`` (names, dtypes, shapes and raw bytes, in name order).

    Two modules have the same fingerprint iff their parameters and buffers are bit-identical.

    Example:
        >>> import torch
        >>> a = torch.nn.Linear(3, 2)
        >>> weights_fingerprint(a) == weights_fingerprint(a), len(weights_fingerprint(a))
        (True, 64)
    """
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        if not isinstance(tensor, Tensor):
            h.update(repr(tensor).encode())
            continue
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _cast_floats(data: Any, dtype: torch.dtype) -> Any:
    return apply_to_collection(data, Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t)


def _leading(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape[:-1])


def _batch_size(inputs: Any) -> int:
    """Leading size of the first tensor in a model input."""
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0])
    found: list[int] = []
    apply_to_collection(inputs, Tensor, lambda t: found.append(int(t.shape[0])) if t.ndim else None)
    if not found:
        raise TypeError("cannot find the batch size of the model input (no tensor in it); pass `input_fn`")
    return found[0]


#: ids of token rows of (B, T) outputs: global sample position * 2**20 + token position.
_TOKEN_STRIDE = 2**20


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
            submodule of the student, so never in its optimizer, checkpoint, DDP wrapper or precision
            casts) and moved to the student's device when fit/validate starts. Its weights are not
            saved, only a fingerprint (SHA-256) that resuming checks.
        every_n_epochs: compare on validation runs of epochs ``e`` with ``(e + 1) % every_n_epochs == 0``
            (Lightning's ``check_val_every_n_epoch`` convention). ``trainer.validate()`` always compares.
            The sanity check never does.
        dataloader: compare on this dataloader (iterated at the end of the validation epoch; under DDP
            each process takes every ``world_size``-th batch) instead of the validation batches.
        dataloader_idx: which validation dataloader to use when ``dataloader`` is None.
        prefix: logged keys are ``f"{prefix}/{key}"``.
        prog_bar: show ``kl``, ``d_llv``, ``d_svd`` in the progress bar (True), none (False) or the
            listed keys.
        input_fn: ``batch -> model input`` (default: ``batch[0]``, ``batch["input_ids"]``, ...).
        label_fn: ``batch -> class labels`` for colouring the embedding plot (default ``batch[1]``).
        mask_fn: ``batch -> bool mask`` over the leading dimensions of the logits (e.g. ``(B, T)``
            padding mask of an LM; default ``batch["attention_mask"]`` of a mapping, else all rows).
        reference_extractor, student_extractor: ``(model, inputs) -> Representations``. Default
            :class:`FinalLinear` (embedding = input of the ``nn.Linear`` that produces the logits,
            unembedding = its weight rows with the bias as last column). Use
            :class:`~lightning_repsim.callbacks.LogitsOnly` for models without embedding access (then
            only d_LLV and KL are reported) or any callable returning ``Representations``.
        reuse_student_outputs: avoid a second student forward when possible: use ``"embeddings"`` (and
            ``"logits"``) of a dict returned by ``validation_step``, or the input of the student's head
            captured by a forward hook while ``validation_step`` ran (accepted only when the head ran
            exactly once with the batch's shape). Otherwise (or when False) the student is run under
            ``no_grad`` in eval mode on ``input_fn(batch)``.
        rep_dim: M for d_LLV when the models give logits only (default ``K - 1``). Ignored when
            embeddings are available (M is their width).
        metric_kwargs: passed to the streaming metrics (e.g. ``lam``, ``reduce``, ``combine``,
            ``num_input_sets``, ``seed``; see :mod:`lightning_repsim.metrics`).
        log_media: with a ``WandbLogger``: log the table, the line plots and the embedding image.
        plot_max_points: at most this many points (of process 0) in the embedding image.
        reference_load_kwargs: keyword arguments of ``load_from_checkpoint`` for a path ``reference``.

    Attributes:
        history: one dict per comparison: ``epoch``, ``global_step``, ``stage`` (``"fit"``/``"validate"``),
            ``num_inputs``, every key of :data:`METRIC_KEYS` (``nan`` when undefined) and the chosen sets
            ``label_pivot``, ``leave_out``, ``input_set``.
        last_embeddings: ``(reference, student, labels)`` plotted last (M = 2 only), or None.
        last_results: the metrics' full results of the last comparison (``"kl"``; ``"svd"``, an
            ``SVDDissimilarityResult`` whose ``.llv`` is the ``LLVResult``, or ``"llv"``; ``"cca"``: their
            ``compute_result()``), with the
            candidate input sets, kept label sets, etc. Not saved in checkpoints.
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
        self.input_fn = input_fn or default_input_fn
        self.label_fn = label_fn or default_label_fn
        self.mask_fn = mask_fn or default_mask_fn
        self.reference_extractor = reference_extractor or FinalLinear()
        self.student_extractor = student_extractor or FinalLinear()
        self.reuse_student_outputs = bool(reuse_student_outputs)
        self.rep_dim = rep_dim
        self.metric_kwargs = dict(metric_kwargs or {})
        self.log_media = bool(log_media)
        self.plot_max_points = int(plot_max_points)
        self.reference_load_kwargs = dict(reference_load_kwargs or {})

        self.history: list[dict[str, Any]] = []
        self.last_embeddings: tuple[Tensor, Tensor, Tensor | None] | None = None
        self.last_results: dict[str, Any] = {}
        self.reference_fingerprint: str | None = None
        self._pending_fingerprint: str | None = None
        self._suite: MetricSuite | None = None
        self._active = False
        self._warned: set[str] = set()
        self._capture_handle = None
        self._captured: list[Tensor] = []
        self._sample_cursor = 0  # samples seen on this process (validation loader) / in the whole custom loader
        self._stride: tuple[int, int] | None = (0, 1)  # position of local sample k = offset + k * stride; None: no ids
        self._length: int | None = None  # dataset length when a padding DistributedSampler is used
        self._plot_ref: list[Tensor] = []
        self._plot_stu: list[Tensor] = []
        self._plot_lab: list[Tensor | None] = []
        self._plot_count = 0
        self.stats = {"reused_student_forward": 0, "own_student_forward": 0, "padded_rows_dropped": 0}

    # ------------------------------------------------------------------------------------------
    # identity, config, state
    # ------------------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # hooks and per-epoch buffers are not picklable / not meaningful in another process (ddp_spawn)
        state = self.__dict__.copy()
        state["_capture_handle"] = None
        state["_captured"] = []
        return state

    @property
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
            "reference_extractor": repr(self.reference_extractor),
            "student_extractor": repr(self.student_extractor),
            "reference": str(self._reference_source) if not isinstance(self._reference_source, nn.Module)
            else type(self._reference_source).__name__,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "config": self.config(),
            "history": copy.deepcopy(self.history),
            "reference_fingerprint": self.reference_fingerprint,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("reference_fingerprint")
        if saved is not None:
            if self.reference_fingerprint is None:
                self._pending_fingerprint = saved
            else:
                self._check_fingerprint(saved)
        old = state_dict.get("config", {})
        mine = self.config()
        changed = sorted(k for k in ("every_n_epochs", "metric_kwargs", "rep_dim") if k in old and old[k] != mine[k])
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
    # reference handling
    # ------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.reference is None:
            path = os.fspath(self._reference_source)
            kwargs = {"map_location": "cpu", **self.reference_load_kwargs}
            self.reference = type(pl_module).load_from_checkpoint(path, **kwargs)
        ref = self.reference
        if ref is pl_module:
            raise ValueError("ReferenceComparison: the reference is the student itself; pass a separate (copied) model")
        student_params = {id(p) for p in pl_module.parameters()}
        shared = [n for n, p in ref.named_parameters() if id(p) in student_params]
        if shared:
            raise ValueError(
                f"ReferenceComparison: the reference shares {len(shared)} parameter(s) with the student (e.g. "
                f"{shared[:3]}); freezing it would freeze the student. Pass a deep copy (copy.deepcopy(model))."
            )
        ref.eval()
        ref.requires_grad_(False)
        if self.reference_fingerprint is None:
            self.reference_fingerprint = weights_fingerprint(ref)
        if self._pending_fingerprint is not None:
            self._check_fingerprint(self._pending_fingerprint)

    def _prepare(self, pl_module: pl.LightningModule) -> None:
        if self._pending_fingerprint is not None:
            self._check_fingerprint(self._pending_fingerprint)
        assert self.reference is not None
        self.reference.to(pl_module.device)
        self.reference.eval()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._prepare(pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._prepare(pl_module)

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

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._active = self._should_compare(trainer)
        if not self._active:
            return
        self.reference.eval()  # type: ignore[union-attr]
        if self._suite is None:
            self._suite = MetricSuite(rep_dim=self.rep_dim, **self.metric_kwargs)
        self._suite.reset()
        self._suite.to(pl_module.device)
        self._sample_cursor = 0
        self._plot_ref, self._plot_stu, self._plot_lab, self._plot_count = [], [], [], 0
        self._stride, self._length = (0, 1), None
        if self.dataloader is None:
            self._configure_positions(trainer)
        self._install_capture(pl_module)

    def _configure_positions(self, trainer: pl.Trainer) -> None:
        """Global sample positions (the ids given to the metrics) and DistributedSampler padding.

        Lightning's ``DistributedSampler`` (``drop_last=False``) pads the index list to a multiple of the
        world size with copies of its first indices and gives rank ``r`` the positions ``r, r + W, r + 2W, ...``
        of that list. So the ``k``-th sample of rank ``r`` has global position ``r + k W``, and it is a padded
        duplicate exactly when that position is ``>= len(dataset)``: those rows are dropped, nothing is counted
        twice. The position is the same for 1 or W processes (without shuffling it is the dataset index), which
        makes the candidate inputs of d_LLV, and thus every value, independent of the number of processes.
        """
        loader = trainer.val_dataloaders
        if isinstance(loader, Sequence) and not isinstance(loader, DataLoader):
            loader = loader[self.dataloader_idx] if self.dataloader_idx < len(loader) else None
        sampler = None
        if isinstance(loader, DataLoader):
            sampler = loader.sampler
            if not isinstance(sampler, DistributedSampler) and loader.batch_sampler is not None:
                sampler = getattr(loader.batch_sampler, "sampler", sampler)
        if isinstance(sampler, DistributedSampler):
            self._stride = (int(sampler.rank), int(sampler.num_replicas))
            try:
                length = len(sampler.dataset)  # type: ignore[arg-type]
            except TypeError:
                length = None
            if length is not None and not sampler.drop_last and sampler.total_size > length:
                self._length = length
        elif trainer.world_size > 1:
            self._stride = None  # local positions would collide across processes: the metrics hash the content
            self._warn_once(
                "no-distributed-sampler",
                "ReferenceComparison: running on several processes but the validation dataloader has no "
                "DistributedSampler; if every process sees the same batches, every input is counted once per "
                "process. Use Lightning's default `use_distributed_sampler=True` or pass `dataloader=`.",
            )

    # ------------------------------------------------------------------------------------------
    # student forward reuse: a hook on the student's head while validation_step runs
    # ------------------------------------------------------------------------------------------
    def _install_capture(self, pl_module: pl.LightningModule) -> None:
        self._remove_capture()
        if not self.reuse_student_outputs or self.dataloader is not None:
            return
        _, head = self._student_head(pl_module)
        if head is None:
            return
        self._captured = []

        def capture(module: nn.Module, args: tuple, output: Any) -> None:
            if args and isinstance(args[0], Tensor):
                self._captured.append(args[0].detach())

        self._capture_handle = head.register_forward_hook(capture)

    def _remove_capture(self) -> None:
        if self._capture_handle is not None:
            self._capture_handle.remove()
            self._capture_handle = None
        self._captured = []

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._captured = []

    # ------------------------------------------------------------------------------------------
    # per batch
    # ------------------------------------------------------------------------------------------
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._active or self.dataloader is not None or dataloader_idx != self.dataloader_idx:
            self._captured = []
            return
        self._process_batch(trainer, pl_module, batch, outputs, reuse=True)
        self._captured = []

    @contextmanager
    def _isolated_rng(self, device: torch.device):
        """The callback must not change the training's random stream (same gradients with and without it)."""
        devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            yield

    def _process_batch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, outputs: Any, reuse: bool,
        positions: Tensor | None = None,
    ) -> None:
        device = pl_module.device
        with self._isolated_rng(device), torch.no_grad():
            inputs = self.input_fn(batch)
            ref_reps = self._reference_reps(inputs)
            stu_reps = self._student_reps(trainer, pl_module, inputs, outputs, ref_reps, reuse)
        self._update(batch, ref_reps, stu_reps, positions)

    def _reference_reps(self, inputs: Any) -> Representations:
        ref = self.reference
        assert ref is not None
        param = next(iter(ref.parameters()), None)
        if param is not None:
            inputs = _cast_floats(move_data_to_device(inputs, param.device), param.dtype)
        return self.reference_extractor(ref, inputs)

    def _student_reps(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        inputs: Any,
        outputs: Any,
        ref_reps: Representations,
        reuse: bool,
    ) -> Representations:
        lead = _leading(ref_reps.logits if ref_reps.logits is not None else ref_reps.embeddings)
        if reuse and self.reuse_student_outputs:
            reps = self._reused(pl_module, outputs, lead)
            if reps is not None:
                self.stats["reused_student_forward"] += 1
                return reps
        self.stats["own_student_forward"] += 1
        with trainer.precision_plugin.val_step_context():
            reps = self.student_extractor(pl_module, inputs)
        if self.reuse_student_outputs and self._capture_handle is None and self.dataloader is None:
            self._install_capture(pl_module)  # the head is known now: reuse from the next batch on
        return reps

    def _student_head(self, pl_module: pl.LightningModule) -> tuple[bool, nn.Linear | None]:
        """(whether the student's head is known, the head or None for a logits-only student)."""
        extractor = self.student_extractor
        is_located = getattr(extractor, "is_located", None)
        head_of = getattr(extractor, "head", None)
        if is_located is None or head_of is None or not is_located(pl_module):
            return False, None
        return True, head_of(pl_module)

    def _reused(self, pl_module: pl.LightningModule, outputs: Any, lead: tuple[int, ...]) -> Representations | None:
        """The student's representations from its own ``validation_step``, or None when they are not available."""
        known, head = self._student_head(pl_module)
        if isinstance(outputs, Mapping) and isinstance(outputs.get("embeddings"), Tensor):
            emb = outputs["embeddings"]
            unemb = outputs.get("unembedding")
            if unemb is None and head is not None:
                unemb = unembedding_of(head)
            if isinstance(unemb, Tensor) and _leading(emb) == lead:
                logits = outputs.get("logits")
                return Representations(logits.detach() if isinstance(logits, Tensor) else None, emb.detach(), unemb.detach())
        if head is not None and len(self._captured) == 1 and _leading(self._captured[0]) == lead:
            return Representations(None, self._captured[0], unembedding_of(head))
        logits = outputs.get("logits") if isinstance(outputs, Mapping) else None
        if known and head is None and isinstance(logits, Tensor) and _leading(logits) == lead:
            return Representations(logits.detach())  # logits-only student
        return None

    def _rows_and_ids(self, batch: Any, lead: tuple[int, ...], positions: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """``(keep, ids)`` over the flattened leading positions: the padding mask of ``mask_fn`` and the
        DistributedSampler duplicates; ids = global sample position (x 2**20 + token position for (B, T))."""
        keep = None
        mask = self.mask_fn(batch)
        if mask is not None:
            if tuple(mask.shape) != lead:
                raise ValueError(f"the mask from `mask_fn` has shape {tuple(mask.shape)}, the logits' leading shape is {lead}")
            keep = mask.to(torch.bool).reshape(-1).cpu()
        if self._length is not None and positions is not None:
            sample_keep = positions < self._length  # padded duplicates sit after the dataset's end
            dropped = int((~sample_keep).sum())
            if dropped:
                self.stats["padded_rows_dropped"] += dropped
                per_row = sample_keep.reshape((-1,) + (1,) * (len(lead) - 1)).expand(lead).reshape(-1)
                keep = per_row if keep is None else keep & per_row
        if positions is None:
            ids = None
        elif len(lead) == 1:
            ids = positions
        else:
            inner = math.prod(lead[1:])
            ids = positions[:, None] * _TOKEN_STRIDE + torch.arange(inner)[None, :] if inner <= _TOKEN_STRIDE else None
            ids = None if ids is None else ids.reshape(-1)
        return keep, ids

    def _update(self, batch: Any, ref: Representations, stu: Representations, positions: Tensor | None = None) -> None:
        lead = _leading(ref.logits if ref.logits is not None else ref.embeddings)
        lead_s = _leading(stu.logits if stu.logits is not None else stu.embeddings)
        if lead != lead_s:
            raise ValueError(f"reference and student outputs have different leading shapes {lead} and {lead_s}")
        if not lead:
            raise ValueError("the logits must have a batch dimension, got a single vector")
        if positions is None and self._stride is not None:
            offset, stride = self._stride  # validation batches: the k-th local sample has position offset + k * stride
            positions = offset + (self._sample_cursor + torch.arange(lead[0])) * stride
        self._sample_cursor += lead[0]
        keep, ids = self._rows_and_ids(batch, lead, positions)
        assert self._suite is not None
        n_rows = self._suite.update(ref, stu, keep, ids)
        if self.log_media and self._plot_count < self.plot_max_points and n_rows > 0:
            self._collect_plot_points(batch, ref, stu, keep, lead)

    def _collect_plot_points(self, batch: Any, ref: Representations, stu: Representations, keep: Tensor | None, lead) -> None:
        if not (ref.has_representations and stu.has_representations):
            return
        if ref.embeddings.shape[-1] != 2 or stu.embeddings.shape[-1] != 2:
            return
        take = self.plot_max_points - self._plot_count
        e_r = ref.embeddings.reshape(-1, 2)
        e_s = stu.embeddings.reshape(-1, 2)
        labels = self.label_fn(batch)
        if labels is not None and tuple(labels.shape) == lead:
            labels = labels.reshape(-1)
        else:
            logits = ref.logits if ref.logits is not None else None
            labels = logits.reshape(-1, logits.shape[-1]).argmax(-1) if logits is not None else None
        if keep is not None:
            k = keep.to(e_r.device)
            e_r, e_s = e_r[k], e_s[k]
            labels = labels[keep.to(labels.device)] if labels is not None else None
        self._plot_ref.append(e_r[:take].detach().to("cpu", torch.float64))
        self._plot_stu.append(e_s[:take].detach().to("cpu", torch.float64))
        self._plot_lab.append(None if labels is None else labels[:take].detach().cpu())
        self._plot_count += min(take, e_r.shape[0])

    # ------------------------------------------------------------------------------------------
    # end of the validation epoch: custom dataloader, compute, log
    # ------------------------------------------------------------------------------------------
    def _run_custom_dataloader(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank, world = trainer.global_rank, trainer.world_size
        device = pl_module.device
        with self._isolated_rng(device):
            cursor = 0
            for i, batch in enumerate(self.dataloader):  # type: ignore[union-attr]
                size = _batch_size(self.input_fn(batch))
                positions = cursor + torch.arange(size)
                cursor += size
                if i % world != rank:  # batch i belongs to process i mod world_size: no input is seen twice
                    continue
                batch = move_data_to_device(batch, device)
                batch = trainer.precision_plugin.convert_input(batch)
                self._process_batch(trainer, pl_module, batch, None, reuse=False, positions=positions)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active:
            return
        self._active = False
        self._remove_capture()
        if self.dataloader is not None:
            with torch.no_grad():
                self._run_custom_dataloader(trainer, pl_module)
        assert self._suite is not None
        values, info, problems = self._suite.compute()
        self.last_results = dict(self._suite.results)
        self._suite.reset()
        for key, message in problems.items():
            self._warn_once(f"{key}:{message}", f"ReferenceComparison: `{key}` is not defined here and is not logged: {message}")
        entry: dict[str, Any] = {
            "epoch": int(trainer.current_epoch),
            "global_step": int(trainer.global_step),
            "stage": "validate" if trainer.state.fn == TrainerFn.VALIDATING else "fit",
            **info,
            **{k: values.get(k, float("nan")) for k in METRIC_KEYS},
        }
        self._record(entry)
        for key in METRIC_KEYS:
            value = values.get(key)
            if value is None or not math.isfinite(value):
                continue
            pl_module.log(
                f"{self.prefix}/{key}",
                torch.tensor(value, dtype=torch.float64, device=pl_module.device),
                on_step=False,
                on_epoch=True,
                prog_bar=key in self.prog_bar_keys,
                logger=bool(trainer.loggers),
                # the value is already reduced over all processes (synced metrics): "max" keeps it exact
                sync_dist=True,
                reduce_fx="max",
                batch_size=1,
                add_dataloader_idx=False,
            )
        self._log_media(trainer, entry)

    def _record(self, entry: dict[str, Any]) -> None:
        if entry["stage"] == "fit":  # a resumed run that validates an epoch again replaces its entry
            key = ("fit", entry["epoch"], entry["global_step"])
            self.history = [h for h in self.history if (h.get("stage"), h.get("epoch"), h.get("global_step")) != key]
        self.history.append(entry)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    # ------------------------------------------------------------------------------------------
    # wandb: table, line plots, embedding image
    # ------------------------------------------------------------------------------------------
    def _wandb_loggers(self, trainer: pl.Trainer) -> list[Any]:
        try:
            from lightning.pytorch.loggers import WandbLogger
        except ImportError:  # pragma: no cover
            return []
        return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]

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

    def _finish_plot_points(self) -> None:
        if not self._plot_ref:
            return
        ref = torch.cat(self._plot_ref)
        stu = torch.cat(self._plot_stu)
        labels = None
        if all(lab is not None for lab in self._plot_lab):
            labels = torch.cat([lab for lab in self._plot_lab if lab is not None])
        self.last_embeddings = (ref, stu, labels)
        self._plot_ref, self._plot_stu, self._plot_lab = [], [], []

    def _log_media(self, trainer: pl.Trainer, entry: dict[str, Any]) -> None:
        self._finish_plot_points()
        if not self.log_media or trainer.global_rank != 0:
            return
        loggers = self._wandb_loggers(trainer)
        if not loggers:
            return
        import wandb

        step = int(trainer.global_step)
        columns = ["epoch", "global_step", "stage", "num_inputs", *METRIC_KEYS]
        rows = [[h.get(c, float("nan")) for c in columns] for h in self.history]
        rows = [[None if isinstance(v, float) and not math.isfinite(v) else v for v in row] for row in rows]
        fits = [h for h in self.history if h.get("stage") == "fit"] or self.history
        xs = [h["epoch"] for h in fits]
        curves = [k for k in ("kl", "d_llv", "d_svd", "mcca") if any(math.isfinite(h.get(k, float("nan"))) for h in fits)]
        for lg in loggers:
            lg.log_table(key=f"{self.prefix}/table", columns=columns, data=rows, step=step)
            if curves:
                ys = [[h.get(k) if math.isfinite(h.get(k, float("nan"))) else None for h in fits] for k in curves]
                chart = wandb.plot.line_series(
                    xs=xs, ys=ys, keys=curves, title="reference vs student per epoch", xname="epoch"
                )
                lg.log_metrics({f"{self.prefix}/curves": chart}, step=step)
            fig = self.embedding_figure(entry)
            if fig is not None:
                from lightning_repsim.callbacks.plotting import figure_to_array

                lg.log_image(
                    key=f"{self.prefix}/embeddings",
                    images=[figure_to_array(fig)],
                    step=step,
                    caption=[f"epoch {entry['epoch']}: reference (left) vs student (right), coloured by class"],
                )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_capture()
        self._active = False

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_capture()
        self._active = False
