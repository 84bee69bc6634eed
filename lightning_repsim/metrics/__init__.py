"""Streaming torchmetrics metrics: exact d_LLV, d_SVD, mean KL and mCCA over whole data sets, for any
batching and any number of processes, from float64 sufficient statistics (SPEC §6).

* :class:`LLVDistance` -- d_LLV from logits (state O(K^2)).
* :class:`SVDDissimilarity` -- d_SVD on the sets d_LLV chooses, from embeddings and unembeddings; its
  ``.llv`` is d_LLV by the representation route (state O(M^2)): the choice for large vocabularies.
* :class:`MeanKLDivergence`, :class:`MeanCCA` -- the baselines.

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
>>> out = metrics.compute()
>>> sorted(out), out["svd"].llv.label_pivot == out["llv"].label_pivot
(['kl', 'llv', 'mcca', 'svd'], True)
"""

from lightning_repsim.metrics.cca import MeanCCA
from lightning_repsim.metrics.kl import MeanKLDivergence
from lightning_repsim.metrics.llv import LLVDistance
from lightning_repsim.metrics.svd import SVDDissimilarity, SVDDissimilarityResult

__all__ = ["LLVDistance", "MeanCCA", "MeanKLDivergence", "SVDDissimilarity", "SVDDissimilarityResult"]
