"""Input preparation shared by every layer: the checks (clear ``ValueError``/``TypeError`` messages naming the
argument, never a silent NaN), masks (bool or 0/1 integers), finiteness (``nan_strategy``), row selection and input
ids. The functional core, the metrics' ``update`` and the callback all prepare their inputs here, so an argument
walked from any entry point goes down into this module and nowhere else.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "NAN_STRATEGIES",
    "as_matrix",
    "as_rows",
    "check_choice",
    "check_embedding_pair",
    "check_finite",
    "check_input_sets",
    "check_label_index",
    "check_logit_pair",
    "check_mask",
    "check_num_inputs",
    "check_num_labels",
    "check_positive_int",
    "check_rep_dim",
    "check_same_shape",
    "check_tensor",
    "embedding_rows",
    "finite_rows",
    "given_log_partitions",
    "given_per_input",
    "logit_rows",
    "row_selector",
    "take_rows",
]

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


# ----------------------------------------------------------------------------------------------
# rows of a batch: masks, ids, non-finite rows (the metrics' ``update``)
# ----------------------------------------------------------------------------------------------
def take_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[index]`` along dim 0 for a boolean mask or an index vector, via ``index_select`` (much cheaper
    than advanced indexing for small tensors on a busy CPU)."""
    if index.dtype == torch.bool:
        index = index.nonzero().flatten()
    return x.index_select(0, index)


NAN_STRATEGIES = ("error", "ignore")


def row_selector(lead_shape: torch.Size, mask: Tensor | None, ids: Tensor | None, device) -> tuple[Tensor | None, Tensor | None]:
    """Flattened boolean ``mask`` (True/1 = keep; bool or 0/1 integers) and int64 ``ids`` for inputs of leading
    shape ``lead_shape``."""
    keep = check_mask(mask, lead_shape, device)
    flat_ids = None
    if ids is not None:
        ids = torch.as_tensor(ids, device=device)
        check_tensor(ids, "ids")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
            raise TypeError(f"`ids` must be an integer tensor, got dtype {ids.dtype}")
        if ids.shape != lead_shape:
            raise ValueError(f"`ids` must have shape {tuple(lead_shape)} (the inputs' leading shape), got {tuple(ids.shape)}")
        flat_ids = ids.reshape(-1).to(torch.int64)
        if flat_ids.numel() and (bool((flat_ids < 0).any()) or bool((flat_ids >= 2**52).any())):
            raise ValueError("`ids` must be integers in [0, 2**52)")
    return keep, flat_ids


def finite_rows(mats: list[tuple[Tensor, str]], nan_strategy: str) -> tuple[list[Tensor], Tensor | None, int]:
    """Apply ``nan_strategy`` to the float64 row matrices: ``"error"`` raises the functional layer's
    error, ``"ignore"`` drops every row with a non-finite value in any of them. Returns the matrices,
    the kept-row selector (None if all kept) and the number dropped."""
    if nan_strategy == "error":
        for x, name in mats:
            check_finite(x, name)
        return [x for x, _ in mats], None, 0
    ok = torch.ones(mats[0][0].shape[0], dtype=torch.bool, device=mats[0][0].device)
    for x, _ in mats:
        ok &= torch.isfinite(x).all(dim=1)
    dropped = int((~ok).sum())
    if dropped == 0:
        return [x for x, _ in mats], None, 0
    return [take_rows(x, ok) for x, _ in mats], ok, dropped


def _select(p: Tensor, q: Tensor, lead: torch.Size, mask, ids, nan_strategy: str | None, names: tuple[str, str]):
    keep, ids = row_selector(lead, mask, ids, p.device)
    if keep is not None:
        p, q = take_rows(p, keep), take_rows(q, keep)
        ids = None if ids is None else take_rows(ids, keep)
    if nan_strategy is None:  # the caller checks finiteness itself
        return p, q, ids, 0
    (p, q), ok, dropped = finite_rows([(p, names[0]), (q, names[1])], nan_strategy)
    if ok is not None and ids is not None:
        ids = take_rows(ids, ok)
    return p, q, ids, dropped


def logit_rows(
    logits_p: Tensor, logits_q: Tensor, mask: Tensor | None, ids: Tensor | None, nan_strategy: str | None
) -> tuple[Tensor, Tensor, Tensor | None, int]:
    """``(p, q, ids, dropped)``: validated, masked, finite (N, K) logits of both models in their own dtype (the
    metrics cast to float64 in blocks of rows, so a large vocabulary never needs an N x K float64 copy) and their
    ids; non-finite rows are dropped and counted under ``nan_strategy="ignore"`` (not checked when it is None: the
    caller does it more cheaply). Shape and finiteness errors are those of the functional layer."""
    p = as_rows(logits_p, "logits_p")
    q = as_rows(logits_q, "logits_q")
    check_same_shape(logits_p, logits_q, "logits_p", "logits_q")
    return _select(p, q, logits_p.shape[:-1], mask, ids, nan_strategy, ("logits_p", "logits_q"))


def given_log_partitions(
    logz_p: Tensor | None, logz_q: Tensor | None, lead: torch.Size, mask: Tensor | None, device
) -> tuple[Tensor | None, Tensor | None]:
    """Optional per-input log-partitions given with the logits: float64, masked like the logits' rows."""
    if logz_p is None and logz_q is None:
        return None, None
    if logz_p is None or logz_q is None:
        raise ValueError("pass both `logz_p` and `logz_q`, or neither")
    return given_per_input(logz_p, "logz_p", lead, mask, device), given_per_input(logz_q, "logz_q", lead, mask, device)


def given_per_input(value: Tensor, name: str, lead: torch.Size, mask: Tensor | None, device) -> Tensor:
    """A per-input value given with the logits (a log-partition, a precomputed KL, ...): float64, one entry per
    position of the logits' leading shape, masked like the logits' rows."""
    keep = check_mask(mask, lead, device)
    check_tensor(value, name)
    if tuple(value.shape) != tuple(lead):
        raise ValueError(f"`{name}` must have the logits' leading shape {tuple(lead)}, got {tuple(value.shape)}")
    value = value.reshape(-1).to(device=device, dtype=torch.float64)
    return value if keep is None else take_rows(value, keep)


def embedding_rows(
    emb_p: Tensor, emb_q: Tensor, mask: Tensor | None, ids: Tensor | None, nan_strategy: str, same_dim: bool
) -> tuple[Tensor, Tensor, Tensor | None, int]:
    """``(f_p, f_q, ids, dropped)``: validated, masked, finite float64 (N, M) embeddings of both models."""
    p = as_matrix(emb_p, "emb_p")
    q = as_matrix(emb_q, "emb_q")
    if same_dim and p.shape != q.shape:
        raise ValueError(f"`emb_p` and `emb_q` must have the same shape, got {tuple(p.shape)} and {tuple(q.shape)}")
    if p.shape[0] != q.shape[0]:
        raise ValueError(f"`emb_p` and `emb_q` must hold the same inputs, got {p.shape[0]} and {q.shape[0]} rows")
    if emb_p.shape[:-1] != emb_q.shape[:-1]:
        raise ValueError(
            f"`emb_p` and `emb_q` must have the same leading shape, got {tuple(emb_p.shape[:-1])} and {tuple(emb_q.shape[:-1])}"
        )
    return _select(p, q, emb_p.shape[:-1], mask, ids, nan_strategy, ("emb_p", "emb_q"))
