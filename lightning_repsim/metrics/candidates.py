"""Candidate inputs for the input-set search of d_LLV (T2, T4) and the g-part of d_SVD, shared by
:class:`~lightning_repsim.metrics.LLVDistance` and :class:`~lightning_repsim.metrics.SVDDissimilarity`.

Two modes: *sketch* (default) keeps the ``buffer_size`` inputs with the smallest seeded hash of their content,
or of their ``ids`` when given (:mod:`~lightning_repsim.metrics.sketch`); *pinned* (``input_sets`` of ids given)
keeps exactly the inputs whose ids occur in ``input_sets``, so explicit candidate sets can be evaluated.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_repsim.functional.inputs import check_positive_int
from lightning_repsim.functional.llv import LLVOptions, draw_input_sets
from lightning_repsim.functional.llv_route import Candidates
from lightning_repsim.metrics.base import StreamingMetric
from lightning_repsim.metrics.sketch import META, buffer_content, empty_buffer, hash_keys

__all__ = ["AUTO_BUFFER_BYTES", "DEFAULT_BUFFER_SIZE", "REPRESENTATION_BUFFER_SIZE", "CandidateMixin", "auto_buffer_size"]

#: The fewest candidate inputs a default buffer keeps (rows of 2K + 3 numbers for
#: :class:`~lightning_repsim.metrics.LLVDistance`, M_p + M_q + 3 for :class:`~lightning_repsim.metrics.SVDDissimilarity`).
DEFAULT_BUFFER_SIZE = 1024
#: The most candidate inputs a default buffer keeps, for narrow rows (0.5 MB of rows of two 2-d models' embeddings, or
#: of 4-label logits); wider rows get fewer (:func:`auto_buffer_size`). The input-set search is exact, hence
#: seed-free, up to the buffer's size (N = 10,000 inputs of narrow models fit). Beyond, which inputs the seeded sketch
#: keeps moves T2: with 8,192 inputs kept of 10,000, by 0.04 % and 0.9 % over seeds 0..9 on the Table 1 and Gaussian
#: families, 2.6 % and 32 % on the authors' models resampled with jitter (near-duplicate inputs); d_LLV did not move
#: (T1 decides it there). benchmarks/bench_seed_spread.py measures it; ``buffer_size=N`` makes it exact.
REPRESENTATION_BUFFER_SIZE = 10240
#: A default buffer (``buffer_size=None``) holds at most this many bytes of rows.
AUTO_BUFFER_BYTES = 64 * 2**20


def auto_buffer_size(row_width: int, dim: int | None = None) -> int:
    """The default candidate buffer for rows of ``row_width`` numbers whose pair scores live in ``dim`` dimensions
    (``SVDDissimilarity``: ``M_p + M_q`` numbers, ``dim = M_p + M_q + 2`` by default; ``LLVDistance``: ``2K`` numbers,
    ``dim = K``, the most the log-probability rows can span): :data:`REPRESENTATION_BUFFER_SIZE` inputs for narrow
    rows, fewer for wide ones, so that the exhaustive input-set search over the buffer costs
    no more than over 10,240 inputs of two 2-d models (about a second of one CPU core,
    :func:`~lightning_repsim.functional.input_search.exhaustive_cost`) and the rows take at most
    :data:`AUTO_BUFFER_BYTES`; never fewer than :data:`DEFAULT_BUFFER_SIZE`.

    Example:
        >>> auto_buffer_size(2 + 2), auto_buffer_size(128 + 128), auto_buffer_size(768 + 768)  # SVDDissimilarity
        (10240, 3132, 1323)
        >>> [auto_buffer_size(2 * k, dim=k) for k in (7, 10, 100, 1000)]  # LLVDistance, K labels
        [10049, 9533, 4767, 1635]
    """
    from lightning_repsim.functional.input_search import exhaustive_cost

    dim = row_width + 2 if dim is None else dim  # the representation route's coefficient rows: M_p + M_q + 2 numbers
    by_time = math.isqrt(2 * exhaustive_cost(REPRESENTATION_BUFFER_SIZE, 6) // (2 * dim + 40)) + 1
    by_memory = AUTO_BUFFER_BYTES // (8 * (row_width + META))
    return int(max(DEFAULT_BUFFER_SIZE, min(REPRESENTATION_BUFFER_SIZE, by_time, by_memory)))


class CandidateMixin(StreamingMetric):
    """The bounded candidate buffer of a metric and the candidate sets drawn from it."""

    options: LLVOptions

    def _init_candidates(self, buffer_size: int | None, set_size: int | None, width: int | None,
                         dim: int | None = None) -> None:
        """Declare the candidate buffer of rows of ``width`` numbers (None: known at the first update) whose pair scores
        live in ``dim`` dimensions; ``buffer_size=None``: sized by :func:`auto_buffer_size`, now if the width is known,
        else at the first update (:meth:`_size_buffer`)."""
        self._auto_buffer = buffer_size is None
        if buffer_size is None:
            buffer_size = REPRESENTATION_BUFFER_SIZE if width is None else auto_buffer_size(width, dim)
        buffer_size = check_positive_int(buffer_size, "buffer_size")
        self._pinned = None
        sets = self.options.input_sets
        if sets is not None:
            if set_size is not None and sets.shape[1] != set_size:
                raise ValueError(f"`input_sets` must have shape (S, M+1) = (S, {set_size}), got {tuple(sets.shape)}")
            self._pinned = torch.unique(sets)
            buffer_size = self._pinned.numel()
        elif set_size is not None and buffer_size < set_size:
            raise ValueError(
                f"`buffer_size`={buffer_size} cannot hold an input set of M+1 = {set_size} inputs: use buffer_size >= {set_size} "
                "(or None, the default: sized from the widths or K)"
            )
        self.buffer_size = buffer_size
        default = empty_buffer(buffer_size, width) if width is not None else torch.zeros(0, 0, dtype=torch.float64)
        self._add_state_kind("candidates", "buffer", default, capacity=buffer_size)

    def _size_buffer(self, row_width: int, dim: int | None = None) -> None:
        """The default buffer's capacity for rows of ``row_width`` numbers, before its first allocation (the same on
        every process, which see the same widths)."""
        if self._auto_buffer and self._pinned is None and not self.candidates.numel():
            self.buffer_size = auto_buffer_size(row_width, dim)
            self._kinds["candidates"].capacity = self.buffer_size

    @staticmethod
    def candidate_config(options: LLVOptions, buffer_size: int | None) -> dict[str, int | None]:
        """The part of the configuration that decides which inputs the buffer keeps (checked on merges; a default
        buffer is None: its size follows from the widths or K, which are checked themselves)."""
        sets = options.input_sets
        return {
            "seed": options.seed,
            "buffer_size": buffer_size if sets is None else int(torch.unique(sets).numel()),
            "input_sets": None if sets is None else int(hash_keys(sets.reshape(1, -1), 0)[0]),
        }

    def _candidate_rows(self, content: Tensor, data: Tensor, ids: Tensor | None) -> Tensor:
        """Keyed buffer rows ``[key, key2, id, data...]`` for the inputs: ``content`` is hashed (unless ``ids``),
        ``data`` is stored; in pinned mode only the inputs whose ids occur in ``input_sets``."""
        if self._pinned is not None:
            if ids is None:
                raise ValueError("`input_sets` hold input ids: pass the inputs' `ids` to update()")
            sel = torch.isin(ids, self._pinned.to(ids.device)).nonzero().flatten()
            ids, data = ids.index_select(0, sel), data.index_select(0, sel)
            key = key2 = ids.to(torch.float64)
        else:
            key, key2 = hash_keys(ids if ids is not None else content, self.options.seed)
        id_col = ids.to(torch.float64) if ids is not None else torch.full_like(key, -1.0)
        return torch.cat([key[:, None], key2[:, None], id_col[:, None], data], dim=1)

    @staticmethod
    def _buffered_rows(buffer: Tensor) -> Tensor:
        """The filled rows ``[key, key2, id, data...]`` of a candidate buffer, in key order."""
        return buffer_content(buffer) if buffer.numel() else buffer.new_zeros(0, META)

    def _candidate_sets(self, rows: Tensor, set_size: int) -> Candidates:
        """The candidate sets as row positions of the buffered ``rows``, reported as input ids when every buffered
        input has one (else as buffer positions): the given ``input_sets`` (ids), or sets drawn from the buffer."""
        ids = rows[:, 2].to(torch.long)
        row_ids = ids if bool((ids >= 0).all()) else None
        if self.options.input_sets is not None:
            sets = self.options.input_sets.to(rows.device)
            pos = torch.searchsorted(ids, sets.reshape(-1)).clamp_max(max(ids.numel() - 1, 0))
            found = ids.numel() > 0 and bool((ids[pos] == sets.reshape(-1)).all())
            if not found:
                missing = sorted({int(i) for i in sets.reshape(-1).tolist()} - set(ids.tolist()))
                raise ValueError(
                    f"`input_sets` refer to input ids never passed to update(): {missing[:10]}"
                    + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else "")
                )
            return Candidates(pos.reshape(sets.shape), given=True, row_ids=ids)
        if rows.shape[0] < set_size:
            raise ValueError(
                f"the candidate buffer holds {rows.shape[0]} distinct inputs, fewer than the M+1 = {set_size} of an "
                "input set: update() with more (distinct) inputs"
            )
        pos = draw_input_sets(rows.shape[0], set_size, self.options.num_input_sets, self.options.seed).to(rows.device)
        return Candidates(pos, row_ids=row_ids)
