"""Streaming d_SVD with the sets chosen by d_LLV, from embeddings and unembeddings (the
representation route: O(M^2) state whatever the vocabulary size)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from lightning_repsim.functional._validation import (
    check_finite,
    check_label_index,
    check_num_inputs,
    check_num_labels,
    check_rep_dim,
)
from lightning_repsim.functional.llv import (
    LLVResult,
    input_terms_from_representation,
    label_cov_from_representation,
    label_means_from_representation,
    label_part,
    llv_result,
    select_input_set,
)
from lightning_repsim.functional.svd import DEFAULT_MAX_LABEL_SUBSETS, SVDResult, svd_from_parts
from lightning_repsim.metrics._state import (
    META,
    CandidateMixin,
    StreamingMetric,
    moments_add,
    moments_covariance,
    moments_dim,
    moments_size,
)
from lightning_repsim.metrics.cca import embedding_rows
from lightning_repsim.metrics.llv import DEFAULT_BUFFER_SIZE, check_llv_options, choose_pivots

__all__ = ["SVDDissimilarity", "SVDDissimilarityResult", "DEFAULT_MAX_PIVOT_CANDIDATES", "default_max_label_subsets"]

#: Pivots searched by default when K is larger (a (pivot, left-out) table costs O(P K) memory).
DEFAULT_MAX_PIVOT_CANDIDATES = 128
_LOGZ_CHUNK = 8192


def default_max_label_subsets(rep_dim: int) -> int:
    """Label subsets evaluated for the f-part when ``max_label_subsets`` is None: the functional
    default (4096) up to M = 128, then fewer so that their M x M products and SVDs stay about 2^33
    flops (M = 256: 512, M = 768: 18); never fewer than 8."""
    return int(min(DEFAULT_MAX_LABEL_SUBSETS, max(8, 2**33 // rep_dim**3)))


@dataclass(frozen=True)
class SVDDissimilarityResult:
    """What :class:`SVDDissimilarity` computed.

    Attributes:
        value: d_SVD ``= max(f_part, g_part)`` (float64 scalar).
        f_part, g_part: the two parts of d_SVD.
        llv: the :class:`~lightning_repsim.functional.LLVResult` that chose the sets (representation route:
            T1/T3 exact from the O(M^2) statistic; ``llv.label_search == "restricted"`` when only some
            pivots were searched).
        svd: the full :class:`~lightning_repsim.functional.SVDResult` (``svd.exhaustive`` is False when the
            f-part was evaluated on a sample of label subsets).
    """

    value: Tensor
    f_part: Tensor
    g_part: Tensor
    llv: LLVResult
    svd: SVDResult

    def as_dict(self) -> dict[str, float]:
        """Flat scalars for loggers: d_llv, t1..t4, label_pivot, leave_out, d_svd, d_svd_f, d_svd_g."""
        return {**self.llv.as_dict(), **self.svd.as_dict()}


def _check_unembedding(unemb: Tensor, name: str) -> Tensor:
    if not isinstance(unemb, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(unemb).__name__}")
    if unemb.ndim != 2 or not unemb.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point (K, M) or (K, M+1) tensor, got {unemb.dtype} {tuple(unemb.shape)}")
    return unemb.detach()


def _split(unemb: Tensor, m: int, name: str, device: torch.device) -> tuple[Tensor, Tensor | None]:
    """Float64 weights (K, M) and bias (K,) or None of an unembedding, on ``device``."""
    if unemb.shape[1] not in (m, m + 1):
        raise ValueError(
            f"`{name}` must have shape (K, M) or (K, M+1) (bias as last column) with M={m} "
            f"(the embedding dimension), got {tuple(unemb.shape)}"
        )
    u = unemb.to(device=device, dtype=torch.float64)
    check_finite(u, name)
    return u[:, :m], (u[:, m] if u.shape[1] == m + 1 else None)


def _log_partition(f: Tensor, unemb: Tensor, m: int) -> Tensor:
    """``logsumexp_y (W f + b)_y`` in float64, over label chunks (never a B x K float64 block for large K)."""
    parts = []
    for start in range(0, unemb.shape[0], _LOGZ_CHUNK):
        w = unemb[start : start + _LOGZ_CHUNK].to(device=f.device, dtype=torch.float64)
        z = f @ w[:, :m].T
        if w.shape[1] == m + 1:
            z = z + w[:, m]
        parts.append(torch.logsumexp(z, dim=1))
    return parts[0] if len(parts) == 1 else torch.logsumexp(torch.stack(parts, dim=1), dim=1)


class SVDDissimilarity(CandidateMixin, StreamingMetric):
    r"""Streaming d_SVD (SPEC §4) on the label/input sets chosen by d_LLV, like
    :func:`~lightning_repsim.functional.compare`, from embeddings and unembeddings. This is also the
    **representation route for d_LLV**: ``compute().llv`` is the d_LLV result, obtained from an O(M^2)
    statistic, so use this metric (not :class:`LLVDistance`, whose state is O(K^2)) for large
    vocabularies such as GPT-2's K = 50,257.

    State (float64, independent of the number of inputs N):

    * the centred mean and co-moment of ``u(x) = [f_p, logZ_p, f_q - f_p, logZ_q - logZ_p]``
      (``2M + 2`` numbers, an invertible map of ``[f_p, logZ_p, f_q, logZ_q]``): ``1 + (2M+2) + (2M+2)^2``
      numbers. With the unembeddings they give T1, T3, the (pivot, left-out) search and the f-part of
      d_SVD exactly (``Cov(log-probs) = B Cov(u) B^T``, never formed);
    * a candidate buffer of ``buffer_size`` inputs' embeddings, ``buffer_size x (2M + 3)`` numbers, for
      the input-set search (T2, T4) and the g-part. Same bottom-k hash sketch as :class:`LLVDistance`.

    So ``8 (2 + (2M+2) + (2M+2)^2 + buffer_size (2M+3))`` bytes (with the dropped-row counter):
    31.5 MB for M = 768 and the default
    buffer, whatever K.

    Cost: ``update`` computes ``logZ`` in float64, O(B K M) per batch. ``compute()`` is O(K M^2 + P K M)
    time (P pivots searched) and temporarily needs about ``8 (20 P K + 4 K M)`` bytes: about 1 GB for
    K = 50,257, P = 128 (lower ``max_pivot_candidates`` to need less); see ``benchmarks/bench_metrics.py``. The unembeddings are
    model parameters, not state: they are held by reference (the latest given wins) and must be fixed
    while inputs are accumulated (``logZ`` is computed at ``update``).

    Args:
        rep_dim: M; if None, taken from the first ``update`` (the state is then sized lazily).
        unemb_p, unemb_q: unembeddings (K, M), or (K, M+1) with the bias as last column (e.g.
            ``torch.cat([head.weight, head.bias[:, None]], 1)``); may instead be given to ``update``.
        lam, reduce, combine, label_pivot, leave_out, input_sets, num_input_sets, seed, pivot_candidates,
            buffer_size, nan_strategy: as in :class:`LLVDistance`.
        max_pivot_candidates: when K is larger, only the labels with the largest mean log-probability
            (averaged over the two models) are searched as pivots, the left-out label still over all K;
            the result says ``llv.label_search == "restricted"``. Default 128 (the search then costs
            O(128 K M)); None searches all K^2 pairs (O(K^2 M) time, O(K^2) memory: fine for K up to a
            few thousand).
        max_label_subsets: label subsets evaluated for the f-part (see
            :func:`~lightning_repsim.functional.svd_dissimilarity`); None picks
            :func:`default_max_label_subsets` (4096 up to M = 128, fewer above).
        kwargs: passed to :class:`torchmetrics.Metric`.

    ``update(emb_p, emb_q, unemb_p=None, unemb_q=None, mask=None, ids=None)``: embeddings (B, M) or
    (B, T, M), any float dtype and device (accumulated in float64 there); ``mask``/``ids`` as in
    :class:`LLVDistance`. ``forward`` only updates.

    Example:
        >>> import torch
        >>> from lightning_repsim.constructions import theorem31_pair
        >>> from lightning_repsim.functional import compare
        >>> pair = theorem31_pair(rho=5.0, n_per_class=60, seed=0)
        >>> metric = SVDDissimilarity(unemb_p=pair.unemb_p, unemb_q=pair.unemb_q)
        >>> for i in range(0, pair.emb_p.shape[0], 100):
        ...     metric.update(pair.emb_p[i : i + 100], pair.emb_q[i : i + 100])
        >>> res = metric.compute()
        >>> ref = compare(pair.emb_p, pair.unemb_p, pair.emb_q, pair.unemb_q)
        >>> bool(torch.isclose(res.f_part, ref.svd.f_part, rtol=1e-9)), res.llv.label_pivot == ref.llv.label_pivot
        (True, True)
    """

    def __init__(
        self,
        rep_dim: int | None = None,
        unemb_p: Tensor | None = None,
        unemb_q: Tensor | None = None,
        lam: float = 1e-5,
        reduce: str = "max",
        combine: str = "max",
        label_pivot: int | None = None,
        leave_out: int | None = None,
        input_sets: Tensor | None = None,
        num_input_sets: int = 200,
        seed: int = 0,
        pivot_candidates: Tensor | None = None,
        max_pivot_candidates: int | None = DEFAULT_MAX_PIVOT_CANDIDATES,
        max_label_subsets: int | None = None,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        nan_strategy: str = "error",
        **kwargs: Any,
    ) -> None:
        super().__init__(nan_strategy=nan_strategy, **kwargs)
        self.rep_dim = None if rep_dim is None else check_rep_dim(rep_dim)
        check_llv_options(lam, reduce, combine, max_pivot_candidates)
        if label_pivot is not None and label_pivot == leave_out:
            raise ValueError(f"`label_pivot` and `leave_out` must differ, both are {label_pivot}")
        if max_label_subsets is not None and (isinstance(max_label_subsets, bool) or int(max_label_subsets) < 1):
            raise ValueError(f"`max_label_subsets` must be a positive int or None, got {max_label_subsets!r}")
        self.lam, self.reduce, self.combine = float(lam), reduce, combine
        self.label_pivot, self.leave_out = label_pivot, leave_out
        self.pivot_candidates = pivot_candidates
        self.max_pivot_candidates = max_pivot_candidates
        self.max_label_subsets = max_label_subsets
        self.unemb_p = None if unemb_p is None else _check_unembedding(unemb_p, "unemb_p")
        self.unemb_q = None if unemb_q is None else _check_unembedding(unemb_q, "unemb_q")
        m = self.rep_dim
        self._add_moments("moments", None if m is None else 2 * m + 2)
        self._init_candidates(
            buffer_size, input_sets, None if m is None else m + 1, None if m is None else 2 * m, num_input_sets, seed
        )

    def _unembeddings(self, m: int, device: torch.device) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        if self.unemb_p is None or self.unemb_q is None:
            raise ValueError(
                "SVDDissimilarity needs both models' unembeddings: pass `unemb_p` and `unemb_q` to the "
                "constructor or to update()"
            )
        w_p, b_p = _split(self.unemb_p, m, "unemb_p", device)
        w_q, b_q = _split(self.unemb_q, m, "unemb_q", device)
        if w_p.shape[0] != w_q.shape[0]:
            raise ValueError(
                f"`unemb_p` and `unemb_q` must have the same number of labels, got {w_p.shape[0]} and {w_q.shape[0]}"
            )
        k = w_p.shape[0]
        check_num_labels(k, m, need_subsets=True)
        for name in ("label_pivot", "leave_out"):
            check_label_index(getattr(self, name), name, k)
        return w_p, b_p, w_q, b_q

    def update(
        self,
        emb_p: Tensor,
        emb_q: Tensor,
        unemb_p: Tensor | None = None,
        unemb_q: Tensor | None = None,
        mask: Tensor | None = None,
        ids: Tensor | None = None,
    ) -> None:
        if unemb_p is not None:
            self.unemb_p = _check_unembedding(unemb_p, "unemb_p")
        if unemb_q is not None:
            self.unemb_q = _check_unembedding(unemb_q, "unemb_q")
        f_p, f_q, ids = embedding_rows(self, emb_p, emb_q, mask, ids, same_dim=True)
        m = f_p.shape[1]
        if self.rep_dim is not None and m != self.rep_dim:
            raise ValueError(f"SVDDissimilarity was built for M={self.rep_dim}, got embeddings with M={m}")
        for unemb, name in ((self.unemb_p, "unemb_p"), (self.unemb_q, "unemb_q")):
            if unemb is None:
                self._unembeddings(m, f_p.device)  # raises the missing-unembedding error
            if unemb.shape[1] not in (m, m + 1):
                _split(unemb, m, name, f_p.device)  # raises the shape error
        if self.unemb_p.shape[0] != self.unemb_q.shape[0]:
            self._unembeddings(m, f_p.device)  # raises the label-count error
        check_num_labels(self.unemb_p.shape[0], m, need_subsets=True)
        if f_p.shape[0] == 0:
            return
        lz_p = _log_partition(f_p, self.unemb_p, m)
        lz_q = _log_partition(f_q, self.unemb_q, m)
        if not (bool(torch.isfinite(lz_p).all()) and bool(torch.isfinite(lz_q).all())):
            check_finite(self.unemb_p.to(torch.float64), "unemb_p")
            check_finite(self.unemb_q.to(torch.float64), "unemb_q")
            raise ValueError("the log-partition logsumexp(W f + b) is not finite for some inputs (logits overflow float64)")
        u = torch.cat([f_p, lz_p[:, None], f_q - f_p, (lz_q - lz_p)[:, None]], dim=1)
        self.moments = moments_add(self._size_state("moments", (moments_size(2 * m + 2),)), u)
        both = torch.cat([f_p, f_q], dim=1)
        self._insert_candidates(both, both, ids)

    def compute(self) -> SVDDissimilarityResult:
        if self.moments.numel() == 0:
            raise ValueError("SVDDissimilarity needs at least M + 2 inputs, got N=0")
        m = (moments_dim(self.moments.numel()) - 2) // 2
        n, mean_u, cov_u = moments_covariance(self.moments)
        check_num_inputs(n, m)
        device = cov_u.device
        w_p, b_p, w_q, b_q = self._unembeddings(m, device)
        k = w_p.shape[0]
        pivots = choose_pivots(
            *label_means_from_representation(mean_u, w_p, b_p, w_q, b_q), self.pivot_candidates, self.max_pivot_candidates
        )
        labels = label_part(
            partial(label_cov_from_representation, cov_u, w_p, w_q), k, device, self.reduce, self.label_pivot,
            self.leave_out, pivots,
        )
        rows = self._candidate_rows()
        pos, reported = self._candidate_sets(rows, m + 1)
        fp_rows, fq_rows = rows[:, META : META + m], rows[:, META + m :]
        b, b_piv, t4, valid = input_terms_from_representation(fp_rows, fq_rows, w_p, b_p, w_q, b_q, pos)
        inputs = select_input_set(b, b_piv, t4, valid, reported, self.reduce)
        llv = llv_result(labels, inputs, n, k, m, self.lam, self.reduce, self.combine)

        # covariance of [f_p; f_q] from that of u (f_q = f_p + (f_q - f_p))
        s_pp, s_pd, s_dd = cov_u[:m, :m], cov_u[:m, m + 1 : 2 * m + 1], cov_u[m + 1 : 2 * m + 1, m + 1 : 2 * m + 1]
        s_pq = s_pp + s_pd
        cov_f = torch.cat([torch.cat([s_pp, s_pq], 1), torch.cat([s_pq.T, s_pp + s_pd + s_pd.T + s_dd], 1)], 0)
        chosen = pos[inputs.chosen_candidate]
        subsets = self.max_label_subsets if self.max_label_subsets is not None else default_max_label_subsets(m)
        svd = svd_from_parts(
            None, w_p, None, w_q, llv.label_pivot, llv.leave_out, llv.input_set, fp_rows[chosen], fq_rows[chosen],
            int(subsets), self.seed, cov_f=cov_f,
        )
        return SVDDissimilarityResult(value=svd.value, f_part=svd.f_part, g_part=svd.g_part, llv=llv, svd=svd)
