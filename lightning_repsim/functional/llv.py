"""The log-likelihood variance distance d_LLV (SPEC §3): the functional entry point from logits.

Two routes feed the same formulas (:mod:`~lightning_repsim.functional.llv_terms`):

* label terms (T1, T3) and the (pivot, left-out) search come from the covariance of the
  ``2K``-vector ``w(x) = [l_p(.|x); l_q(.|x) - l_p(.|x)]`` (log-probabilities ``l``). Storing the
  *difference* of the two models rather than ``l_q`` keeps the terms accurate when the models are
  nearly identical (distillation). Any batch split gives the same covariance (``_moments``), which is
  what makes the streaming metrics exact;
* input terms (T2, T4) need the full label vectors at the inputs of each candidate input set and
  are computed directly from them, all candidate sets in a few batched operations.

The representation route (:mod:`~lightning_repsim.functional.llv_representation`) computes the same
terms from embeddings and unembeddings for large vocabularies.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_repsim.functional.inputs import (
    check_input_sets,
    check_logit_pair,
    check_num_inputs,
    check_num_labels,
    check_rep_dim,
)
from lightning_repsim.functional.llv_options import LLVOptions, LLVResult, ResolvedLabels
from lightning_repsim.functional.llv_route import Candidates, LLVSizes, LogitsRoute, choose_pivots, llv_from_route
from lightning_repsim.functional.llv_terms import TIE_RTOL

__all__ = [
    "LLVOptions",
    "LLVResult",
    "ResolvedLabels",
    "TIE_RTOL",
    "choose_pivots",
    "draw_input_sets",
    "llv_distance",
    "llv_seed_spread",
    "log_probabilities",
]


def log_probabilities(logits: Tensor) -> Tensor:
    """``log softmax`` in float64 over the last dimension (the model's ``l(y|x)``).

    Example:
        >>> import torch
        >>> log_probabilities(torch.tensor([[0.0, 0.0]], dtype=torch.float16)).exp()
        tensor([[0.5000, 0.5000]], dtype=torch.float64)
    """
    return torch.log_softmax(logits.to(torch.float64), dim=-1)


def draw_input_sets(num_inputs: int, set_size: int, count: int, seed: int = 0) -> Tensor:
    """``count`` random sets of ``set_size`` distinct input indices (a seeded CPU generator, so the
    draw is the same on every run and device). Rows with a repeated index are redrawn.

    Example:
        >>> sets = draw_input_sets(100, 3, 5, seed=0)
        >>> sets.shape, bool((sets.sort(1).values.diff(dim=1) > 0).all())
        (torch.Size([5, 3]), True)
    """
    if num_inputs < set_size:
        raise ValueError(f"cannot draw sets of {set_size} distinct inputs from {num_inputs} inputs")
    if count < 1:
        raise ValueError(f"`num_input_sets` must be >= 1, got {count}")
    gen = torch.Generator().manual_seed(int(seed))
    if set_size * (set_size - 1) > 2 * num_inputs:
        # rejection below would almost never accept (e.g. M = 768 from a buffer of 1024): sample
        # without replacement instead (seeded, first element of each row is its pivot input)
        return torch.stack([torch.randperm(num_inputs, generator=gen)[:set_size] for _ in range(count)])
    sets = torch.randint(num_inputs, (count, set_size), generator=gen)
    while True:
        ordered = sets.sort(dim=1).values
        dup = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
        n_dup = int(dup.sum())
        if n_dup == 0:
            return sets
        sets[dup] = torch.randint(num_inputs, (n_dup, set_size), generator=gen)


def llv_distance(logits_p: Tensor, logits_q: Tensor, rep_dim: int | None = None, **options: Any) -> LLVResult:
    """Log-likelihood variance distance d_LLV between two models' predictive distributions.

    Args:
        logits_p, logits_q: logits of the two models on the same inputs, shape (N, K) or (..., K)
            (leading dimensions are flattened). Any float dtype and device; computed in float64.
        rep_dim: the representation dimension M; input sets have M+1 inputs. None (default): the larger rank of the
            two models' log-probabilities over inputs (centred over labels), ``max(r_p, r_q)`` -- the rank of their
            embeddings as the logits see them (``result.rep_dim`` reports it).
        options: the d_LLV options of :class:`LLVOptions`: ``lam``, ``reduce``, ``combine``,
            ``label_pivot``, ``leave_out``, ``labels``, ``pivot_candidates``, ``max_pivot_candidates``,
            ``input_sets`` (row indices), ``num_input_sets``, ``input_set_search`` (``"optimise"``: the exact argmin
            of T2 over all sets of distinct inputs within :data:`~lightning_repsim.functional.input_search.EXHAUSTIVE_BUDGET`,
            seed-free; ``"sample"``: the best of the drawn sets), ``seed``.

    Returns:
        :class:`LLVResult` (``.value`` is d_LLV).

    Cost: O(N K^2) for the label covariance and O(K^2) for the (pivot, left-out) search (all pairs, in
    chunks of pivots), O(N^2 D) for the input-set search (D <= K the rank of the log-probability rows; N = 10,000 at
    K = 100 in under 2 s of one CPU core); memory O(N K + K^2).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> logits = torch.randn(500, 7, generator=g, dtype=torch.float64)
        >>> shifted = logits + torch.randn(500, 1, generator=g, dtype=torch.float64)  # same p(y|x)
        >>> float(llv_distance(logits, shifted, rep_dim=2).value) < 1e-12
        True
        >>> res = llv_distance(logits, logits.flip(-1), rep_dim=2)
        >>> round(float(res.value), 3) > 0, res.input_set.shape
        (True, torch.Size([3]))
    """
    opts = LLVOptions(**options)
    rep_dim = None if rep_dim is None else check_rep_dim(rep_dim)
    p, q = check_logit_pair(logits_p, logits_q)
    n, k = p.shape
    resolved = opts.resolve(k)
    lp, lq = log_probabilities(p), log_probabilities(q)
    if resolved.labels is not None:
        index = resolved.labels.to(lp.device)
        lp, lq = lp.index_select(1, index), lq.index_select(1, index)
    kk = lp.shape[1]
    check_num_labels(kk)
    route = LogitsRoute.from_log_probabilities(lp, lq)
    if rep_dim is None:
        rep_dim = route.representation_dim()
    check_num_inputs(n, rep_dim)
    if opts.input_sets is None:
        candidates = Candidates(draw_input_sets(n, rep_dim + 1, opts.num_input_sets, opts.seed).to(lp.device))
    else:
        candidates = Candidates(check_input_sets(opts.input_sets, rep_dim, n).to(lp.device), given=True)
    return llv_from_route(route, candidates, opts, resolved, LLVSizes(n, k, rep_dim))[0]


def llv_seed_spread(logits_p: Tensor, logits_q: Tensor, rep_dim: int, seeds: Iterable[int] = range(10),
                    **options: Any) -> dict[str, float | list[float]]:
    """How much d_LLV moves with the seed of the candidate draw: :func:`llv_distance` for each seed (the other options
    as given), and the mean, standard deviation, minimum, maximum and relative spread ``(max - min) / mean`` of d_LLV
    and of T2 (the term the input set decides). With the default ``input_set_search="optimise"`` the spread is 0
    whenever every candidate input is tried as a pivot; compare with ``input_set_search="sample"``.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> z = torch.randn(300, 6, generator=g, dtype=torch.float64)
        >>> spread = llv_seed_spread(z, z + torch.randn(300, 6, generator=g, dtype=torch.float64), rep_dim=2, seeds=range(3))
        >>> spread["t2_relative_spread"]
        0.0
    """
    results = [llv_distance(logits_p, logits_q, rep_dim, **{**options, "seed": int(seed)}) for seed in seeds]
    out: dict[str, float | list[float]] = {}
    for name, values in (("d_llv", [float(r.value) for r in results]), ("t2", [float(r.t2) for r in results])):
        t = torch.tensor(values, dtype=torch.float64)
        out.update({
            f"{name}_values": values, f"{name}_mean": float(t.mean()), f"{name}_std": float(t.std()) if t.numel() > 1 else 0.0,
            f"{name}_min": float(t.min()), f"{name}_max": float(t.max()),
            f"{name}_relative_spread": float((t.max() - t.min()) / t.mean()) if float(t.mean()) else 0.0,
        })
    return out
