"""Streaming torchmetrics metrics: exact d_LLV, d_SVD, mean KL and mCCA over whole data sets, for any
batching and any number of processes, from float64 sufficient statistics (SPEC §6).

* :class:`LLVDistance` -- d_LLV from logits (state O(K^2)).
* :class:`SVDDissimilarity` -- d_SVD on the sets d_LLV chooses, from embeddings and unembeddings; its
  ``compute_result().llv`` is d_LLV by the representation route (state O(M^2)): the choice for large
  vocabularies.
* :class:`MeanKLDivergence`, :class:`MeanCCA` -- the baselines.
* :class:`LinearCKA` (biased or debiased), :class:`ProcrustesDistance` -- the covariance family, from one exact
  shifted statistic (state O((d_p + d_q)^2), any widths).
* :class:`LogitDistance` -- d_logit; with :class:`MeanKLDivergence` a :class:`PerInputMean` (3 numbers).

``compute()`` returns the headline value as a float64 scalar tensor (so ``self.log(name, metric)``,
``MetricCollection``, ``MetricTracker`` work); ``compute_result()`` returns everything (terms, sets, parts).
They compose in a :class:`torchmetrics.MetricCollection` (call ``update`` with keyword arguments; each
metric takes the ones it needs):

>>> import torch
>>> from torchmetrics import MetricCollection
>>> from lightning_repsim.constructions import theorem31_pair
>>> from lightning_repsim.functional import logits_from_representations
>>> pair = theorem31_pair(rho=5.0, n_per_class=60, seed=0)
>>> metrics = MetricCollection({
...     "svd": SVDDissimilarity(unemb_p=pair.unemb_p, unemb_q=pair.unemb_q),
...     "llv": LLVDistance(rep_dim=2),
...     "kl": MeanKLDivergence(),
...     "mcca": MeanCCA(),
... })
>>> for i in range(0, pair.emb_p.shape[0], 100):
...     f_p, f_q = pair.emb_p[i : i + 100], pair.emb_q[i : i + 100]
...     metrics.update(emb_p=f_p, emb_q=f_q, logits_p=logits_from_representations(f_p, pair.unemb_p),
...                    logits_q=logits_from_representations(f_q, pair.unemb_q))
>>> out = metrics.compute()  # a dict of scalar tensors
>>> sorted(out), round(float(out["mcca"]), 3)
(['kl', 'llv', 'mcca', 'svd'], 0.001)
>>> metrics["svd"].compute_result().llv.label_pivot == metrics["llv"].compute_result().label_pivot
True
"""

from lightning_repsim.metrics.cca import CCAResult, MeanCCA
from lightning_repsim.metrics.cka import CKAResult, LinearCKA, ProcrustesDistance
from lightning_repsim.metrics.kl import KLResult, MeanKLDivergence
from lightning_repsim.metrics.llv import LLVDistance
from lightning_repsim.metrics.logit_distance import LogitDistance, LogitDistanceResult
from lightning_repsim.metrics.per_input import PerInputMean
from lightning_repsim.metrics.svd import SVDDissimilarity, SVDDissimilarityResult

__all__ = [
    "CCAResult",
    "CKAResult",
    "KLResult",
    "LLVDistance",
    "LinearCKA",
    "LogitDistance",
    "LogitDistanceResult",
    "MeanCCA",
    "MeanKLDivergence",
    "PerInputMean",
    "ProcrustesDistance",
    "SVDDissimilarity",
    "SVDDissimilarityResult",
]
