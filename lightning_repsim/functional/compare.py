"""The paper's full pipeline in one call: d_LLV chooses the sets, d_SVD uses them, plus the
baselines (mean KL, mCCA) and the bounds d_SVD <= 2 M d_LLV (paper) and d_SVD <= 2 d_LLV^2 (SPEC §5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_repsim.functional._moments import batch_moments, covariance_from_moments
from lightning_repsim.functional.cca import canonical_correlations_from_cov, check_cca_inputs
from lightning_repsim.functional.cka import logit_distance_rows
from lightning_repsim.functional.family import ModelPair, logits_from_parts
from lightning_repsim.functional.inputs import check_input_sets, check_logit_pair, check_num_inputs, check_num_labels
from lightning_repsim.functional.kl import kl_per_input, mean_kl_divergence
from lightning_repsim.functional.llv import LLVOptions, LLVResult, draw_input_sets, llv_distance
from lightning_repsim.functional.llv_representation import RepresentationRoute, embedding_covariance, representation_rows
from lightning_repsim.functional.llv_route import Candidates, LLVSizes, llv_from_route
from lightning_repsim.functional.llv_terms import CHUNK_NUMBERS
from lightning_repsim.functional.svd import (
    SVDResult,
    SVDStatistics,
    embedding_pair_covariance,
    representation_dim,
    svd_from_parts,
)

__all__ = ["ComparisonReport", "compare", "svd_bounds"]


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
        rep_dim: the representation dimension r the sets were sized for (``max(r_p, r_q)`` unless given).
        embedding_rank: the ranks ``(r_p, r_q)`` of the two embeddings; widths: their widths ``(M_p, M_q)``.
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
    embedding_rank: tuple[int, int] = (0, 0)
    widths: tuple[int, int] = (0, 0)

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
            f"Compared two models on N={self.num_inputs} inputs, K={self.num_labels} labels, M={self.rep_dim}"
            + ("" if self.widths == (self.rep_dim, self.rep_dim) else
               f" (widths {self.widths[0]} and {self.widths[1]}, ranks {self.embedding_rank[0]} and {self.embedding_rank[1]})"),
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


def svd_bounds(d_llv: Tensor | float, rep_dim: int) -> tuple[Tensor | float, Tensor | float]:
    """The bounds on d_SVD implied by d_LLV: ``(2 M d_LLV, 2 d_LLV^2)`` (paper, Theorem 4.6/4.7; sharper, SPEC §5).

    Example:
        >>> svd_bounds(0.1, 4)
        (0.8, 0.020000000000000004)
    """
    return 2 * rep_dim * d_llv, 2 * d_llv * d_llv


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
    rep_dim: int | None = None,
    route: str = "auto",
    logits: tuple[Tensor, Tensor] | None = None,
    **options: Any,
) -> ComparisonReport:
    """Compare two models of the family ``p(y|x) = softmax(f(x)^T g(y))`` on the same inputs.

    Args:
        emb_p, emb_q: embeddings ``f`` (N x M_p, N x M_q). The widths may differ: a student smaller than its teacher
            compares at the representation dimension ``max(r_p, r_q)`` (see ``rep_dim``).
        unemb_p, unemb_q: unembeddings ``g`` (K x M), or K x (M+1) with the bias as last column
            (e.g. ``torch.cat([linear.weight, linear.bias[:, None]], 1)``).
        rep_dim: the representation dimension r: d_LLV's input sets have r + 1 inputs, d_SVD's label subsets r
            labels. Default: the larger rank of the two embeddings, ``max(r_p, r_q)`` (M for two full-rank embeddings
            of width M; a LayerNorm-final or redundant coordinate does not count). Why that default, and the floor of
            d_SVD it implies when the student's rank is lower: ``docs/smaller_student.md``.
        route: ``"logits"`` computes d_LLV from the N x K log-probabilities and a 2K x 2K covariance
            (:func:`llv_distance`); ``"representation"`` from the ``(M_p + M_q + 2)^2`` covariance of
            ``[f_p, logZ_p, f_q - fit(f_p), logZ_q - logZ_p]`` and the unembeddings (as
            :class:`~lightning_repsim.metrics.SVDDissimilarity` does: O(N K M) time for the logits, which are
            formed in blocks of rows, and O(N M^2 + K M^2) for the statistics; never K x K or N x K at once);
            ``"auto"`` (default) takes the representation route when K > max(256, 4 (M + 1)), M the larger width.
            Both give the same numbers (to rounding) for the same options; the representation route's default pivot
            search is bounded (see :class:`LLVOptions`).
        logits: the models' own logits ``(logits_p, logits_q)``, each (N, K), optional. When given, the KL and each
            input's ``logZ`` come from them (in float64) rather than from ``f g^T``, on the logits route d_LLV too:
            what :class:`~lightning_repsim.ReferenceComparison` does with the logits the models produced (in
            float32 they differ from ``f g^T`` in float64 by rounding).
        options: the d_LLV options of :class:`LLVOptions` (``lam``, ``reduce``, ``combine``, ``label_pivot``,
            ``leave_out``, ``labels`` (logits route only), ``input_sets``, ``num_input_sets``, ``seed``, ...);
            ``seed`` also seeds the sample of label subsets of d_SVD, and ``max_label_subsets`` is d_SVD's (as in
            :func:`svd_dissimilarity`: 4096 up to r = 51, fewer above).

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
    max_label_subsets = options.pop("max_label_subsets", None)
    opts = LLVOptions(**options)
    pair = ModelPair.of(emb_p, unemb_p, emb_q, unemb_q)
    n, k, m_p, m_q = pair.sizes
    given = _given_logits(logits, n, k)
    if choose_route(route, k, max(m_p, m_q)) == "logits":
        cov_f, cov_w = embedding_pair_covariance(pair.f_p, pair.f_q), None
        r = representation_dim(cov_f, m_p, rep_dim)
        logits_p, logits_q = given if given is not None else pair.logits()
        llv = llv_distance(logits_p, logits_q, rep_dim=r, **options)
        kl = mean_kl_divergence(logits_p, logits_q)
        d_logit = logit_distance_rows(logits_p, logits_q).mean().sqrt()
    else:
        if opts.labels is not None:
            raise ValueError("`labels` (a label subset) applies to the logits route; the representation route is exact for any K")
        kl, d_logit, u = _kl_and_representation_rows(pair, given)
        count, mean_u, m2 = batch_moments(u)
        cov_u = covariance_from_moments(count, m2)
        cov_f = embedding_covariance(cov_u, m_p)
        r = representation_dim(cov_f, m_p, rep_dim)
        check_num_labels(k, r)
        check_num_inputs(n, r)
        if opts.input_sets is None:
            candidates = Candidates(draw_input_sets(n, r + 1, opts.num_input_sets, opts.seed).to(pair.f_p.device))
        else:
            candidates = Candidates(check_input_sets(opts.input_sets, r, n).to(pair.f_p.device), given=True)
        route_ = RepresentationRoute((mean_u, cov_u), (pair.w_p, pair.b_p, pair.w_q, pair.b_q), (pair.f_p, pair.f_q))
        llv, _ = llv_from_route(route_, candidates, opts, opts.resolve(k), LLVSizes(n, k, r))
        cov_w = embedding_covariance(route_.sigma_h, m_p)  # the sigma shared by the input terms serves the g-part
    check_num_labels(k, r, need_subsets=True)
    stats = SVDStatistics(cov_f, pair.w_p, pair.w_q, pair.f_p[llv.input_set], pair.f_q[llv.input_set], cov_w)
    svd = svd_from_parts(stats, (llv.label_pivot, llv.leave_out, llv.input_set), r, max_label_subsets, opts.seed)
    check_cca_inputs(n, m_p, m_q)
    ccs = canonical_correlations_from_cov(cov_f, m_p)
    bound_paper, bound_sharp = svd_bounds(llv.value, r)
    return ComparisonReport(
        llv=llv,
        svd=svd,
        kl=kl,
        d_logit=d_logit,
        mcca=ccs.mean(),
        canonical_correlations=ccs,
        bound_paper=bound_paper,
        bound_sharp=bound_sharp,
        rep_dim=r,
        num_inputs=n,
        num_labels=llv.num_labels,
        embedding_rank=svd.embedding_rank,
        widths=(m_p, m_q),
    )


