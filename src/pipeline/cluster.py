"""python -m pipeline.cluster [overrides]: group one layer's embeddings into clusters.

Reads the layer's Parquet file and clusters its L2-normalised rows, optionally reduced with PCA,
with k-means (k from config, or the number of labels) or HDBSCAN, and writes `assignments.parquet`
(`image_id`, `cluster`), `metrics.json` (silhouette; NMI and adjusted Rand index against the
labels when there are labels), `sizes.json` (images per cluster), `projection.png` and
`contact_sheet.png`.

Every image is assigned, but what is fitted is fitted on a sample, so that a million rows of
1280 floats cost one copy of the layer in memory and minutes on two cores: PCA is fitted on up
to `cluster.sample` images; k-means (faiss, seeded by k-means++) is trained on up to
`cluster.sample` and every image then goes to its nearest centroid; HDBSCAN, on PCA components
(HDBSCAN_DIM unless `cluster.pca_dim` says), clusters up to `cluster.hdbscan_sample` images and
every other image takes the cluster (or the noise) of its nearest clustered neighbour. Rows are
normalised where they are read, a chunk at a time, never the layer as a whole.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
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
# Values normalised, projected or assigned at once: 64 MiB of float32, whatever the layer's size.
CHUNK_VALUES = 16 * 2**20
# k-means: Lloyd iterations (faiss's default); starts, each from its own k-means++ seeding, the
# lowest objective kept (each costs a training: 20-25 s for 100,000 x 1280 and k=100 here); the
# rows k-means++ draws its seeds from (in float64: scikit-learn's float32 path is ~6x slower),
# at least 3 per cluster, as scikit-learn's MiniBatchKMeans seeds from 3 x its batch of 1024.
KMEANS_ITER = 25
KMEANS_STARTS = 3
KMEANS_SEED_ROWS = 3 * 1024
# HDBSCAN's density estimates need few dimensions (and its cost grows with them): without
# cluster.pca_dim it runs on this many PCA components.
HDBSCAN_DIM = 32


def cluster_vectors(
    vectors: np.ndarray,
    method: ClusterMethod,
    k: int | None,
    pca_dim: int | None = None,
    min_cluster_size: int = 5,
    seed: int = 0,
    sample: int = 100_000,
    hdbscan_sample: int = 20_000,
) -> np.ndarray:
    """A cluster number per row (-1: HDBSCAN's noise), for the rows' directions (each is
    L2-normalised as it is read; `vectors` is left as it is). PCA and k-means are fitted on up
    to `sample` rows, HDBSCAN on up to `hdbscan_sample`; every row is assigned."""
    check_params(method, pca_dim, min_cluster_size, sample, hdbscan_sample)
    n = len(vectors)
    if method is ClusterMethod.kmeans and (k is None or not 1 <= k <= n):
        raise ConfigError(
            f"k-means needs 1 <= cluster.k <= {n} (the images), got {k}"
            + ("; the embeddings have no labels to count" if k is None else "")
        )
    if method is ClusterMethod.hdbscan and pca_dim is None and vectors.shape[1] > HDBSCAN_DIM:
        pca_dim = HDBSCAN_DIM
    if pca_dim is not None:
        points, unit = reduce(vectors, pca_dim, sample, seed), False
    else:
        points, unit = vectors, True  # normalised chunk by chunk where they are read
    if method is ClusterMethod.hdbscan:
        return hdbscan_clusters(points, unit, min_cluster_size, hdbscan_sample, seed)
    return kmeans_clusters(points, unit, k, max(sample, k), seed)


def chunks(n: int, dim: int) -> Iterator[slice]:
    """Row ranges of about CHUNK_VALUES values each: what is computed at once."""
    step = max(1, CHUNK_VALUES // max(1, dim))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def rows_of(points: np.ndarray, rows: np.ndarray | slice, unit: bool) -> np.ndarray:
    """Those rows as float32, L2-normalised when `unit`: a copy of them only (a range of rows
    that needs no change is a view)."""
    taken = points[rows]
    if taken.dtype != np.float32 or (unit and isinstance(rows, slice)):
        taken = taken.astype(np.float32)  # a view of the caller's rows: never written to
    return normalise(taken, out=taken) if unit else taken


def reduce(vectors: np.ndarray, dim: int, sample: int, seed: int) -> np.ndarray:
    """The normalised rows' first `dim` principal components (float32), PCA fitted on up to
    `sample` of them and applied a chunk at a time."""
    from sklearn.decomposition import PCA

    fitted = rows_of(vectors, sample_rows(len(vectors), sample, seed), unit=True)
    pca = PCA(n_components=min(dim, *fitted.shape), random_state=seed).fit(fitted)
    out = np.empty((len(vectors), pca.n_components_), np.float32)
    for rows in chunks(*vectors.shape):
        out[rows] = pca.transform(rows_of(vectors, rows, unit=True))
    return out


def kmeans_clusters(points: np.ndarray, unit: bool, k: int, sample: int, seed: int) -> np.ndarray:
    """faiss k-means trained on up to `sample` rows from KMEANS_STARTS k-means++ seedings
    (scikit-learn's), the lowest objective kept; each row then assigned to its nearest
    centroid."""
    import faiss
    from sklearn.cluster import kmeans_plusplus

    from pipeline.search.exact import faiss_gpus

    train = rows_of(points, sample_rows(len(points), sample, seed), unit)
    best = None
    for start in range(KMEANS_STARTS):
        seeds = train[sample_rows(len(train), max(KMEANS_SEED_ROWS, 3 * k), seed + 1 + start)]
        centres, _ = kmeans_plusplus(seeds.astype(np.float64), k, random_state=seed + start)
        kmeans = faiss.Kmeans(
            train.shape[1],
            k,
            niter=KMEANS_ITER,
            seed=seed + start,
            # Train on all of `train`: it is the sample already (and faiss need not warn that
            # a cluster has few points: k may be the labels' count of a small set).
            max_points_per_centroid=len(train),
            min_points_per_centroid=1,
            gpu=faiss_gpus(),  # faiss's GPU k-means where the installed faiss has it; 0: CPU
        )
        kmeans.train(train, init_centroids=centres.astype(np.float32))
        if best is None or kmeans.obj[-1] < best.obj[-1]:
            best = kmeans
    del train
    assignments = np.empty(len(points), np.int64)
    for rows in chunks(*points.shape):
        assignments[rows] = best.index.search(rows_of(points, rows, unit), 1)[1][:, 0]
    return assignments


def hdbscan_clusters(
    points: np.ndarray, unit: bool, min_cluster_size: int, sample: int, seed: int
) -> np.ndarray:
    """scikit-learn's HDBSCAN on up to `sample` rows; every other row takes the cluster (or
    the noise, -1) of its nearest clustered row (faiss, exact)."""
    import faiss
    from sklearn.cluster import HDBSCAN

    fitted_rows = sample_rows(len(points), sample, seed)
    fitted = rows_of(points, fitted_rows, unit)
    # `fitted` is this function's own copy, so HDBSCAN may work in it.
    found = HDBSCAN(min_cluster_size=min_cluster_size, copy=False).fit_predict(fitted)
    if len(fitted_rows) == len(points):
        return found
    log.info(
        "HDBSCAN clustered %d of %d images (cluster.hdbscan_sample); each other image takes "
        "the cluster of its nearest clustered one",
        len(fitted_rows),
        len(points),
    )
    index = faiss.IndexFlatL2(fitted.shape[1])
    index.add(fitted)
    assignments = np.empty(len(points), np.int64)
    for rows in chunks(*points.shape):
        assignments[rows] = found[index.search(rows_of(points, rows, unit), 1)[1][:, 0]]
    assignments[fitted_rows] = found
    return assignments


def check_params(
    method: ClusterMethod, pca_dim: int | None, min_cluster_size: int, sample: int, hdbscan: int
) -> None:
    if pca_dim is not None and pca_dim < 1:
        raise ConfigError(f"cluster.pca_dim must be at least 1 (or null: no PCA), got {pca_dim}")
    if method is ClusterMethod.hdbscan and min_cluster_size < 2:
        raise ConfigError(f"cluster.min_cluster_size must be at least 2, got {min_cluster_size}")
    for key, value in (("sample", sample), ("hdbscan_sample", hdbscan)):
        if value < 2:
            raise ConfigError(f"cluster.{key} must be at least 2, got {value}")


def sample_rows(n: int, limit: int, seed: int) -> np.ndarray:
    """All row indices, or `limit` of them drawn at random (sorted), when there are more."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def cluster_metrics(
    vectors: np.ndarray, assignments: np.ndarray, labels: list[str | None] | None, seed: int = 0
) -> dict:
    """Silhouette (cosine, so the rows need not be normalised; on a random sample of
    SILHOUETTE_SAMPLE images beyond that), and agreement with the labels over the images that
    have one (a label may be null)."""
    import pandas as pd
    from sklearn import config_context
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
        with config_context(working_memory=SILHOUETTE_MIB):
            silhouette = silhouette_score(vectors[rows], assignments[rows], metric="cosine")
        metrics["silhouette"] = float(silhouette)
    # Labels as codes (-1: none): the scores depend only on which images share a label.
    codes = pd.factorize(pd.Series(labels, dtype=object))[0] if labels else np.array([], int)
    labelled = np.flatnonzero(codes >= 0)
    if len(labelled):
        known, found = codes[labelled], assignments[labelled]
        metrics["nmi"] = float(normalized_mutual_info_score(known, found))
        metrics["ari"] = float(adjusted_rand_score(known, found))
    return metrics


