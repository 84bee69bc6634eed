"""Side-by-side scatter of two models' 2-D embeddings, coloured by class (the paper's Figure 3, left), and the
layer-by-layer similarity heatmap of the CKA literature."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["figure_to_array", "plot_embeddings", "plot_layer_matrix"]


def _np(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def plot_embeddings(
    emb_reference: Tensor | np.ndarray,
    emb_student: Tensor | np.ndarray,
    labels: Tensor | np.ndarray | None = None,
    title: str | None = None,
    metrics: Mapping[str, float] | None = None,
    names: tuple[str, str] = ("reference", "student"),
    point_size: float = 4.0,
) -> Any:
    """A matplotlib ``Figure`` with two panels: the reference's and the student's embeddings of the same
    inputs (N x 2), each point coloured by its class label.

    Two models can predict almost alike (small KL) while these two pictures are different stars: that is
    what d_LLV and d_SVD measure and KL does not. ``metrics`` (e.g. ``{"kl": ..., "d_llv": ...}``) are
    written under the title. Rendered with Agg, without pyplot (no display, no global backend change).

    Example:
        >>> from lightning_repsim.constructions import theorem31_pair
        >>> pair = theorem31_pair(rho=5.0, n_per_class=50)
        >>> fig = plot_embeddings(pair.emb_p, pair.emb_q, pair.labels)
        >>> len(fig.axes)
        2
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    a, b = _np(emb_reference), _np(emb_student)
    if a.ndim != 2 or a.shape[1] != 2 or b.shape != a.shape:
        raise ValueError(f"plot_embeddings needs two (N, 2) arrays of equal shape, got {a.shape} and {b.shape}")
    lab = None if labels is None else _np(labels).astype(np.int64).reshape(-1)
    if lab is not None and lab.shape[0] != a.shape[0]:
        raise ValueError(f"`labels` must have one entry per point ({a.shape[0]}), got {lab.shape[0]}")

    fig = Figure(figsize=(8.0, 4.2), dpi=100)
    FigureCanvasAgg(fig)  # attach an Agg canvas: no pyplot, no global backend change
    axes = fig.subplots(1, 2)
    if lab is not None:
        classes = np.unique(lab)
        cmap = matplotlib.colormaps["tab10" if classes.size <= 10 else "tab20"]
        colour_of = {c: cmap(i % cmap.N) for i, c in enumerate(classes)}
    for ax, emb, name in zip(axes, (a, b), names):
        if lab is None:
            ax.scatter(emb[:, 0], emb[:, 1], s=point_size, color="tab:blue", linewidths=0)
        else:
            for c in classes:
                sel = lab == c
                ax.scatter(emb[sel, 0], emb[sel, 1], s=point_size, color=colour_of[c], label=str(c), linewidths=0)
        ax.set_title(f"{name} embedding f(x)")
        ax.set_aspect("equal", adjustable="datalim")
        ax.grid(alpha=0.3)
    if lab is not None and classes.size <= 20:
        axes[1].legend(title="class", loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=2)
    heading = title or ""
    if metrics:
        text = "  ".join(f"{k}={v:.4g}" for k, v in metrics.items() if v is not None and np.isfinite(v))
        heading = f"{heading}\n{text}" if heading else text
    if heading:
        fig.suptitle(heading, fontsize=9)
    fig.tight_layout()
    return fig


def plot_layer_matrix(
    values: Tensor | np.ndarray,
    reference_layers: list[str],
    student_layers: list[str],
    measure: str = "cka",
    title: str | None = None,
) -> Any:
    """A matplotlib ``Figure``: the heatmap of a layer-by-layer similarity matrix (rows: reference layers, columns:
    student layers), each cell annotated with its value (NaN cells, undefined values, are left blank).

    Example:
        >>> import numpy as np
        >>> fig = plot_layer_matrix(np.eye(2), ["body.1", "body.3"], ["body.1", "body.3"])
        >>> len(fig.axes)  # the heatmap and its colour bar
        2
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    v = _np(values)
    if v.shape != (len(reference_layers), len(student_layers)):
        raise ValueError(
            f"plot_layer_matrix: values of shape {v.shape} for {len(reference_layers)} x {len(student_layers)} layers"
        )
    size = 2.0 + 0.6 * max(v.shape)
    fig = Figure(figsize=(size + 1.5, size), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    bounded = measure.startswith("cka")
    image = ax.imshow(v, cmap="magma", vmin=0.0 if bounded else None, vmax=1.0 if bounded else None, origin="lower")
    fig.colorbar(image, ax=ax, label=measure)
    ax.set_yticks(range(v.shape[0]), reference_layers, fontsize=7)
    ax.set_xticks(range(v.shape[1]), student_layers, fontsize=7, rotation=45, ha="right")
    ax.set_ylabel("reference layer")
    ax.set_xlabel("student layer")
    if max(v.shape) <= 16:
        for i in range(v.shape[0]):
            for j in range(v.shape[1]):
                if np.isfinite(v[i, j]):
                    light = bounded and v[i, j] < 0.6
                    ax.text(j, i, f"{v[i, j]:.2f}", ha="center", va="center", fontsize=7, color="white" if light else "black")
    ax.set_title(title or f"{measure}: reference vs student layers", fontsize=9)
    fig.tight_layout()
    return fig


def figure_to_array(fig: Any) -> np.ndarray:
    """RGB uint8 array (H x W x 3) of a matplotlib figure (rendered with Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
