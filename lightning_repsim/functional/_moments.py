"""Centred first and second moments in float64, with exact (Chan) merging.

Every streaming statistic in ``lightning_repsim`` is a triple ``(n, mean, m2)`` where ``m2`` is the
*centred* co-moment matrix ``sum_i (x_i - mean)(x_i - mean)^T``. Two triples merge exactly with
Chan et al.'s pairwise formula, so the result does not depend on how the data were split into
batches or processes. Raw sums of squares are never formed: log-probabilities reach -100 and
``E[x^2] - E[x]^2`` would lose most of their digits.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from lightning_repsim.functional.inputs import check_finite

__all__ = [
    "add_gram_",
    "add_rows_",
    "batch_moments",
    "centred_blocks",
    "column_means",
    "covariance_from_moments",
    "merge_moments",
    "merge_moments_",
    "row_blocks",
]

#: Below twice this many columns, :func:`add_gram_` is one matrix product.
SYMMETRIC_MIN_COLUMNS = 256

#: Float64 numbers in one block of rows of the blocked statistics (4 MB): a block is all the data they copy at once.
BLOCK_NUMBERS = 1 << 19


def add_gram_(out: Tensor, x: Tensor) -> Tensor:
    """``out += x^T x`` in place, for a symmetric ``out`` of shape (D, D): for D >= 512 the columns of ``x`` are split
    in halves, the two diagonal blocks are accumulated recursively and the upper off-diagonal block once, then
    mirrored (a third fewer flops than one product at D = 1,538, and an exactly symmetric result).

    Example:
        >>> import torch
        >>> x = torch.randn(50, 600, dtype=torch.float64)
        >>> bool(torch.allclose(add_gram_(torch.zeros(600, 600, dtype=torch.float64), x), x.T @ x))
        True
    """
    d = x.shape[1]
    if d < 2 * SYMMETRIC_MIN_COLUMNS:
        return out.addmm_(x.T, x)
    h = d // 2
    a, b = x[:, :h], x[:, h:]
    add_gram_(out[:h, :h], a)
    add_gram_(out[h:, h:], b)
    out[:h, h:].addmm_(a.T, b)
    out[h:, :h].copy_(out[:h, h:].T)
    return out


def batch_moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Two-pass centred moments of the rows of ``x`` (shape ``(N, D)``), computed in float64.

    Returns ``(n, mean, m2)`` with ``n`` a float64 scalar tensor, ``mean`` of shape ``(D,)`` and
    ``m2 = (x - mean)^T (x - mean)`` of shape ``(D, D)``.

    Example:
        >>> import torch
        >>> n, mean, m2 = batch_moments(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
        >>> n.item(), mean.tolist(), m2.tolist()
        (2.0, [2.0, 4.0], [[2.0, 4.0], [4.0, 8.0]])
    """
    x = x.to(torch.float64)
    n = torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device)
    if x.shape[0] == 0:
        d = x.shape[1]
        return n, x.new_zeros(d), x.new_zeros(d, d)
    mean = x.mean(dim=0)
    xc = x - mean
    return n, mean, add_gram_(x.new_zeros(x.shape[1], x.shape[1]), xc)