@dataclass
class SheetCluster:
    """A cluster on the contact sheet: its number, its rows, those nearest its centroid
    (nearest first) and a seeded random sample of the others."""

    number: int
    members: np.ndarray
    central: np.ndarray
    random: np.ndarray


def sheet_clusters(
    vectors: np.ndarray, assignments: np.ndarray, per_cluster: int, seed: int
) -> list[SheetCluster]:
    """The SHEET_ROWS largest clusters (HDBSCAN's noise is none), largest first: in each, the
    ceil(per_cluster / 2) rows nearest its centroid (the mean of its normalised rows) and the
    rest of `per_cluster` drawn at random from its other rows (seeded). Two passes a chunk at a
    time, no row normalised in a copy: the centroids as sums of the rows weighted by their
    inverse norms, then each row's cosine to its centroid (about 1 s per 100,000 x 1280)."""
    numbers, sizes = np.unique(assignments[assignments >= 0], return_counts=True)
    numbers = numbers[np.lexsort((numbers, -sizes))[:SHEET_ROWS]]
    codes = np.full(len(assignments), -1, np.int64)  # each row's place on the sheet, or -1
    for place, number in enumerate(numbers):
        codes[assignments == number] = place
    inverse_norms = np.zeros(len(assignments), np.float32)
    sums = np.zeros((vectors.shape[1], len(numbers)))
    for rows in chunks(*vectors.shape):
        x = rows_of(vectors, rows, unit=False)  # a view of float32 rows
        norms = np.sqrt(np.einsum("ij,ij->i", x, x))
        np.divide(1, norms, out=inverse_norms[rows], where=norms > 0)
        weights = (codes[rows, None] == np.arange(len(numbers))) * inverse_norms[rows, None]
        sums += x.T @ weights.astype(np.float32)  # (dim, clusters): BLAS's fast way round
    centres = normalise(np.ascontiguousarray(sums.T, np.float32))
    nearness = np.zeros(len(assignments), np.float32)
    for rows in chunks(*vectors.shape):
        inside = codes[rows] >= 0
        scores = rows_of(vectors, rows, unit=False) @ centres.T
        nearness[rows][inside] = scores[inside, codes[rows][inside]]
    nearness *= inverse_norms
    rng, central = np.random.default_rng(seed), math.ceil(per_cluster / 2)
    found = []
    for place, number in enumerate(numbers):
        members = np.flatnonzero(codes == place)
        near = members[np.argsort(-nearness[members], kind="stable")[:central]]
        rest = np.setdiff1d(members, near)
        drawn = rng.choice(rest, min(per_cluster - central, len(rest)), replace=False)
        found.append(SheetCluster(int(number), members, near, np.sort(drawn)))
    return found


