"""The paper's full pipeline in one call: d_LLV chooses the sets, d_SVD uses them, plus the
baselines (mean KL, mCCA) and the bounds d_SVD <= 2 M d_LLV (paper) and d_SVD <= 2 d_LLV^2 (SPEC §5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_repsim.functional._moments import batch_moments, covariance_from_moments
from lightning_repsim.functional._validation import (
    as_matrix,
    check_finite,
    check_input_sets,
    check_logit_pair,
    check_num_inputs,
    check_num_labels,
)
from lightning_repsim.functional.cca import canonical_correlations_from_cov, check_cca_inputs
from lightning_repsim.functional.cka import logit_distance_rows
from lightning_repsim.functional.family import logits_from_parts, split_unembedding
from lightning_repsim.functional.kl import kl_per_input, mean_kl_divergence
from lightning_repsim.functional.llv import LLVOptions, LLVResult, draw_input_sets, llv_distance
from lightning_repsim.functional.llv_representation import embedding_covariance, label_covariance_of_h, representation_llv
from lightning_repsim.functional.llv_terms import CHUNK_NUMBERS
from lightning_repsim.functional.svd import (
    SVDResult,
    default_max_label_subsets,
    embedding_pair_covariance,
    representation_dim,
    svd_from_parts,
)

__all__ = ["ComparisonReport", "compare"]


@dataclass(frozen=True)
class ComparisonReport:
    """What :func:`compare` measured: every distance between two models on the same inputs.

    Attributes:
        llv: the :class:`LLVResult` (sets chosen here are used by ``svd``).
        svd: the :class:`SVDResult`.
        kl: mean KL divergence ``KL(p || q)``.
        d_logit: the logit distance ``sqrt(mean_x ||c(z_p) - c(z_q)||^2)`` (Nielsen et al. 2026; ``c`` centres over
            classes).
        mcca: mean canonical correlation of the embeddings; ``canonical_correlations`` all of them.
        bound_paper: ``2 M d_LLV`` (Theorem 4.6/4.7; informative below 1/(2M)).
        bound_sharp: ``2 d_LLV^2`` (SPEC §5).
    """

    llv: LLVResult
    svd: SVDResult
    kl: Tensor
    d_logit: Tensor
    mcca: Tensor
    canonical_correlations: Tensor
    bound_paper: Tensor
    bound_sharp: Tensor
    rep_dim: int
    num_inputs: int
    num_labels: int

    def as_dict(self) -> dict[str, float]:
        """Flat scalar dictionary (keys as logged by the callback)."""
        llv = {k: v for k, v in self.llv.as_dict().items() if k not in ("label_pivot", "leave_out")}
        return {
            "kl": float(self.kl),
            "d_logit": float(self.d_logit),
            **llv,
            **self.svd.as_dict(),
            "mcca": float(self.mcca),
            "bound_paper": float(self.bound_paper),
            "bound_sharp": float(self.bound_sharp),
        }

    def summary(self) -> str:
        """A human-readable report."""
        d = self.as_dict()
        lines = [
            f"Compared two models on N={self.num_inputs} inputs, K={self.num_labels} labels, M={self.rep_dim}",
            f"  mean KL(p||q)          {d['kl']:.6g}      (predictive closeness; small does NOT imply similar representations)",
            f"  d_logit                {d['d_logit']:.6g}      (centred-logit distance)",
            f"  d_LLV                  {d['d_llv']:.6g}      T1={d['llv_t1']:.4g} T2={d['llv_t2']:.4g} "
            f"lam*T3={self.llv.lam * d['llv_t3']:.3g} lam*T4={self.llv.lam * d['llv_t4']:.3g}",
            f"  d_SVD                  {d['d_svd']:.6g}      f-part={d['d_svd_f']:.4g} g-part={d['d_svd_g']:.4g}"
            + ("" if self.svd.exhaustive else f" (f-part over a sample of {self.svd.msvd_f.numel()} of "
               f"{_count(self.svd.num_label_subsets)} label subsets: a lower estimate)"),
            f"  mCCA                   {d['mcca']:.6g}",
            f"  bounds on d_SVD        2*M*d_LLV={d['bound_paper']:.4g}   2*d_LLV^2={d['bound_sharp']:.4g}",
            f"  sets                   label pivot={self.llv.label_pivot} left-out={self.llv.leave_out} "
            f"input set={self.llv.input_set.tolist()}",
        ]
        if self.llv.labels is not None:
            lines.append(f"  d_LLV was computed on {self.llv.labels.numel()} of the {self.num_labels} labels: an estimate")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _count(value: int) -> str:
    """An integer as digits, or as a power of ten when it is astronomically large (C(K-2, M) for large K)."""
    return f"{value:,}" if value < 10**12 else f"about 10^{len(str(value)) - 1}"


#: Routes of :func:`compare`.
ROUTES = ("auto", "logits", "representation")


def choose_route(route: str, k: int, m: int) -> str:
    """``"auto"``: the representation route when its ``(2M+2)^2`` statistic is much smaller than the logits
    route's ``2K x 2K`` one and K is large (K > max(256, 4 (M + 1))), else the logits route."""
    if route not in ROUTES:
        raise ValueError(f"`route` must be one of {ROUTES}, got {route!r}")
    if route != "auto":
        return route
    return "representation" if k > max(256, 4 * (m + 1)) else "logits"


