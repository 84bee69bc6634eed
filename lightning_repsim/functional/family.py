"""The model family of SPEC §1, ``p(y|x) = softmax_y(f(x)^T g(y) + b_y)``: unembeddings with an optional bias
column, and logits and log-partition functions computed from representations, in float64.

An unembedding is ``(K, M)`` (weights ``g(y)``) or ``(K, M+1)`` with the bias ``b_y`` as last column, which is
what ``torch.cat([head.weight, head.bias[:, None]], 1)`` gives for a final ``nn.Linear`` (the embedding is then
the layer's input). Every layer that needs logits or ``logZ`` from representations calls these functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_repsim.functional.inputs import as_matrix, check_embedding_pair, check_finite

__all__ = ["ModelPair", "fit_width", "log_partition", "logits_from_parts", "logits_from_representations", "split_unembedding",
           "unembedding_parts"]

#: Labels per block when ``logZ`` is computed for large vocabularies (never a B x K float64 block); on CPU the
#: block is narrowed so that a block of logits holds about :data:`CPU_BLOCK_NUMBERS` numbers (4 MB: its passes stay
#: in cache; 4x faster at N = 256, K = 50,257, M = 2).
LABEL_BLOCK = 8192
CPU_BLOCK_NUMBERS = 1 << 19


def fit_width(x: Tensor, width: int) -> Tensor:
    """``x`` with its last dimension cut or zero-padded to ``width`` (a view when it is cut or already fits).

    How two models of different embedding widths ``M_p``, ``M_q`` are put side by side: the narrower one is read
    as the same model with constant-zero coordinates and zero unembedding columns appended, which changes none of
    its logits. Coordinates the two models share by position are then compared by their *difference*, so two
    identical models (one with a redundant coordinate appended) compare as identical to rounding.

    Example:
        >>> import torch
        >>> fit_width(torch.ones(2, 3), 5).tolist(), fit_width(torch.ones(2, 3), 2).shape
        ([[1.0, 1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0, 0.0]], torch.Size([2, 2]))
    """
    have = x.shape[-1]
    if have >= width:
        return x[..., :width]
    return torch.cat([x, x.new_zeros(*x.shape[:-1], width - have)], dim=-1)


def split_unembedding(unemb: Tensor, rep_dim: int, name: str = "unemb") -> tuple[Tensor, Tensor | None]:
    """Float64 weights (K, M) and bias (K,) or None of an unembedding of width M or M+1 (bias last), on its device.

    Example:
        >>> import torch
        >>> w, b = split_unembedding(torch.ones(5, 3), rep_dim=2)
        >>> w.shape, b.shape, w.dtype
        (torch.Size([5, 2]), torch.Size([5]), torch.float64)
    """
    u = as_matrix(unemb, name)
    check_finite(u, name)
    if unemb.ndim != 2:
        raise ValueError(f"`{name}` must be a (K, M) or (K, M+1) matrix, got shape {tuple(unemb.shape)}")
    return unembedding_parts(u, rep_dim, name)


def unembedding_parts(unemb: Tensor, rep_dim: int, name: str = "unemb") -> tuple[Tensor, Tensor | None]:
    """Views ``(weights (K, M), bias (K,) or None)`` of a (K, M) or (K, M+1) unembedding, in its own dtype and device
    (no copy, no finiteness check: :func:`split_unembedding` adds those); a clear error for any other width.

    Example:
        >>> import torch
        >>> w, b = unembedding_parts(torch.ones(5, 3), rep_dim=2)
        >>> w.shape, b.shape, w.dtype
        (torch.Size([5, 2]), torch.Size([5]), torch.float32)
    """
    if unemb.ndim == 2 and unemb.shape[1] == rep_dim:
        return unemb, None
    if unemb.ndim == 2 and unemb.shape[1] == rep_dim + 1:
        return unemb[:, :rep_dim], unemb[:, rep_dim]
    raise ValueError(
        f"`{name}` must have shape (K, M) or (K, M+1) (bias as last column) with M={rep_dim} "
        f"(the embedding dimension), got {tuple(unemb.shape)}"
    )


@dataclass(frozen=True)
class ModelPair:
    """Two models of the family on the same N inputs, checked and in float64: embeddings ``f_p`` (N, M_p), ``f_q``
    (N, M_q), unembedding weights ``w_p`` (K, M_p), ``w_q`` (K, M_q) and biases (K,) or None. The widths may differ
    (a smaller student); K may not."""

    f_p: Tensor
    w_p: Tensor
    b_p: Tensor | None
    f_q: Tensor
    w_q: Tensor
    b_q: Tensor | None

    @classmethod
    def of(cls, emb_p: Tensor, unemb_p: Tensor, emb_q: Tensor, unemb_q: Tensor) -> ModelPair:
        """Check and convert ``(emb_p, unemb_p, emb_q, unemb_q)``; unembeddings are (K, M) or (K, M+1) with the bias
        as last column."""
        f_p, f_q = check_embedding_pair(emb_p, emb_q)
        w_p, b_p = split_unembedding(unemb_p, f_p.shape[1], "unemb_p")
        w_q, b_q = split_unembedding(unemb_q, f_q.shape[1], "unemb_q")
        if w_p.shape[0] != w_q.shape[0]:
            raise ValueError(
                f"`unemb_p` and `unemb_q` must have the same number of labels, got {w_p.shape[0]} and {w_q.shape[0]}"
            )
        return cls(f_p, w_p, b_p, f_q, w_q, b_q)

    @property
    def sizes(self) -> tuple[int, int, int, int]:
        """``(N, K, M_p, M_q)``: inputs, labels and the two embedding widths."""
        return int(self.f_p.shape[0]), int(self.w_p.shape[0]), int(self.f_p.shape[1]), int(self.f_q.shape[1])

    def logits(self) -> tuple[Tensor, Tensor]:
        """Both models' logits (N, K), float64."""
        return logits_from_parts(self.f_p, self.w_p, self.b_p), logits_from_parts(self.f_q, self.w_q, self.b_q)


