"""Streaming d_LLV from logits (the logits route, O(K^2) state)."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor

from lightning_repsim.functional._validation import (
    check_choice,
    check_label_index,
    check_num_inputs,
    check_num_labels,
    check_rep_dim,
)
from lightning_repsim.functional.llv import (
    COMBINATIONS,
    REDUCTIONS,
    LLVResult,
    input_part,
    label_cov_from_full,
    label_part,
    llv_result,
    log_probabilities,
)
from lightning_repsim.metrics._state import (
    META,
    CandidateMixin,
    StreamingMetric,
    logit_rows,
    moments_add,
    moments_covariance,
    moments_size,
)

__all__ = ["LLVDistance"]

DEFAULT_BUFFER_SIZE = 1024


def choose_pivots(
    mean_lp: Tensor, mean_lq: Tensor, pivot_candidates: Tensor | None, max_pivot_candidates: int | None
) -> Tensor | None:
    """Pivots to search: the given ones, else (when K exceeds ``max_pivot_candidates``) the labels with the
    largest mean log-probability averaged over both models (ties: smaller label), else all (None)."""
    k = mean_lp.numel()
    if pivot_candidates is not None:
        piv = torch.as_tensor(pivot_candidates).to(device=mean_lp.device, dtype=torch.long).flatten()
        if piv.numel() == 0 or bool((piv < 0).any()) or bool((piv >= k).any()):
            raise ValueError(f"`pivot_candidates` must be non-empty label indices in [0, {k})")
        return piv
    if max_pivot_candidates is None or k <= max_pivot_candidates:
        return None
    score = mean_lp + mean_lq
    return torch.argsort(-score, stable=True)[:max_pivot_candidates].sort().values


def check_llv_options(lam: float, reduce: str, combine: str, max_pivot_candidates: int | None) -> None:
    check_choice(reduce, "reduce", REDUCTIONS)
    check_choice(combine, "combine", COMBINATIONS)
    if not float(lam) >= 0:
        raise ValueError(f"`lam` must be >= 0, got {lam!r}")
    if max_pivot_candidates is not None and (
        isinstance(max_pivot_candidates, bool) or not isinstance(max_pivot_candidates, int) or max_pivot_candidates < 1
    ):
        raise ValueError(f"`max_pivot_candidates` must be a positive int or None, got {max_pivot_candidates!r}")


class LLVDistance(CandidateMixin, StreamingMetric):
    r"""Streaming d_LLV (SPEC §3) from two models' logits: the same :class:`~lightning_repsim.functional.LLVResult`
    as :func:`~lightning_repsim.functional.llv_distance` on the concatenated data, for any batch sizes,
    order and number of processes.

    State (float64, independent of the number of inputs N):

    * the centred mean and co-moment of ``w(x) = [l_p(.|x); l_q(.|x) - l_p(.|x)]``: ``1 + 2K + 4K^2``
      numbers; they give T1, T3 and the (pivot, left-out) search exactly;
    * a candidate buffer of ``buffer_size`` inputs, ``buffer_size x (2K + 3)`` numbers (their
      log-probabilities under both models), from which the candidate input sets for T2/T4 are drawn.
      It keeps the inputs with the smallest seeded hash of their logits (or of ``ids``), so its content
      does not depend on batching or world size.

    So ``8 (2 + 2K + 4K^2 + buffer_size (2K + 3))`` bytes (the extra 8:
    the dropped-row counter): 32 MB + 16 MB for K = 1000. For vocabularies
    where ``K^2`` is too large (K = 50,257) use the representation route,
    :class:`~lightning_repsim.metrics.SVDDissimilarity` (its ``.llv`` is this result, from an O(M^2) state).

    Args:
        rep_dim: the representation dimension M (input sets have M+1 inputs).
        num_labels: K; if None, taken from the first ``update`` (the state is then sized lazily).
        lam, reduce, combine, label_pivot, leave_out, num_input_sets, seed: as in
            :func:`~lightning_repsim.functional.llv_distance` (``seed`` also seeds the buffer's hash).
        input_sets: optional (S, M+1) candidate input sets given as input *ids* (pass ``ids`` to
            ``update``); the buffer then keeps exactly those inputs and the sets are evaluated as given.
        pivot_candidates: optional labels to search as pivots (all K by default).
        max_pivot_candidates: if set and K is larger, search only the labels with the largest mean
            log-probability (``result.label_search == "restricted"``). Default None: all K^2 pairs.
        buffer_size: capacity of the candidate buffer (default 1024).
        nan_strategy: ``"error"`` (default, the functional layer's error) or ``"ignore"``: rows with a
            non-finite logit in either model are dropped and counted in ``num_dropped``.
        kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ``process_group``, ...).

    ``update(logits_p, logits_q, mask=None, ids=None)``: logits (B, K) or (B, T, K) in any float dtype on
    any device (accumulated in float64 on that device; move the metric there with ``.to``); ``mask``
    (B,) or (B, T) boolean, True = use the input (e.g. ``labels != ignore_index``); ``ids`` optional
    integer ids of the inputs (same shape as ``mask``), hashed instead of the logits: use them when the
    logits of one input could differ in the last bits between runs (different batch sizes on GPU).

    The result's ``input_set``/``candidate_sets`` are input ids when every buffered input has one, else
    positions in the hash-ordered buffer. ``forward`` only updates; call ``compute()`` at the end.

    Notes on the candidate buffer: inputs with identical content (or identical ids) are the same input
    to the sketch and are kept once, so duplicates added by a ``DistributedSampler`` to even out the
    shards do not change the buffer (they do add to the moments, as for every torchmetrics metric: use
    ``drop_last`` or an even split for exact equality with one process). Pass ``ids`` always or never
    within one accumulation. With 52-bit keys plus a second 52-bit key for ties, two different inputs
    collide with probability about ``N^2 / 2^105``.

    Example:
        >>> import torch
        >>> from lightning_repsim.functional import llv_distance
        >>> g = torch.Generator().manual_seed(0)
        >>> logits_p = torch.randn(300, 6, generator=g)
        >>> logits_q = logits_p + 0.3 * torch.randn(300, 6, generator=g)
        >>> metric = LLVDistance(rep_dim=2)
        >>> for i in range(0, 300, 64):
        ...     metric.update(logits_p[i : i + 64], logits_q[i : i + 64])
        >>> res = metric.compute()
        >>> ref = llv_distance(logits_p, logits_q, rep_dim=2)
        >>> (res.label_pivot, res.leave_out) == (ref.label_pivot, ref.leave_out)
        True
        >>> bool(torch.isclose(res.t1, ref.t1, rtol=1e-12)), res.num_inputs
        (True, 300)
    """

    def __init__(
        self,
        rep_dim: int,
        num_labels: int | None = None,
        lam: float = 1e-5,
        reduce: str = "max",
        combine: str = "max",
        label_pivot: int | None = None,
        leave_out: int | None = None,
        input_sets: Tensor | None = None,
        num_input_sets: int = 200,
        seed: int = 0,
        pivot_candidates: Tensor | None = None,
        max_pivot_candidates: int | None = None,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        nan_strategy: str = "error",
        **kwargs: Any,
    ) -> None:
        super().__init__(nan_strategy=nan_strategy, **kwargs)
        self.rep_dim = check_rep_dim(rep_dim)
        check_llv_options(lam, reduce, combine, max_pivot_candidates)
        if num_labels is not None:
            check_num_labels(int(num_labels))
            num_labels = int(num_labels)
            self.label_pivot = check_label_index(label_pivot, "label_pivot", num_labels)
            self.leave_out = check_label_index(leave_out, "leave_out", num_labels)
        else:
            self.label_pivot, self.leave_out = label_pivot, leave_out
        if self.label_pivot is not None and self.label_pivot == self.leave_out:
            raise ValueError(f"`label_pivot` and `leave_out` must differ, both are {label_pivot}")
        self.num_labels = num_labels
        self.lam, self.reduce, self.combine = float(lam), reduce, combine
        self.pivot_candidates = pivot_candidates
        self.max_pivot_candidates = max_pivot_candidates
        self._add_moments("moments", None if num_labels is None else 2 * num_labels)
        self._init_candidates(
            buffer_size, input_sets, self.rep_dim + 1, None if num_labels is None else 2 * num_labels, num_input_sets, seed
        )

    def update(self, logits_p: Tensor, logits_q: Tensor, mask: Tensor | None = None, ids: Tensor | None = None) -> None:
        p, q, ids = logit_rows(self, logits_p, logits_q, mask, ids)
        k = p.shape[1]
        if self.num_labels is None:
            check_num_labels(k)
        elif k != self.num_labels:
            raise ValueError(f"LLVDistance was built for K={self.num_labels} labels, got logits with K={k}")
        for name in ("label_pivot", "leave_out"):
            check_label_index(getattr(self, name), name, k)
        if p.shape[0] == 0:
            return
        lp, lq = log_probabilities(p), log_probabilities(q)
        self.moments = moments_add(self._size_state("moments", (moments_size(2 * k),)), torch.cat([lp, lq - lp], dim=1))
        self._insert_candidates(torch.cat([p, q], dim=1), torch.cat([lp, lq], dim=1), ids)

    def compute(self) -> LLVResult:
        if self.moments.numel() == 0:
            raise ValueError(f"LLVDistance needs at least M + 2 = {self.rep_dim + 2} inputs, got N=0")
        n, mean, cov = moments_covariance(self.moments)
        k = cov.shape[0] // 2
        check_num_inputs(n, self.rep_dim)
        pivots = choose_pivots(mean[:k], mean[:k] + mean[k:], self.pivot_candidates, self.max_pivot_candidates)
        labels = label_part(
            partial(label_cov_from_full, cov), k, cov.device, self.reduce, self.label_pivot, self.leave_out, pivots
        )
        rows = self._candidate_rows()
        pos, reported = self._candidate_sets(rows, self.rep_dim + 1)
        lp_rows, lq_rows = rows[:, META : META + k], rows[:, META + k :]
        inputs = input_part(lp_rows[pos], lq_rows[pos], reported, self.reduce)
        return llv_result(labels, inputs, n, k, self.rep_dim, self.lam, self.reduce, self.combine)
