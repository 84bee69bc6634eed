"""The representation route of d_LLV (SPEC §6): every term from embeddings and unembeddings, never K x K.

For a model of the family ``p(y|x) = softmax(W f(x) + b)``, each log-probability is a linear function of the
streamed vector ``u(x)`` (layout :data:`REPRESENTATION_LAYOUT`), so the label terms need only the
``(2M+2) x (2M+2)`` covariance of ``u`` and the unembeddings (``Cov(w) = B Cov(u) B^T``, never formed), and the
input terms only the candidate inputs' embeddings: O(M^2) state and O(K M^2 + P K M) compute for any vocabulary
size K. The entries then follow the shared formula of :mod:`~lightning_repsim.functional.llv_terms`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_repsim.functional._moments import batch_moments, covariance_from_moments, merge_moments
from lightning_repsim.functional.input_search import PairStatistics, choose_input_set
from lightning_repsim.functional.llv import LLVOptions, LLVResult, choose_pivots, llv_result
from lightning_repsim.functional.llv_terms import CHUNK_NUMBERS, LabelCov, entries, label_part, normalisers, select_input_set

__all__ = [
    "REPRESENTATION_LAYOUT",
    "embedding_covariance",
    "label_covariance_of_h",
    "representation_llv",
    "representation_pivot_budget",
    "input_terms_from_representation",
    "RepresentationLabelCov",
    "label_means_from_representation",
]

#: Layout of the streamed representation vector ``u(x)`` (length ``2M + 2``). It is an invertible
#: linear map of ``[f_p, logZ_p, f_q, logZ_q]`` (SPEC §6); storing the *differences* keeps nearly
#: identical models accurate, exactly as ``[l_p; l_q - l_p]`` does for the logits route.
REPRESENTATION_LAYOUT = "[f_p, logZ_p, f_q - f_p, logZ_q - logZ_p]"
_LABEL_CHUNK = 4096


def _label_coefficients(w_p: Tensor, w_q: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Rows ``alpha_y``, ``delta_y`` of the linear maps ``u -> X_y = l_p(y|x)`` and
    ``u -> D_y = l_q(y|x) - l_p(y|x)`` (up to constants, which covariances ignore):
    ``X_y = W_p[y] f_p - logZ_p + b``, ``D_y = (W_q - W_p)[y] f_p + W_q[y] (f_q - f_p) - (logZ_q - logZ_p) + b'``."""
    wp, wq = w_p[rows], w_q[rows]
    c, m = wp.shape
    zero, one = wp.new_zeros(c, 1), wp.new_ones(c, 1)
    alpha = torch.cat([wp, -one, wp.new_zeros(c, m + 1)], dim=1)
    delta = torch.cat([wq - wp, zero, wq, -one], dim=1)
    return alpha, delta