def _given_logits(logits: tuple[Tensor, Tensor] | None, n: int, k: int) -> tuple[Tensor, Tensor] | None:
    if logits is None:
        return None
    if not isinstance(logits, (tuple, list)) or len(logits) != 2:
        raise ValueError("`logits` must be a pair (logits_p, logits_q) of the models' own logits, or None")
    p, q = check_logit_pair(*logits)
    if p.shape != (n, k):
        raise ValueError(f"`logits` must have shape (N, K) = ({n}, {k}) (the embeddings' inputs, the "
                         f"unembeddings' labels), got {tuple(p.shape)}")
    return p, q


def _kl_and_representation_rows(pair: ModelPair, given: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Mean KL(p || q), d_logit and the rows ``u`` of the representation layout, from the ``given`` logits or those
    formed from the representations, in blocks of rows (float64; memory O(block K))."""
    n, k = pair.sizes[:2]
    step = max(1, CHUNK_NUMBERS // k)
    kl_sum = pair.f_p.new_zeros(())
    logit_sum = pair.f_p.new_zeros(())
    logz = []
    for start in range(0, n, step):
        sl = slice(start, start + step)
        if given is None:
            z_p, z_q = logits_from_parts(pair.f_p[sl], pair.w_p, pair.b_p), logits_from_parts(pair.f_q[sl], pair.w_q, pair.b_q)
        else:
            z_p, z_q = given[0][sl], given[1][sl]
        lz_p, lz_q = torch.logsumexp(z_p, dim=1), torch.logsumexp(z_q, dim=1)
        kl_sum = kl_sum + kl_per_input(z_p - lz_p[:, None], z_q - lz_q[:, None]).sum()
        logit_sum = logit_sum + logit_distance_rows(z_p, z_q).sum()
        logz.append(torch.stack([lz_p, lz_q], dim=1))
    lz = torch.cat(logz)
    return kl_sum / n, (logit_sum / n).sqrt(), representation_rows(pair.f_p, lz[:, 0], pair.f_q, lz[:, 1])
