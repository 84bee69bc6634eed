"""Streaming d_SVD with the sets chosen by d_LLV, from embeddings and unembeddings (the
representation route: O(M^2) state whatever the vocabulary size)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from lightning_repsim.functional.family import log_partition, split_unembedding, unembedding_parts
from lightning_repsim.functional.inputs import (
    check_finite,
    check_num_inputs,
    check_num_labels,
    check_rep_dim,
    check_tensor,
    embedding_rows,
)
from lightning_repsim.functional.llv import LLVOptions
from lightning_repsim.functional.llv_representation import RepresentationRoute, embedding_covariance, representation_rows
from lightning_repsim.functional.llv_route import LLVSizes, llv_from_route
from lightning_repsim.functional.llv_terms import CHUNK_NUMBERS
from lightning_repsim.functional.svd import SVDResult, SVDStatistics, representation_dim, svd_from_parts
from lightning_repsim.metrics.base import DEFAULT_MEMORY_BUDGET_GB
from lightning_repsim.metrics.candidates import CandidateMixin
from lightning_repsim.metrics.moment_state import moments_covariance, moments_dim
from lightning_repsim.metrics.sketch import META, hash_keys

__all__ = ["SVDDissimilarity", "SVDDissimilarityResult"]


#: The result of :class:`SVDDissimilarity`: the functional :class:`~lightning_repsim.functional.SVDResult` with its
#: ``llv`` set (one result type per measure; the name of earlier versions is kept).
SVDDissimilarityResult = SVDResult


def _stack_log_partitions(emb_p: Tensor, emb_q: Tensor, logz_p: Tensor | None, logz_q: Tensor | None):
    """``(logz_p[..., None], logz_q[..., None])`` in float64, checked against the embeddings' leading shape."""
    if logz_p is None and logz_q is None:
        return None
    if logz_p is None or logz_q is None:
        raise ValueError("pass both `logz_p` and `logz_q`, or neither")
    out = []
    for lz, emb, name in ((logz_p, emb_p, "logz_p"), (logz_q, emb_q, "logz_q")):
        check_tensor(emb, "emb_p" if name == "logz_p" else "emb_q")
        check_tensor(lz, name)
        if tuple(lz.shape) != tuple(emb.shape[:-1]):
            raise ValueError(f"`{name}` must have the embeddings' leading shape {tuple(emb.shape[:-1])}, got {tuple(lz.shape)}")
        out.append(lz.to(device=emb.device, dtype=torch.float64)[..., None])
    return out


def _version(t: Tensor) -> int | None:
    """The tensor's in-place modification counter (None for inference tensors, which cannot change in place)."""
    return None if t.is_inference() else t._version


#: Entries of an unembedding hashed into its fingerprint (all of them when it has fewer).
FINGERPRINT_ENTRIES = 4096


def unembedding_fingerprint(unemb: Tensor) -> Tensor:
    """Two positive int64 hash keys of an unembedding's shape and of ``FINGERPRINT_ENTRIES`` seeded entries (float64
    values; all entries when there are fewer): O(1) cost at any K, exact integer hashing, so the same tensor gives the
    same keys on every device and in every dtype it is exactly representable in. Two different models' unembeddings
    differ in essentially every entry, so they get different keys.

    Example:
        >>> import torch
        >>> g = torch.randn(6, 3)
        >>> bool((unembedding_fingerprint(g) == unembedding_fingerprint(g.double())).all())
        True
        >>> bool((unembedding_fingerprint(g) == unembedding_fingerprint(g + 1)).all())
        False
    """
    flat = unemb.detach().reshape(-1)
    if flat.numel() > FINGERPRINT_ENTRIES:
        picks = torch.randint(flat.numel(), (FINGERPRINT_ENTRIES,), generator=torch.Generator().manual_seed(flat.numel()))
        flat = flat[picks.to(flat.device)]
    shape = torch.tensor(list(unemb.shape), dtype=torch.float64, device=flat.device)
    key, key2 = hash_keys(torch.cat([shape, flat.to(torch.float64)])[None, :], seed=20_24)
    return torch.cat([key, key2]).to(torch.int64) + 1