def compare(
    emb_p: Tensor,
    unemb_p: Tensor,
    emb_q: Tensor,
    unemb_q: Tensor,
    max_label_subsets: int | None = None,
    route: str = "auto",
    logits_p: Tensor | None = None,
    logits_q: Tensor | None = None,
    **options: Any,
) -> ComparisonReport:
    """Compare two models of the family ``p(y|x) = softmax(f(x)^T g(y))`` on the same inputs.

    Args:
        emb_p, emb_q: embeddings ``f`` (N x M).
        unemb_p, unemb_q: unembeddings ``g`` (K x M), or K x (M+1) with the bias as last column
            (e.g. ``torch.cat([linear.weight, linear.bias[:, None]], 1)``).
        max_label_subsets: as in :func:`svd_dissimilarity` (default: 4096 up to M = 51, fewer above).
        route: ``"logits"`` computes d_LLV from the N x K log-probabilities and a 2K x 2K covariance
            (:func:`llv_distance`); ``"representation"`` from the ``(2M+2)^2`` covariance of
            ``[f_p, logZ_p, f_q - f_p, logZ_q - logZ_p]`` and the unembeddings (as
            :class:`~lightning_repsim.metrics.SVDDissimilarity` does: O(N K M) time for the logits, which are
            formed in blocks of rows, and O(N M^2 + K M^2) for the statistics; never K x K or N x K at once);
            ``"auto"`` (default) takes the representation route when K > max(256, 4 (M + 1)). Both give the
            same numbers (to rounding) for the same options; the representation route's default pivot search
            is bounded (see :class:`LLVOptions`).
        logits_p, logits_q: the models' own logits (N, K), optional. When given, the KL and each input's
            ``logZ`` come from them (in float64) rather than from ``f g^T``, on the logits route d_LLV too:
            what :class:`~lightning_repsim.ReferenceComparison` does with the logits the models produced (in
            float32 they differ from ``f g^T`` in float64 by rounding).
        options: the d_LLV options of :class:`LLVOptions` (``lam``, ``reduce``, ``combine``, ``label_pivot``,
            ``leave_out``, ``labels`` (logits route only), ``input_sets``, ``num_input_sets``, ``seed``, ...);
            ``seed`` also seeds the sample of label subsets of d_SVD.

    Example:
        >>> from lightning_repsim.constructions import theorem31_pair
        >>> pair = theorem31_pair(rho=20.0, n_per_class=200, seed=0)
        >>> report = compare(pair.emb_p, pair.unemb_p, pair.emb_q, pair.unemb_q)
        >>> float(report.kl) < 1e-4, float(report.llv.value) > 1.3, float(report.mcca) < 0.05
        (True, True, True)
        >>> same = compare(pair.emb_p, pair.unemb_p, pair.emb_q, pair.unemb_q, route="representation")
        >>> bool(abs(same.llv.value - report.llv.value) < 1e-9)
        True
    """
    opts = LLVOptions(**options)
    f_p = as_matrix(emb_p, "emb_p")
    f_q = as_matrix(emb_q, "emb_q")
    if f_p.shape != f_q.shape:
        raise ValueError(f"`emb_p` and `emb_q` must have the same shape, got {tuple(f_p.shape)} and {tuple(f_q.shape)}")
    check_finite(f_p, "emb_p")
    check_finite(f_q, "emb_q")
    n, m = f_p.shape
    w_p, b_p = split_unembedding(unemb_p, m, "unemb_p")
    w_q, b_q = split_unembedding(unemb_q, m, "unemb_q")
    if w_p.shape != w_q.shape:
        raise ValueError(f"`unemb_p` and `unemb_q` must have the same number of labels, got {w_p.shape[0]} and {w_q.shape[0]}")
    k = w_p.shape[0]
    given = _given_logits(logits_p, logits_q, n, k)
    if choose_route(route, k, m) == "logits":
        cov_f, cov_w = embedding_pair_covariance(f_p, f_q), None
        r = representation_dim(cov_f, m)  # M unless the embeddings are rank-deficient (LayerNorm-final, dead units)
        logits_p, logits_q = given if given is not None else (logits_from_parts(f_p, w_p, b_p), logits_from_parts(f_q, w_q, b_q))
        llv = llv_distance(logits_p, logits_q, rep_dim=r, **options)
        kl = mean_kl_divergence(logits_p, logits_q)
        d_logit = logit_distance_rows(logits_p, logits_q).mean().sqrt()
    else:
        if opts.labels is not None:
            raise ValueError("`labels` (a label subset) applies to the logits route; the representation route is exact for any K")
        check_num_labels(k, m)
        kl, d_logit, u = _kl_and_representation_rows(f_p, w_p, b_p, f_q, w_q, b_q, given)
        count, mean_u, m2 = batch_moments(u)
        cov_u = covariance_from_moments(count, m2)
        cov_f = embedding_covariance(cov_u, m)
        r = representation_dim(cov_f, m)
        check_num_inputs(n, r)
        if opts.input_sets is None:
            sets = draw_input_sets(n, r + 1, opts.num_input_sets, opts.seed)
        else:
            sets = check_input_sets(opts.input_sets, r, n)
        sets = sets.to(f_p.device)
        sigma_h = label_covariance_of_h(w_p, b_p, w_q, b_q)  # shared by the input terms and the g-part
        llv, _ = representation_llv(n, mean_u, cov_u, w_p, b_p, w_q, b_q, f_p, f_q, sets, lambda s: s, opts, sigma_h, rep_dim=r)
        cov_w = embedding_covariance(sigma_h, m)
    check_num_labels(k, r, need_subsets=True)
    subsets = default_max_label_subsets(r) if max_label_subsets is None else max_label_subsets
    svd = svd_from_parts(
        f_p, w_p, f_q, w_q, llv.label_pivot, llv.leave_out, llv.input_set, f_p[llv.input_set], f_q[llv.input_set],
        subsets, opts.seed, cov_f=cov_f, cov_w=cov_w,
    )
    check_cca_inputs(n, m, m)
    ccs = canonical_correlations_from_cov(cov_f, m)
    d = llv.value
    return ComparisonReport(
        llv=llv,
        svd=svd,
        kl=kl,
        d_logit=d_logit,
        mcca=ccs.mean(),
        canonical_correlations=ccs,
        bound_paper=2 * r * d,
        bound_sharp=2 * d * d,
        rep_dim=r,
        num_inputs=n,
        num_labels=llv.num_labels,
    )