class RepresentationLabelCov:
    """``pivots -> LabelCov`` from the ``(2M+2) x (2M+2)`` covariance of ``u(x)`` (layout
    :data:`REPRESENTATION_LAYOUT`) and the unembedding weights ``w_p``, ``w_q`` (K x M; biases shift
    log-probabilities by constants and do not enter). ``Cov(w) = B Cov(u) B^T`` is never formed: the K
    diagonals cost O(K M^2) once, each call O(P K M) for its P pivots; memory O(P K + chunk_size M), so
    K = 50,257 is fine. Pass it as the ``label_cov`` of :func:`~lightning_repsim.functional.llv_terms.label_part`,
    which calls it once per chunk of pivots.
    """

    def __init__(self, cov_u: Tensor, w_p: Tensor, w_q: Tensor, chunk_size: int = _LABEL_CHUNK) -> None:
        self.cov_u, self.w_p, self.w_q, self.chunk_size = cov_u, w_p, w_q, chunk_size
        k, m = w_p.shape
        self.vx, self.vxd, self.vd = (cov_u.new_empty(k) for _ in range(3))
        # blocks of C = Cov(u), u = [f (0:M), lp (M), g (M+1:2M+1), e (2M+1)]; alpha_y = [W_p, -1, 0, 0] and
        # delta_y = [dW, 0, W_q, -1] (dW = W_q - W_p) are never assembled: each diagonal is a sum of block quadratic
        # forms, five (chunk, M) x (M, M) products in all (symmetry: dW C_fg W_q^T appears once, doubled)
        g, e = slice(m + 1, 2 * m + 1), 2 * m + 1
        c_ff, c_fg, c_gg = cov_u[:m, :m], cov_u[:m, g], cov_u[g, g]
        c_flp, c_fe, c_lpg, c_ge = cov_u[:m, m], cov_u[:m, e], cov_u[m, g], cov_u[g, e]
        c_lplp, c_lpe, c_ee = cov_u[m, m], cov_u[m, e], cov_u[e, e]

        def rowdot(a: Tensor, b: Tensor) -> Tensor:
            return (a * b).sum(1)

        for sl, wp, dw, wq in self._label_chunks():
            wp_ff = wp @ c_ff
            dw_fg = dw @ c_fg
            self.vx[sl] = rowdot(wp_ff, wp) - 2 * (wp @ c_flp) + c_lplp
            self.vxd[sl] = (rowdot(wp_ff, dw) + rowdot(wp @ c_fg, wq) - wp @ c_fe - dw @ c_flp - wq @ c_lpg + c_lpe)
            self.vd[sl] = (rowdot(dw @ c_ff, dw) + 2 * rowdot(dw_fg, wq) + rowdot(wq @ c_gg, wq) - 2 * (dw @ c_fe)
                           - 2 * (wq @ c_ge) + c_ee)

    def _label_chunks(self):
        """``(slice, W_p, W_q - W_p, W_q)`` rows of each chunk of labels."""
        k = self.w_p.shape[0]
        for start in range(0, k, self.chunk_size):
            sl = slice(start, min(k, start + self.chunk_size))
            wp, wq = self.w_p[sl], self.w_q[sl]
            yield sl, wp, wq - wp, wq

    def __call__(self, pivots: Tensor) -> LabelCov:
        cov_u, m, k = self.cov_u, self.w_p.shape[1], self.w_p.shape[0]
        a_piv, d_piv = _label_coefficients(self.w_p, self.w_q, pivots)
        p = pivots.numel()
        # the pivots' alpha C and delta C stacked: (2P, 2M+2); their products with every label's alpha and delta
        # from three (2P, M) x (M, chunk) products: S alpha^T = S_f W_p^T - S_lp, S delta^T = S_f dW^T + S_g W_q^T - S_e
        s = torch.cat([a_piv[:, : m + 1] @ cov_u[: m + 1], d_piv @ cov_u])
        s_f, s_lp, s_g, s_e = s[:, :m], s[:, m, None], s[:, m + 1 : 2 * m + 1], s[:, 2 * m + 1, None]
        sxx, sxd_py, sxd_yp, sdd = (cov_u.new_empty(p, k) for _ in range(4))
        for sl, wp, dw, wq in self._label_chunks():
            with_alpha = torch.sub(s_f @ wp.T, s_lp)
            with_delta = torch.addmm(torch.sub(s_f @ dw.T, s_e), s_g, wq.T)
            sxx[:, sl], sxd_yp[:, sl] = with_alpha[:p], with_alpha[p:]
            sxd_py[:, sl], sdd[:, sl] = with_delta[:p], with_delta[p:]
        return LabelCov(pivots=pivots, vx=self.vx, vxd=self.vxd, vd=self.vd, sxx=sxx, sxd_py=sxd_py, sxd_yp=sxd_yp, sdd=sdd)