def merge_moments(
    n_a: Tensor, mean_a: Tensor, m2_a: Tensor, n_b: Tensor, mean_b: Tensor, m2_b: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Merge two centred moment triples exactly (Chan, Golub & LeVeque pairwise update).

    ``m2 = m2_a + m2_b + delta delta^T * n_a n_b / n`` with ``delta = mean_b - mean_a``.
    Either side may be empty (``n = 0``). Leading batch dimensions are supported, so the
    triples gathered from all processes can be folded one after another.

    Example:
        >>> import torch
        >>> x = torch.randn(10, 3, dtype=torch.float64)
        >>> merged = merge_moments(*batch_moments(x[:4]), *batch_moments(x[4:]))
        >>> all(torch.allclose(a, b) for a, b in zip(merged, batch_moments(x)))
        True
    """
    n = n_a + n_b
    safe_n = torch.where(n > 0, n, torch.ones_like(n))
    delta = mean_b - mean_a
    w_b = (n_b / safe_n).unsqueeze(-1)
    mean = mean_a + delta * w_b
    coef = (n_a * n_b / safe_n).unsqueeze(-1).unsqueeze(-1)
    m2 = m2_a + m2_b + coef * (delta.unsqueeze(-1) * delta.unsqueeze(-2))
    return n, mean, m2


def merge_moments_(
    n_a: Tensor, mean_a: Tensor, m2_a: Tensor, n_b: Tensor, mean_b: Tensor, m2_b: Tensor
) -> None:
    """In-place :func:`merge_moments`: the triple ``a`` (``n_a`` a 0-d tensor) is overwritten with the
    merged triple, without (D, D) temporaries (the streaming metrics' states reach 2000 x 2000).

    Example:
        >>> import torch
        >>> x = torch.randn(10, 3, dtype=torch.float64)
        >>> n, mean, m2 = batch_moments(x[:4])
        >>> merge_moments_(n, mean, m2, *batch_moments(x[4:]))
        >>> all(torch.allclose(a, b) for a, b in zip((n, mean, m2), batch_moments(x)))
        True
    """
    n = n_a + n_b
    if float(n) == 0:
        return
    delta = mean_b - mean_a
    m2_a.add_(m2_b).addr_(delta, delta, alpha=float(n_a * n_b / n))
    mean_a.add_(delta, alpha=float(n_b / n))
    n_a.copy_(n)


def covariance_from_moments(n: Tensor, m2: Tensor) -> Tensor:
    """Unbiased covariance ``m2 / (n - 1)`` (the convention used everywhere in the paper)."""
    return m2 / (n - 1)


# ----------------------------------------------------------------------------------------------
# blocked statistics of large row matrices: float64 copies of one block of rows at a time
# ----------------------------------------------------------------------------------------------
def row_blocks(n: int, width: int, block_numbers: int | None = None) -> list[slice]:
    """Slices of at most ``block_numbers // width`` rows (at least 64; default :data:`BLOCK_NUMBERS`) covering
    ``range(n)``."""
    step = max(64, (BLOCK_NUMBERS if block_numbers is None else block_numbers) // max(width, 1))
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


def column_means(x: Tensor, name: str) -> Tensor:
    """Float64 column means of the rows of ``x`` (any float dtype), read in blocks of rows (no float64 copy of ``x``);
    a non-finite value raises the functional layer's error naming ``name`` (a non-finite value makes its column's
    sum non-finite, so only that case looks at the values again).

    Example:
        >>> import torch
        >>> column_means(torch.tensor([[1.0, 2.0], [3.0, 6.0]]), "x").tolist()
        [2.0, 4.0]
    """
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for sl in row_blocks(x.shape[0], x.shape[1]):
        total += x[sl].sum(dim=0, dtype=torch.float64)
    if not bool(torch.isfinite(total).all()):
        check_finite(x, name)
        raise ValueError(f"the column sums of `{name}` overflow float64 (values up to {float(x.abs().max()):.3g})")
    return total / max(x.shape[0], 1)


def centred_blocks(parts: list[tuple[Tensor, Tensor]], extra: int = 0) -> Iterator[Tensor]:
    """Blocks of rows ``[x_1 - c_1, x_2 - c_2, ..., 0 (extra columns)]`` in float64, one reused buffer of at most
    :data:`BLOCK_NUMBERS` numbers, for ``parts = [(x_1, c_1), ...]`` (matrices with the same rows, and their shifts).
    A block is valid until the next one is drawn; its ``extra`` last columns are the caller's to fill."""
    n = parts[0][0].shape[0]
    widths = [x.shape[1] for x, _ in parts]
    width = sum(widths) + extra
    slices = row_blocks(n, width)
    if not slices:
        return
    device = parts[0][0].device
    buf = torch.empty(slices[0].stop - slices[0].start, width, dtype=torch.float64, device=device)
    for sl in slices:
        block = buf[: sl.stop - sl.start]
        start = 0
        for (x, shift), w in zip(parts, widths):
            block[:, start : start + w].copy_(x[sl]).sub_(shift)
            start += w
        yield block


def add_rows_(n: Tensor, mean: Tensor, m2: Tensor, rows: Tensor) -> None:
    """Merge the rows of ``rows`` (float64, (B, D)) into the triple ``(n, mean, m2)`` in place (Welford/Chan: the
    block is centred on its own mean -- in place, so ``rows`` is overwritten -- its Gram added straight into ``m2``,
    then the rank-one Chan correction), without D x D temporaries.

    Example:
        >>> import torch
        >>> x = torch.randn(10, 3, dtype=torch.float64) + 1e4
        >>> n, mean, m2 = batch_moments(x[:4])
        >>> add_rows_(n, mean, m2, x[4:].clone())
        >>> all(torch.allclose(a, b) for a, b in zip((n, mean, m2), batch_moments(x)))
        True
    """
    b = rows.shape[0]
    if b == 0:
        return
    mean_b = rows.mean(dim=0)
    rows.sub_(mean_b)
    total = n + b
    delta = mean_b - mean
    root = (n * b / total).sqrt()  # Chan: + n_a n_b / n * delta delta^T
    add_gram_(m2, rows).addr_(delta * root, delta * root)
    mean.add_(delta * (b / total))
    n.add_(b)
