"""Input checks shared by every public function: clear ``ValueError`` messages, never a silent NaN."""

from __future__ import annotations

import torch
from torch import Tensor

_MAX_SHOWN = 5


def check_tensor(x: Tensor, name: str) -> Tensor:
    """A real (not ``meta``) torch.Tensor, or a ``TypeError``/``ValueError`` naming the argument."""
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.is_meta:
        raise ValueError(
            f"`{name}` is a tensor on the `meta` device: it has a shape but no values, so nothing can be computed "
            "from it. Materialise the model/tensors first (e.g. `module.to_empty(device=...)` and load weights)."
        )
    return x


def as_rows(x: Tensor, name: str) -> Tensor:
    """Flatten a floating-point ``(..., K)`` tensor to ``(N, K)`` rows, keeping its dtype and device."""
    check_tensor(x, name)
    if x.ndim < 2:
        raise ValueError(f"`{name}` must have shape (N, K) or (..., K), got shape {tuple(x.shape)}")
    if not (x.is_floating_point()):
        raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[-1] == 0:
        raise ValueError(f"`{name}` must have at least one class (coordinate) in its last dimension, got shape {tuple(x.shape)}")
    return x.reshape(-1, x.shape[-1])


def as_matrix(x: Tensor, name: str) -> Tensor:
    """Flatten ``(..., K)`` to ``(N, K)`` and cast to float64 on the tensor's own device."""
    return as_rows(x, name).to(torch.float64)


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


def check_positive_int(value: int, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}")
    return value


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


def check_embedding_pair(emb_p: Tensor, emb_q: Tensor) -> tuple[Tensor, Tensor]:
    """Validate two models' embeddings of the same inputs and return them as float64 ``(N, M_p)``, ``(N, M_q)``
    matrices: the widths may differ (a smaller student), the inputs (leading shapes) may not."""
    p = as_matrix(emb_p, "emb_p")
    q = as_matrix(emb_q, "emb_q")
    if emb_p.shape[:-1] != emb_q.shape[:-1]:
        raise ValueError(
            f"`emb_p` and `emb_q` must hold the same inputs (leading shape), got {tuple(emb_p.shape[:-1])} and "
            f"{tuple(emb_q.shape[:-1])} (widths may differ)"
        )
    check_finite(p, "emb_p")
    check_finite(q, "emb_q")
    return p, q


def check_mask(mask: Tensor | None, lead_shape: torch.Size | tuple[int, ...], device: torch.device | str | None = None,
               name: str = "mask") -> Tensor | None:
    """Flattened boolean ``mask`` (True = keep the input) from a bool or 0/1 integer tensor of the inputs' leading
    shape (an ``attention_mask`` as tokenizers produce it); None stays None. One host read checks integer values."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        mask = torch.as_tensor(mask)
    check_tensor(mask, name)
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"`{name}` must be boolean or 0/1 integers (True/1 = keep the input), got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(lead_shape):
        raise ValueError(
            f"`{name}` must have shape {tuple(lead_shape)} (the inputs' leading shape), got {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        if mask.numel() and bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"`{name}` must hold only 0 and 1 (or be boolean), got values {torch.unique(mask)[:5].tolist()}")
        mask = mask != 0
    flat = mask.reshape(-1)
    return flat if device is None else flat.to(device)


def check_input_sets(input_sets: Tensor, rep_dim: int | None = None, num_inputs: int | None = None,
                     name: str = "input_sets") -> Tensor:
    """Candidate input sets as an ``(S, M+1)`` LongTensor (one set of ``M+1`` indices may be given as a vector):
    integer, non-empty, ``M+1`` distinct non-negative entries per row, below ``num_inputs`` when given."""
    sets = torch.as_tensor(input_sets)
    if sets.is_floating_point() or sets.dtype == torch.bool or sets.is_complex():
        raise TypeError(f"`{name}` must hold integer input indices (or ids), got dtype {sets.dtype}")
    sets = sets.to(torch.long)
    if sets.ndim == 1:
        sets = sets[None]
    expect = "(S, M+1)" if rep_dim is None else f"(S, M+1) = (S, {rep_dim + 1})"
    if sets.ndim != 2 or sets.numel() == 0 or (rep_dim is not None and sets.shape[1] != rep_dim + 1):
        raise ValueError(f"`{name}` must have shape {expect}, got {tuple(sets.shape)}")
    if sets.shape[1] < 2:
        raise ValueError(f"`{name}`: an input set needs at least 2 inputs (the pivot x0 and one compared input)")
    if bool((sets < 0).any()) or (num_inputs is not None and bool((sets >= num_inputs).any())):
        where = "negative indices" if num_inputs is None else f"indices outside [0, {num_inputs})"
        raise ValueError(f"`{name}` holds {where}")
    if bool((sets.sort(dim=1).values.diff(dim=1) == 0).any()):
        raise ValueError(f"`{name}`: every candidate set must hold M+1 distinct inputs")
    return sets


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


def check_label_index(value: int | None, name: str, k: int | None = None) -> int | None:
    """A label index in ``[0, k)`` (any non-negative int when ``k`` is None), or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, Tensor)) or (isinstance(value, Tensor) and value.numel() != 1):
        raise ValueError(f"`{name}` must be a label index (an int), got {value!r}")
    value = int(value)
    if k is None:
        if value < 0:
            raise ValueError(f"`{name}` must be a non-negative label index, got {value}")
        return value
    if not 0 <= value < k:
        raise ValueError(f"`{name}` must be a label index in [0, {k}), got {value}")
    return value
