"""Pure-torch functional core: every distance of the paper, exact and vectorised.

>>> from lightning_repsim.functional import mean_kl_divergence, llv_distance, svd_dissimilarity, mean_cca, compare
"""

from lightning_repsim.functional._moments import batch_moments, covariance_from_moments, merge_moments
from lightning_repsim.functional.cca import canonical_correlations, mean_cca
from lightning_repsim.functional.cka import linear_cka, logit_distance, procrustes_distance
from lightning_repsim.functional.compare import ComparisonReport, compare
from lightning_repsim.functional.family import log_partition, logits_from_representations, split_unembedding
from lightning_repsim.functional.kl import mean_kl_divergence
from lightning_repsim.functional.llv import (
    LLVOptions,
    LLVResult,
    draw_input_sets,
    llv_distance,
    llv_seed_spread,
    log_probabilities,
)
from lightning_repsim.functional.svd import DiversityWarning, SVDResult, svd_dissimilarity

__all__ = [
    "ComparisonReport",
    "DiversityWarning",
    "LLVOptions",
    "LLVResult",
    "SVDResult",
    "batch_moments",
    "canonical_correlations",
    "compare",
    "covariance_from_moments",
    "draw_input_sets",
    "linear_cka",
    "llv_distance",
    "llv_seed_spread",
    "log_partition",
    "log_probabilities",
    "logit_distance",
    "logits_from_representations",
    "mean_cca",
    "mean_kl_divergence",
    "merge_moments",
    "procrustes_distance",
    "split_unembedding",
    "svd_dissimilarity",
]
