"""The pictures say what they claim: the contact sheet shows each cluster's most central images
and a seeded random few, headed by its size and majority label; the projection is coloured by
label beside by cluster; the pairs sit in a grid on the right side of a line at the threshold;
the feature maps have their colour scale and an overlay on the input. Read back from the
matplotlib figures, not from the PNG files (the commands' tests check those)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from pipeline import cluster, dedup, extract, pictures, plots, review
from pipeline.cluster import contact_sheet, sheet_clusters
from pipeline.search.vectors import normalise
from pipeline.storage.contract import Embeddings

from conftest import composed, write_image, write_layer


def texts(figure: Figure, gid: str) -> list:
    return [t for t in figure.texts if t.get_gid() == gid]


def lines(figure: Figure, gid: str) -> list[Line2D]:
    return [a for a in figure.artists if isinstance(a, Line2D) and a.get_gid() == gid]


def thumbnails(figure: Figure, part: str) -> list[Axes]:
    """The thumbnails of one part of a sheet, in reading order (top to bottom, left to right)."""
    shown = [ax for ax in figure.axes if ax.get_label() == part]
    return sorted(shown, key=lambda ax: (-round(ax.get_position().y0, 4), ax.get_position().x0))


# --- the contact sheet --------------------------------------------------------------------------


def sheet_layer() -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Rows in 4 dims: cluster 7 of 7 rows around e0, laid out symmetrically so that the
    centroid of its normalised rows is exactly e0 (its row "centre" nearest, then "near+" and
    "near-"), one of them 100 times longer than the others (a mean of the raw rows would lean
    its way); cluster 3 of 4 rows, cluster 5 of 2, and 10 rows of noise (-1). Interleaved, so
    a cluster's rows fall in several chunks. Returns vectors, assignments, named rows."""
    e = np.eye(4)
    named = {
        "centre": e[0],
        "near+": e[0] + 0.1 * e[1],
        "near-": e[0] - 0.1 * e[1],
        "mid+": e[0] + 0.5 * e[2],
        "mid-": e[0] - 0.5 * e[2],
        "far+": 100 * (e[0] + 0.9 * e[1]),  # long: the raw mean leans to it
        "far-": e[0] - 0.9 * e[1],
    }
    rng = np.random.default_rng(0)
    others = [(3, e[3] + rng.normal(0, 0.1, 4)) for _ in range(4)]
    others += [(5, e[2] + rng.normal(0, 0.1, 4)) for _ in range(2)]
    others += [(-1, rng.normal(0, 1, 4)) for _ in range(10)]
    rows: list[tuple[str | int, np.ndarray]] = [
        *[(name, v) for name, v in named.items()],
        *[(number, v) for number, v in others],
    ]
    order = rng.permutation(len(rows))
    rows = [rows[i] for i in order]
    vectors = np.array([v for _, v in rows], np.float32)
    assignments = np.array([7 if isinstance(k, str) else k for k, _ in rows])
    where = {k: i for i, (k, _) in enumerate(rows) if isinstance(k, str)}
    return vectors, assignments, where