def logits_from_parts(emb: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Logits ``f(x)^T g(y) (+ b_y)`` in float64 from embeddings (N, M), weights (K, M) and an optional bias (K,)."""
    logits = emb.to(torch.float64) @ weight.to(device=emb.device, dtype=torch.float64).T
    return logits if bias is None else logits + bias.to(device=emb.device, dtype=torch.float64)


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


def log_partition(emb: Tensor, weight: Tensor, bias: Tensor | None, block: int | None = None) -> Tensor:
    """``logZ(x) = logsumexp_y (f(x)^T g(y) + b_y)`` in float64, over blocks of labels (memory O(N block);
    ``block`` defaults to :data:`LABEL_BLOCK` labels, fewer on CPU for many inputs).

    Example:
        >>> import torch
        >>> f, w = torch.randn(4, 3, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
        >>> bool(torch.allclose(log_partition(f, w, None, block=3), torch.logsumexp(f @ w.T, dim=1)))
        True
    """
    if block is None:
        block = LABEL_BLOCK if emb.device.type != "cpu" else min(LABEL_BLOCK, max(256, CPU_BLOCK_NUMBERS // max(1, emb.shape[0])))
    n, k = emb.shape[0], weight.shape[0]
    f = emb.to(torch.float64)
    # one reused block buffer (a fresh temporary per block costs page faults on CPU: 4x slower in a new process)
    flat = torch.empty(n * min(block, k), dtype=torch.float64, device=emb.device)
    parts = f.new_empty(n, -(-k // block))
    for i, start in enumerate(range(0, k, block)):
        w = weight[start : start + block].to(device=emb.device, dtype=torch.float64)
        z = torch.mm(f, w.T, out=flat[: n * w.shape[0]].view(n, w.shape[0]))
        if bias is not None:
            z.add_(bias[start : start + block].to(device=emb.device, dtype=torch.float64))
        top = z.amax(dim=1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # +-inf rows: logZ = +-inf, NaN stays NaN
        parts[:, i] = z.sub_(top).exp_().sum(dim=1).log_().add_(top.squeeze(1))
    return parts[:, 0] if parts.shape[1] == 1 else torch.logsumexp(parts, dim=1)
