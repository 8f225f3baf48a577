"""Pictures for people: what a stage's numbers look like. Matplotlib with the Agg backend
where nothing else chose one, so they render on machines with no display; chosen when a figure
is made (`subplots`), not at import, so a notebook that imports the package keeps its own."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure


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


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """The first two principal components (deterministic: SVD signs fixed by the data)."""
    centred = vectors - vectors.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    top = components[:2]
    top *= np.sign(top[np.arange(len(top)), np.abs(top).argmax(axis=1)])[:, None]
    return centred @ top.T


NO_LABEL = "(no label)"


def projection_figure(
    vectors: np.ndarray, groups: Sequence[str | None] | None, title: str
) -> Figure:
    """A 2D PCA scatter of the embeddings, one colour per group (label or cluster); images
    whose label is missing (None) are a group of their own."""
    points = pca_2d(vectors.astype(np.float64))
    figure, axes = subplots(figsize=(7, 6), layout="constrained")
    if groups is None:
        axes.scatter(points[:, 0], points[:, 1], s=12)
    else:
        groups = [NO_LABEL if g is None else g for g in groups]
        # Cluster numbers in numeric order (-1, 0, 2, 10), labels alphabetically.
        names = sorted(
            set(groups), key=lambda g: (0, int(g), "") if g.lstrip("-").isdigit() else (1, 0, g)
        )
        codes = np.array([names.index(g) for g in groups])
        colours = plt.get_cmap("tab20" if len(names) <= 20 else "turbo")(
            codes / max(1, len(names) - 1) if len(names) > 20 else codes
        )
        axes.scatter(points[:, 0], points[:, 1], s=12, c=colours)
        if len(names) <= 20:
            for code, name in enumerate(names):
                axes.scatter([], [], s=12, color=colours[codes == code][0], label=name)
            axes.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1, 0.5))
    axes.set(title=title, xlabel="PC 1", ylabel="PC 2")
    return figure


def pr_figure(curve: Sequence, threshold: float, title: str) -> Figure:
    """Precision, recall and F1 over similarity thresholds, the chosen threshold marked: the
    picture a person reads to see why the threshold is where it is."""
    figure, axes = subplots(figsize=(6, 4), layout="constrained")
    for column in ("precision", "recall", "f1"):
        axes.plot(curve["threshold"], curve[column], label=column)
    axes.axvline(threshold, color="grey", linestyle="--", label=f"threshold {threshold}")
    axes.set(title=title, xlabel="cosine similarity threshold", ylabel="score", ylim=(0, 1.02))
    axes.legend(fontsize="small")
    return figure


def thumbnail(path: Path, size: int = 96) -> np.ndarray | None:
    """A small RGB copy of an image file, or None if it cannot be read."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR_RGB)
    if image is None:
        return None
    scale = size / max(image.shape[:2])
    return cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)


def image_grid(rows: Sequence[tuple[str, Sequence[tuple[Path, str]]]], title: str) -> Figure:
    """One row per (row title, [(image path, caption), ...]); unreadable images left blank."""
    columns = max(len(images) for _, images in rows)
    figure, axes = subplots(
        len(rows),
        columns,
        squeeze=False,
        layout="constrained",
        figsize=(1.3 * columns + 0.5, 1.45 * len(rows) + 0.4),
    )
    for r, (row_title, images) in enumerate(rows):
        for c in range(columns):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            ax.spines[:].set_visible(False)
            if c < len(images):
                picture = thumbnail(images[c][0])
                if picture is not None:
                    ax.imshow(picture)
                ax.set_title(images[c][1], fontsize=5)
        axes[r, 0].set_ylabel(row_title, fontsize=7, rotation=0, ha="right", va="center")
    figure.suptitle(title, fontsize=9)
    return figure


def save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
