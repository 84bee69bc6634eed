"""``ModelComparison``: compare a model with a frozen reference over a stream of batches, with or without a Trainer.

It owns what one comparison needs -- the reference, the two extractors, the streaming metrics (a
``MetricCollection``), the layer-wise CKA hooks and the points of the embedding picture -- and has the interface of a
metric: :meth:`~ModelComparison.update` with a batch and the student (its module, or its
:class:`~lightning_repsim.callbacks.Representations` for that batch), :meth:`~ModelComparison.compute`,
:meth:`~ModelComparison.reset`. Every value is exact over all batches and, under ``torch.distributed`` (DDP, Fabric),
over all processes. :class:`~lightning_repsim.callbacks.ReferenceComparison` is its Lightning adapter (when to compare,
reusing the student's validation forward, the sampler's positions, logging, checkpoints); in a Fabric or plain loop::

    comparison = ModelComparison(teacher)              # options: ComparisonConfig fields, e.g. rep_dim=8, layers=[...]
    for batch in loader:
        comparison.update(batch, student)              # runs both models under no_grad (or pass Representations)
    outcome = comparison.compute()                     # outcome.values["d_llv"], outcome.info["rep_dim"], ...

Under several processes, pass each batch's global sample ``positions`` (and the data set's length, so that a
``DistributedSampler``'s padded copies are dropped); without them the processes compare the content of what they saw at
``compute()``: inputs every process saw count once, overlapping shards are refused (``docs/distributed.md``).
Sharded (DTensor) unembeddings are gathered once per comparison.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_repsim.callbacks.config import ComparisonConfig, split_config
from lightning_repsim.callbacks.extraction import Representations, is_dtensor
from lightning_repsim.callbacks.layers import LayerComparison
from lightning_repsim.callbacks.media import EmbeddingPoints
from lightning_repsim.callbacks.metric_suite import MetricSuite
from lightning_repsim.callbacks.overlap import InputOverlap
from lightning_repsim.callbacks.positions import rows_and_ids
from lightning_repsim.callbacks.reference import model_inputs, move_inputs

__all__ = ["ComparisonOutcome", "ModelComparison"]


@dataclass
class ComparisonOutcome:
    """What :meth:`ModelComparison.compute` found.

    Attributes:
        values: the scalars to log: every key of ``METRIC_KEYS`` that is defined, and ``layers/<name>/<measure>``.
        info: ``num_inputs``, ``num_dropped``, ``rep_dim`` and ``rep_dim_reason``, ``mode``, ``widths``,
            ``embedding_rank``, ``state_bytes``, the chosen sets, and the per-layer values and matrix.
        problems: ``{key: why it is undefined}`` for values that could not be computed (e.g. d_SVD when K < M + 2).
        warnings: the warnings raised while computing (e.g. a ``DiversityWarning``), for the caller to show.
        results: the metrics' full results (``"kl"``, ``"svd"`` or ``"llv"``, ``"cca"``; ``compute_result()``).
    """

    values: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    warnings: list[warnings.WarningMessage] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)


class ModelComparison:
    """A student compared with a frozen reference (``p`` = the reference, ``q`` = the student), batch by batch.

    Args:
        reference: the reference model (an ``nn.Module``); frozen here (``eval()``, no gradients).
        config: a :class:`~lightning_repsim.callbacks.ComparisonConfig`, or its fields as keyword ``options``.
        context: a callable returning the context manager the models' forwards run in (e.g. an autocast; the
            callback passes Lightning's precision context). Default: none.
    """

    def __init__(self, reference: nn.Module, config: ComparisonConfig | None = None,
                 context: Callable[[], Any] | None = None, **options: Any) -> None:
        if not isinstance(reference, nn.Module):
            raise TypeError(f"`reference` must be an nn.Module, got {type(reference).__name__}")
        self.config = split_config(config, options)
        self.reference = reference.eval().requires_grad_(False)
        self.context = context or contextlib.nullcontext
        self.suite, self.layers = self.collaborators(self.config)
        self.points = EmbeddingPoints(self.config.plot_max_points)
        self.device = torch.device("cpu")
        self.padded_rows_dropped = 0  # DistributedSampler duplicates dropped since the last reset
        self.overlap = InputOverlap()  # content keys of samples without positions, under several processes
        self._synced = self.config.metric_kwargs.get("sync_on_compute", True) is not False  # else each process alone
        self._full_unembeddings: dict[str, Tensor] = {}  # sharded (DTensor) unembeddings gathered once per comparison
        self.unembedding_gathers = 0  # how many times a sharded unembedding was gathered (tests: once per comparison)

    @staticmethod
    def collaborators(config: ComparisonConfig) -> tuple[MetricSuite, LayerComparison | None]:
        """The metric suite and the layer comparison a configuration asks for (bad metric or layer options fail
        here, before any data)."""
        suite = MetricSuite(rep_dim=config.rep_dim, **config.metric_kwargs)
        if not config.layers.enabled:
            return suite, None
        layer_kwargs = {k: v for k, v in config.metric_kwargs.items() if k in ("nan_strategy", "memory_budget_gb")}
        options = config.layers
        layers = LayerComparison(options.names, matrix=options.matrix, reduce=options.reduce, max_width=options.max_width,
                                 too_wide=options.too_wide, metric_kwargs=layer_kwargs)
        return suite, layers

    # -- state -------------------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> ModelComparison:
        """Move the reference and the statistics to ``device``."""
        self.device = torch.device(device)
        self.reference = self.reference.to(self.device)
        self.suite.to(self.device)
        if self.layers is not None:
            self.layers.to(self.device)
        return self

    def reset(self) -> None:
        """Forget the accumulated batches (the reference and the configuration stay)."""
        self.suite.reset()
        if self.layers is not None:
            self.layers.reset()
        self.points.start()
        self.padded_rows_dropped = 0
        self.overlap.reset()
        self._full_unembeddings = {}

    def watch_layers(self, student: nn.Module) -> None:
        """Install the layer hooks on both models (``layers`` option): the forwards that follow feed them."""
        if self.layers is not None:
            self.layers.install(self.reference, student)

    def unwatch_layers(self) -> None:
        if self.layers is not None:
            self.layers.remove()

    @contextlib.contextmanager
    def layers_paused(self):
        """Forwards inside this context do not feed the layer hooks (e.g. a check on a few samples)."""
        if self.layers is None:
            yield
            return
        with self.layers.paused():
            yield

    # -- per batch ---------------------------------------------------------------------------------
    def reference_representations(self, batch: Any) -> Representations:
        """The reference's representations of ``batch`` (under ``no_grad``, in the forward context)."""
        with torch.no_grad(), self.context():
            inputs = move_inputs(model_inputs(batch, self.reference, self.config.input_fn), self.reference)
            return self.config.reference_extractor(self.reference, inputs)

    def student_representations(self, batch: Any, student: nn.Module) -> Representations:
        """The student's representations of ``batch`` from its own forward (``no_grad``, the forward context)."""
        with torch.no_grad(), self.context():
            inputs = move_inputs(model_inputs(batch, student, self.config.input_fn), student)
            return self.config.student_extractor(student, inputs)

    def update(self, batch: Any, student: nn.Module | Representations, positions: Tensor | None = None,
               dataset_length: int | None = None) -> int:
        """Add one batch: the reference is run on it, the student too unless its ``Representations`` are given.

        ``positions``: the batch's samples' global positions in the data set (the metrics' candidate buffers hash
        them instead of the content, which makes every value independent of the number of processes); with
        ``dataset_length``, positions at or beyond it are padded duplicates (a ``DistributedSampler``) and dropped.
        Returns the number of rows added.
        """
        if self.layers is not None:
            self.layers.clear()
        ref = self.reference_representations(batch)
        stu = student if isinstance(student, Representations) else self.student_representations(batch, student)
        return self.add(batch, ref, stu, positions, dataset_length)

    def add(self, batch: Any, ref: Representations, stu: Representations, positions: Tensor | None = None,
            dataset_length: int | None = None) -> int:
        """Add both models' representations of ``batch`` (and the layer outputs the hooks captured meanwhile)."""
        lead, lead_s = ref.leading_shape, stu.leading_shape
        if lead != lead_s:
            raise ValueError(f"reference and student outputs have different leading shapes {lead} and {lead_s}")
        if not lead:
            raise ValueError("the logits must have a batch dimension, got a single vector")
        ref, stu = self._gathered(ref, "reference"), self._gathered(stu, "student")
        keep, ids, padded = rows_and_ids(self.config.mask_fn(batch), lead, positions, dataset_length)
        self.padded_rows_dropped += padded
        if self._synced and self.overlap.tracking:  # which inputs each process saw: compared across processes at compute()
            if positions is None:
                self.overlap.add(model_inputs(batch, self.reference, self.config.input_fn), lead[0])
            else:
                self.overlap.add_positions(positions if dataset_length is None else positions[positions < dataset_length])
        added = self.suite.update(ref, stu, keep, ids)
        if self.layers is not None:
            self.layers.update(lead, keep)
        if self.config.log_media and added:
            self.points.add(ref, stu, self.config.label_fn(batch), keep, lead)
        return added

    def _gathered(self, reps: Representations, side: str) -> Representations:
        """``reps`` with a sharded unembedding (DTensor parameters: FSDP2's ``fully_shard``, tensor parallelism) as
        the full tensor, gathered on the first batch of the comparison (a collective: every process is at its first
        batch) and reused for the others: the unembedding does not change during a comparison."""
        if not is_dtensor(reps.unembedding):
            return reps
        full = self._full_unembeddings.get(side)
        if full is None:
            full = reps.unembedding.full_tensor().detach()
            self._full_unembeddings[side] = full
            self.unembedding_gathers += 1
        return dataclasses.replace(reps, unembedding=full)

    # -- result ------------------------------------------------------------------------------------
    def compute(self) -> ComparisonOutcome:
        """Every value over all batches (and processes: a collective under ``torch.distributed``, every process
        must call it). The accumulated state stays until :meth:`reset`.

        Under several processes, what each process accumulated is compared first (:mod:`.overlap`: the samples'
        positions, or their content when added without ``positions``): processes that saw the same inputs as a lower
        rank (every process iterating the whole set, tensor-parallel ranks) do not count them again; overlapping but
        different inputs raise :class:`~lightning_repsim.callbacks.overlap.SharedInputsError`.
        ``info["inputs_across_processes"]`` says what was found: ``"positions"`` (disjoint by position),
        ``"positions, shared by groups"`` (a sampler of fewer replicas than processes), ``"disjoint"`` or
        ``"replicated"`` (by content), ``"unknown"`` (inputs that are not tensors)."""
        outcome = ComparisonOutcome()
        if self._synced and not self.overlap.settle(self.device):
            self.suite.reset()  # a lower rank saw the same inputs: its statistics count, each input once
            if self.layers is not None:
                self.layers.reset()
        if self.overlap.verdict is not None:
            outcome.info["inputs_across_processes"] = self.overlap.verdict
        if self.layers is not None:
            values, info, problems = self.layers.compute()
            outcome.values.update(values)
            outcome.info.update(info)
            outcome.problems.update(problems)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            values, info, problems = self.suite.compute()
        outcome.values.update(values)
        outcome.info = {**info, **outcome.info}
        outcome.problems.update(problems)
        outcome.warnings = list(caught)
        outcome.results = dict(self.suite.results)
        self.points.finish()
        return outcome

