"""Lightning callbacks: :class:`ReferenceComparison` compares the model in training with a frozen reference.

>>> from lightning_repsim.callbacks import ReferenceComparison, FinalLinear, LogitsOnly
"""

from lightning_repsim.callbacks.extraction import FinalLinear, LogitsOnly, Representations
from lightning_repsim.callbacks.metric_suite import METRIC_KEYS
from lightning_repsim.callbacks.plotting import plot_embeddings
from lightning_repsim.callbacks.reference_comparison import ReferenceComparison, weights_fingerprint

__all__ = [
    "METRIC_KEYS",
    "FinalLinear",
    "LogitsOnly",
    "ReferenceComparison",
    "Representations",
    "plot_embeddings",
    "weights_fingerprint",
]