def _check_unembedding(unemb: Tensor, name: str) -> Tensor:
    check_tensor(unemb, name)
    if unemb.ndim != 2 or not unemb.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point (K, M) or (K, M+1) tensor, got {unemb.dtype} {tuple(unemb.shape)}")
    return unemb.detach()


class SVDDissimilarity(CandidateMixin):
    r"""Streaming d_SVD (SPEC §4) on the label/input sets chosen by d_LLV, like
    :func:`~lightning_repsim.functional.compare`, from embeddings and unembeddings. This is also the
    **representation route for d_LLV**: ``compute_result().llv`` is the d_LLV result, obtained from an
    O((M_p + M_q)^2) statistic, so use this metric (not :class:`LLVDistance`, whose state is O(K^2)) for large
    vocabularies such as GPT-2's K = 50,257.

    As input to ``forward`` and ``update``: ``emb_p``, ``emb_q`` (B, M_p) and (B, M_q), or (B, T, M), embeddings of
    the same inputs (the widths may differ: a smaller student), any float dtype and device; optionally
    ``unemb_p``/``unemb_q`` (if not given to the constructor), ``mask`` (boolean or 0/1 integers, 1 = use) and
    ``ids``, as in :class:`LLVDistance`.

    As output of ``forward`` and ``compute``: d_SVD as a float64 scalar tensor (``forward``: of the batch alone;
    its cost is a ``compute()`` on a batch-sized state, i.e. the label search: about a second at K = 50,257).
    :meth:`compute_result` returns the :class:`~lightning_repsim.functional.SVDResult` (f- and g-parts, subsets,
    ranks) with ``.llv``, the d_LLV result with its terms and sets (the same result type as
    :func:`~lightning_repsim.functional.svd_dissimilarity`).

    State (float64, independent of the number of inputs N; not persistent unless ``persistent(True)``), sized at the
    first ``update`` from both widths:

    * the centred mean and co-moment of ``u(x) = [f_p, logZ_p, f_q - fit(f_p, M_q), logZ_q - logZ_p]``
      (:data:`~lightning_repsim.functional.llv_representation.REPRESENTATION_LAYOUT`, ``D = M_p + M_q + 2``
      numbers, an invertible map of ``[f_p, logZ_p, f_q, logZ_q]``): ``1 + D + D^2`` numbers. With the
      unembeddings they give T1, T3, the (pivot, left-out) search and the f-part of d_SVD exactly
      (``Cov(log-probs) = B Cov(u) B^T``, never formed);
    * a candidate buffer of ``buffer_size`` inputs' embeddings, ``buffer_size x (M_p + M_q + 3)`` numbers, for
      the input-set search (T2, T4) and the g-part. Same bottom-k hash sketch as :class:`LLVDistance`. With the
      default buffer (10,240 inputs for narrow embeddings, fewer for wide ones) the search is exact (every pair of buffered inputs
      scored), so the result does not depend on ``seed`` for up to that many inputs; beyond, which inputs the seeded
      sketch keeps still moves T2 a little (measured in ``benchmarks/bench_seed_spread.py``).

    So about ``8 (D^2 + buffer_size (M_p + M_q + 3))`` bytes: 0.5 MB for M = 2, 5 MB for widths 128 and 64, 32 MB
    for M = 768, whatever K.

    Cost: ``update`` computes ``logZ`` in float64, O(B K M) per batch (none when the caller passes ``logz_p``,
    ``logz_q``). ``compute()`` is O(K D^2 + P K D) time (P pivots searched, at most 128 by default when K is larger)
    plus the input-set search, and needs about ``8 (K D + 40 * 2^22)`` bytes of temporaries (checked against
    ``memory_budget_gb`` before the first update allocates). The unembeddings are model parameters, not state: they
    are held by reference, must stay fixed while inputs are accumulated (``logZ`` is computed at ``update``; a changed
    unembedding is refused until ``reset()``).

    Args:
        rep_dim: the representation dimension M (input sets of M + 1 inputs, label subsets of M labels). None
            (default): the larger rank of the two embeddings, ``max(r_p, r_q)``, found at ``compute()``
            (``docs/smaller_student.md``).
        unemb_p, unemb_q: unembeddings (K, M_p) and (K, M_q), or with the bias as last column (e.g.
            ``torch.cat([head.weight, head.bias[:, None]], 1)``); may instead be given to ``update``.
        buffer_size: candidate inputs kept. None (default): 10,240 for narrow embeddings, fewer for wide ones, so that
            the exhaustive input-set search stays about a second of one CPU core
            (:func:`~lightning_repsim.metrics.candidates.auto_buffer_size`: 3,132 for two models of width 128, 1,323 for
            width 768).
        nan_strategy, memory_budget_gb: as in :class:`LLVDistance`.
        kwargs: ``max_label_subsets``, the label subsets evaluated for the f-part (see
            :func:`~lightning_repsim.functional.svd_dissimilarity`; None picks
            :func:`~lightning_repsim.functional.svd.default_max_label_subsets`: 4096 up to M = 51, 256 at M = 128,
            fewer above), as in :func:`~lightning_repsim.functional.compare`; the d_LLV options of
            :class:`~lightning_repsim.functional.LLVOptions` (``max_pivot_candidates`` None means at most 128 pivots
            here) and the keyword arguments of :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from lightning_repsim.constructions import theorem31_pair
        >>> from lightning_repsim.functional import compare
        >>> pair = theorem31_pair(rho=5.0, n_per_class=60, seed=0)
        >>> metric = SVDDissimilarity(unemb_p=pair.unemb_p, unemb_q=pair.unemb_q)
        >>> for i in range(0, pair.emb_p.shape[0], 100):
        ...     metric.update(pair.emb_p[i : i + 100], pair.emb_q[i : i + 100])
        >>> d_svd = metric.compute()
        >>> res = metric.compute_result()
        >>> ref = compare(pair.emb_p, pair.unemb_p, pair.emb_q, pair.unemb_q)
        >>> bool(torch.isclose(d_svd, ref.svd.value, rtol=1e-9)), res.llv.label_pivot == ref.llv.label_pivot
        (True, True)
    """

    plot_upper_bound = 1.0

    def __init__(self, rep_dim: int | None = None, unemb_p: Tensor | None = None, unemb_q: Tensor | None = None,
                 buffer_size: int | None = None, nan_strategy: str = "error",
                 memory_budget_gb: float | None = DEFAULT_MEMORY_BUDGET_GB, **kwargs: Any) -> None:
        max_label_subsets = kwargs.pop("max_label_subsets", None)
        options, kwargs = LLVOptions.split(kwargs)
        rep_dim = None if rep_dim is None else check_rep_dim(rep_dim)
        config = {"rep_dim": rep_dim, **self.candidate_config(options, buffer_size)}
        super().__init__(nan_strategy=nan_strategy, memory_budget_gb=memory_budget_gb, config=config, **kwargs)
        if options.labels is not None:
            raise ValueError("`labels` (a label subset) is for LLVDistance: the representation route is exact for any K")
        self.options = options
        self.rep_dim = rep_dim
        if max_label_subsets is not None and (isinstance(max_label_subsets, bool) or int(max_label_subsets) < 1):
            raise ValueError(f"`max_label_subsets` must be a positive int or None, got {max_label_subsets!r}")
        self.max_label_subsets = max_label_subsets
        self.unemb_p = None if unemb_p is None else _check_unembedding(unemb_p, "unemb_p")
        self.unemb_q = None if unemb_q is None else _check_unembedding(unemb_q, "unemb_q")
        self._in_use: tuple | None = None  # (unembedding, its version) of p and q that the accumulated inputs used
        # sized at the first update, once both widths are known (an unembedding may carry a bias column)
        self._add_state_kind("moments", "moments", torch.zeros(0, dtype=torch.float64))
        self._add_state_kind("widths", "dims", torch.zeros(2, dtype=torch.int64))
        # which unembeddings the accumulated logZ used: states of two models refuse to merge, load or sync together
        self._add_state_kind("unembeddings", "fingerprint", torch.zeros(4, dtype=torch.int64))
        self.buffer_size = buffer_size
        self._init_candidates(buffer_size, None if rep_dim is None else rep_dim + 1, None)

    def _describe(self, name: str, shape: tuple[int, ...]) -> str:
        described = {
            "moments": lambda: f"M_p + M_q = {moments_dim(shape[0]) - 2}",
            "candidates": lambda: f"a buffer of {shape[0]} inputs with M_p + M_q = {shape[1] - META}",
            "widths": lambda: f"widths (M_p, M_q) = {shape}",
            "unembeddings": lambda: ("no inputs" if not any(shape) else
                                     f"inputs whose logZ used other unembeddings (fingerprints p={shape[:2]}, q={shape[2:]})"),
        }
        return described[name]() if name in described else super()._describe(name, shape)

    def _check_sizes(self, m_p: int, m_q: int, k: int) -> None:
        """The set sizes, K and the memory the states and compute() need, before anything is allocated."""
        m = self.rep_dim if self.rep_dim is not None else max(m_p, m_q)
        self._size_buffer(m_p + m_q)
        if self.buffer_size < m + 1 and self.options.input_sets is None:
            raise ValueError(f"`buffer_size`={self.buffer_size} cannot hold an input set of M+1 = {m + 1} inputs")
        check_num_labels(k, m, need_subsets=True)
        d = m_p + m_q + 2
        state = 8.0 * (1 + d + d * d + self.buffer_size * (m_p + m_q + 3))
        compute = 8.0 * (k * (m_p + m_q) + 40 * CHUNK_NUMBERS)
        self._check_memory(state, compute, f"with K={k:,} labels and widths {m_p}, {m_q}", "Lower `buffer_size`.")

    def _check_unembeddings(self, m_p: int, m_q: int) -> None:
        """Both unembeddings given, of widths M_p (+1) and M_q (+1), with the same number K >= 3 of labels."""
        if self.unemb_p is None or self.unemb_q is None:
            raise ValueError(
                "SVDDissimilarity needs both models' unembeddings: pass `unemb_p` and `unemb_q` to the "
                "constructor or to update()"
            )
        unembedding_parts(self.unemb_p, m_p, "unemb_p")
        unembedding_parts(self.unemb_q, m_q, "unemb_q")
        k, k_q = self.unemb_p.shape[0], self.unemb_q.shape[0]
        if k != k_q:
            raise ValueError(f"`unemb_p` and `unemb_q` must have the same number of labels, got {k} and {k_q}")
        check_num_labels(k)

    def _unembeddings(self, m_p: int, m_q: int, device: torch.device) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """Float64 weights and biases on ``device``, checked (finite included)."""
        self._check_unembeddings(m_p, m_q)
        w_p, b_p = split_unembedding(self.unemb_p.to(device), m_p, "unemb_p")
        w_q, b_q = split_unembedding(self.unemb_q.to(device), m_q, "unemb_q")
        self.options.resolve(w_p.shape[0])
        return w_p, b_p, w_q, b_q

    def _raw_unembeddings(self, m_p: int, m_q: int) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """Weights and biases as views of the unembeddings in their own dtype and device (no K x M float64 copy per
        update: ``log_partition`` converts blocks of labels), after the shape checks."""
        self._check_unembeddings(m_p, m_q)
        return (*unembedding_parts(self.unemb_p, m_p, "unemb_p"), *unembedding_parts(self.unemb_q, m_q, "unemb_q"))

    @staticmethod
    def _check_unchanged(unemb: Tensor, name: str, used: tuple[Tensor, int]) -> None:
        """Refuse an unembedding that differs from the one the accumulated inputs used, also after an in-place
        change (e.g. an optimizer step on the parameter it views, seen by the tensor's version counter): an O(K M)
        comparison when a different tensor is given, none when it is the same one."""
        tensor, version = used
        if version is not None and _version(tensor) != version:
            changed = True
        elif unemb is tensor:
            changed = False
        else:
            changed = unemb.shape != tensor.shape or not torch.equal(unemb.to(tensor.device, tensor.dtype), tensor)
        if changed:
            raise ValueError(
                f"`{name}` changed while inputs were being accumulated: logZ of the earlier inputs was computed with "
                "the old unembedding, so the statistics would mix two models. Call reset() (e.g. at the start of each "
                "validation epoch) before updating with a new unembedding."
            )

    def update(
        self,
        emb_p: Tensor,
        emb_q: Tensor,
        mask: Tensor | None = None,
        ids: Tensor | None = None,
        unemb_p: Tensor | None = None,
        unemb_q: Tensor | None = None,
        logz: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        """Accumulate a batch of both models' embeddings (see the class docstring); ``mask`` and ``ids`` as in every
        metric of this package. ``logz`` (optional): ``(logz_p, logz_q)``, each input's log-partition ``logsumexp``
        of each model's logits (the embeddings' leading shape), when the caller has the logits, e.g.
        :class:`~lightning_repsim.ReferenceComparison`; saves recomputing them from the embeddings (O(B K M))."""
        logz_p, logz_q = (None, None) if logz is None else logz
        new_p = self.unemb_p if unemb_p is None else _check_unembedding(unemb_p, "unemb_p")
        new_q = self.unemb_q if unemb_q is None else _check_unembedding(unemb_q, "unemb_q")
        if self._in_use is not None and new_p is not None and new_q is not None:
            self._check_unchanged(new_p, "unemb_p", self._in_use[0])
            self._check_unchanged(new_q, "unemb_q", self._in_use[1])
        given = _stack_log_partitions(emb_p, emb_q, logz_p, logz_q)
        if given is not None:  # carried as an extra column, so masks and dropped rows apply to it too
            emb_p, emb_q = torch.cat([emb_p.double(), given[0]], -1), torch.cat([emb_q.double(), given[1]], -1)
        f_p, f_q, ids, dropped = embedding_rows(emb_p, emb_q, mask, ids, self.nan_strategy, same_dim=False)
        if given is not None:
            (f_p, lz_p), (f_q, lz_q) = (f_p[:, :-1], f_p[:, -1]), (f_q[:, :-1], f_q[:, -1])
        m_p, m_q = f_p.shape[1], f_q.shape[1]
        self.unemb_p, self.unemb_q = new_p, new_q
        w_p, b_p, w_q, b_q = self._raw_unembeddings(m_p, m_q)
        if self._in_use is None:  # the first inputs of this accumulation: sizes, memory and finiteness, once
            self._check_sizes(m_p, m_q, w_p.shape[0])
            for unemb, name in ((self.unemb_p, "unemb_p"), (self.unemb_q, "unemb_q")):
                if not bool(torch.isfinite(unemb).all()):
                    check_finite(unemb.to(torch.float64), name)
        contributions: dict[str, Any] = {"widths": torch.tensor([m_p, m_q], dtype=torch.int64)}
        if self._in_use is None and f_p.shape[0]:
            contributions["unembeddings"] = self._fingerprints()
        if dropped:
            contributions["num_dropped"] = dropped
        if f_p.shape[0]:
            if given is None:
                lz_p = log_partition(f_p, w_p.to(f_p.device), None if b_p is None else b_p.to(f_p.device))
                lz_q = log_partition(f_q, w_q.to(f_p.device), None if b_q is None else b_q.to(f_p.device))
            if not (bool(torch.isfinite(lz_p).all()) and bool(torch.isfinite(lz_q).all())):
                raise ValueError("the log-partition logsumexp(W f + b) is not finite for some inputs (logits overflow float64)")
            contributions["moments"] = representation_rows(f_p, lz_p, f_q, lz_q)
            both = torch.cat([f_p, f_q], dim=1)
            contributions["candidates"] = self._candidate_rows(both, both, ids)
        self._accumulate(contributions)
        if f_p.shape[0] and self._in_use is None:
            self._in_use = ((self.unemb_p, _version(self.unemb_p)), (self.unemb_q, _version(self.unemb_q)))

    def reset(self) -> None:
        super().reset()
        self._in_use = None

    def _adopt_loaded_states(self) -> None:
        """A loaded state must have been accumulated with this metric's unembeddings, when it holds them."""
        super()._adopt_loaded_states()
        self._in_use = None  # the next update checks its unembeddings against the loaded fingerprints
        loaded = self.unembeddings
        if bool((loaded == 0).all()) or self.unemb_p is None or self.unemb_q is None:
            return
        mine = self._fingerprints().to(loaded.device)
        if not torch.equal(mine, loaded):
            self.reset()
            raise ValueError(
                "SVDDissimilarity: the loaded state_dict holds inputs whose logZ used other unembeddings (fingerprints "
                f"{loaded.tolist()}) than this metric's ({mine.tolist()}): its statistics belong to another model"
            )

    def _fingerprints(self) -> Tensor:
        """The fingerprints of both unembeddings, ``[p (2), q (2)]``: what the ``unembeddings`` state holds."""
        return torch.cat([unembedding_fingerprint(self.unemb_p), unembedding_fingerprint(self.unemb_q)])

    def __getstate__(self) -> dict[str, Any]:
        # tensor version counters do not survive a copy: a copy checks the unembeddings from its next update on
        return {**super().__getstate__(), "_in_use": None}

    def _result_from(self, states: dict[str, Tensor]) -> SVDResult:
        moments = states["moments"]
        if moments.numel() == 0 or int(moments[0]) == 0:
            raise ValueError("SVDDissimilarity needs at least M + 2 inputs, got N=0")
        m_p, m_q = (int(w) for w in states["widths"].tolist())
        n, mean_u, cov_u = moments_covariance(moments)
        cov_f = embedding_covariance(cov_u, m_p)
        r = representation_dim(cov_f, m_p, self.rep_dim)  # max(r_p, r_q) unless given
        check_num_inputs(n, r)
        heads = self._unembeddings(m_p, m_q, cov_u.device)
        k = heads[0].shape[0]
        check_num_labels(k, r, need_subsets=True)
        rows = self._buffered_rows(states["candidates"])
        candidates = self._candidate_sets(rows, r + 1)
        fp_rows, fq_rows = rows[:, META : META + m_p], rows[:, META + m_p :]
        route = RepresentationRoute((mean_u, cov_u), heads, (fp_rows, fq_rows))
        llv, chosen = llv_from_route(route, candidates, self.options, self.options.resolve(k), LLVSizes(n, k, r))
        stats = SVDStatistics(cov_f, heads[0], heads[2], fp_rows[chosen], fq_rows[chosen],
                              cov_w=embedding_covariance(route.sigma_h, m_p))
        svd = svd_from_parts(stats, (llv.label_pivot, llv.leave_out, llv.input_set), r, self.max_label_subsets, self.options.seed)
        return dataclasses.replace(svd, llv=llv)

    def compute_result(self) -> SVDResult:
        """The full :class:`~lightning_repsim.functional.SVDResult` with its ``llv`` (the d_LLV result that chose the
        sets); ``.value`` is what ``compute()`` returns."""
        return super().compute_result()
