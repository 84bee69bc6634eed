"""Input preparation for the metrics' ``update``: validated float64 rows of both models, masked (bool or 0/1
integer masks), with ids, and non-finite rows handled by ``nan_strategy`` -- with the functional layer's errors."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_repsim.functional._validation import as_matrix, as_rows, check_finite, check_mask, check_same_shape, check_tensor
from lightning_repsim.metrics.sketch import take_rows

__all__ = ["NAN_STRATEGIES", "embedding_rows", "finite_rows", "logit_rows", "row_selector"]

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
