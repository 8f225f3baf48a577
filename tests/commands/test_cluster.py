"""Clustering: planted structure recovered, and the CLI writes what the contract says."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import cluster
from pipeline.cluster import cluster_metrics, cluster_vectors, contact_sheet
from pipeline.config import ClusterMethod
from pipeline.errors import ConfigError
from pipeline.search.vectors import normalise
from pipeline.storage.contract import Embeddings

from conftest import composed, run_cli, write_layer


def planted(
    n_clusters: int = 4, per: int = 30, dim: int = 32, seed: int = 0
) -> tuple[np.ndarray, list[str]]:
    """Tight clusters around random directions: the answer is known."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim)) * 5
    vectors = np.concatenate([c + rng.standard_normal((per, dim)) * 0.3 for c in centres])
    return vectors.astype(np.float32), [f"c{i}" for i in range(n_clusters) for _ in range(per)]


@pytest.mark.parametrize("method", [ClusterMethod.kmeans, ClusterMethod.hdbscan])
def test_separated_clusters_are_recovered(method: ClusterMethod) -> None:
    vectors, labels = planted()
    assignments = cluster_vectors(vectors, method, k=4, pca_dim=8, min_cluster_size=5)
    metrics = cluster_metrics(normalise(vectors), assignments, labels)
    assert metrics["nmi"] > 0.99 and metrics["ari"] > 0.99 and metrics["n_clusters"] == 4
    assert metrics["silhouette"] > 0.5 and sum(metrics["sizes"].values()) == 120


@pytest.mark.parametrize("method", [ClusterMethod.kmeans, ClusterMethod.hdbscan])
def test_fitted_on_a_sample_every_row_is_assigned(method: ClusterMethod) -> None:
    """Beyond `sample` (k-means) or `hdbscan_sample` rows, the clusters are fitted on a sample
    and every other row joins its nearest: the planted clusters are still recovered whole."""
    vectors, labels = planted(per=250)
    assignments = cluster_vectors(
        vectors, method, k=4, pca_dim=8, min_cluster_size=5, sample=100, hdbscan_sample=100
    )
    metrics = cluster_metrics(vectors, assignments, labels)
    assert len(assignments) == 1000 and metrics["n_clusters"] == 4
    assert metrics["nmi"] > 0.99 and metrics["ari"] > 0.99