def contact_sheet(
    embeddings: Embeddings,
    assignments: np.ndarray,
    images_root: Path,
    per_cluster: int,
    title: str,
    seed: int = 0,
) -> Figure:
    """A row of thumbnails per cluster of `sheet_clusters`, said in the title which."""
    from pipeline.pictures import cluster_sheet

    clusters = sheet_clusters(embeddings.vectors, assignments, per_cluster, seed)
    total, noise = len(np.unique(assignments[assignments >= 0])), int((assignments < 0).sum())
    which = (
        f"all {total} clusters"
        if len(clusters) == total
        else f"the {len(clusters)} largest of {total}"
    )
    central = math.ceil(per_cluster / 2)
    subtitle = (
        f"{which}, largest first"
        + (f" (noise, {noise:,} images, not shown)" if noise else "")
        + f"; each row: the {central} images nearest the cluster's centre | "
        f"{per_cluster - central} of its others at random (seed {seed})"
    )
    return cluster_sheet(
        clusters, embeddings.ids, embeddings.labels, images_root, f"{title}\n{subtitle}"
    )


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
    check_params(
        params.method, params.pca_dim, params.min_cluster_size, params.sample, params.hdbscan_sample
    )


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
            params.sample,
            params.hdbscan_sample,
        )
    with step("scoring the clusters"):
        metrics = cluster_metrics(embeddings.vectors, assignments, embeddings.labels, params.seed)
    sizes = metrics.pop("sizes")  # a table, not a metric: beside the metrics, not in them
    out = Path(params.output_dir)
    with step(f"writing {out}"):
        write_tables(out, embeddings, assignments, metrics, sizes, params.headline_file)
    title = f"{source.stem}: {params.method.value}, {metrics['n_clusters']} clusters"
    with step("drawing the pictures"):
        figures = write_figures(out, embeddings, assignments, title, cfg)
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
    embeddings: Embeddings,
    assignments: np.ndarray,
    title: str,
    cfg: PipelineConfig,
) -> list[Path]:
    """projection.png (the same 2D PCA of a sample of PROJECTION_POINTS at most, coloured by
    label where there are labels, beside it by cluster), and the contact sheet when
    images_root holds the images."""
    from pipeline import plots
    from pipeline.storage.contract import images_root

    params, labels = cfg.cluster, embeddings.labels
    shown = sample_rows(len(assignments), PROJECTION_POINTS, params.seed)
    panels = {"cluster": [str(a) for a in assignments[shown]]}
    if labels and any(label is not None for label in labels):
        panels = {"label": [labels[i] for i in shown], **panels}
    unit = rows_of(embeddings.vectors, shown, unit=True)
    projection = plots.projection_figure(
        unit, f"{title}: 2D PCA of {len(shown):,} of {len(assignments):,} images", panels
    )
    figures = [plots.save(projection, out / "projection.png")]
    root = images_root(cfg.images_root, embeddings.metadata)
    if root is not None and (root / embeddings.ids[0]).is_file():
        sheet = contact_sheet(
            embeddings, assignments, root, params.sheet_images, title, params.seed
        )
        figures.append(plots.save(sheet, out / CONTACT_SHEET))
    else:
        log.warning("no contact sheet: images_root=%s does not hold the images", root)
    return figures


if __name__ == "__main__":
    from pipeline.app import main

    main("cluster", run, check=check)
