"""Pictures for people: what a stage's numbers look like. Matplotlib with the Agg backend, so
they render on machines with no display."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """The first two principal components (deterministic: SVD signs fixed by the data)."""
    centred = vectors - vectors.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    top = components[:2]
    top *= np.sign(top[np.arange(len(top)), np.abs(top).argmax(axis=1)])[:, None]
    return centred @ top.T


def projection_figure(vectors: np.ndarray, groups: Sequence[str] | None, title: str) -> Figure:
    """A 2D PCA scatter of the embeddings, one colour per group (label or cluster)."""
    points = pca_2d(vectors.astype(np.float64))
    figure, axes = plt.subplots(figsize=(7, 6), layout="constrained")
    if groups is None:
        axes.scatter(points[:, 0], points[:, 1], s=12)
    else:
        names = sorted(set(groups))
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
