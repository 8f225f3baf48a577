"""python -m pipeline.cluster [overrides]: group one layer's embeddings into clusters.

Reads the layer's Parquet file, L2-normalises, optionally reduces with PCA, clusters with k-means
(k from config, or the number of labels) or HDBSCAN, and writes `assignments.parquet`
(`image_id`, `cluster`), `metrics.json` (silhouette; NMI and adjusted Rand index against the
labels when there are labels), `sizes.json` (images per cluster), `projection.png` and
`contact_sheet.png`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.config import ClusterMethod, PipelineConfig
from pipeline.errors import LABEL_KEYS, ConfigError
from pipeline.progress import step
from pipeline.results import DatasetRef, StageResult, write_headline
from pipeline.search.vectors import normalise

# scikit-learn, pandas, pyarrow and matplotlib are imported where they are used: this module
# runs as `python -m pipeline.cluster`, and its --help and config errors need none of them.
if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from pipeline.storage.contract import Embeddings

log = logging.getLogger(__name__)
# Beyond these sizes a number or picture is computed on a random sample: silhouette costs
# O(N^2) time, a 2D projection needs no more points, and a figure has a pixel limit.
SILHOUETTE_SAMPLE = 10_000
PROJECTION_POINTS = 20_000
SHEET_ROWS = 40  # clusters shown in the contact sheet
SILHOUETTE_MIB = 64  # memory for the silhouette's distance chunks
CONTACT_SHEET = "contact_sheet.png"


def cluster_vectors(
    vectors: np.ndarray,
    method: ClusterMethod,
    k: int | None,
    pca_dim: int | None = None,
    min_cluster_size: int = 5,
    seed: int = 0,
) -> np.ndarray:
    """A cluster number per row (-1: HDBSCAN's noise)."""
    check_params(method, pca_dim, min_cluster_size)
    from sklearn.cluster import HDBSCAN, KMeans
    from sklearn.decomposition import PCA

    points = normalise(vectors)
    if pca_dim is not None:
        dim = min(pca_dim, *points.shape)
        points = PCA(n_components=dim, random_state=seed).fit_transform(points)
    if method is ClusterMethod.hdbscan:
        # `points` is this function's own copy, so HDBSCAN may work in it.
        return HDBSCAN(min_cluster_size=min_cluster_size, copy=False).fit_predict(points)
    if k is None or not 1 <= k <= len(points):
        raise ConfigError(
            f"k-means needs 1 <= cluster.k <= {len(points)} (the images), got {k}"
            + ("; the embeddings have no labels to count" if k is None else "")
        )
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(points)


def check_params(method: ClusterMethod, pca_dim: int | None, min_cluster_size: int) -> None:
    if pca_dim is not None and pca_dim < 1:
        raise ConfigError(f"cluster.pca_dim must be at least 1 (or null: no PCA), got {pca_dim}")
    if method is ClusterMethod.hdbscan and min_cluster_size < 2:
        raise ConfigError(f"cluster.min_cluster_size must be at least 2, got {min_cluster_size}")


def sample_rows(n: int, limit: int, seed: int) -> np.ndarray:
    """All row indices, or `limit` of them drawn at random (sorted), when there are more."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def cluster_metrics(
    vectors: np.ndarray, assignments: np.ndarray, labels: list[str | None] | None, seed: int = 0
) -> dict:
    """Silhouette (cosine; on a random sample of SILHOUETTE_SAMPLE images beyond that), and
    agreement with the labels over the images that have one (a label may be null)."""
    import pandas as pd
    import sklearn
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

    sizes = pd.Series(assignments).value_counts().sort_index()
    metrics: dict = {
        "n_images": len(assignments),
        "n_clusters": int((sizes.index >= 0).sum()),
        "sizes": {str(c): int(n) for c, n in sizes.items()},
    }
    rows = sample_rows(len(assignments), SILHOUETTE_SAMPLE, seed)
    if 2 <= len(np.unique(assignments[rows])) < len(rows):
        # sklearn computes distances in chunks of up to `working_memory` MiB (default 1 GiB).
        with sklearn.config_context(working_memory=SILHOUETTE_MIB):
            silhouette = silhouette_score(vectors[rows], assignments[rows], metric="cosine")
        metrics["silhouette"] = float(silhouette)
    labelled = [i for i, label in enumerate(labels or []) if label is not None]
    if labelled:
        known = [labels[i] for i in labelled]
        metrics["nmi"] = float(normalized_mutual_info_score(known, assignments[labelled]))
        metrics["ari"] = float(adjusted_rand_score(known, assignments[labelled]))
    return metrics


def contact_sheet(
    embeddings: Embeddings, assignments: np.ndarray, images_root: Path, per_cluster: int, title: str
) -> Figure:
    """A row of thumbnails per cluster (the first SHEET_ROWS clusters): what each holds."""
    from pipeline import plots

    rows = []
    for cluster in sorted(set(assignments.tolist()))[:SHEET_ROWS]:
        members = np.flatnonzero(assignments == cluster)[:per_cluster]
        rows.append(
            (
                f"cluster {cluster}\n({(assignments == cluster).sum()})",
                [
                    (
                        images_root / embeddings.ids[i],
                        (embeddings.labels[i] or "") if embeddings.labels else "",
                    )
                    for i in members
                ],
            )
        )
    return plots.image_grid(rows, title)


def check_labels(
    k: int | None, method: ClusterMethod, labels: list[str | None] | None, source: Path
) -> None:
    """k-means needs k, which it takes from the labels; without labels, say which keys give
    them (and that there is no NMI or ARI)."""
    if k is None and method is ClusterMethod.kmeans:
        raise ConfigError(
            f"no labels: set {LABEL_KEYS} and extract again, or set cluster.k "
            f"(k-means takes k from the labels; {source} has none)"
        )
    if not any(label is not None for label in labels or []):
        log.info("no labels: no NMI or ARI against them (%s, and extract again)", LABEL_KEYS)


def check(cfg: PipelineConfig) -> None:
    """What can be refused before anything is read (the command runs it before tracking)."""
    from pipeline.storage.contract import existing_embeddings

    existing_embeddings(cfg.embeddings)
    params = cfg.cluster
    check_params(params.method, params.pca_dim, params.min_cluster_size)


def run(cfg: PipelineConfig) -> StageResult:
    params = cfg.cluster
    source, embeddings, record = read_inputs(cfg)
    k = cluster_count(params.k, embeddings.labels)
    check_labels(k, params.method, embeddings.labels, source)
    with step(f"clustering {len(embeddings.ids):,} images ({params.method.value})"):
        assignments = cluster_vectors(
            embeddings.vectors,
            params.method,
            k,
            params.pca_dim,
            params.min_cluster_size,
            params.seed,
        )
    with step("scoring the clusters"):
        unit = normalise(embeddings.vectors)
        metrics = cluster_metrics(unit, assignments, embeddings.labels, params.seed)
    sizes = metrics.pop("sizes")  # a table, not a metric: beside the metrics, not in them
    out = Path(params.output_dir)
    with step(f"writing {out}"):
        write_tables(out, embeddings, assignments, metrics, sizes, params.headline_file)
    title = f"{source.stem}: {params.method.value}, {metrics['n_clusters']} clusters"
    with step("drawing the pictures"):
        figures = write_figures(out, unit, embeddings, assignments, title, cfg)
    summary = (
        f"{metrics['n_images']} images in {metrics['n_clusters']} clusters"
        + (f" (NMI {metrics['nmi']:.3f}, ARI {metrics['ari']:.3f})" if "nmi" in metrics else "")
        + f" -> {out}"
    )
    log.info("%s", summary)
    return StageResult(
        output_dir=out,
        metrics=metrics,
        artifacts=[out / "metrics.json", out / "sizes.json", *figures],
        inputs=[record],
        summary=summary,
    )


def read_inputs(cfg: PipelineConfig) -> tuple[Path, Embeddings, DatasetRef]:
    """The layer's folder, its embeddings (checked; at least 2 images), and them as the run's
    input."""
    from pipeline.storage.contract import embeddings_input, existing_embeddings
    from pipeline.storage.inputs import read_layer

    source = existing_embeddings(cfg.embeddings)
    embeddings = read_layer(source, cfg.verify)
    record = embeddings_input(source, embeddings.metadata)
    if len(embeddings.ids) < 2:
        raise ConfigError(
            f"embeddings {source} hold {len(embeddings.ids)} image(s): clustering needs 2 or more"
        )
    return source, embeddings, record


def cluster_count(k: int | None, labels: list[str | None] | None) -> int | None:
    """cluster.k, or else the number of distinct labels (None without labels); says how many
    images have no label, which k and the scores against labels leave out."""
    known = [label for label in labels or [] if label is not None]
    if labels and len(known) < len(labels):
        log.info(
            "%d of %d images have no label: k and the scores against labels count the others",
            len(labels) - len(known),
            len(labels),
        )
    return k if k is not None else (len(set(known)) or None)


def write_tables(
    out: Path,
    embeddings: Embeddings,
    assignments: np.ndarray,
    metrics: dict,
    sizes: dict,
    headline_file: str | None,
) -> None:
    """assignments.parquet, metrics.json, sizes.json and the headline figures."""
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    # Written only when the images are there: removed first, so an old sheet never stays
    # beside new assignments.
    (out / CONTACT_SHEET).unlink(missing_ok=True)
    pd.DataFrame({"image_id": embeddings.ids, "cluster": assignments}).to_parquet(
        out / "assignments.parquet", index=False
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "sizes.json").write_text(json.dumps(sizes, indent=2) + "\n")
    write_headline(headline_file, embeddings.metadata["layer"], metrics, ["cluster_nmi"])


def write_figures(
    out: Path,
    unit: np.ndarray,
    embeddings: Embeddings,
    assignments: np.ndarray,
    title: str,
    cfg: PipelineConfig,
) -> list[Path]:
    """projection.png (a sample of PROJECTION_POINTS at most), and the contact sheet when
    images_root holds the images."""
    from pipeline import plots
    from pipeline.storage.contract import images_root

    params = cfg.cluster
    shown = sample_rows(len(unit), PROJECTION_POINTS, params.seed)
    labels = [str(a) for a in assignments[shown]]
    figures = [
        plots.save(plots.projection_figure(unit[shown], labels, title), out / "projection.png")
    ]
    root = images_root(cfg.images_root, embeddings.metadata)
    if root is not None and (root / embeddings.ids[0]).is_file():
        sheet = contact_sheet(embeddings, assignments, root, params.sheet_images, title)
        figures.append(plots.save(sheet, out / CONTACT_SHEET))
    else:
        log.warning("no contact sheet: images_root=%s does not hold the images", root)
    return figures


if __name__ == "__main__":
    from pipeline.app import main

    main("cluster", run, check=check)
