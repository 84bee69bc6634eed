"""Streaming d_LLV from logits (the logits route, O(K^2) state)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_repsim.functional.inputs import check_num_inputs, check_num_labels, check_positive_int, check_rep_dim, logit_rows
from lightning_repsim.functional.llv import LLVOptions, LLVResult, ResolvedLabels
from lightning_repsim.functional.llv_route import LLVSizes, LogitsRoute, llv_from_route
from lightning_repsim.functional.llv_terms import CHUNK_NUMBERS
from lightning_repsim.metrics.base import DEFAULT_MEMORY_BUDGET_GB
from lightning_repsim.metrics.candidates import CandidateMixin, auto_buffer_size
from lightning_repsim.metrics.moment_state import empty_moments, moments_covariance, moments_dim
from lightning_repsim.metrics.sketch import META, hash_keys

__all__ = ["LLVDistance", "log_probability_rows"]


def log_probability_rows(p: Tensor, q: Tensor, columns: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Float64 log-probabilities of both models' logit rows (N, K), normalised over all K labels, of the given
    label ``columns`` (all by default); computed in blocks of rows, so no N x K float64 copy is ever formed."""
    k = p.shape[1]
    step = max(1, CHUNK_NUMBERS // k)
    out_p, out_q = [], []
    for start in range(0, p.shape[0], step):
        for rows, out in ((p, out_p), (q, out_q)):
            lp = torch.log_softmax(rows[start : start + step].to(torch.float64), dim=-1)
            out.append(lp if columns is None else lp.index_select(1, columns))
    return torch.cat(out_p), torch.cat(out_q)


class LLVDistance(CandidateMixin):
    r"""Streaming d_LLV (SPEC §3) from two models' logits: the same value and
    :class:`~lightning_repsim.functional.LLVResult` as :func:`~lightning_repsim.functional.llv_distance` on the
    concatenated data, for any batch sizes, order and number of processes.

    As input to ``forward`` and ``update``:

    * ``logits_p``, ``logits_q``: the two models' logits on the same inputs, (B, K) or (B, T, K), any float
      dtype and device (accumulated in float64 on the metric's device; move it there with ``.to``);
    * ``mask`` (optional): (B,) or (B, T), boolean or 0/1 integers (an ``attention_mask``), 1 = use the input;
    * ``ids`` (optional): integer ids of the inputs (mask's shape), hashed for the candidate buffer instead of
      the logits: use them when one input's logits could differ in the last bits between runs (different
      batch sizes on GPU), and always under DDP with a padding sampler.

    As output of ``forward`` and ``compute``: d_LLV as a float64 scalar tensor (``forward``: of the batch
    alone, see :meth:`~lightning_repsim.metrics.base.StreamingMetric.forward`; its cost is a ``compute()`` on
    a batch-sized state). :meth:`compute_result` returns the full :class:`~lightning_repsim.functional.LLVResult`
    (terms T1..T4 and their entries, the chosen label and input sets, the candidates).

    State (float64, independent of the number of inputs N; not persistent unless ``persistent(True)``):

    * the centred mean and co-moment of ``w(x) = [l_p(.|x); l_q(.|x) - l_p(.|x)]``: ``1 + 2K + 4K^2``
      numbers; they give T1, T3 and the (pivot, left-out) search exactly;
    * a candidate buffer of ``buffer_size`` inputs, ``buffer_size x (2K + 3)`` numbers (their
      log-probabilities under both models), from which the candidate input sets for T2/T4 are drawn.
      It keeps the inputs with the smallest seeded hash of their logits (or of ``ids``), so its content
      does not depend on batching or world size.

    So about ``8 (4K^2 + buffer_size (2K + 3))`` bytes: 58 MB for K = 1000 with the default buffer. Before allocating, the metric
    estimates its states and ``compute()`` temporaries and refuses (``ValueError``) a configuration above
    ``memory_budget_gb``: for language-model vocabularies (K = 50,257 would need about 160 GB) use
    :class:`~lightning_repsim.metrics.SVDDissimilarity` (the representation route, exact, O(M^2) state), or
    pass ``labels=`` to estimate d_LLV on a subset of labels (``result.labels`` says so).

    Args:
        rep_dim: the representation dimension M (input sets have M+1 inputs). None (default): the larger rank of the
            two models' log-probabilities (centred over labels) over the inputs, ``max(r_p, r_q)``, found at
            ``compute()`` as :func:`~lightning_repsim.functional.llv_distance` does.
        num_labels: K; if None, taken from the first ``update`` (the states are then sized lazily).
        buffer_size: capacity of the candidate buffer (at least M+1). None (default): sized from K when it is known
            (:func:`~lightning_repsim.metrics.candidates.auto_buffer_size`): 10,049 inputs for K = 7, 4,767 for
            K = 100, 1,635 for K = 1,000, so that the exhaustive input-set search over it stays about a second of one
            CPU core; the search is exact, hence independent of ``seed``, for up to that many inputs.
        nan_strategy: ``"error"`` (default, the functional layer's error) or ``"ignore"``: rows with a
            non-finite logit in either model are dropped and counted in ``num_dropped``.
        memory_budget_gb: the most the states plus ``compute()`` may need (default 8); None: no check.
        kwargs: the d_LLV options of :class:`~lightning_repsim.functional.LLVOptions` (``lam``, ``reduce``,
            ``combine``, ``label_pivot``, ``leave_out``, ``labels``, ``pivot_candidates``,
            ``max_pivot_candidates``, ``input_sets`` (of input *ids*: the buffer then keeps exactly those
            inputs), ``num_input_sets``, ``seed`` (also the buffer's hash)), and the keyword arguments of
            :class:`torchmetrics.Metric` (``sync_on_compute``, ``process_group``, ...).

    Notes on the candidate buffer: inputs with identical content (or identical ids) are the same input
    to the sketch and are kept once, so duplicates added by a ``DistributedSampler`` to even out the
    shards do not change the buffer (they do add to the moments, as for every torchmetrics metric: use
    ``drop_last`` or an even split for exact equality with one process). Pass ``ids`` always or never
    within one accumulation. With 52-bit keys plus a second 52-bit key for ties, two different inputs
    collide with probability about ``N^2 / 2^105``. With ``labels``, the hash reads only those columns.

    Example:
        >>> import torch
        >>> from lightning_repsim.functional import llv_distance
        >>> g = torch.Generator().manual_seed(0)
        >>> logits_p = torch.randn(300, 6, generator=g)
        >>> logits_q = logits_p + 0.3 * torch.randn(300, 6, generator=g)
        >>> metric = LLVDistance(rep_dim=2)
        >>> for i in range(0, 300, 64):
        ...     metric.update(logits_p[i : i + 64], logits_q[i : i + 64])
        >>> d_llv = metric.compute()  # a scalar tensor: self.log("val/d_llv", metric) works
        >>> res = metric.compute_result()  # the full LLVResult
        >>> ref = llv_distance(logits_p, logits_q, rep_dim=2)
        >>> (res.label_pivot, res.leave_out) == (ref.label_pivot, ref.leave_out), bool(d_llv == res.value)
        (True, True)
        >>> bool(torch.isclose(res.t1, ref.t1, rtol=1e-12)), res.num_inputs
        (True, 300)
    """

    def __init__(
        self,
        rep_dim: int | None = None,
        num_labels: int | None = None,
        buffer_size: int | None = None,
        nan_strategy: str = "error",
        memory_budget_gb: float | None = DEFAULT_MEMORY_BUDGET_GB,
        **kwargs: Any,
    ) -> None:
        options, kwargs = LLVOptions.split(kwargs)
        labels = None if options.labels is None else int(hash_keys(options.labels.reshape(1, -1), 0)[0])
        rep_dim = None if rep_dim is None else check_rep_dim(rep_dim)
        config = {"rep_dim": rep_dim, "labels": labels, **self.candidate_config(options, buffer_size)}
        super().__init__(nan_strategy=nan_strategy, memory_budget_gb=memory_budget_gb, config=config, **kwargs)
        self.options = options
        self.rep_dim = rep_dim
        self.num_labels = None if num_labels is None else check_positive_int(num_labels, "num_labels", minimum=3)
        self.buffer_size = buffer_size
        width = None
        if self.num_labels is not None:
            width = 2 * self._resolve(self.num_labels, buffer_size).num_compared
        self._add_state_kind("moments", "moments", empty_moments(width) if width else torch.zeros(0, dtype=torch.float64))
        self._add_state_kind("dims", "dims", torch.tensor([self.num_labels or 0], dtype=torch.int64))
        self._init_candidates(buffer_size, None if rep_dim is None else rep_dim + 1, width, None if width is None else width // 2)

    # -- sizes -------------------------------------------------------------------------------------
    def _resolve(self, k: int, buffer_size: int | None = None) -> _Labels:
        """The label options for K labels, after the size and memory checks (before anything is allocated)."""
        if self.num_labels is not None and k != self.num_labels:
            raise ValueError(f"LLVDistance was built for K={self.num_labels} labels, got logits with K={k}")
        resolved = self.options.resolve(k)
        kk = k if resolved.labels is None else resolved.labels.numel()
        check_num_labels(kk)
        buf = self.buffer_size if buffer_size is None else buffer_size
        if buf is None:  # the default buffer: sized from the compared labels
            buf = auto_buffer_size(2 * kk, dim=kk)
        state = 8.0 * (1 + 2 * kk + 4 * kk * kk + buf * (2 * kk + 3))
        compute = 8.0 * (4 * kk * kk + 20 * min(kk * kk, CHUNK_NUMBERS) + 12 * CHUNK_NUMBERS)
        fit = int(math.sqrt(max(self.memory_budget_gb or 0, 0) * 1e9 / 8 / 8)) if self.memory_budget_gb else kk
        self._check_memory(
            state, compute, f"with K={kk:,} labels",
            "d_LLV from logits keeps a 2K x 2K statistic. With embeddings and the unembedding, use SVDDissimilarity "
            "(the representation route: the exact d_LLV from an O(M^2) state, for any K). From logits alone, estimate "
            f"d_LLV on a subset of labels: LLVDistance(rep_dim=..., labels=<label indices>) with at most about {fit:,} "
            "labels (e.g. the most frequent tokens); the result reports `labels`.",
        )
        return _Labels(resolved, kk)

    def _describe(self, name: str, shape: tuple[int, ...]) -> str:
        labels = {"moments": lambda: moments_dim(shape[0]) // 2, "dims": lambda: shape[0],
                  "candidates": lambda: (shape[1] - META) // 2}
        if name not in labels:
            return super()._describe(name, shape)
        buffer = f"a buffer of {shape[0]} inputs with " if name == "candidates" else ""
        return f"{buffer}K={labels[name]()} labels"

    # -- update and compute ------------------------------------------------------------------------
    def update(self, logits_p: Tensor, logits_q: Tensor, mask: Tensor | None = None, ids: Tensor | None = None) -> None:
        """Accumulate a batch of both models' logits (see the class docstring)."""
        p, q, ids, dropped = logit_rows(logits_p, logits_q, mask, ids, self.nan_strategy)
        k = p.shape[1]
        resolved = self._resolve(k)
        labels = resolved.resolved.labels
        self._size_buffer(2 * resolved.num_compared, dim=resolved.num_compared)
        if self.rep_dim is not None and self.buffer_size < self.rep_dim + 1 and self.options.input_sets is None:
            raise ValueError(f"the default candidate buffer for K={k:,} labels holds {self.buffer_size:,} inputs, fewer "
                             f"than an input set of M+1 = {self.rep_dim + 1}: pass buffer_size >= {self.rep_dim + 1}")
        contributions: dict[str, Any] = {"dims": torch.tensor([k], dtype=torch.int64)}
        if dropped:
            contributions["num_dropped"] = dropped
        if p.shape[0]:
            columns = None if labels is None else labels.to(p.device)
            lp, lq = log_probability_rows(p, q, columns)
            contributions["moments"] = torch.cat([lp, lq - lp], dim=1)
            content = torch.cat([p, q] if columns is None else [p.index_select(1, columns), q.index_select(1, columns)], 1)
            contributions["candidates"] = self._candidate_rows(content, torch.cat([lp, lq], dim=1), ids)
        self._accumulate(contributions)

    def _result_from(self, states: dict[str, Tensor]) -> LLVResult:
        moments = states["moments"]
        if moments.numel() == 0 or int(moments[0]) == 0:
            raise ValueError("LLVDistance needs at least M + 2 inputs, got N=0")
        n, mean, cov = moments_covariance(moments)
        kk = cov.shape[0] // 2
        k = int(states["dims"][0]) or kk
        rows = self._buffered_rows(states["candidates"])
        route = LogitsRoute.from_moments(mean, cov, rows[:, META : META + kk], rows[:, META + kk :])
        rep_dim = self.rep_dim if self.rep_dim is not None else route.representation_dim()
        check_num_inputs(n, rep_dim)
        candidates = self._candidate_sets(rows, rep_dim + 1)
        return llv_from_route(route, candidates, self.options, self.options.resolve(k), LLVSizes(n, k, rep_dim))[0]

    def compute_result(self) -> LLVResult:
        """The full :class:`~lightning_repsim.functional.LLVResult` (``.value`` is what ``compute()`` returns)."""
        return super().compute_result()


class _Labels:
    """The resolved label options and the number of compared labels."""

    def __init__(self, resolved: ResolvedLabels, num_compared: int) -> None:
        self.resolved = resolved
        self.num_compared = num_compared