def test_the_sheet_shows_the_largest_clusters_their_central_rows_and_a_seeded_sample(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    vectors, assignments, row = sheet_layer()
    monkeypatch.setattr(cluster, "SHEET_ROWS", 2)
    monkeypatch.setattr(cluster, "CHUNK_VALUES", 3 * 4)  # three rows a chunk
    shown = sheet_clusters(vectors, assignments, per_cluster=6, seed=0)
    # The two largest, largest first: noise (10 rows) is no cluster, cluster 5 (2) is left out.
    assert [(c.number, len(c.members)) for c in shown] == [(7, 7), (3, 4)]
    seven = shown[0]
    assert seven.central[0] == row["centre"]
    assert set(seven.central) == {row["centre"], row["near+"], row["near-"]}
    # The random half: 3 of the 4 others, never a central one; drawn again with the seed.
    others = {row["mid+"], row["mid-"], row["far+"], row["far-"]}
    assert len(seven.random) == 3 and set(seven.random) <= others
    again = sheet_clusters(vectors, assignments, per_cluster=6, seed=0)
    assert [c.random.tolist() for c in again] == [c.random.tolist() for c in shown]
    draws = {
        tuple(sheet_clusters(vectors, assignments, per_cluster=6, seed=s)[0].random)
        for s in range(8)
    }
    assert len(draws) > 1  # the seed decides the sample
    # A small cluster: as many central rows as asked, the rest (if any) at random.
    assert len(shown[1].central) == 3 and len(shown[1].random) == 1
    assert set(shown[1].central) | set(shown[1].random) == set(np.flatnonzero(assignments == 3))
    # The mean of the raw rows would put the long row first: the rows are normalised.
    raw = vectors[assignments == 7].mean(axis=0)
    members = np.flatnonzero(assignments == 7)
    assert members[np.argmax(normalise(vectors[members]) @ normalise(raw[None])[0])] == row["far+"]


def test_choosing_the_sheets_images_copies_no_more_than_a_chunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The centroids and each row's nearness to its own are found a chunk at a time: numpy's
    peak beyond the layer is a few numbers a row, never a copy of the rows."""
    import tracemalloc

    vectors = np.random.default_rng(0).standard_normal((40_000, 64), dtype=np.float32)
    assignments = np.random.default_rng(1).integers(0, 50, len(vectors))
    monkeypatch.setattr(cluster, "CHUNK_VALUES", 64 * 1000)
    sheet_clusters(vectors[:100], assignments[:100], per_cluster=8, seed=0)  # numpy's first use
    tracemalloc.start()
    sheet_clusters(vectors, assignments, per_cluster=8, seed=0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # A few numbers a row (its place, its norm, its nearness: 1.3 MB here), a chunk at a time.
    assert peak < vectors.nbytes / 4, peak


def test_contact_sheet_rows_say_size_and_majority_label_and_show_the_chosen_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vectors, assignments, row = sheet_layer()
    monkeypatch.setattr(cluster, "SHEET_ROWS", 2)
    ids = [f"{i:02d}.png" for i in range(len(vectors))]
    for i, name in enumerate(ids):
        write_image(tmp_path / name, np.full((12, 16, 3), 10 * i, np.uint8))
    labels: list[str | None] = ["dog"] * len(ids)
    labels[row["centre"]] = labels[row["near+"]] = labels[row["mid+"]] = "cat"
    labels[row["far+"]] = labels[row["far-"]] = "cat"
    labels[row["mid-"]] = None  # 6 of 7 labelled, 5 of them cats
    embeddings = Embeddings(ids, labels, vectors, {})
    figure = contact_sheet(embeddings, assignments, tmp_path, per_cluster=6, title="t", seed=0)
    headings = [t.get_text() for t in texts(figure, "row-title")]
    assert headings == [
        "cluster 7: 7 images; majority label 'cat': 83% (5 of 6 labelled)",
        "cluster 3: 4 images; majority label 'dog': 100% (4 of 4)",
    ]
    title = figure.texts[0].get_text()
    assert "the 2 largest of 3" in title and "noise, 10 images, not shown" in title
    chosen = sheet_clusters(vectors, assignments, per_cluster=6, seed=0)
    central = [ax.get_gid() for ax in thumbnails(figure, "central")]
    random = [ax.get_gid() for ax in thumbnails(figure, "random")]
    assert central == [str(tmp_path / ids[i]) for c in chosen for i in c.central]
    assert random == [str(tmp_path / ids[i]) for c in chosen for i in c.random]
    assert len(lines(figure, "separator")) == 2
    # Each caption: the file and its label, red where it is not the row's majority label.
    captions = {t.get_text(): t.get_color() for t in figure.texts}
    assert captions[f"{ids[row['centre']]}\ncat"] == "black"
    assert captions[f"{ids[row['near-']]}\ndog"] == "firebrick"


def test_a_sheet_without_labels_or_clusters_still_says_what_it_shows(tmp_path: Path) -> None:
    vectors = np.eye(3, dtype=np.float32)
    embeddings = Embeddings(["a.png", "b.png", "c.png"], None, vectors, {})
    figure = contact_sheet(embeddings, np.array([0, 0, 1]), tmp_path, per_cluster=1, title="t")
    assert [t.get_text() for t in texts(figure, "row-title")] == [
        "cluster 0: 2 images",
        "cluster 1: 1 image",
    ]
    assert not thumbnails(figure, "random")  # one image a cluster: the central one
    assert all(ax.texts[0].get_text() == "unreadable" for ax in thumbnails(figure, "central"))
    noise = contact_sheet(embeddings, np.array([-1, -1, -1]), tmp_path, 8, "t")
    assert any("every image is noise" in t.get_text() for t in noise.texts)


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


# --- near-duplicate pairs -----------------------------------------------------------------------


def pairs_layer(tmp_path: Path, similarities: list[float]) -> tuple[pd.DataFrame, list[str]]:
    """Candidate pairs (i, i + 1) with these similarities, most similar first, and the images."""
    ids = [f"{i:02d}.png" for i in range(len(similarities) + 1)]
    for i, name in enumerate(ids):
        write_image(tmp_path / name, np.full((20, 30, 3), 7 * i % 256, np.uint8))
    candidates = pd.DataFrame(
        {"a": range(len(similarities)), "b": range(1, len(ids)), "similarity": similarities}
    )
    return candidates, ids


def test_top_pairs_are_a_grid_cut_by_a_line_at_the_threshold(tmp_path: Path) -> None:
    candidates, ids = pairs_layer(tmp_path, [0.99, 0.95, 0.93, 0.91, 0.88, 0.86, 0.84, 0.8, 0.7])
    shown = dedup.around_threshold(candidates, threshold=0.87, count=8)
    figure = review.top_pairs_figure(shown, ids, tmp_path, 0.87, "t")
    numbers = sorted(
        texts(figure, "similarity"),
        key=lambda t: (-round(t.get_position()[1], 4), t.get_position()[0]),
    )
    values = [float(t.get_text()) for t in numbers]
    assert values == [0.95, 0.93, 0.91, 0.88, 0.86, 0.84, 0.8, 0.7]  # in reading order
    (line,) = lines(figure, "threshold")
    at = line.get_ydata()[0]
    assert all((t.get_position()[1] > at) == (float(t.get_text()) >= 0.87) for t in numbers)
    # No thumbnail straddles the line: four pairs wholly above it, four wholly below.
    firsts = thumbnails(figure, "a")
    assert len([ax for ax in firsts if ax.get_position().y0 > at]) == 4
    assert len([ax for ax in firsts if ax.get_position().y1 < at]) == 4
    assert line.get_xdata()[1] - line.get_xdata()[0] > 0.9
    assert [t.get_text() for t in texts(figure, "threshold")] == ["threshold 0.870"]
    # Each pair: its two images, a left of b; the first pair shown is the most similar.
    first_a, first_b = thumbnails(figure, "a")[0], thumbnails(figure, "b")[0]
    assert (first_a.get_gid(), first_b.get_gid()) == (
        str(tmp_path / ids[1]),
        str(tmp_path / ids[2]),
    )
    width, height = figure.get_size_inches()
    assert 0.5 <= width / height <= 2.5
    assert first_a.get_position().width * width * plots.DPI >= 127  # 128-pixel thumbnails


@pytest.mark.parametrize("count", [1, 2, 5, 12, 40])
def test_the_pairs_figure_keeps_a_sane_shape_however_many(tmp_path: Path, count: int) -> None:
    similarities = sorted(np.linspace(0.5, 0.99, count).round(3).tolist(), reverse=True)
    candidates, ids = pairs_layer(tmp_path, similarities)
    figure = review.top_pairs_figure(candidates, ids, tmp_path, 0.75, "t")
    width, height = figure.get_size_inches()
    assert 0.5 <= width / height <= 2.5, (count, width, height)
    assert len(texts(figure, "similarity")) == count


def test_pairs_all_on_one_side_still_show_where_the_threshold_is(tmp_path: Path) -> None:
    candidates, ids = pairs_layer(tmp_path, [0.99, 0.98])
    figure = review.top_pairs_figure(candidates, ids, tmp_path, 0.9, "t")
    (line,) = lines(figure, "threshold")
    assert all(t.get_position()[1] > line.get_ydata()[0] for t in texts(figure, "similarity"))
    assert any(t.get_text().endswith(": none") for t in figure.texts)


# --- feature maps -------------------------------------------------------------------------------


@pytest.mark.parametrize("normalise_by", ["channel", "layer"])
def test_feature_maps_have_a_colour_scale_and_an_overlay_on_the_input(normalise_by: str) -> None:
    maps = np.zeros((4, 8, 8), np.float32)
    maps[2, 1:3, 1:3] = 5.0  # the strongest channel, hot in the top-left quarter
    maps[3] = np.linspace(-1, 1, 64).reshape(8, 8)
    picture = np.full((64, 96, 3), 0.5, np.float32)
    figure = pictures.feature_figure(picture, maps, [2, 3, 0, 1], "t", normalise_by)
    (overlay,) = [ax for ax in figure.axes if any(im.get_gid() == "overlay" for im in ax.images)]
    under, heat = overlay.images
    assert under.get_array().shape == picture.shape  # the input, the map blended over it
    assert heat.get_array().shape == picture.shape[:2] and np.ndim(heat.get_alpha()) == 2
    y, x = np.unravel_index(np.argmax(heat.get_array()), picture.shape[:2])
    assert y < 32 and x < 48  # upsampled where the channel is hot
    scales = [ax for ax in figure.axes if ax.get_label() == "<colorbar>"]
    assert len(scales) == 2  # the overlay's and the maps'
    grid = [ax for ax in figure.axes if ax.get_title().startswith("channel ")]
    assert [ax.get_title().split("\n")[0] for ax in grid] == [f"channel {c}" for c in (2, 3, 0, 1)]
    limits = grid[1].images[0].get_clim()
    assert limits == ((0, 1) if normalise_by == "channel" else (-1, 5))
