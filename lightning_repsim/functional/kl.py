"""Mean KL divergence between two models' predictive distributions (SPEC §2)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_repsim.functional._validation import check_logit_pair

__all__ = ["mean_kl_divergence", "kl_per_input"]


def kl_per_input(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p(.|x) || q(.|x))`` for each row, from float64 log-probabilities of shape (N, K)."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def check_num_classes(k: int) -> None:
    if k < 1:
        raise ValueError(f"the logits must have at least one class (K >= 1) in their last dimension, got K={k}")


def mean_kl_divergence(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """``d_KL = mean_x KL(p(.|x) || q(.|x))``, a float64 scalar tensor.

    Logits of shape (N, K) or (..., K); any float dtype and device. This is the baseline that the
    paper shows can be arbitrarily small for models with very different representations.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[0.0, 1.0, 2.0], [2.0, 0.0, 0.0]])
        >>> float(mean_kl_divergence(logits, logits + 5.0))  # a per-input shift changes nothing
        0.0
        >>> round(float(mean_kl_divergence(logits, logits.flip(-1))), 4)
        1.2557
    """
    p, q = check_logit_pair(logits_p, logits_q)
    check_num_classes(p.shape[1])
    if p.shape[0] == 0:
        raise ValueError("mean_kl_divergence needs at least one input, got N=0")
    return kl_per_input(torch.log_softmax(p, -1), torch.log_softmax(q, -1)).mean()
