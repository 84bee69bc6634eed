"""The paper's full pipeline in one call: d_LLV chooses the sets, d_SVD uses them, plus the
baselines (mean KL, mCCA) and the bounds d_SVD <= 2 M d_LLV (paper) and d_SVD <= 2 d_LLV^2 (SPEC §5)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from lightning_repsim.functional._validation import as_matrix
from lightning_repsim.functional.cca import canonical_correlations
from lightning_repsim.functional.kl import mean_kl_divergence
from lightning_repsim.functional.llv import LLVResult, llv_distance
from lightning_repsim.functional.svd import (
    DEFAULT_MAX_LABEL_SUBSETS,
    SVDResult,
    logits_from_parts,
    split_unembedding,
    svd_dissimilarity,
)

__all__ = ["ComparisonReport", "compare", "logits_from_representations"]


def logits_from_representations(emb: Tensor, unemb: Tensor, names: tuple[str, str] = ("emb", "unemb")) -> Tensor:
    """Logits ``f(x)^T g(y) (+ b_y)`` from an embedding (N x M) and an unembedding (K x M, or
    K x (M+1) with the bias as last column), in float64.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(4, 3).double()
        >>> f = torch.randn(5, 4, dtype=torch.float64)
        >>> unemb = torch.cat([lin.weight, lin.bias[:, None]], dim=1)
        >>> torch.allclose(logits_from_representations(f, unemb), lin(f))
        True
    """
    f = as_matrix(emb, names[0])
    w, b = split_unembedding(unemb, f.shape[1], names[1])
    return logits_from_parts(f, w, b)


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
        return {
            "kl": float(self.kl),
            "d_llv": float(self.llv.distance),
            "llv_t1": float(self.llv.t1),
            "llv_t2": float(self.llv.t2),
            "llv_t3": float(self.llv.t3),
            "llv_t4": float(self.llv.t4),
            "d_svd": float(self.svd.value),
            "d_svd_f": float(self.svd.f_part),
            "d_svd_g": float(self.svd.g_part),
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
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def compare(
    emb_p: Tensor,
    unemb_p: Tensor,
    emb_q: Tensor,
    unemb_q: Tensor,
    lam: float = 1e-5,
    reduce: str = "max",
    combine: str = "max",
    label_pivot: int | None = None,
    leave_out: int | None = None,
    input_sets: Tensor | None = None,
    num_input_sets: int = 200,
    seed: int = 0,
    max_label_subsets: int = DEFAULT_MAX_LABEL_SUBSETS,
) -> ComparisonReport:
    """Compare two models of the family ``p(y|x) = softmax(f(x)^T g(y))`` on the same inputs.

    Args:
        emb_p, emb_q: embeddings ``f`` (N x M).
        unemb_p, unemb_q: unembeddings ``g`` (K x M), or K x (M+1) with the bias as last column
            (e.g. ``torch.cat([linear.weight, linear.bias[:, None]], 1)``).
        The other arguments are those of :func:`llv_distance` and :func:`svd_dissimilarity`.

    Example:
        >>> from lightning_repsim.constructions import theorem31_pair
        >>> pair = theorem31_pair(rho=20.0, n_per_class=200, seed=0)
        >>> report = compare(pair.emb_p, pair.unemb_p, pair.emb_q, pair.unemb_q)
        >>> float(report.kl) < 1e-4, float(report.llv.distance) > 1.3, float(report.mcca) < 0.05
        (True, True, True)
    """
    f_p = as_matrix(emb_p, "emb_p")
    f_q = as_matrix(emb_q, "emb_q")
    m = f_p.shape[1]
    logits_p = logits_from_representations(f_p, unemb_p, ("emb_p", "unemb_p"))
    logits_q = logits_from_representations(f_q, unemb_q, ("emb_q", "unemb_q"))
    llv = llv_distance(
        logits_p, logits_q, rep_dim=m, lam=lam, reduce=reduce, combine=combine, label_pivot=label_pivot,
        leave_out=leave_out, input_sets=input_sets, num_input_sets=num_input_sets, seed=seed,
    )
    svd = svd_dissimilarity(
        f_p, unemb_p, f_q, unemb_q, label_pivot=llv.label_pivot, leave_out=llv.leave_out,
        input_set=llv.input_set, max_label_subsets=max_label_subsets, seed=seed,
    )
    ccs = canonical_correlations(f_p, f_q)
    d = llv.distance
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


