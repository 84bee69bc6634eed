"""Lightning integration: :class:`ReferenceComparison` compares the model in training with a frozen reference;
:class:`ModelComparison` is the same comparison without a Trainer (a Fabric or plain loop).

>>> from lightning_repsim.callbacks import ReferenceComparison, ModelComparison, ComparisonConfig, FinalLinear, LogitsOnly
"""

from lightning_repsim.callbacks.comparison import ComparisonOutcome, ModelComparison
from lightning_repsim.callbacks.config import METRIC_KEYS, ComparisonConfig, LayerOptions
from lightning_repsim.callbacks.extraction import Extractor, FinalLinear, LogitsOnly, Representations
from lightning_repsim.callbacks.plotting import plot_embeddings
from lightning_repsim.callbacks.reference_comparison import ReferenceComparison, weights_fingerprint

__all__ = [
    "METRIC_KEYS",
    "ComparisonConfig",
    "ComparisonOutcome",
    "Extractor",
    "FinalLinear",
    "LayerOptions",
    "LogitsOnly",
    "ModelComparison",
    "ReferenceComparison",
    "Representations",
    "plot_embeddings",
    "weights_fingerprint",
]
