"""The paper's full pipeline in one call: d_LLV chooses the sets, d_SVD uses them, plus the
baselines (mean KL, mCCA) and the bounds d_SVD <= 2 M d_LLV (paper) and d_SVD <= 2 d_LLV^2 (SPEC §5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lightning_repsim.functional._validation import as_matrix, check_finite
from lightning_repsim.functional.cca import canonical_correlations
from lightning_repsim.functional.family import logits_from_representations
from lightning_repsim.functional.kl import mean_kl_divergence
from lightning_repsim.functional.llv import LLVOptions, LLVResult, llv_distance
from lightning_repsim.functional.svd import DEFAULT_MAX_LABEL_SUBSETS, SVDResult, svd_dissimilarity

__all__ = ["ComparisonReport", "compare"]


@dataclass(frozen=True)
class ComparisonReport:
    """What :func:`compare` measured: every distance between two models on the same inputs.

    Attributes:
        llv: the :class:`LLVResult` (sets chosen here are used by ``svd``).
        svd: the :class:`SVDResult`.
        kl: mean KL divergence ``KL(p || q)``.
        mcca: mean canonical correlation of the embeddings; ``canonical_correlations`` all of them.
        bound_paper: ``2 M d_LLV`` (Theorem 4.6/4.7; informative below 1/(2M)).
        bound_sharp: ``2 d_LLV^2`` (SPEC §5).
    """

    llv: LLVResult
    svd: SVDResult
    kl: Tensor
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
            f"  d_LLV                  {d['d_llv']:.6g}      T1={d['llv_t1']:.4g} T2={d['llv_t2']:.4g} "
            f"lam*T3={self.llv.lam * d['llv_t3']:.3g} lam*T4={self.llv.lam * d['llv_t4']:.3g}",
            f"  d_SVD                  {d['d_svd']:.6g}      f-part={d['d_svd_f']:.4g} g-part={d['d_svd_g']:.4g}"
            + ("" if self.svd.exhaustive else f" (f-part over a sample of {self.svd.msvd_f.numel()} of "
               f"{self.svd.num_label_subsets} label subsets: a lower estimate)"),
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


def compare(
    emb_p: Tensor,
    unemb_p: Tensor,
    emb_q: Tensor,
    unemb_q: Tensor,
    max_label_subsets: int = DEFAULT_MAX_LABEL_SUBSETS,
    **options: Any,
) -> ComparisonReport:
    """Compare two models of the family ``p(y|x) = softmax(f(x)^T g(y))`` on the same inputs.

    Args:
        emb_p, emb_q: embeddings ``f`` (N x M).
        unemb_p, unemb_q: unembeddings ``g`` (K x M), or K x (M+1) with the bias as last column
            (e.g. ``torch.cat([linear.weight, linear.bias[:, None]], 1)``).
        max_label_subsets: as in :func:`svd_dissimilarity`.
        options: the d_LLV options of :class:`LLVOptions` (``lam``, ``reduce``, ``combine``, ``label_pivot``,
            ``leave_out``, ``labels``, ``input_sets``, ``num_input_sets``, ``seed``, ...); ``seed`` also seeds
            the sample of label subsets of d_SVD.

    Example:
        >>> from lightning_repsim.constructions import theorem31_pair
        >>> pair = theorem31_pair(rho=20.0, n_per_class=200, seed=0)
        >>> report = compare(pair.emb_p, pair.unemb_p, pair.emb_q, pair.unemb_q)
        >>> float(report.kl) < 1e-4, float(report.llv.value) > 1.3, float(report.mcca) < 0.05
        (True, True, True)
    """
    opts = LLVOptions(**options)
    f_p = as_matrix(emb_p, "emb_p")
    f_q = as_matrix(emb_q, "emb_q")
    check_finite(f_p, "emb_p")
    check_finite(f_q, "emb_q")
    m = f_p.shape[1]
    logits_p = logits_from_representations(f_p, unemb_p, ("emb_p", "unemb_p"))
    logits_q = logits_from_representations(f_q, unemb_q, ("emb_q", "unemb_q"))
    llv = llv_distance(logits_p, logits_q, rep_dim=m, **options)
    svd = svd_dissimilarity(
        f_p, unemb_p, f_q, unemb_q, label_pivot=llv.label_pivot, leave_out=llv.leave_out,
        input_set=llv.input_set, max_label_subsets=max_label_subsets, seed=opts.seed,
    )
    ccs = canonical_correlations(f_p, f_q)
    d = llv.value
    return ComparisonReport(
        llv=llv,
        svd=svd,
        kl=mean_kl_divergence(logits_p, logits_q),
        mcca=ccs.mean(),
        canonical_correlations=ccs,
        bound_paper=2 * m * d,
        bound_sharp=2 * d * d,
        rep_dim=m,
        num_inputs=f_p.shape[0],
        num_labels=llv.num_labels,
    )
