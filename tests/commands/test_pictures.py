"""The pictures say what they claim: the projection is coloured by label beside by cluster. Read
back from the matplotlib figures, not from the PNG files (the commands' tests check those)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from pipeline import cluster, extract, plots

from conftest import composed, write_layer

# --- the projection -----------------------------------------------------------------------------


def panels(figure: Figure) -> dict[str, list[str]]:
    """Each scatter panel's title and its legend's entries."""
    return {
        ax.get_title(): [t.get_text() for t in ax.get_legend().texts] if ax.get_legend() else []
        for ax in figure.axes
    }


def test_the_projection_is_by_label_beside_by_cluster() -> None:
    vectors = np.random.default_rng(0).normal(size=(8, 5))
    labels = ["cat", "dog", None, "cat", "dog", "dog", "cat", "cat"]
    clusters = ["0", "1", "-1", "0", "1", "1", "0", "10"]
    figure = plots.projection_figure(vectors, "t", {"label": labels, "cluster": clusters})
    assert panels(figure) == {
        "by label": ["(no label) (1)", "cat (4)", "dog (3)"],
        "by cluster": ["-1 (noise) (1)", "0 (3)", "1 (3)", "10 (1)"],
    }
    # The same points in both panels.
    first, second = (ax.collections[0].get_offsets() for ax in figure.axes)
    np.testing.assert_array_equal(first, second)


def test_many_groups_are_named_on_the_projection_not_in_a_legend() -> None:
    vectors = np.random.default_rng(0).normal(size=(100, 5))
    labels = [f"class {i % 25}" for i in range(100)]
    (ax,) = plots.projection_figure(vectors, "t", {"label": labels}).axes
    assert ax.get_legend() is None
    named = {t.get_text() for t in ax.texts}
    assert {f"class {i}" for i in range(25)} <= named


def test_the_extractions_picture_is_coloured_by_label_when_there_are_labels() -> None:
    vectors = np.random.default_rng(0).normal(size=(6, 4))
    labelled = extract._projection((vectors, ["a", "b", "a", "b", "a", None]), "t")
    assert panels(labelled) == {"by label": ["(no label) (1)", "a (3)", "b (2)"]}
    for labels in (None, [None] * 6):
        (ax,) = extract._projection((vectors, labels), "t").axes
        assert ax.get_legend() is None


def test_the_cluster_stage_draws_labels_and_clusters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vectors = np.concatenate([np.eye(4)[[0] * 3], np.eye(4)[[1] * 3]]).astype(np.float32)
    vectors += np.random.default_rng(0).normal(0, 0.01, vectors.shape).astype(np.float32)
    labels = ["x", "x", "y", "y", "y", "y"]
    layer = write_layer(tmp_path / "l.parquet", vectors, [f"{i}.png" for i in range(6)], labels)
    drawn: dict[str, Figure] = {}
    monkeypatch.setattr(plots, "save", lambda figure, path: drawn.setdefault(path.name, figure))
    cfg = composed(
        "tracking=none",
        f"embeddings={layer}",
        f"cluster.output_dir={tmp_path / 'out'}",
        f"images_root={tmp_path / 'nowhere'}",
    )
    cluster.run(cfg)
    assert panels(drawn["projection.png"]) == {
        "by label": ["x (2)", "y (4)"],
        "by cluster": ["0 (3)", "1 (3)"],
    }
