"""lightning_repsim: do two models that *predict* alike also *represent* alike?

Exact d_LLV, d_SVD, mean KL and mCCA (Nielsen, Marconato, Dittadi, Gresele, NeurIPS 2025) as a
pure-torch functional core (:mod:`lightning_repsim.functional`).
"""

from lightning_repsim import functional
from lightning_repsim.constructions import radial_dataset, theorem31_pair
from lightning_repsim.losses import KDLoss, LLVLoss, LogitDistanceLoss

__version__ = "0.1.0"

__all__ = ["KDLoss", "LLVLoss", "LogitDistanceLoss", "functional", "radial_dataset", "theorem31_pair", "__version__"]
