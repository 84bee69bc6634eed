"""Model pairs and data sets from the paper's experiments (SPEC §7), generated with seeded torch RNGs."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["ModelPair", "theorem31_pair", "THEOREM31_PERMUTATION", "radial_dataset"]

#: Model 2 of the Theorem 3.1 construction relabels class k as pi(k) = (2k + 5) mod 7.
THEOREM31_PERMUTATION = (5, 0, 2, 4, 6, 1, 3)


class ModelPair(NamedTuple):
    """Embeddings (N x M) and unembeddings (K x M) of two models on the same inputs."""

    emb_p: Tensor
    unemb_p: Tensor
    emb_q: Tensor
    unemb_q: Tensor
    labels: Tensor


def theorem31_pair(
    rho: float, n_per_class: int = 500, seed: int = 0, dtype: torch.dtype = torch.float64
) -> ModelPair:
    """The Theorem 3.1 / Table 1 construction: two models whose KL divergence goes to 0 as ``rho``
    grows while their 2-D embeddings stay permuted stars (not linearly related).

    K = 7 classes at angles ``theta_k = 2 pi k / 7``; ``g_p(y_k) = rho (cos theta_k, sin theta_k)``;
    input j of class k sits at radius ``r = 2 + |0.01 xi|`` and angle ``theta_k + delta_kj``,
    ``delta ~ U(-pi/64, pi/64)``. Model q relabels by ``pi(k) = 2k + 5 mod 7``: the same input has
    angle ``theta_pi(k) + delta_pi(k)j`` and the same radius, and ``g_q(y_k)`` points at
    ``theta_pi(k)``.

    Example:
        >>> pair = theorem31_pair(rho=5.0, n_per_class=10)
        >>> pair.emb_p.shape, pair.unemb_p.shape
        (torch.Size([70, 2]), torch.Size([7, 2]))
    """
    k = 7
    gen = torch.Generator().manual_seed(int(seed))
    theta = 2 * math.pi * torch.arange(k, dtype=torch.float64) / k
    radius = 2 + (0.01 * torch.randn(k, n_per_class, generator=gen, dtype=torch.float64)).abs()
    delta = (torch.rand(k, n_per_class, generator=gen, dtype=torch.float64) * 2 - 1) * (math.pi / 64)
    perm = torch.tensor(THEOREM31_PERMUTATION)

    def star(angles: Tensor) -> Tensor:
        return torch.stack([angles.cos(), angles.sin()], dim=-1)

    emb_p = (radius[..., None] * star(theta[:, None] + delta)).reshape(-1, 2)
    emb_q = (radius[..., None] * star(theta[perm][:, None] + delta[perm])).reshape(-1, 2)
    unemb_p = rho * star(theta)
    unemb_q = rho * star(theta[perm])
    labels = torch.arange(k).repeat_interleave(n_per_class)
    return ModelPair(emb_p.to(dtype), unemb_p.to(dtype), emb_q.to(dtype), unemb_q.to(dtype), labels)


def radial_dataset(n: int, num_classes: int, seed: int = 0, scale: float = 3.0) -> tuple[Tensor, Tensor]:
    """The synthetic "radial" classification data of Section 5.2 (antipodal wedges).

    ``x ~ N(0, scale^2 I_2)``; if ``x_2 < 0`` then ``x = -x``; the class is the index of the wedge of
    angle ``pi / K`` containing the angle of ``x`` in ``[0, pi]`` (the last wedge takes the rest).

    Example:
        >>> x, y = radial_dataset(1000, 4)
        >>> x.shape, int(y.max())
        (torch.Size([1000, 2]), 3)
    """
    gen = torch.Generator().manual_seed(int(seed))
    x = scale * torch.randn(n, 2, generator=gen)
    flip = x[:, 1] < 0
    x = torch.where(flip[:, None], -x, x)
    angle = torch.atan2(x[:, 1], x[:, 0]).clamp(0, math.pi)
    y = torch.clamp((angle / (math.pi / num_classes)).floor().long(), max=num_classes - 1)
    return x, y
