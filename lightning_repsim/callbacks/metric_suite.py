"""The streaming metrics one comparison needs, fed from two models' :class:`Representations`.

All accumulation happens in :mod:`lightning_repsim.metrics` (exact, bounded memory, synced across processes); the
metrics are one ``torchmetrics.MetricCollection`` (reset, device moves, sync). This module decides which metrics apply
(representations or logits only, K vs M), feeds them from what the models already computed, and flattens their
results (``as_dict()`` of each) into the keys the callback logs.

Cost per batch: the models' own logits give the KL, the squared logit distance and each input's log-partition
``logZ`` (float64, in blocks of rows: O(B K)); nothing is recomputed from ``f g^T`` unless the logits are missing or
were computed in half precision (mixed precision), in which case they are recomputed once in float32 from the
head's input, so that the statistics describe the model family ``softmax(f g^T)`` to float32 precision.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor
from torchmetrics import MetricCollection

from lightning_repsim.callbacks.config import METRIC_KEYS
from lightning_repsim.callbacks.extraction import Representations
from lightning_repsim.callbacks.overlap import distributed_world
from lightning_repsim.functional import LLVOptions
from lightning_repsim.functional.compare import svd_bounds
from lightning_repsim.functional.family import unembedding_parts
from lightning_repsim.functional.kl import logit_pair_rows

__all__ = ["METRIC_KEYS", "MetricSuite", "logits_for_statistics"]

#: torchmetrics.Metric keyword arguments passed on to every metric.
_TORCHMETRICS_KWARGS = frozenset(
    {"compute_on_cpu", "dist_sync_on_step", "process_group", "dist_sync_fn", "distributed_available_fn", "sync_on_compute"}
)
_LOW_PRECISION = (torch.float16, torch.bfloat16)
#: which logged key a metric's failure leaves undefined
_PROBLEM_KEYS = {"kl": "kl", "logit": "d_logit", "llv": "d_llv", "svd": "d_svd", "cca": "mcca"}


def _own_params(cls: Any) -> set[str]:
    params = inspect.signature(cls.__init__).parameters
    return {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _rows(t: Tensor, keep: Tensor | None) -> Tensor:
    rows = t.reshape(-1, t.shape[-1])
    if keep is not None:
        rows = rows[keep.to(rows.device)]
    return rows


def logits_for_statistics(reps: Representations, keep: Tensor | None) -> Tensor:
    """The model's logit rows as the statistics use them: its own logits when they are float32 or float64, else
    (missing, or float16/bfloat16 from mixed precision) recomputed in float32 from the embedding and the
    unembedding (one float32 product: no float64 copy of the unembedding or of the logits)."""
    if reps.logits is not None and reps.logits.dtype not in _LOW_PRECISION:
        return _rows(reps.logits, keep)
    f = _rows(reps.embeddings, keep)
    w, b = unembedding_parts(reps.unembedding.to(f.device), f.shape[1], "unembedding")
    logits = f.float() @ w.float().T
    return logits if b is None else logits.add_(b.float())


class MetricSuite:
    """KL, d_logit, d_LLV (+ terms), d_SVD (+ parts), mCCA between a reference (p) and a student (q).

    The metrics are created at the first :meth:`update`, once the shapes are known:

    * always ``MeanKLDivergence`` and ``LogitDistance`` on the logits;
    * both models give embeddings (of any widths M_p, M_q) and K >= max(M_p, M_q) + 2 (or ``rep_dim`` + 2):
      ``SVDDissimilarity`` (its ``.llv`` is d_LLV by the representation route, O((M_p + M_q)^2) state, any K) fed
      with the embeddings and each input's ``logZ`` from the logits, at the representation dimension
      ``max(r_p, r_q)`` of the embeddings (or ``rep_dim``), and ``MeanCCA`` on the embeddings;
    * otherwise (logits only, or K < M + 2 as for a ResNet's 10-class head on 512-d features): ``LLVDistance`` on
      the logits with ``rep_dim`` (default: ``max(r_p, r_q)`` of the log-probabilities centred over labels, at most
      K - 1), plus ``MeanCCA`` when both have embeddings.

    ``compute()`` reports which M it used and why (``info["rep_dim"]``, ``info["rep_dim_reason"]``). ``ids`` (global
    sample positions) are given to the metrics with a candidate buffer, so the candidate inputs, hence every value,
    do not depend on the number of processes.
    """

    def __init__(self, rep_dim: int | None = None, **metric_kwargs: Any) -> None:
        from lightning_repsim import metrics as M

        known = set(_TORCHMETRICS_KWARGS) | set(LLVOptions.names()) | {"max_label_subsets"}
        for cls in (M.MeanKLDivergence, M.LogitDistance, M.LLVDistance, M.SVDDissimilarity, M.MeanCCA):
            known |= _own_params(cls)
        unknown = sorted(set(metric_kwargs) - known)
        if unknown:
            raise ValueError(f"unknown `metric_kwargs` {unknown}; the metrics accept {sorted(known)}")
        self.rep_dim = rep_dim
        self.metric_kwargs = metric_kwargs
        self.metrics: MetricCollection | None = None
        self.mode: str | None = None
        self.m: int | None = None
        self.k: int | None = None
        self.widths: tuple[int, int] | None = None
        self.rep_dim_reason = ""
        self.svd_problem: str | None = None
        self.device = torch.device("cpu")
        self.num_rows = 0
        self.results: dict[str, Any] = {}

    # -- construction ----------------------------------------------------------------------------
    def _kwargs_for(self, cls: Any) -> dict[str, Any]:
        from lightning_repsim import metrics as M

        accepted = _own_params(cls) | _TORCHMETRICS_KWARGS
        if cls in (M.LLVDistance, M.SVDDissimilarity):
            accepted |= set(LLVOptions.names())
        if cls is M.SVDDissimilarity:
            accepted = (accepted - {"labels"}) | {"max_label_subsets"}
        return {k: v for k, v in self.metric_kwargs.items() if k in accepted}

    @staticmethod
    def check_compatible(ref: Representations, stu: Representations) -> None:
        """Both models must predict over the same labels."""
        k_ref, k_stu = ref.num_labels, stu.num_labels
        if k_ref != k_stu:
            raise ValueError(
                f"ReferenceComparison: the reference predicts K={k_ref} classes but the student K={k_stu}: they must "
                "share the label set (same classes, same vocabulary) to be compared"
            )

    def _choose_mode(self, ref: Representations, stu: Representations) -> None:
        """The route and the representation dimension (with the reason, reported by :meth:`compute`)."""
        both = ref.has_representations and stu.has_representations
        self.k = int(ref.num_labels)
        self.widths = (int(ref.embeddings.shape[-1]), int(stu.embeddings.shape[-1])) if both else None
        widest = max(self.widths) if self.widths else None
        # the representation route whenever both models expose embeddings, whatever their widths, as long as d_SVD's
        # label subsets fit (K >= M + 2); M is then max(r_p, r_q) of the embeddings (or `rep_dim`), found at compute()
        needed = self.rep_dim if self.rep_dim is not None else widest
        self.mode = "representations" if both and self.k >= needed + 2 else "logits"
        self.m = self.rep_dim  # None: found at compute(), from the ranks of the embeddings or of the log-probabilities
        if self.rep_dim is not None:
            self.rep_dim_reason = "given (rep_dim)"
        elif self.mode == "representations":
            self.rep_dim_reason = "max(rank of the reference's embeddings, rank of the student's)"
        else:
            self.rep_dim_reason = "max(rank of the reference's log-probabilities, rank of the student's)"
        self.svd_problem = None
        if both and self.mode == "logits":
            self.svd_problem = f"d_SVD needs K >= M + 2 labels, got K={self.k}, M={needed} (the embeddings' width)"

    def _build(self, ref: Representations, stu: Representations) -> None:
        from lightning_repsim import metrics as M

        self.check_compatible(ref, stu)
        self._choose_mode(ref, stu)
        metrics: dict[str, Any] = {
            "kl": M.MeanKLDivergence(**self._kwargs_for(M.MeanKLDivergence)),
            "logit": M.LogitDistance(**self._kwargs_for(M.LogitDistance)),
        }
        if self.mode == "representations":
            # d_SVD on the sets d_LLV chooses; its .llv is d_LLV by the representation route (O((M_p + M_q)^2) state)
            metrics["svd"] = M.SVDDissimilarity(rep_dim=self.m, **self._kwargs_for(M.SVDDissimilarity))
        else:
            metrics["llv"] = M.LLVDistance(rep_dim=self.m, **self._kwargs_for(M.LLVDistance))
        if self.widths is not None:
            metrics["cca"] = M.MeanCCA(**self._kwargs_for(M.MeanCCA))
        self.metrics = MetricCollection(metrics, compute_groups=False).to(self.device)

    # -- torchmetrics-like interface ---------------------------------------------------------------
    def to(self, device: torch.device) -> MetricSuite:
        self.device = torch.device(device)
        if self.metrics is not None:
            self.metrics = self.metrics.to(self.device)
        return self

    def reset(self) -> None:
        if self.metrics is not None:
            self.metrics.reset()
        self.num_rows = 0

    def state_nbytes(self) -> int:
        return 0 if self.metrics is None else int(sum(metric.state_nbytes() for metric in self.metrics.values()))

    def update(self, ref: Representations, stu: Representations, keep: Tensor | None = None, ids: Tensor | None = None) -> int:
        """Add one batch; ``keep`` is a bool mask over the flattened leading positions, ``ids`` (same length)
        integer ids of the inputs for the candidate buffers. Returns the number of rows added."""
        if self.metrics is None:
            self._build(ref, stu)
        else:
            self.check_compatible(ref, stu)
        if ids is not None and keep is not None:
            ids = ids[keep.to(ids.device)]
        z_p = logits_for_statistics(ref, keep)
        z_q = logits_for_statistics(stu, keep).to(z_p.device)
        n = int(z_p.shape[0])
        if n == 0:
            return 0
        both = "cca" in self.metrics
        f_p = _rows(ref.embeddings, keep) if both else None
        f_q = _rows(stu.embeddings, keep).to(z_p.device) if both else None
        lz_p, lz_q, kl, logit_sq = logit_pair_rows(z_p, z_q)  # one float64 sweep over both models' logits
        # rows with a non-finite output in either model are skipped by every metric alike (counted as dropped):
        # a non-finite logit makes logZ, the KL or the logit distance non-finite, one check per row instead of per logit
        ok = torch.isfinite(lz_p) & torch.isfinite(lz_q) & torch.isfinite(kl) & torch.isfinite(logit_sq)
        if both:
            ok &= torch.isfinite(f_p).all(1) & torch.isfinite(f_q).all(1)
        if not bool(ok.all()):
            z_p, z_q, lz_p, lz_q, kl, logit_sq = z_p[ok], z_q[ok], lz_p[ok], lz_q[ok], kl[ok], logit_sq[ok]
            f_p, f_q = (f_p[ok], f_q[ok]) if both else (None, None)
            ids = None if ids is None else ids[ok.to(ids.device)]
        if ids is not None:
            ids = ids.to(z_p.device)
        self.num_rows += n
        if z_p.shape[0] == 0:
            return 0
        self.metrics["kl"].update(z_p, z_q, per_input=kl)
        self.metrics["logit"].update(z_p, z_q, per_input=logit_sq)
        if "svd" in self.metrics:
            unemb_p, unemb_q = ref.unembedding.to(z_p.device), stu.unembedding.to(z_p.device)
            self.metrics["svd"].update(f_p, f_q, ids=ids, unemb_p=unemb_p, unemb_q=unemb_q, logz=(lz_p, lz_q))
        else:
            self.metrics["llv"].update(z_p, z_q, ids=ids)
        if both:
            self.metrics["cca"].update(f_p, f_q)
        return int(z_p.shape[0])

    def _global_rows(self) -> int:
        """Rows added on all processes (a collective under DDP: every process calls compute)."""
        import torch.distributed as dist

        if distributed_world()[1] > 1:
            count = torch.tensor([self.num_rows], dtype=torch.int64, device=self.device)
            dist.all_reduce(count)
            return int(count.item())
        return self.num_rows

    def compute(self) -> tuple[dict[str, float], dict[str, Any], dict[str, str]]:
        """``(values, info, problems)``: logged values, set information (``num_inputs`` the values were computed on,
        ``num_dropped`` rows skipped as non-finite, the M used and why), and why missing values are missing."""
        rows = self._global_rows()
        info: dict[str, Any] = {"num_inputs": 0, "num_dropped": 0, "mode": self.mode, "rep_dim": self.m,
                                "num_labels": self.k, "rep_dim_reason": self.rep_dim_reason}
        if self.metrics is None:
            return {}, info, {"all": "no validation rows were seen"}
        info["state_bytes"] = self.state_nbytes()
        if self.widths is not None:
            info["widths"] = list(self.widths)
        self.results, problems = {}, {}
        for name, metric in self.metrics.items():
            try:
                self.results[name] = metric.compute_result()
            except (ValueError, torch.linalg.LinAlgError) as err:
                problems[_PROBLEM_KEYS[name]] = str(err)
        if "d_svd" in problems and "svd" in self.metrics:
            problems["d_llv"] = problems["d_svd"]  # d_LLV comes from the same metric
        values: dict[str, float] = {}
        for result in self.results.values():
            values.update({k: v for k, v in result.as_dict().items() if k in METRIC_KEYS})
        if "kl" in self.results:
            info["num_inputs"] = int(self.results["kl"].num_inputs)
        info["num_dropped"] = rows - info["num_inputs"] if "kl" in self.results else rows
        llv = self.results["svd"].llv if "svd" in self.results else self.results.get("llv")
        if llv is not None:
            values["bound_paper"], values["bound_sharp"] = svd_bounds(values["d_llv"], int(llv.rep_dim))
            info.update(rep_dim=int(llv.rep_dim), label_pivot=int(llv.label_pivot), leave_out=int(llv.leave_out),
                        input_set=[int(i) for i in llv.input_set.tolist()])
        if "svd" in self.results:
            r_p, r_q = (int(r) for r in self.results["svd"].svd.embedding_rank)
            info["embedding_rank"] = [r_p, r_q]
            if self.rep_dim is None:
                info["rep_dim_reason"] = f"max(rank {r_p} of the reference's embeddings, rank {r_q} of the student's)"
        elif llv is not None and self.rep_dim is None:
            info["rep_dim_reason"] = f"max(rank of the reference's log-probabilities, rank of the student's) = {llv.rep_dim}"
        elif self.svd_problem:
            problems["d_svd"] = self.svd_problem
        return values, info, problems