def label_means_from_representation(
    mean_u: Tensor, w_p: Tensor, b_p: Tensor | None, w_q: Tensor, b_q: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Mean log-probability of every label under each model, ``E_x l_p(y|x)`` and ``E_x l_q(y|x)``."""
    m = w_p.shape[1]
    f_p, lz_p, df, dlz = mean_u[:m], mean_u[m], mean_u[m + 1 : 2 * m + 1], mean_u[2 * m + 1]
    mean_p = w_p @ f_p - lz_p
    mean_q = w_q @ (f_p + df) - (lz_p + dlz)
    return (mean_p if b_p is None else mean_p + b_p), (mean_q if b_q is None else mean_q + b_q)


def label_covariance_of_h(
    w_p: Tensor, b_p: Tensor | None, w_q: Tensor, b_q: Tensor | None, chunk_size: int = _LABEL_CHUNK
) -> Tensor:
    """Covariance over labels of ``h_y = [W_p[y], b_p[y], (W_q - W_p)[y], (b_q - b_p)[y]]``, ``(2M+2)^2``, O(K M^2).
    Its structure is that of :data:`REPRESENTATION_LAYOUT`, so :func:`embedding_covariance` of it is the covariance
    over labels of ``[g_p; g_q]`` (the g-part of d_SVD)."""
    k = w_p.shape[0]
    b_p = w_p.new_zeros(k) if b_p is None else b_p
    b_q = w_q.new_zeros(k) if b_q is None else b_q
    count = mean = m2 = None
    for start in range(0, k, chunk_size):
        sl = slice(start, min(k, start + chunk_size))
        h = torch.cat([w_p[sl], b_p[sl, None], w_q[sl] - w_p[sl], (b_q[sl] - b_p[sl])[:, None]], dim=1)
        part = batch_moments(h)
        count, mean, m2 = part if count is None else merge_moments(count, mean, m2, *part)
    return covariance_from_moments(count, m2)


def input_terms_from_representation(
    f_p_rows: Tensor,
    f_q_rows: Tensor,
    w_p: Tensor,
    b_p: Tensor | None,
    w_q: Tensor,
    b_q: Tensor | None,
    sets: Tensor,
    chunk_size: int = _LABEL_CHUNK,
    sigma: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Term-2/term-4 entries ``(b, b_piv, |tau_p - tau_q|, valid)``, each (S, M), for candidate sets
    (S, M+1) of row indices into the embeddings ``f_p_rows``/``f_q_rows`` (R x M), without forming any
    (M+1) x K matrix of log-probabilities.

    Over labels, ``l_p(y|x) = h_y . [f_p(x), 1, 0, 0] + const`` and ``l_q(y|x) - l_p(y|x) =
    h_y . [f_q - f_p, 0, f_q, 1] + const`` with ``h_y = [W_p[y], b_p[y], (W_q - W_p)[y], (b_q - b_p)[y]]``,
    so every variance over labels is a quadratic form in the ``(2M+2)^2`` label covariance ``Sigma`` of
    ``h`` (cost O(K M^2) once): per row ``Var l_p``, ``Cov(l_p, l_q - l_p)``, ``Var(l_q - l_p)``, and per
    (set, input) the displacement against the set's pivot in ``Sigma``'s quadratic form: from Gram matrices of
    the R rows the sets use (O(R^2 M), the metrics' bounded buffer) or set by set (O(S M^3), when R is large:
    ``compare`` over all N inputs), whichever costs less. The entries follow the shared formula of
    :mod:`~lightning_repsim.functional.llv_terms`.
    """
    m = w_p.shape[1]
    if sigma is None:
        sigma = label_covariance_of_h(w_p, b_p, w_q, b_q, chunk_size)
    fp, fq = f_p_rows, f_q_rows
    df = fq - fp
    vx, cxe, ve = _row_variances(fp, df, fq, sigma)
    vq = vx + 2 * cxe + ve
    used, local = torch.unique(sets, return_inverse=True)
    s_count, set_size = sets.shape
    if used.numel() ** 2 <= s_count * (set_size - 1) * (3 * m + 2):  # Gram matrices of the used rows are cheaper
        tp2, delta = _displacements_by_gram(fp[used], df[used], fq[used], sigma, local)
    else:  # the displacements of each set directly (many rows, few sets: e.g. compare over all N inputs)
        tp2, delta = _displacements_by_set(fp, df, fq, sigma, sets)
    z, i = sets[:, :1], sets[:, 1:]
    valid, tp, tq = normalisers(tp2, delta, vx[i] + vx[z], vq[i] + vq[z])
    b, b_piv, t4 = entries(valid, tp, tq, delta, (vx[i], cxe[i], ve[i]), (vx[z], cxe[z], ve[z]))
    return b, b_piv, t4, valid


def _displacements_by_set(fp: Tensor, df: Tensor, fq: Tensor, sigma: Tensor, sets: Tensor) -> tuple[Tensor, Tensor]:
    """``(tau_p^2, Delta)`` per (set, input) from each input's displacement against its set's pivot, O(S M^3)."""
    m = fp.shape[1]
    step = max(1, CHUNK_NUMBERS // (sets.shape[1] * (2 * m + 2)))
    parts = []
    for chunk in sets.split(step):
        z, i = chunk[:, :1], chunk[:, 1:]
        d_a = fp[i] - fp[z]  # (S, M, M): only the f_p block of the X-displacement is non-zero
        d_d = torch.cat([df[i] - df[z], torch.zeros_like(d_a[..., :1]), fq[i] - fq[z], torch.zeros_like(d_a[..., :1])], -1)
        tp2 = (d_a @ sigma[:m, :m] * d_a).sum(-1)
        delta = 2 * ((d_a @ sigma[:m]) * d_d).sum(-1) + (d_d @ sigma * d_d).sum(-1)
        parts.append((tp2, delta))
    return tuple(torch.cat(t) for t in zip(*parts))


def _row_variances(fp: Tensor, df: Tensor, fq: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per input, over labels: ``Var l_p``, ``Cov(l_p, l_q - l_p)``, ``Var(l_q - l_p)``, the quadratic forms of
    ``x = [f_p, 1, 0, 0]`` and ``e = [f_q - f_p, 0, f_q, 1]`` in ``sigma``."""
    m, r = fp.shape[1], fp.shape[0]
    zero, one = fp.new_zeros(r, 1), fp.new_ones(r, 1)
    x = torch.cat([fp, one, fp.new_zeros(r, m + 1)], dim=1)
    e = torch.cat([df, zero, fq, one], dim=1)
    x_s, e_s = x @ sigma, e @ sigma
    return (x_s * x).sum(1), (x_s * e).sum(1), (e_s * e).sum(1)


def _centred_coefficients(fp: Tensor, df: Tensor, fq: Tensor) -> tuple[Tensor, Tensor]:
    """The rows' ``x`` and ``e`` coefficients centred over the rows (constants dropped: displacements ignore them)."""
    m, r = fp.shape[1], fp.shape[0]
    zero = fp.new_zeros(r, 1)
    ac = torch.cat([fp - fp.mean(0), fp.new_zeros(r, m + 2)], dim=1)
    dc = torch.cat([df - df.mean(0), zero, fq - fq.mean(0), zero], dim=1)
    return ac, dc


def _displacements_by_gram(fp: Tensor, df: Tensor, fq: Tensor, sigma: Tensor, sets: Tensor) -> tuple[Tensor, Tensor]:
    """``(tau_p^2, Delta)`` per (set, input) from Gram matrices of the R used rows (centred), O(R^2 M)."""
    ac, dc = _centred_coefficients(fp, df, fq)
    ac_s = ac @ sigma
    gaa, gad, gdd = ac_s @ ac.T, ac_s @ dc.T, (dc @ sigma) @ dc.T
    z, i = sets[:, :1], sets[:, 1:]
    tp2 = gaa[i, i] + gaa[z, z] - 2 * gaa[i, z]
    cad = gad[i, i] - gad[i, z] - gad[z, i] + gad[z, z]
    vdd = gdd[i, i] + gdd[z, z] - 2 * gdd[i, z]
    return tp2, 2 * cad + vdd


def embedding_covariance(cov_u: Tensor, m: int) -> Tensor:
    """Covariance of ``[f_p; f_q]`` (2M x 2M) from that of ``u`` (:data:`REPRESENTATION_LAYOUT`, ``f_q = f_p + (f_q - f_p)``)."""
    s_pp, s_pd, s_dd = cov_u[:m, :m], cov_u[:m, m + 1 : 2 * m + 1], cov_u[m + 1 : 2 * m + 1, m + 1 : 2 * m + 1]
    s_pq = s_pp + s_pd
    return torch.cat([torch.cat([s_pp, s_pq], 1), torch.cat([s_pq.T, s_pp + s_pd + s_pd.T + s_dd], 1)], 0)


def representation_pivot_budget(k: int, m: int) -> int:
    """Pivots the representation route searches by default: all K when the (pivot, label) covariance rows cost
    under about 2^31 flops (``8 P K (2M+2)``), else as many as that budget allows, never fewer than 128."""
    return int(min(k, max(128, 2**31 // (8 * k * (2 * m + 2)))))


def representation_pair_statistics(f_p_rows: Tensor, f_q_rows: Tensor, sigma: Tensor) -> PairStatistics:
    """The pair statistics of the input-set search (:mod:`~lightning_repsim.functional.input_search`) for candidate
    inputs given by their embeddings, with ``sigma`` the label covariance of :func:`label_covariance_of_h`."""
    fp, fq = f_p_rows, f_q_rows
    df = fq - fp
    var_x, cov_xd, var_d = _row_variances(fp, df, fq, sigma)
    ac, dc = _centred_coefficients(fp, df, fq)
    return PairStatistics(
        a=ac, d=dc, a_w=ac @ sigma, d_w=dc @ sigma, var_x=var_x, cov_xd=cov_xd, var_d=var_d,
        directions_p=fp, directions_q=fq, center_directions=False,
    )


def representation_llv(
    n: int, mean_u: Tensor, cov_u: Tensor, w_p: Tensor, b_p: Tensor | None, w_q: Tensor, b_q: Tensor | None,
    f_p_rows: Tensor, f_q_rows: Tensor, positions: Tensor, report: Callable[[Tensor], Tensor], options: LLVOptions,
    sigma_h: Tensor | None = None, rep_dim: int | None = None,
) -> tuple[LLVResult, Tensor]:
    """d_LLV by the representation route from the moments of ``u`` over ``n`` inputs (mean, unbiased covariance),
    the unembedding weights/biases and the candidate inputs' embeddings (``positions``: the given ``input_sets`` or
    the sampled sets, as rows of ``f_*_rows``; ``report(positions)``: sets as the result reports them; ``rep_dim``:
    the representation dimension, M by default, the embeddings' rank when they are rank-deficient). The input set is
    searched as ``options.input_set_search`` says unless ``options.input_sets`` were given. Returns the result and the
    chosen input set as row positions. Shared by
    :func:`~lightning_repsim.functional.compare` and :class:`~lightning_repsim.metrics.SVDDissimilarity`."""
    k, m = w_p.shape
    resolved = options.resolve(k)
    budget = options.max_pivot_candidates
    if budget is None:
        budget = representation_pivot_budget(k, m)
    pivots = choose_pivots(*label_means_from_representation(mean_u, w_p, b_p, w_q, b_q), resolved, budget)
    labels = label_part(
        RepresentationLabelCov(cov_u, w_p, w_q), k, cov_u.device, options.reduce, resolved.label_pivot,
        resolved.leave_out, pivots, refine=resolved.pivot_candidates is None,
    )
    if sigma_h is None:
        sigma_h = label_covariance_of_h(w_p, b_p, w_q, b_q)

    def entries_of(sets: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return input_terms_from_representation(f_p_rows, f_q_rows, w_p, b_p, w_q, b_q, sets, sigma=sigma_h)

    if options.input_sets is not None:
        inputs, search = select_input_set(*entries_of(positions), report(positions), options.reduce), None
        chosen = positions[inputs.chosen_candidate]
    else:
        inputs, search, chosen = choose_input_set(
            entries_of, lambda: representation_pair_statistics(f_p_rows, f_q_rows, sigma_h), positions, report,
            torch.cat([f_p_rows, f_q_rows], 1), options.input_set_search, options.reduce,
        )
    return llv_result(labels, inputs, resolved, n, k, m if rep_dim is None else rep_dim, options, search), chosen
