"""lightning_repsim: do two models that *predict* alike also *represent* alike?

Exact d_LLV, d_SVD, mean KL and mCCA (Nielsen, Marconato, Dittadi, Gresele, NeurIPS 2025), the logit
distance and the CKA family in three layers: a pure-torch functional core (:mod:`lightning_repsim.functional`),
streaming torchmetrics metrics (:mod:`lightning_repsim.metrics`), and Lightning integration (the
:class:`ReferenceComparison` callback, the distillation losses).
"""

from lightning_repsim import functional
from lightning_repsim.callbacks import ComparisonConfig, ModelComparison, ReferenceComparison
from lightning_repsim.constructions import radial_dataset, theorem31_pair
from lightning_repsim.losses import (
    HiddenStateKDLoss,
    HiddenStateLogitDistanceLoss,
    KDLoss,
    LLVLoss,
    LLVLossOptions,
    LogitDistanceLoss,
)
from lightning_repsim.metrics import (
    LinearCKA,
    LLVDistance,
    LogitDistance,
    MeanCCA,
    MeanKLDivergence,
    ProcrustesDistance,
    SVDDissimilarity,
    SVDDissimilarityResult,
)

__version__ = "0.1.0"

__all__ = [
    "ComparisonConfig",
    "HiddenStateKDLoss",
    "HiddenStateLogitDistanceLoss",
    "KDLoss",
    "LLVDistance",
    "LLVLoss",
    "LLVLossOptions",
    "LinearCKA",
    "LogitDistance",
    "LogitDistanceLoss",
    "MeanCCA",
    "MeanKLDivergence",
    "ModelComparison",
    "ProcrustesDistance",
    "ReferenceComparison",
    "SVDDissimilarity",
    "SVDDissimilarityResult",
    "functional",
    "radial_dataset",
    "theorem31_pair",
    "__version__",
]