def _given_logits(logits_p: Tensor | None, logits_q: Tensor | None, n: int, k: int) -> tuple[Tensor, Tensor] | None:
    if logits_p is None and logits_q is None:
        return None
    if logits_p is None or logits_q is None:
        raise ValueError("pass both `logits_p` and `logits_q`, or neither")
    p, q = check_logit_pair(logits_p, logits_q)
    if p.shape != (n, k):
        raise ValueError(f"`logits_p`/`logits_q` must have shape (N, K) = ({n}, {k}) (the embeddings' inputs, the "
                         f"unembeddings' labels), got {tuple(p.shape)}")
    return p, q


def _kl_and_representation_rows(
    f_p: Tensor, w_p: Tensor, b_p: Tensor | None, f_q: Tensor, w_q: Tensor, b_q: Tensor | None,
    given: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean KL(p || q), d_logit and the rows ``u = [f_p, logZ_p, f_q - f_p, logZ_q - logZ_p]``, from the ``given``
    logits or those formed from the representations, in blocks of rows (float64; memory O(block K))."""
    n, k = f_p.shape[0], w_p.shape[0]
    step = max(1, CHUNK_NUMBERS // k)
    kl_sum = f_p.new_zeros(())
    logit_sum = f_p.new_zeros(())
    logz = []
    for start in range(0, n, step):
        sl = slice(start, start + step)
        if given is None:
            z_p, z_q = logits_from_parts(f_p[sl], w_p, b_p), logits_from_parts(f_q[sl], w_q, b_q)
        else:
            z_p, z_q = given[0][sl], given[1][sl]
        lz_p, lz_q = torch.logsumexp(z_p, dim=1), torch.logsumexp(z_q, dim=1)
        kl_sum = kl_sum + kl_per_input(z_p - lz_p[:, None], z_q - lz_q[:, None]).sum()
        logit_sum = logit_sum + logit_distance_rows(z_p, z_q).sum()
        logz.append(torch.stack([lz_p, lz_q], dim=1))
    lz = torch.cat(logz)
    u = torch.cat([f_p, lz[:, :1], f_q - f_p, lz[:, 1:] - lz[:, :1]], dim=1)
    return kl_sum / n, (logit_sum / n).sqrt(), u
