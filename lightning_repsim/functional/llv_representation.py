"""The representation route of d_LLV (SPEC §6): every term from embeddings and unembeddings, never K x K.

For a model of the family ``p(y|x) = softmax(W f(x) + b)``, each log-probability is a linear function of the
streamed vector ``u(x)`` (layout :data:`REPRESENTATION_LAYOUT`), so the label terms need only the covariance of
``u`` (``(M_p + M_q + 2)^2`` numbers) and the unembeddings (``Cov(w) = B Cov(u) B^T``, never formed), and the input
terms only the candidate inputs' embeddings: O((M_p + M_q)^2) state and O(K (M_p + M_q)^2 + P K (M_p + M_q)) compute
for any vocabulary size K. The entries then follow the shared formula of :mod:`~lightning_repsim.functional.llv_terms`.

**Two widths.** The models may have embeddings of different widths ``M_p``, ``M_q`` (a smaller student). The layout
compares them by position (:func:`~lightning_repsim.functional.family.fit_width`: the narrower model read with zero
coordinates appended), keeping the *difference* of the shared coordinates: identical models, one with a redundant
coordinate appended, compare as identical to rounding, and equal widths give exactly the equal-width layout.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_repsim.functional._moments import batch_moments, covariance_from_moments, merge_moments
from lightning_repsim.functional.family import fit_width
from lightning_repsim.functional.input_search import PairStatistics
from lightning_repsim.functional.llv_labels import LabelCov
from lightning_repsim.functional.llv_route import LLVRoute
from lightning_repsim.functional.llv_terms import CHUNK_NUMBERS, entries, normalisers

__all__ = [
    "REPRESENTATION_LAYOUT",
    "RepresentationRoute",
    "embedding_covariance",
    "label_covariance_of_h",
    "representation_pivot_budget",
    "representation_rows",
    "input_terms_from_representation",
    "RepresentationLabelCov",
    "label_means_from_representation",
]

#: Layout of the streamed representation vector ``u(x)`` (length ``M_p + M_q + 2``), with ``fit`` the width
#: alignment of :func:`~lightning_repsim.functional.family.fit_width`. It is an invertible linear map of
#: ``[f_p, logZ_p, f_q, logZ_q]`` (SPEC §6); storing the *differences* keeps nearly identical models accurate,
#: exactly as ``[l_p; l_q - l_p]`` does for the logits route.
REPRESENTATION_LAYOUT = "[f_p, logZ_p, f_q - fit(f_p, M_q), logZ_q - logZ_p]"
_LABEL_CHUNK = 4096


def representation_rows(f_p: Tensor, lz_p: Tensor, f_q: Tensor, lz_q: Tensor) -> Tensor:
    """Rows ``u(x)`` of :data:`REPRESENTATION_LAYOUT` (float64) from both models' embeddings and log-partitions."""
    f_p, f_q = f_p.to(torch.float64), f_q.to(torch.float64)
    return torch.cat([f_p, lz_p[:, None], f_q - fit_width(f_p, f_q.shape[1]), (lz_q - lz_p)[:, None]], dim=1)


def _widths(size: int, m_p: int) -> tuple[int, int]:
    return m_p, size - m_p - 2


