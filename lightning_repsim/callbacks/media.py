"""What the comparison shows beyond scalars: the embedding picture (M = 2) and, with a ``WandbLogger``, a table of
all comparisons, line plots and the picture, logged by rank 0."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_repsim.callbacks.extraction import Representations

__all__ = ["EmbeddingPoints", "embedding_figure", "layer_figure", "log_wandb_layer_matrix", "log_wandb_media", "wandb_loggers"]


class EmbeddingPoints:
    """Up to ``max_points`` pairs of 2-D embeddings (reference, student) with class labels, for the picture."""

    def __init__(self, max_points: int) -> None:
        self.max_points = max_points
        self.last: tuple[Tensor, Tensor, Tensor | None] | None = None
        self.start()

    def start(self) -> None:
        self._ref: list[Tensor] = []
        self._stu: list[Tensor] = []
        self._lab: list[Tensor | None] = []
        self._count = 0

    def add(self, ref: Representations, stu: Representations, labels: Tensor | None, keep: Tensor | None,
            lead: tuple[int, ...]) -> None:
        if self._count >= self.max_points or not (ref.has_representations and stu.has_representations):
            return
        if ref.embeddings.shape[-1] != 2 or stu.embeddings.shape[-1] != 2:
            return
        take = self.max_points - self._count
        e_r, e_s = ref.embeddings.reshape(-1, 2), stu.embeddings.reshape(-1, 2)
        if labels is not None and tuple(labels.shape) == lead:
            labels = labels.reshape(-1)
        else:
            logits = ref.logits
            labels = logits.reshape(-1, logits.shape[-1]).argmax(-1) if logits is not None else None
        if keep is not None:
            k = keep.to(e_r.device)
            e_r, e_s = e_r[k], e_s[k]
            labels = labels[keep.to(labels.device)] if labels is not None else None
        self._ref.append(e_r[:take].detach().to("cpu", torch.float64))
        self._stu.append(e_s[:take].detach().to("cpu", torch.float64))
        self._lab.append(None if labels is None else labels[:take].detach().cpu())
        self._count += min(take, e_r.shape[0])

    def finish(self) -> None:
        """Keep the points of this comparison as :attr:`last` (when there were any)."""
        if self._ref:
            labels = None
            if all(lab is not None for lab in self._lab):
                labels = torch.cat([lab for lab in self._lab if lab is not None])
            self.last = (torch.cat(self._ref), torch.cat(self._stu), labels)
        self.start()


def embedding_figure(points: tuple[Tensor, Tensor, Tensor | None] | None, entry: Mapping[str, Any]) -> Any | None:
    """The picture of both models' 2-D embeddings (``points``: reference, student, labels), titled with the
    comparison's epoch and values, or None without points."""
    if points is None:
        return None
    from lightning_repsim.callbacks.plotting import plot_embeddings

    ref, stu, labels = points
    title = f"epoch {entry.get('epoch', '?')} ({entry.get('stage', '')}): reference vs student"
    shown = {k: entry[k] for k in ("kl", "d_llv", "d_svd", "mcca") if k in entry}
    return plot_embeddings(ref, stu, labels, title=title, metrics=shown)


def layer_figure(entry: Mapping[str, Any]) -> Any | None:
    """The heatmap of a comparison's layer-by-layer matrix (``entry["layer_matrix"]``), or None."""
    matrix = entry.get("layer_matrix")
    if not matrix:
        return None
    from lightning_repsim.callbacks.plotting import plot_layer_matrix

    title = f"{matrix['measure']}, epoch {entry.get('epoch', '?')} ({entry.get('stage', '')}): reference vs student"
    return plot_layer_matrix(matrix["values"], matrix["reference"], matrix["student"], matrix["measure"], title)


def wandb_loggers(trainer: pl.Trainer) -> list[Any]:
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover
        return []
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def log_wandb_media(
    trainer: pl.Trainer, prefix: str, history: Sequence[Mapping[str, Any]], keys: Sequence[str], entry: Mapping[str, Any],
    figure: Callable[[], Any],
) -> None:
    """The table of all comparisons, the line plots of kl/d_llv/d_svd/mcca over epochs and the embedding picture
    (``figure()``, or None) to every ``WandbLogger`` of the trainer."""
    loggers = wandb_loggers(trainer)
    if not loggers:
        return
    import wandb

    from lightning_repsim.callbacks.plotting import figure_to_array

    step = int(trainer.global_step)
    columns = ["epoch", "global_step", "stage", "num_inputs", *keys]
    rows = [[h.get(c, float("nan")) for c in columns] for h in history]
    rows = [[None if isinstance(v, float) and not math.isfinite(v) else v for v in row] for row in rows]
    fits = [h for h in history if h.get("stage") == "fit"] or list(history)
    xs = [h["epoch"] for h in fits]
    curves = [k for k in ("kl", "d_llv", "d_svd", "mcca") if any(math.isfinite(h.get(k, float("nan"))) for h in fits)]
    fig = figure()
    for lg in loggers:
        lg.log_table(key=f"{prefix}/table", columns=columns, data=rows, step=step)
        if curves:
            ys = [[h.get(k) if math.isfinite(h.get(k, float("nan"))) else None for h in fits] for k in curves]
            chart = wandb.plot.line_series(xs=xs, ys=ys, keys=curves, title="reference vs student per epoch", xname="epoch")
            lg.log_metrics({f"{prefix}/curves": chart}, step=step)
        if fig is not None:
            lg.log_image(
                key=f"{prefix}/embeddings",
                images=[figure_to_array(fig)],
                step=step,
                caption=[f"epoch {entry['epoch']}: reference (left) vs student (right), coloured by class"],
            )


def log_wandb_layer_matrix(trainer: pl.Trainer, prefix: str, entry: Mapping[str, Any], fig: Any | None) -> None:
    """The layer-by-layer matrix of ``entry["layer_matrix"]`` as a heatmap image and a long-format table
    (reference layer, student layer, value) to every ``WandbLogger`` of the trainer."""
    loggers = wandb_loggers(trainer)
    matrix = entry.get("layer_matrix")
    if not loggers or not matrix:
        return
    from lightning_repsim.callbacks.plotting import figure_to_array

    measure, step = matrix["measure"], int(trainer.global_step)
    rows = [[r, s, v if math.isfinite(v) else None]
            for r, row in zip(matrix["reference"], matrix["values"]) for s, v in zip(matrix["student"], row)]
    for lg in loggers:
        lg.log_table(key=f"{prefix}/layers/{measure}_table", columns=["reference_layer", "student_layer", measure],
                     data=rows, step=step)
        if fig is not None:
            lg.log_image(key=f"{prefix}/layers/{measure}_matrix", images=[figure_to_array(fig)], step=step,
                         caption=[f"epoch {entry['epoch']}: {measure}, reference layers (rows) vs student layers (columns)"])
