"""d_SVD, the PLS-SVD representational dissimilarity (SPEC §4).

``m_SVD(A, B)`` is the mean singular value of the cross-correlation matrix of the standardised
columns of ``A`` and ``B``; ``d_SVD = 1 - m_SVD``. The f-part compares the models' log-odds
``(g(y) - g(y0))^T f(x)`` over inputs for every M-subset of kept labels; the g-part compares
``(f(x_i) - f(x0))^T g(y)`` over labels for the chosen input set.

The f-part needs only the joint covariance of ``[f_p; f_q]`` (2M x 2M): the cross-correlation of all
kept labels' log-odds is built once from it and every subset's M x M block is read out of that
matrix, so all subsets are evaluated in one batched ``svdvals`` call.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_repsim.functional._moments import batch_moments, covariance_from_moments
from lightning_repsim.functional.family import ModelPair
from lightning_repsim.functional.inputs import check_num_labels, check_rep_dim
from lightning_repsim.functional.llv import draw_input_sets, llv_distance
from lightning_repsim.functional.subspace import Subspace, pair_subspaces, restricted_cond

__all__ = [
    "SVDResult",
    "SVDStatistics",
    "DiversityWarning",
    "svd_dissimilarity",
    "m_svd_from_cov",
    "f_part_from_cov",
    "g_part",
]

#: Condition number above which a diversity matrix (L or N) is reported as near-singular.
DIVERSITY_COND_WARN = 1e8
DEFAULT_MAX_LABEL_SUBSETS = 4096


def default_max_label_subsets(rep_dim: int) -> int:
    """Label subsets evaluated for the f-part when ``max_label_subsets`` is None: 4096 up to M = 51, then
    fewer so that the subsets' M x M products and SVDs stay bounded (``S M^3 <= 2^29``: M = 128 gives 256,
    M = 256 gives 32), never fewer than 8. ``result.exhaustive`` says whether every subset was evaluated."""
    return int(min(DEFAULT_MAX_LABEL_SUBSETS, max(8, 2**29 // rep_dim**3)))


class DiversityWarning(UserWarning):
    """A diversity matrix (displaced unembeddings L or displaced embeddings N) is near-singular."""


@dataclass(frozen=True)
class SVDResult:
    """Result of :func:`svd_dissimilarity` (float64 tensors).

    Attributes:
        value: ``d_SVD = max(f_part, g_part)``.
        f_part: ``1 - min`` over evaluated label subsets of ``m_SVD``.
        g_part: ``1 - m_SVD`` over labels for the chosen input set.
        msvd_f: one ``m_SVD`` per evaluated subset, in ``label_subsets`` order.
        msvd_g: ``m_SVD`` of the g-part.
        label_subsets: (S, M) indices into ``kept_labels`` (``itertools.combinations`` order when
            exhaustive).
        kept_labels: the K-2 labels other than the pivot and the left-out label.
        worst_subset: the labels (not indices) of the subset attaining ``f_part``.
        exhaustive: False when ``C(K-2, M) > max_label_subsets`` and a seeded sample of subsets
            was evaluated; ``f_part`` is then a lower estimate of the true maximum.
        num_label_subsets: ``C(K-2, M)``, the number of subsets in the definition.
        cond_l: condition numbers of ``L`` for the worst subset, (model p, model q), restricted to the subspace
            the embeddings occupy (``L V``).
        cond_n: condition numbers of ``N`` for the input set, (model p, model q), restricted likewise.
        embedding_rank: the ranks (r_p, r_q) of the two models' embeddings.
        rep_dim: the representation dimension r the label subsets (r labels) and the input set (r + 1 inputs) have:
            ``max(r_p, r_q)`` unless given (M for two full-rank embeddings of width M).
        llv: the :class:`~lightning_repsim.functional.LLVResult` that chose the sets, when the result comes from
            :class:`~lightning_repsim.metrics.SVDDissimilarity` (the representation route's d_LLV); None from
            :func:`svd_dissimilarity` (``compare`` reports it as ``report.llv``).
        label_pivot, leave_out, input_set: the sets used.
    """

    value: Tensor
    f_part: Tensor
    g_part: Tensor
    msvd_f: Tensor = field(repr=False)
    msvd_g: Tensor
    label_subsets: Tensor = field(repr=False)
    kept_labels: Tensor = field(repr=False)
    worst_subset: Tensor
    exhaustive: bool
    num_label_subsets: int
    cond_l: Tensor
    cond_n: Tensor
    label_pivot: int
    leave_out: int
    input_set: Tensor
    embedding_rank: tuple[int, int] = (0, 0)
    rep_dim: int = 0
    llv: Any = field(default=None, repr=False)

    @property
    def svd(self) -> SVDResult:
        """The result itself (``SVDDissimilarity.compute_result().svd`` of earlier versions)."""
        return self

    def as_dict(self) -> dict[str, float | int]:
        """Scalars under the keys the callback logs: ``d_svd``, ``d_svd_f``, ``d_svd_g``, and d_LLV's when ``llv`` is
        set (the streaming metric)."""
        out: dict[str, float | int] = {} if self.llv is None else self.llv.as_dict()
        return {**out, "d_svd": float(self.value), "d_svd_f": float(self.f_part), "d_svd_g": float(self.g_part)}


def _check_variances(v_p: Tensor, v_q: Tensor, what: str, names: Tensor | None = None) -> None:
    tiny = torch.finfo(torch.float64).tiny
    for v, model in ((v_p, "p"), (v_q, "q")):
        if bool((v <= tiny).any()):
            bad = torch.nonzero((v <= tiny).reshape(-1)).flatten()
            bad = (bad if names is None else names[bad]).tolist()[:5]
            raise ValueError(
                f"zero variance in {what} of model {model} (coordinates {bad}): m_SVD standardises each "
                "coordinate and is undefined for constant ones"
            )


def _correlation(c_pp: Tensor, c_qq: Tensor, c_pq: Tensor, what: str) -> Tensor:
    v_p, v_q = c_pp.diagonal(dim1=-2, dim2=-1), c_qq.diagonal(dim1=-2, dim2=-1)
    _check_variances(v_p, v_q, what)
    return c_pq / (v_p.sqrt().unsqueeze(-1) * v_q.sqrt().unsqueeze(-2))


def m_svd_from_cov(c_pp: Tensor, c_qq: Tensor, c_pq: Tensor, what: str = "the compared coordinates") -> Tensor:
    """``m_SVD``: the mean singular value of the cross-correlation matrix; batched over leading dims."""
    return torch.linalg.svdvals(_correlation(c_pp, c_qq, c_pq, what)).mean(dim=-1)


def _label_subsets(n_kept: int, m: int, max_subsets: int, seed: int, device) -> tuple[Tensor, bool, int]:
    total = math.comb(n_kept, m)
    if total <= max_subsets:
        subsets = torch.combinations(torch.arange(n_kept), r=m)
        if m == 1:
            subsets = subsets.reshape(-1, 1)
        return subsets.to(device), True, total
    # seeded M-subsets without an (S, K-2) matrix of random keys (K = 50,257 is fine)
    subsets = draw_input_sets(n_kept, m, max_subsets, seed).sort(dim=1).values
    subsets = torch.unique(subsets, dim=0)
    return subsets.to(device), False, total


@dataclass(frozen=True)
class FPart:
    msvd: Tensor
    subsets: Tensor
    kept_labels: Tensor
    worst: int
    exhaustive: bool
    total: int
    cond: Tensor


def f_part_from_cov(
    cov_f: Tensor,
    weights: tuple[Tensor, Tensor],
    label_set: tuple[int, int],
    rep_dim: int | None = None,
    max_label_subsets: int = DEFAULT_MAX_LABEL_SUBSETS,
    seed: int = 0,
    subspaces: tuple[Subspace, Subspace] | None = None,
) -> FPart:
    """m_SVD of the f-part for every (or a sample of) r-subset(s) of kept labels, r the representation dimension
    (``rep_dim``; by default the larger rank of the two embeddings, :mod:`~lightning_repsim.functional.subspace`: M
    when they are full rank).

    ``cov_f``: covariance of ``[f_p; f_q]`` over inputs ((M_p + M_q)^2); ``weights``: the unembedding weights
    ``(w_p, w_q)`` (K x M_p, K x M_q; biases do not matter: they shift the log-odds by constants); ``label_set``:
    ``(label_pivot, leave_out)``.
    """
    w_p, w_q = weights
    label_pivot, leave_out = label_set
    k, m = w_p.shape
    if subspaces is None:
        subspaces = pair_subspaces(cov_f, m)
    r = max(subspaces[0].rank, subspaces[1].rank) if rep_dim is None else rep_dim
    check_num_labels(k, r, need_subsets=True)
    keep = torch.ones(k, dtype=torch.bool, device=w_p.device)
    keep[[label_pivot, leave_out]] = False
    kept = torch.nonzero(keep).flatten()
    s_pp, s_pq, s_qq = cov_f[:m, :m], cov_f[:m, m:], cov_f[m:, m:]
    subsets, exhaustive, total = _label_subsets(kept.numel(), r, max_label_subsets, seed, w_p.device)
    # the log-odds' variances of every label some subset uses, once (O(K M^2) at most), then each subset's M x M
    # cross-covariance block (one M^3 product; never the (K-2)^2 matrix: K = 50,257 is fine), in chunks of about
    # 2^22 numbers; the log-odds rows are formed for the used labels only (no K x M copy)
    used, local = torch.unique(subsets, return_inverse=True)
    l_p_u = w_p[kept[used]] - w_p[label_pivot]
    l_q_u = w_q[kept[used]] - w_q[label_pivot]
    var_p = ((l_p_u @ s_pp) * l_p_u).sum(1)
    var_q = ((l_q_u @ s_qq) * l_q_u).sum(1)
    cross = l_p_u @ s_pq
    _check_variances(var_p, var_q, "the log-odds over inputs", used)
    msvd = []
    for chunk in local.split(max(1, 2**22 // (m * m))):
        c_pq = cross[chunk] @ l_q_u[chunk].mT
        corr = c_pq / (var_p[chunk].sqrt().unsqueeze(-1) * var_q[chunk].sqrt().unsqueeze(-2))
        msvd.append(torch.linalg.svdvals(corr).mean(dim=-1))
    msvd = torch.cat(msvd)
    worst = int(torch.argmin(msvd))
    rows = kept[subsets[worst]]
    cond = torch.stack([
        restricted_cond(w_p[rows] - w_p[label_pivot], subspaces[0]), restricted_cond(w_q[rows] - w_q[label_pivot], subspaces[1])
    ])
    return FPart(msvd, subsets, kept, worst, exhaustive, total, cond)


def g_part(w_p: Tensor, w_q: Tensor, f_p_set: Tensor, f_q_set: Tensor, cov_w: Tensor | None = None,
           subspaces: tuple[Subspace, Subspace] | None = None) -> tuple[Tensor, Tensor]:
    """``(m_SVD, cond(N) per model)`` of the g-part: samples are all K labels, coordinates
    ``(f(x_i) - f(x0))^T g(y)`` for the input set ``f_set`` (r+1 x M, first row = x0). With ``cov_w``, the
    covariance over labels of ``[g_p; g_q]`` ((M_p + M_q)^2), it costs O(M^3) instead of O(K M^2):
    ``Cov(N_p g_p, N_q g_q) = N_p Cov(g_p, g_q) N_q^T``."""
    n_p = f_p_set[1:] - f_p_set[:1]
    n_q = f_q_set[1:] - f_q_set[:1]
    m = n_p.shape[0]
    if cov_w is None:
        count, _, m2 = batch_moments(torch.cat([w_p @ n_p.T, w_q @ n_q.T], dim=1))
        cov = covariance_from_moments(count, m2)
    else:
        t = torch.block_diag(n_p, n_q)
        cov = t @ cov_w @ t.T
    msvd = m_svd_from_cov(cov[:m, :m], cov[m:, m:], cov[:m, m:], "the input-set log-odds over labels")
    if subspaces is None:
        return msvd, torch.stack([torch.linalg.cond(n_p), torch.linalg.cond(n_q)])
    return msvd, torch.stack([restricted_cond(n_p, subspaces[0]), restricted_cond(n_q, subspaces[1])])


def warn_if_near_singular(cond: Tensor, what: str, threshold: float = DIVERSITY_COND_WARN) -> None:
    for c, model in zip(cond.tolist(), ("p", "q")):
        if not (c < threshold):
            warnings.warn(
                f"near-singular diversity matrix {what} for model {model}: condition number {c:.3g} "
                f"(> {threshold:.0e}); the diversity condition may fail for these sets, so d_SVD is "
                "unreliable. The result's label_pivot/leave_out/input_set say which sets were used.",
                DiversityWarning,
                stacklevel=3,
            )


def svd_dissimilarity(
    emb_p: Tensor,
    unemb_p: Tensor,
    emb_q: Tensor,
    unemb_q: Tensor,
    input_set: Tensor | None = None,
    rep_dim: int | None = None,
    max_label_subsets: int | None = None,
    **options,
) -> SVDResult:
    """d_SVD between two models given embeddings (N x M_p, N x M_q: the widths may differ) and unembeddings
    (K x M, or K x (M+1) with the bias as last column).

    The label set (``label_pivot``, ``leave_out``) and the ``input_set`` are normally those chosen by d_LLV (as in
    :func:`compare`). Any of them left ``None`` is chosen by running :func:`llv_distance` on the models' logits (the
    other d_LLV ``options`` of :class:`LLVOptions` are passed on; ``seed`` also seeds the sample of label subsets).

    ``rep_dim``: the representation dimension r (label subsets of r labels, input sets of r + 1 inputs); by default
    the larger rank of the two embeddings, ``max(r_p, r_q)`` (see ``docs/smaller_student.md``).

    ``d_SVD^f`` is a max over all ``C(K-2, r)`` label subsets: all are evaluated when there are at
    most ``max_label_subsets`` (default :func:`default_max_label_subsets`: 4096 up to r = 51), otherwise a
    seeded random sample (``result.exhaustive`` is then False and ``f_part`` a lower estimate).

    Example:
        >>> import torch
        >>> from lightning_repsim.constructions import theorem31_pair
        >>> pair = theorem31_pair(rho=5.0, n_per_class=100, seed=0)
        >>> res = svd_dissimilarity(pair.emb_p, pair.unemb_p, pair.emb_q, pair.unemb_q)
        >>> float(res.f_part) > 0.99  # permuted stars: not linearly related
        True
        >>> same = svd_dissimilarity(pair.emb_p, pair.unemb_p, 2 * pair.emb_p, pair.unemb_p / 2)
        >>> float(same.value) < 1e-9
        True
    """
    pair = ModelPair.of(emb_p, unemb_p, emb_q, unemb_q)
    cov_f = embedding_pair_covariance(pair.f_p, pair.f_q)
    n, k, m_p, m_q = pair.sizes
    r = representation_dim(cov_f, m_p, rep_dim)
    check_num_labels(k, r, need_subsets=True)
    label_pivot, leave_out = options.get("label_pivot"), options.get("leave_out")
    if label_pivot is None or leave_out is None or input_set is None:
        given = None if input_set is None else torch.as_tensor(input_set)[None]
        llv = llv_distance(*pair.logits(), rep_dim=r, **{**options, "input_sets": given})
        label_pivot, leave_out, input_set = llv.label_pivot, llv.leave_out, llv.input_set
    input_set = torch.as_tensor(input_set, device=pair.f_p.device).to(torch.long).flatten()
    if input_set.numel() != r + 1:
        raise ValueError(
            f"`input_set` must hold r+1 = {r + 1} input indices (r = {r}, the representation dimension; widths "
            f"{(m_p, m_q)}), got {input_set.numel()}"
        )
    stats = SVDStatistics(cov_f, pair.w_p, pair.w_q, pair.f_p[input_set], pair.f_q[input_set])
    return svd_from_parts(stats, (int(label_pivot), int(leave_out), input_set), r, max_label_subsets, options.get("seed", 0))


@dataclass(frozen=True)
class SVDStatistics:
    """What d_SVD needs: ``cov_f``, the covariance over inputs of ``[f_p; f_q]`` ((M_p + M_q)^2); the unembedding
    weights ``w_p`` (K x M_p), ``w_q`` (K x M_q); the embeddings of the input set ``f_p_set``, ``f_q_set``
    ((r + 1) x M, pivot first); optionally ``cov_w``, the covariance over labels of ``[g_p; g_q]``, which makes the
    g-part O(M^3) instead of O(K M^2)."""

    cov_f: Tensor
    w_p: Tensor
    w_q: Tensor
    f_p_set: Tensor
    f_q_set: Tensor
    cov_w: Tensor | None = None


def svd_from_parts(stats: SVDStatistics, sets: tuple[int, int, Tensor], rep_dim: int | None = None,
                   max_label_subsets: int | None = None, seed: int = 0) -> SVDResult:
    """d_SVD from its sufficient statistics and the chosen sets ``(label_pivot, leave_out, input_set)``, at the
    representation dimension ``rep_dim`` (default: the larger rank of the embeddings). Shared by
    :func:`svd_dissimilarity`, :func:`~lightning_repsim.functional.compare` and the streaming metric."""
    label_pivot, leave_out, input_set = sets
    subspaces = pair_subspaces(stats.cov_f, stats.w_p.shape[1])
    r = max(subspaces[0].rank, subspaces[1].rank) if rep_dim is None else rep_dim
    subsets = default_max_label_subsets(r) if max_label_subsets is None else max_label_subsets
    fp = f_part_from_cov(stats.cov_f, (stats.w_p, stats.w_q), (label_pivot, leave_out), r, subsets, seed, subspaces)
    msvd_g, cond_n = g_part(stats.w_p, stats.w_q, stats.f_p_set, stats.f_q_set, stats.cov_w, subspaces)
    warn_if_near_singular(fp.cond, "L (displaced unembeddings of the worst label subset)")
    warn_if_near_singular(cond_n, "N (displaced embeddings of the input set)")
    f_part = (1.0 - fp.msvd[fp.worst]).clamp_min(0)
    g = (1.0 - msvd_g).clamp_min(0)
    return SVDResult(
        value=torch.maximum(f_part, g),
        f_part=f_part,
        g_part=g,
        msvd_f=fp.msvd,
        msvd_g=msvd_g,
        label_subsets=fp.subsets,
        kept_labels=fp.kept_labels,
        worst_subset=fp.kept_labels[fp.subsets[fp.worst]],
        exhaustive=fp.exhaustive,
        num_label_subsets=fp.total,
        cond_l=fp.cond,
        cond_n=cond_n,
        label_pivot=label_pivot,
        leave_out=leave_out,
        input_set=input_set,
        embedding_rank=(subspaces[0].rank, subspaces[1].rank),
        rep_dim=r,
    )


def embedding_pair_covariance(f_p: Tensor, f_q: Tensor) -> Tensor:
    """Covariance over inputs of ``[f_p; f_q]`` (float64, centred two-pass)."""
    count, _, m2 = batch_moments(torch.cat([f_p, f_q], dim=1).to(torch.float64))
    return covariance_from_moments(count, m2)


def representation_dim(cov_f: Tensor, dim_p: int, rep_dim: int | None = None) -> int:
    """The representation dimension of a pair: ``rep_dim`` when given (checked), else the larger rank of the two
    embeddings, ``max(r_p, r_q)`` (see :mod:`~lightning_repsim.functional.subspace` and ``docs/smaller_student.md``);
    the input sets of d_LLV and d_SVD have this many inputs plus one, d_SVD's label subsets this many labels."""
    if rep_dim is not None:
        return check_rep_dim(rep_dim)
    sub_p, sub_q = pair_subspaces(cov_f, dim_p)
    return max(sub_p.rank, sub_q.rank)