def _label_coefficients(w_p: Tensor, w_q: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Rows ``alpha_y``, ``delta_y`` of the linear maps ``u -> X_y = l_p(y|x)`` and
    ``u -> D_y = l_q(y|x) - l_p(y|x)`` (up to constants, which covariances ignore):
    ``X_y = W_p[y] f_p - logZ_p + b``, ``D_y = (fit(W_q, M_p) - W_p)[y] f_p + W_q[y] (f_q - fit(f_p, M_q))
    - (logZ_q - logZ_p) + b'`` (``fit(W_q, M_p) f_p = W_q fit(f_p, M_q)``)."""
    wp, wq = w_p[rows], w_q[rows]
    c, m_q = wq.shape
    zero, one = wp.new_zeros(c, 1), wp.new_ones(c, 1)
    alpha = torch.cat([wp, -one, wp.new_zeros(c, m_q + 1)], dim=1)
    delta = torch.cat([fit_width(wq, wp.shape[1]) - wp, zero, wq, -one], dim=1)
    return alpha, delta


class RepresentationLabelCov:
    """``pivots -> LabelCov`` from the covariance of ``u(x)`` (layout :data:`REPRESENTATION_LAYOUT`) and the
    unembedding weights ``w_p`` (K x M_p), ``w_q`` (K x M_q); biases shift log-probabilities by constants and do not
    enter. ``Cov(w) = B Cov(u) B^T`` is never formed: the K diagonals cost O(K M^2) once, each call O(P K M) for its P
    pivots; memory O(P K + chunk_size M), so K = 50,257 is fine. It is the ``label_cov`` of the representation route,
    called once per chunk of pivots.
    """

    def __init__(self, cov_u: Tensor, w_p: Tensor, w_q: Tensor, chunk_size: int = _LABEL_CHUNK) -> None:
        self.cov_u, self.w_p, self.w_q, self.chunk_size = cov_u, w_p, w_q, chunk_size
        k, m = w_p.shape
        self.vx, self.vxd, self.vd = (cov_u.new_empty(k) for _ in range(3))
        # blocks of C = Cov(u), u = [f (0:M_p), lp (M_p), g (M_p+1 : M_p+1+M_q), e (last)]; alpha_y = [W_p, -1, 0, 0] and
        # delta_y = [dW, 0, W_q, -1] (dW = fit(W_q, M_p) - W_p) are never assembled: each diagonal is a sum of block
        # quadratic forms, five (chunk, M) x (M, M) products in all (the symmetric dW C_fg W_q^T appears once, doubled)
        e = cov_u.shape[0] - 1
        g = slice(m + 1, e)
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
        """``(slice, W_p, fit(W_q, M_p) - W_p, W_q)`` rows of each chunk of labels."""
        k, m = self.w_p.shape
        for start in range(0, k, self.chunk_size):
            sl = slice(start, min(k, start + self.chunk_size))
            wp, wq = self.w_p[sl], self.w_q[sl]
            yield sl, wp, fit_width(wq, m) - wp, wq

    def __call__(self, pivots: Tensor) -> LabelCov:
        cov_u, m, k = self.cov_u, self.w_p.shape[1], self.w_p.shape[0]
        a_piv, d_piv = _label_coefficients(self.w_p, self.w_q, pivots)
        p = pivots.numel()
        # the pivots' alpha C and delta C stacked: (2P, D); their products with every label's alpha and delta from
        # three (2P, M) x (M, chunk) products: S alpha^T = S_f W_p^T - S_lp, S delta^T = S_f dW^T + S_g W_q^T - S_e
        s = torch.cat([a_piv[:, : m + 1] @ cov_u[: m + 1], d_piv @ cov_u])
        s_f, s_lp, s_g, s_e = s[:, :m], s[:, m, None], s[:, m + 1 : -1], s[:, -1:]
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
    m, m_q = w_p.shape[1], w_q.shape[1]
    f_p, lz_p, df, dlz = mean_u[:m], mean_u[m], mean_u[m + 1 : m + 1 + m_q], mean_u[-1]
    mean_p = w_p @ f_p - lz_p
    mean_q = w_q @ (df + fit_width(f_p, m_q)) - (lz_p + dlz)
    return (mean_p if b_p is None else mean_p + b_p), (mean_q if b_q is None else mean_q + b_q)


def label_covariance_of_h(
    w_p: Tensor, b_p: Tensor | None, w_q: Tensor, b_q: Tensor | None, chunk_size: int = _LABEL_CHUNK
) -> Tensor:
    """Covariance over labels of ``h_y = [W_p[y], b_p[y], (W_q - fit(W_p, M_q))[y], (b_q - b_p)[y]]``,
    ``(M_p + M_q + 2)^2``, O(K M^2). Its structure is that of :data:`REPRESENTATION_LAYOUT`, so
    :func:`embedding_covariance` of it is the covariance over labels of ``[g_p; g_q]`` (the g-part of d_SVD)."""
    k, m_q = w_p.shape[0], w_q.shape[1]
    b_p = w_p.new_zeros(k) if b_p is None else b_p
    b_q = w_q.new_zeros(k) if b_q is None else b_q
    count = mean = m2 = None
    for start in range(0, k, chunk_size):
        sl = slice(start, min(k, start + chunk_size))
        h = torch.cat([w_p[sl], b_p[sl, None], w_q[sl] - fit_width(w_p[sl], m_q), (b_q[sl] - b_p[sl])[:, None]], dim=1)
        part = batch_moments(h)
        count, mean, m2 = part if count is None else merge_moments(count, mean, m2, *part)
    return covariance_from_moments(count, m2)


def _row_coefficients(fp: Tensor, fq: Tensor) -> tuple[Tensor, Tensor]:
    """Per input, the coefficient rows ``x = [f_p, 1, 0, 0]`` of ``l_p`` and ``e = [fit(f_q, M_p) - f_p, 0, f_q, 1]``
    of ``l_q - l_p`` in the label covariance of :func:`label_covariance_of_h` (``W_p fit(f_q, M_p) = fit(W_p, M_q)
    f_q``)."""
    m_q, r = fq.shape[1], fp.shape[0]
    zero, one = fp.new_zeros(r, 1), fp.new_ones(r, 1)
    x = torch.cat([fp, one, fp.new_zeros(r, m_q + 1)], dim=1)
    e = torch.cat([fit_width(fq, fp.shape[1]) - fp, zero, fq, one], dim=1)
    return x, e


def _row_variances(x: Tensor, e: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per input, over labels: ``Var l_p``, ``Cov(l_p, l_q - l_p)``, ``Var(l_q - l_p)``: quadratic forms in ``sigma``."""
    x_s, e_s = x @ sigma, e @ sigma
    return (x_s * x).sum(1), (x_s * e).sum(1), (e_s * e).sum(1)


def displacements(ac: Tensor, dc: Tensor, sigma: Tensor, sets: Tensor) -> tuple[Tensor, Tensor]:
    """``(tau_p^2, Delta)`` per (set, input): the displacement of each input from its set's pivot in ``sigma``'s
    quadratic form, for coefficient rows ``ac`` (of ``l_p``) and ``dc`` (of ``l_q - l_p``), from Gram matrices of the
    rows (O(R^2 D), when few rows serve many sets) or set by set (O(S M D^2), many rows and few sets), whichever
    costs less. ``Delta = 2 Cov(u, v) + Var v`` for the displacements ``u`` of ``l_p`` and ``v`` of ``l_q - l_p``."""
    s_count, set_size = sets.shape
    rows, dim = ac.shape
    if rows * rows <= s_count * (set_size - 1) * dim:
        ac_s = ac @ sigma
        gaa, gad, gdd = ac_s @ ac.T, ac_s @ dc.T, (dc @ sigma) @ dc.T
        z, i = sets[:, :1], sets[:, 1:]
        tp2 = gaa[i, i] + gaa[z, z] - 2 * gaa[i, z]
        cad = gad[i, i] - gad[i, z] - gad[z, i] + gad[z, z]
        vdd = gdd[i, i] + gdd[z, z] - 2 * gdd[i, z]
        return tp2, 2 * cad + vdd
    step = max(1, CHUNK_NUMBERS // (set_size * dim))
    parts = []
    for chunk in sets.split(step):
        z, i = chunk[:, :1], chunk[:, 1:]
        d_a, d_d = ac[i] - ac[z], dc[i] - dc[z]
        d_a_s = d_a @ sigma
        parts.append(((d_a_s * d_a).sum(-1), 2 * (d_a_s * d_d).sum(-1) + (d_d @ sigma * d_d).sum(-1)))
    return tuple(torch.cat(t) for t in zip(*parts))  # type: ignore[return-value]


def input_terms_from_representation(f_p_rows: Tensor, f_q_rows: Tensor, sigma: Tensor, sets: Tensor) -> tuple[Tensor, ...]:
    """Term-2/term-4 entries ``(b, b_piv, |tau_p - tau_q|, valid)``, each (S, M), for candidate sets (S, M+1) of row
    positions of the embeddings ``f_p_rows`` (R x M_p), ``f_q_rows`` (R x M_q), without forming any (M+1) x K matrix
    of log-probabilities: every variance over labels is a quadratic form in the label covariance ``sigma`` of
    :func:`label_covariance_of_h` (O(K M^2) once). The entries follow the shared formula of
    :mod:`~lightning_repsim.functional.llv_terms`.
    """
    used, local = torch.unique(sets, return_inverse=True)
    x, e = _row_coefficients(f_p_rows[used], f_q_rows[used])
    vx, cxe, ve = _row_variances(x, e, sigma)
    vq = vx + 2 * cxe + ve
    tp2, delta = displacements(x - x.mean(0), e - e.mean(0), sigma, local)
    z, i = local[:, :1], local[:, 1:]
    valid, tp, tq = normalisers(tp2, delta, vx[i] + vx[z], vq[i] + vq[z])
    return (*entries(valid, tp, tq, delta, (vx[i], cxe[i], ve[i]), (vx[z], cxe[z], ve[z])), valid)


def embedding_covariance(cov_u: Tensor, m_p: int) -> Tensor:
    """Covariance of ``[f_p; f_q]`` ((M_p + M_q)^2) from that of ``u`` (:data:`REPRESENTATION_LAYOUT`):
    ``f_q = (f_q - fit(f_p, M_q)) + T f_p`` with ``T`` the (M_q x M_p) selection of ``fit``."""
    m_p, m_q = _widths(cov_u.shape[0], m_p)
    g = slice(m_p + 1, m_p + 1 + m_q)
    s_pp, s_pd, s_dd = cov_u[:m_p, :m_p], cov_u[:m_p, g], cov_u[g, g]
    s_pt = fit_width(s_pp, m_q)  # Cov(f_p, T f_p) = C_pp T^T
    s_pq = s_pd + s_pt
    s_tt = fit_width(s_pt.T, m_q)  # T C_pp T^T
    s_dt = fit_width(s_pd.T, m_q)  # Cov(d, T f_p) = C_dp T^T
    s_qq = s_dd + s_dt + s_dt.T + s_tt
    return torch.cat([torch.cat([s_pp, s_pq], 1), torch.cat([s_pq.T, s_qq], 1)], 0)


def representation_pivot_budget(k: int, m: int) -> int:
    """Pivots the representation route searches by default: all K when the (pivot, label) covariance rows cost
    under about 2^31 flops (``8 P K (2M+2)``, M the mean width), else as many as that budget allows, never fewer
    than 128."""
    return int(min(k, max(128, 2**31 // (8 * k * (2 * m + 2)))))


class RepresentationRoute(LLVRoute):
    """The representation route (module docstring): the moments of ``u`` over the inputs, the unembedding weights and
    biases of both models, and the candidate inputs' embeddings ``f_p_rows`` (R x M_p), ``f_q_rows`` (R x M_q).
    ``sigma_h`` (:func:`label_covariance_of_h`) is computed when not given (it also serves the g-part of d_SVD)."""

    def __init__(self, moments: tuple[Tensor, Tensor], heads: tuple[Tensor, Tensor | None, Tensor, Tensor | None],
                 rows: tuple[Tensor, Tensor], sigma_h: Tensor | None = None) -> None:
        self.mean_u, self.cov_u = moments
        self.w_p, self.b_p, self.w_q, self.b_q = heads
        self.f_p_rows, self.f_q_rows = rows
        self.sigma_h = label_covariance_of_h(*heads) if sigma_h is None else sigma_h
        self.num_labels, m_p = self.w_p.shape
        self.device = self.cov_u.device
        self.content = torch.cat(rows, 1)
        self.pivot_budget = representation_pivot_budget(self.num_labels, (m_p + self.w_q.shape[1] + 1) // 2)
        self._label_cov: RepresentationLabelCov | None = None

    def label_cov(self, pivots: Tensor) -> LabelCov:
        if self._label_cov is None:
            self._label_cov = RepresentationLabelCov(self.cov_u, self.w_p, self.w_q)
        return self._label_cov(pivots)

    def label_means(self) -> tuple[Tensor, Tensor]:
        return label_means_from_representation(self.mean_u, self.w_p, self.b_p, self.w_q, self.b_q)

    def set_entries(self, positions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return input_terms_from_representation(self.f_p_rows, self.f_q_rows, self.sigma_h, positions)  # type: ignore[return-value]

    def pair_statistics(self) -> PairStatistics:
        x, e = _row_coefficients(self.f_p_rows, self.f_q_rows)
        moments = _row_variances(x, e, self.sigma_h)
        return PairStatistics.from_weighted(x - x.mean(0), e - e.mean(0), self.sigma_h, moments,
                                            (self.f_p_rows, self.f_q_rows))
