"""The streaming metrics one comparison needs, fed from two models' :class:`Representations`.

All accumulation happens in :mod:`lightning_repsim.metrics` (exact, bounded memory, synced across
processes); this module only decides which metrics apply (representations or logits only, K vs M)
and turns their results into the flat keys that the callback logs.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from lightning_repsim.callbacks.extraction import Representations
from lightning_repsim.functional import LLVOptions, logits_from_representations

__all__ = ["METRIC_KEYS", "MetricSuite"]

#: Keys of the logged values (``ComparisonReport.as_dict()`` order).
METRIC_KEYS = (
    "kl",
    "d_llv",
    "llv_t1",
    "llv_t2",
    "llv_t3",
    "llv_t4",
    "d_svd",
    "d_svd_f",
    "d_svd_g",
    "mcca",
    "bound_paper",
    "bound_sharp",
)


#: torchmetrics.Metric keyword arguments passed on to every metric.
_TORCHMETRICS_KWARGS = frozenset(
    {"compute_on_cpu", "dist_sync_on_step", "process_group", "dist_sync_fn", "distributed_available_fn", "sync_on_compute"}
)
#: Largest K for d_LLV from logits (the 2K x 2K co-moment of LLVDistance); beyond, embeddings are required.
MAX_LABELS_LOGITS_ROUTE = 4096
#: The float64 logits rebuilt from representations for the KL are fed in row chunks of at most this many numbers.
_KL_CHUNK = 2**22


def _own_params(cls: Any) -> set[str]:
    params = inspect.signature(cls.__init__).parameters
    return {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _accepts(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def _rows(t: Tensor, keep: Tensor | None) -> Tensor:
    rows = t.reshape(-1, t.shape[-1])
    if keep is not None:
        rows = rows[keep.to(rows.device)]
    return rows


def _logit_rows(reps: Representations, keep: Tensor | None) -> Tensor:
    if reps.logits is not None:
        return _rows(reps.logits, keep)
    f = _rows(reps.embeddings, keep)
    return logits_from_representations(f, reps.unembedding.to(f.device))


class MetricSuite:
    """KL, d_LLV (+ terms), d_SVD (+ parts), mCCA between a reference (p) and a student (q).

    The metrics are created at the first :meth:`update`, once the shapes are known:

    * both models give embeddings of the same width M: ``MeanKLDivergence`` on the float64 logits
      ``f g~^T`` rebuilt from the representations (exactly what ``functional.compare`` does);
      ``SVDDissimilarity`` when K >= M + 2 (its ``.llv`` is d_LLV by the representation route, O(M^2)
      state, any K), else ``LLVDistance`` on those logits; ``MeanCCA`` on the embeddings;
    * otherwise (logits only, or different widths): ``MeanKLDivergence`` and ``LLVDistance`` on the
      models' logits with ``rep_dim`` (default ``K - 1``), plus ``MeanCCA`` when both have embeddings.

    ``ids`` (global sample positions from the callback) are given to the metrics with a candidate buffer,
    so the candidate inputs, hence every value, do not depend on the number of processes.
    """

    def __init__(self, rep_dim: int | None = None, **metric_kwargs: Any) -> None:
        from lightning_repsim import metrics as M

        known = set(_TORCHMETRICS_KWARGS) | set(LLVOptions.names())
        for cls in (M.MeanKLDivergence, M.LLVDistance, M.SVDDissimilarity, M.MeanCCA):
            known |= _own_params(cls)
        unknown = sorted(set(metric_kwargs) - known)
        if unknown:
            raise ValueError(f"unknown `metric_kwargs` {unknown}; the metrics accept {sorted(known)}")
        self.rep_dim = rep_dim
        self.metric_kwargs = metric_kwargs
        self.metrics: dict[str, Any] = {}
        self.mode: str | None = None
        self.m: int | None = None
        self.k: int | None = None
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
            accepted -= {"labels"}
        return {k: v for k, v in self.metric_kwargs.items() if k in accepted}

    def _build(self, ref: Representations, stu: Representations) -> None:
        from lightning_repsim import metrics as M

        both = ref.has_representations and stu.has_representations
        k = ref.unembedding.shape[0] if ref.unembedding is not None else ref.logits.shape[-1]
        self.k = int(k)
        if both and ref.embeddings.shape[-1] == stu.embeddings.shape[-1]:
            self.mode = "representations"
            self.m = int(ref.embeddings.shape[-1])
        else:
            self.mode = "logits"
            if self.rep_dim is not None:
                self.m = self.rep_dim
            elif both:
                self.m = int(min(ref.embeddings.shape[-1], stu.embeddings.shape[-1]))
            else:
                self.m = self.k - 1
            if self.k > MAX_LABELS_LOGITS_ROUTE:
                raise ValueError(
                    f"d_LLV from logits keeps a 2K x 2K statistic, too large for K={self.k} labels. Give both models "
                    "embedding access (the default FinalLinear extractor or a custom one returning embeddings and "
                    "the unembedding): the representation route needs only O(M^2)."
                )
        metrics: dict[str, Any] = {"kl": M.MeanKLDivergence(**self._kwargs_for(M.MeanKLDivergence))}
        if self.mode == "representations" and self.k >= self.m + 2:
            # d_SVD on the sets d_LLV chooses; its .llv is d_LLV by the representation route (O(M^2) state)
            metrics["svd"] = M.SVDDissimilarity(rep_dim=self.m, **self._kwargs_for(M.SVDDissimilarity))
        else:
            metrics["llv"] = M.LLVDistance(rep_dim=self.m, **self._kwargs_for(M.LLVDistance))
        if both:
            metrics["cca"] = M.MeanCCA(**self._kwargs_for(M.MeanCCA))
        self.metrics = {name: metric.to(self.device) for name, metric in metrics.items()}

    # -- torchmetrics-like interface ---------------------------------------------------------------
    def to(self, device: torch.device) -> MetricSuite:
        self.device = torch.device(device)
        self.metrics = {name: metric.to(self.device) for name, metric in self.metrics.items()}
        return self

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()
        self.num_rows = 0

    def update(self, ref: Representations, stu: Representations, keep: Tensor | None = None, ids: Tensor | None = None) -> int:
        """Add one batch; ``keep`` is a bool mask over the flattened leading positions, ``ids`` (same length)
        integer ids of the inputs for the candidate buffers. Returns the number of rows added."""
        if not self.metrics:
            self._build(ref, stu)
        if ids is not None and keep is not None:
            ids = ids[keep.to(ids.device)]
        f_p = f_q = u_p = u_q = None
        if ref.has_representations and stu.has_representations:
            f_p = _rows(ref.embeddings, keep).to(torch.float64)
            f_q = _rows(stu.embeddings, keep).to(device=f_p.device, dtype=torch.float64)
            u_p = ref.unembedding.to(device=f_p.device, dtype=torch.float64)
            u_q = stu.unembedding.to(device=f_p.device, dtype=torch.float64)
        z_p = z_q = None
        if self.mode == "logits":
            z_p = _logit_rows(ref, keep)
            z_q = _logit_rows(stu, keep).to(z_p.device)
        n = int(f_p.shape[0]) if f_p is not None else int(z_p.shape[0])
        if n == 0:
            return 0
        if ids is not None:
            ids = ids.to(f_p.device if f_p is not None else z_p.device)
        if self.mode == "representations":
            # the logits f g~^T in float64, exactly as functional.compare builds them; in row chunks for large K
            step = max(1, _KL_CHUNK // self.k)
            if "svd" in self.metrics:
                for i in range(0, n, step):
                    self.metrics["kl"].update(
                        logits_from_representations(f_p[i : i + step], u_p),
                        logits_from_representations(f_q[i : i + step], u_q),
                    )
                self._update_with_ids("svd", ids, f_p, f_q, u_p, u_q)
            else:  # K < M + 2: small K, the logits route of d_LLV
                z_p, z_q = logits_from_representations(f_p, u_p), logits_from_representations(f_q, u_q)
                self.metrics["kl"].update(z_p, z_q)
                self._update_with_ids("llv", ids, z_p, z_q)
        else:
            self.metrics["kl"].update(z_p, z_q)
            self._update_with_ids("llv", ids, z_p, z_q)
        if "cca" in self.metrics:
            self.metrics["cca"].update(f_p, f_q)
        self.num_rows += n
        return n

    def _update_with_ids(self, name: str, ids: Tensor | None, *args: Tensor) -> None:
        metric = self.metrics[name]
        if ids is not None and _accepts(metric.update, "ids"):
            metric.update(*args, ids=ids)
        else:
            metric.update(*args)

    def _global_rows(self) -> int:
        """Rows added on all processes (a collective under DDP: every process calls compute)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            count = torch.tensor([self.num_rows], dtype=torch.int64, device=self.device)
            dist.all_reduce(count)
            return int(count.item())
        return self.num_rows

    def compute(self) -> tuple[dict[str, float], dict[str, Any], dict[str, str]]:
        """``(values, info, problems)``: logged values, set information, and why missing values are missing."""
        values: dict[str, float] = {}
        info: dict[str, Any] = {"num_inputs": self._global_rows(), "mode": self.mode, "rep_dim": self.m, "num_labels": self.k}
        problems: dict[str, str] = {}
        if not self.metrics:
            problems["all"] = "no validation rows were seen"
            return values, info, problems
        results: dict[str, Any] = {}
        self.results = results
        for name, metric in self.metrics.items():
            try:
                results[name] = metric.compute_result()
            except (ValueError, torch.linalg.LinAlgError) as err:
                problems[{"kl": "kl", "llv": "d_llv", "svd": "d_svd", "cca": "mcca"}[name]] = str(err)
        if "d_svd" in problems and "svd" in self.metrics:
            problems["d_llv"] = problems["d_svd"]  # d_LLV comes from the same metric
        if "kl" in results:
            values["kl"] = float(results["kl"].value)
        llv = results.get("llv")
        if llv is None and "svd" in results:
            llv = results["svd"].llv
        if llv is not None:
            d = float(llv.value)
            values.update(
                d_llv=d, llv_t1=float(llv.t1), llv_t2=float(llv.t2), llv_t3=float(llv.t3), llv_t4=float(llv.t4),
                bound_paper=2 * self.m * d, bound_sharp=2 * d * d,
            )
            info.update(
                label_pivot=int(llv.label_pivot), leave_out=int(llv.leave_out),
                input_set=[int(i) for i in llv.input_set.tolist()],
            )
        svd = results.get("svd")
        if svd is not None:
            values.update(d_svd=float(svd.value), d_svd_f=float(svd.f_part), d_svd_g=float(svd.g_part))
        elif "svd" not in self.metrics and self.mode == "representations":
            problems["d_svd"] = f"d_SVD needs K >= M + 2 labels, got K={self.k}, M={self.m}"
        if "cca" in results:
            values["mcca"] = float(results["cca"].value)
        return values, info, problems