def test_clustering_copies_no_more_than_a_chunk_and_its_samples(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The layer is normalised, projected and assigned a chunk at a time, never copied whole:
    numpy's peak beyond the input is the samples and one chunk (tracemalloc sees numpy's
    buffers), and the input is left as it was."""
    import tracemalloc

    vectors, _ = planted(n_clusters=4, per=10_000, dim=64)  # 10 MiB
    before = vectors.copy()
    monkeypatch.setattr(cluster, "CHUNK_VALUES", 64 * 1000)
    for method in (ClusterMethod.kmeans, ClusterMethod.hdbscan):
        cluster_vectors(vectors[:100], method, k=4)  # what importing the libraries allocates
        tracemalloc.start()
        cluster_vectors(vectors, method, k=4, sample=2000, hdbscan_sample=1000)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        # the assignments (8 bytes a row) and PCA's 32 components (HDBSCAN: 128 bytes a row)
        kept = len(vectors) * (8 + (128 if method is ClusterMethod.hdbscan else 0))
        assert peak - kept < vectors.nbytes / 4, (method, peak)
    np.testing.assert_array_equal(vectors, before)


def test_kmeans_needs_a_k() -> None:
    with pytest.raises(ConfigError, match="no labels to count"):
        cluster_vectors(planted()[0], ClusterMethod.kmeans, k=None)


@pytest.mark.parametrize(
    ("method", "settings", "message"),
    [
        (ClusterMethod.kmeans, {"k": 0}, "cluster.k"),
        (ClusterMethod.kmeans, {"k": 2, "pca_dim": 0}, "cluster.pca_dim"),
        (ClusterMethod.hdbscan, {"k": None, "min_cluster_size": 1}, "cluster.min_cluster_size"),
        (ClusterMethod.kmeans, {"k": 2, "sample": 1}, "cluster.sample"),
        (ClusterMethod.hdbscan, {"k": None, "hdbscan_sample": 0}, "cluster.hdbscan_sample"),
    ],
)
def test_bad_settings_are_config_errors(
    method: ClusterMethod, settings: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        cluster_vectors(planted()[0], method, **settings)


def test_silhouette_on_a_sample_is_close_to_the_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    vectors, labels = planted(per=100)
    assignments = cluster_vectors(vectors, ClusterMethod.kmeans, k=4)
    whole = cluster_metrics(normalise(vectors), assignments, labels)
    monkeypatch.setattr(cluster, "SILHOUETTE_SAMPLE", 100)
    sampled = cluster_metrics(normalise(vectors), assignments, labels)
    assert sampled["silhouette"] == pytest.approx(whole["silhouette"], abs=0.05)
    assert sampled["sizes"] == whole["sizes"]  # the other numbers use every image


def test_contact_sheet_shows_at_most_sheet_rows_clusters(
    monkeypatch: pytest.MonkeyPatch, photos: Path
) -> None:
    monkeypatch.setattr(cluster, "SHEET_ROWS", 2)
    ids = sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*.png"))
    embeddings = Embeddings(ids, None, np.zeros((len(ids), 2), np.float32), {})
    figure = contact_sheet(embeddings, np.arange(len(ids)), photos, per_cluster=3, title="t")
    assert len(figure.axes) == 2  # two clusters of one image each
    rows = [t.get_text() for t in figure.texts if t.get_gid() == "row-title"]
    assert rows == ["cluster 0: 1 image", "cluster 1: 1 image"]
    assert f"the 2 largest of {len(ids)}" in figure.texts[0].get_text()


@pytest.mark.slow
def test_cli_writes_assignments_metrics_and_pictures(tmp_path: Path, photos: Path) -> None:
    ids = sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*.png"))
    vectors, _ = planted(n_clusters=2, per=len(ids) // 2, dim=16)
    labels = [i.split("/")[0] for i in ids]
    layer = write_layer(tmp_path / "embeddings/photos/tiny/pool.parquet", vectors, ids, labels)
    done = run_cli(
        f"embeddings={layer}",
        f"images_root={photos}",
        "tracking=none",
        "cluster.sheet_images=2",  # a cluster of 3: the one nearest its centre, one at random
        module="pipeline.cluster",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    out = tmp_path / "outputs/cluster/photos/tiny/pool"
    assignments = pd.read_parquet(out / "assignments.parquet")
    assert assignments["image_id"].tolist() == ids and assignments["cluster"].nunique() == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_clusters"] == 2 and {"nmi", "ari", "silhouette"} <= set(metrics)
    assert "sizes" not in metrics  # a table, kept out of `dvc metrics show`
    assert sum(json.loads((out / "sizes.json").read_text()).values()) == len(ids)
    with Image.open(out / "projection.png") as projection:
        assert 1.6 < projection.width / projection.height < 3  # by label | by cluster
    with Image.open(out / "contact_sheet.png") as sheet:
        # Two rows of 1-inch thumbnails (110 pixels), each under its heading.
        assert sheet.width >= 600 and 2 * 180 <= sheet.height <= 3 * 180


def test_run_without_images_drops_an_old_contact_sheet(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    vectors, labels = planted(n_clusters=2, per=3, dim=8)
    ids = [f"{i}.png" for i in range(6)]
    layer = write_layer(tmp_path / "l.parquet", vectors, ids, labels)
    out = tmp_path / "out"
    out.mkdir()
    (out / "contact_sheet.png").write_bytes(b"stale")  # from a run that had the images
    cfg = composed(
        "tracking=none",
        f"embeddings={layer}",
        f"cluster.output_dir={out}",
        f"images_root={tmp_path / 'nowhere'}",
    )
    with caplog.at_level(logging.WARNING):
        result = cluster.run(cfg)
    assert result.metrics["n_clusters"] == 2 and "no contact sheet" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == [
        "assignments.parquet",
        "metrics.json",
        "projection.png",
        "sizes.json",
    ]


@pytest.mark.slow
def test_cli_missing_embeddings_is_one_line_exit_2(tmp_path: Path) -> None:
    done = run_cli(
        "embeddings=nope.parquet", "tracking=none", module="pipeline.cluster", cwd=tmp_path
    )
    assert done.returncode == 2 and "embeddings nope.parquet do not exist" in done.stderr
    assert done.stderr.strip().count("\n") == 0


@pytest.mark.slow
def test_stages_do_not_import_torch() -> None:
    """The downstream stages start fast and run where torch is not installed."""
    code = (
        "import sys, pipeline.cluster, pipeline.dedup, pipeline.probe, pipeline.report; "
        "print('torch' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip() == "False"
