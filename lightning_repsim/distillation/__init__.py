"""Implementation of the distillation losses (public names in :mod:`lightning_repsim.losses`).

Modules, by concern: :mod:`.rows` (checked student/teacher rows, masks, blocks, reductions), :mod:`.base` (the
options every loss shares), :mod:`.logit_distance`, :mod:`.kd`, :mod:`.llv_loss` with :mod:`.llv_moments` (the
batch moments and their backward) and :mod:`.llv_sets` (label and input sets), and :mod:`.hidden` (the losses
computed from hidden states and linear heads, without the logits).
"""

from lightning_repsim.distillation.hidden import HiddenStateKDLoss, HiddenStateLogitDistanceLoss
from lightning_repsim.distillation.kd import KDLoss
from lightning_repsim.distillation.llv_loss import LLVLoss, LLVLossOptions, LLVLossTerms
from lightning_repsim.distillation.logit_distance import LogitDistanceLoss

__all__ = [
    "HiddenStateKDLoss",
    "HiddenStateLogitDistanceLoss",
    "KDLoss",
    "LLVLoss",
    "LLVLossOptions",
    "LLVLossTerms",
    "LogitDistanceLoss",
]
