"""Distillation losses: a differentiable mini-batch d_LLV, the centred logit distance, and Hinton KD.

All are ``nn.Module`` s called like torch losses, ``loss(input, target)``, i.e.
``loss(student_logits, teacher_logits, mask=None)``:

* the **student** (model ``p`` of SPEC §3) comes first and receives the gradient; the **teacher**
  (model ``q``) comes second and is detached inside, so no gradient ever reaches it. (The metrics and the
  functional core take ``(reference p, student q)``: the other way round, as documented in the README.)
* logits have shape ``(B, K)`` or ``(B, T, K)`` (any leading dimensions; they are flattened to
  rows). ``mask`` has the leading shape (``(B,)`` or ``(B, T)``), bool (or 0/1 integers),
  ``True`` = keep the row; masked rows contribute nothing and receive zero gradient, and their
  logits may hold anything, even NaN;
* the computation runs in ``float32``, or ``float64`` when either input is ``float64`` (``dtype=``
  forces one), with autocast disabled inside, so the losses are safe under ``torch.autocast``
  (bf16/fp16 logits are upcast block by block) and work under ``torch.compile``;
* ``reduction``: ``"mean"`` (over kept rows), ``"sum"`` or ``"none"`` (per row, leading shape,
  masked rows 0). :class:`LLVLoss` is a batch statistic; see its docstring for what the
  reductions mean there;
* ``chunk_size``: at most this many rows per block. Each loss walks the ``(N, K)`` rows in blocks with a
  hand-written backward, so the only ``(N, K)`` tensor it allocates is the gradient, plus a few blocks. The
  default is about 1 MB of float32 per block on the CPU (the fastest there: every temporary stays in cache;
  a larger ``chunk_size`` changes nothing) and all rows in one block on an accelerator (fewest kernel
  launches); pass ``chunk_size`` on an accelerator when the float32 work on large (e.g. bf16 ``(B, T, 128k)``)
  logits does not fit: it then holds a few ``chunk_size x K`` float32 blocks.

For vocabularies so large that the logits should never exist, :class:`HiddenStateLogitDistanceLoss` and
:class:`HiddenStateKDLoss` take the hidden states and the linear output layers of both models instead.

Bad input raises ``ValueError`` (shape mismatch, fewer than 2 labels, non-finite values in kept
rows, too few rows for :class:`LLVLoss`). The finiteness check reads a few numbers derived from every
kept logit on the host (one sync per call); it is skipped while ``torch.compile`` traces and can be
switched off with ``check_finite=False`` (non-finite logits then give a non-finite loss).

The implementation lives in :mod:`lightning_repsim.distillation`, one module per concern.

Example:
    >>> import torch
    >>> from lightning_repsim.losses import KDLoss, LLVLoss, LogitDistanceLoss
    >>> teacher = torch.randn(32, 10, generator=torch.Generator().manual_seed(0))
    >>> student = teacher + 3.0  # same predictive distribution: every loss is zero
    >>> [round(float(loss(student, teacher)), 6) for loss in (LLVLoss(rep_dim=2), LogitDistanceLoss(), KDLoss())]
    [0.0, 0.0, 0.0]
"""

from lightning_repsim.distillation import (
    HiddenStateKDLoss,
    HiddenStateLogitDistanceLoss,
    KDLoss,
    LLVLoss,
    LLVLossOptions,
    LLVLossTerms,
    LogitDistanceLoss,
)

__all__ = [
    "HiddenStateKDLoss",
    "HiddenStateLogitDistanceLoss",
    "KDLoss",
    "LLVLoss",
    "LLVLossOptions",
    "LLVLossTerms",
    "LogitDistanceLoss",
]
