"""Input checks shared by every public function: clear ``ValueError`` messages, never a silent NaN."""

from __future__ import annotations

import torch
from torch import Tensor

_MAX_SHOWN = 5


def as_matrix(x: Tensor, name: str) -> Tensor:
    """Flatten ``(..., K)`` to ``(N, K)`` and cast to float64 on the tensor's own device."""
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"`{name}` must have shape (N, K) or (..., K), got shape {tuple(x.shape)}")
    if not (x.is_floating_point()):
        raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {x.dtype}")
    return x.reshape(-1, x.shape[-1]).to(torch.float64)


def check_finite(x: Tensor, name: str) -> None:
    """Raise a ``ValueError`` that says how many values are non-finite and in which rows."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        count = int(bad.sum())
        rows = torch.nonzero(bad.reshape(bad.shape[0], -1).any(dim=1)).flatten()
        shown = rows[:_MAX_SHOWN].tolist()
        more = "" if rows.numel() <= _MAX_SHOWN else f" (and {rows.numel() - _MAX_SHOWN} more rows)"
        raise ValueError(
            f"`{name}` contains {count} non-finite value(s) (NaN or inf) in {rows.numel()} row(s); "
            f"first rows (after flattening to (N, K)): {shown}{more}"
        )


def check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"`{name_a}` and `{name_b}` must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def check_logit_pair(logits_p: Tensor, logits_q: Tensor) -> tuple[Tensor, Tensor]:
    """Validate two models' logits and return them as float64 ``(N, K)`` matrices."""
    p = as_matrix(logits_p, "logits_p")
    q = as_matrix(logits_q, "logits_q")
    check_same_shape(logits_p, logits_q, "logits_p", "logits_q")
    check_finite(p, "logits_p")
    check_finite(q, "logits_q")
    return p, q


def check_num_labels(k: int, rep_dim: int | None = None, need_subsets: bool = False) -> None:
    if k < 3:
        raise ValueError(
            f"the number of labels K={k} is too small: d_LLV needs K >= 3 (a pivot, a left-out label "
            "and at least one compared label)"
        )
    if need_subsets and rep_dim is not None and k < rep_dim + 2:
        raise ValueError(
            f"d_SVD needs K >= M + 2 labels (pivot, left-out label and M-subsets of the rest), "
            f"got K={k} and M={rep_dim}"
        )


def check_num_inputs(n: int, rep_dim: int) -> None:
    if n < rep_dim + 2:
        raise ValueError(
            f"need at least M + 2 = {rep_dim + 2} inputs to choose an input set of M + 1 = {rep_dim + 1} "
            f"inputs and estimate variances, got N={n}"
        )


def check_rep_dim(rep_dim: int) -> int:
    if isinstance(rep_dim, bool) or not isinstance(rep_dim, int) or rep_dim < 1:
        raise ValueError(f"`rep_dim` must be a positive int (the representation dimension M), got {rep_dim!r}")
    return rep_dim


def check_choice(value: str, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}")
    return value


def check_label_index(value: int | None, name: str, k: int) -> int | None:
    if value is None:
        return None
    value = int(value)
    if not 0 <= value < k:
        raise ValueError(f"`{name}` must be a label index in [0, {k}), got {value}")
    return value
