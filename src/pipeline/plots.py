"""Pictures for people: what a stage's numbers look like. Matplotlib with the Agg backend
where nothing else chose one, so they render on machines with no display; chosen when a figure
is made (`subplots`, `figure`), not at import, so a notebook that imports the package keeps its
own. Pictures made of the images themselves (contact sheets, pairs, feature maps) are
`pictures.py`'s."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

DPI = 110  # every picture is saved at this resolution: a figure inch is DPI pixels
NO_LABEL = "(no label)"
# tab20's colours but its two greys (grey is for no label and for noise): beyond this many
# groups a legend's colours cannot be told apart.
GROUP_COLOURS = [i for i in range(20) if i not in (14, 15)]
LEGEND_GROUPS = len(GROUP_COLOURS)
NAMED_GROUPS = 30  # ... and the largest this many are named where their points are


def headless() -> None:
    """Agg for pyplot's figures, unless a backend was chosen (`matplotlib.use`, MPLBACKEND,
    a matplotlibrc, a notebook's `%matplotlib inline`): the stages save PNG files and never
    open a window, on a machine with a display too. Nothing to do once a backend is chosen."""
    # auto_select=False asks without making matplotlib pick one (3.10+).
    if matplotlib.get_backend(auto_select=False) is None:
        matplotlib.use("Agg")


def subplots(*args: Any, **kwargs: Any) -> tuple[Figure, Any]:
    """pyplot's `subplots`, headless (see `headless`): what every figure here is made with."""
    headless()
    return plt.subplots(*args, **kwargs)


def figure(**kwargs: Any) -> Figure:
    """pyplot's `figure`, headless: for a figure whose axes are placed by hand."""
    headless()
    return plt.figure(**kwargs)


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """The first two principal components (deterministic: SVD signs fixed by the data)."""
    centred = vectors - vectors.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    top = components[:2]
    top *= np.sign(top[np.arange(len(top)), np.abs(top).argmax(axis=1)])[:, None]
    return centred @ top.T


def projection_figure(
    vectors: np.ndarray, title: str, panels: Mapping[str, Sequence[str | None]] | None = None
) -> Figure:
    """A 2D PCA scatter of the embeddings, one panel per colouring in `panels` (its name, such
    as "label" or "cluster", and each row's group), side by side on the same points; one
    uncoloured panel without any. Images whose group is missing (None) are a group of their
    own."""
    points = pca_2d(vectors.astype(np.float64))
    panels = dict(panels or {})
    figure, axes = subplots(
        1, max(1, len(panels)), figsize=(6.6 * max(1, len(panels)), 6), layout="constrained"
    )
    axes = np.atleast_1d(axes)
    size = float(np.clip(6000 / max(1, len(points)), 2, 12))
    if not panels:
        axes[0].scatter(points[:, 0], points[:, 1], s=size)
    for ax, (name, groups) in zip(axes[: len(panels)], panels.items(), strict=True):
        scatter_groups(ax, points, groups, size)
        ax.set_title(f"by {name}", fontsize=10)
    for ax in axes:
        ax.set(xlabel="PC 1", ylabel="PC 2")
    figure.suptitle(title, fontsize=10)
    return figure


def scatter_groups(ax: Axes, points: np.ndarray, groups: Sequence[str | None], size: float) -> None:
    """The points coloured by group, with a legend of the groups and their counts; beyond
    LEGEND_GROUPS groups, the NAMED_GROUPS largest named at their points' median instead."""
    groups = [NO_LABEL if g is None else str(g) for g in groups]
    # Cluster numbers in numeric order (-1, 0, 2, 10), labels alphabetically.
    names = sorted(
        set(groups), key=lambda g: (0, int(g), "") if g.lstrip("-").isdigit() else (1, 0, g)
    )
    index = {name: code for code, name in enumerate(names)}
    codes = np.array([index[g] for g in groups])
    counts = np.bincount(codes, minlength=len(names))
    many = len(names) > LEGEND_GROUPS
    palette = (
        plt.get_cmap("turbo")(np.linspace(0, 1, len(names)))
        if many
        else plt.get_cmap("tab20")(GROUP_COLOURS[: len(names)])
    )
    for code, name in enumerate(names):
        if name in (NO_LABEL, "-1"):  # no label, HDBSCAN's noise: grey, not a group's colour
            palette[code] = (0.6, 0.6, 0.6, 1)
    ax.scatter(points[:, 0], points[:, 1], s=size, c=palette[codes], linewidths=0)
    if not many:
        for code, name in enumerate(names):
            shown = "-1 (noise)" if name == "-1" else name
            ax.scatter([], [], s=20, color=palette[code], label=f"{shown} ({counts[code]})")
        ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1, 0.5))
        return
    for code in np.argsort(-counts, kind="stable")[:NAMED_GROUPS]:
        x, y = np.median(points[codes == code], axis=0)
        ax.text(x, y, names[code], fontsize=6, ha="center", va="center", alpha=0.85)
    ax.text(
        0.01,
        0.01,
        f"{len(names)} groups: the {min(NAMED_GROUPS, len(names))} largest named at their median",
        transform=ax.transAxes,
        fontsize=7,
        color="grey",
    )


def pr_figure(curve: Sequence, threshold: float, title: str) -> Figure:
    """Precision, recall and F1 over similarity thresholds, the chosen threshold marked: the
    picture a person reads to see why the threshold is where it is."""
    figure, axes = subplots(figsize=(6, 4), layout="constrained")
    for column in ("precision", "recall", "f1"):
        axes.plot(curve["threshold"], curve[column], label=column)
    if "precision_worst" in curve:  # the calibration's: presumed duplicates counted against it
        axes.plot(
            curve["threshold"],
            curve["precision_worst"],
            color="C0",
            linestyle=":",
            label="precision, presumed duplicates counted",
        )
    axes.axvline(threshold, color="grey", linestyle="--", label=f"threshold {threshold:.3f}")
    axes.set(title=title, xlabel="cosine similarity threshold", ylabel="score", ylim=(0, 1.02))
    axes.legend(fontsize="small")
    return figure


def save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return path
