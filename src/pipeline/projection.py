"""A layer's images on a 2D map, and each image's nearest others: what the explorer shows,
computed once and kept in a Parquet file while the layer and the settings are the same.

The map is UMAP (cosine) where umap-learn is installed and there are enough images, else the
first two principal components; the neighbours come from `pipeline.search`, and UMAP's graph
is made of them, so umap-learn searches nothing itself.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.config import ExploreConfig, Projection
from pipeline.progress import step

# pyarrow, scikit-learn, umap and the search are imported where they are used: the explorer's
# --help and config errors need none of them.
if TYPE_CHECKING:
    import pyarrow as pa

    from pipeline.storage.contract import Embeddings

log = logging.getLogger(__name__)
# What a kept file was made from, in its Parquet schema metadata.
CACHE_KEY = b"pipeline_explore"
LAYOUT_VERSION = 1
# UMAP's neighbourhood graph: umap-learn's default n_neighbors (each image itself among them);
# the neighbours are searched once, by pipeline.search, for the graph and the table alike.
UMAP_NEIGHBOURS = 15
PCA_SAMPLE = 20_000  # PCA's 2 axes are fitted on this many images at most
CHUNK_ROWS = 8192  # rows projected at once


@dataclass
class Layout:
    """Each image's place on the map, and its nearest others (rows, -1: none) with their
    cosine similarities, nearest first."""

    xy: np.ndarray  # (n, 2) float32
    neighbours: np.ndarray  # (n, k) int64
    similarity: np.ndarray  # (n, k) float32
    method: str  # "umap" or "pca"


def projection_method(choice: Projection, n: int, umap_min_images: int) -> str:
    """umap or pca: auto is UMAP where umap-learn is installed and there are enough images for
    its neighbourhood graph to mean something."""
    if choice is not Projection.auto:
        return choice.value
    if importlib.util.find_spec("umap") is None:
        log.info("the map is PCA's: umap-learn is not installed (pip install umap-learn)")
        return "pca"
    if n < umap_min_images:
        log.info("the map is PCA's: %d images, fewer than explore.umap_min_images", n)
        return "pca"
    return "umap"


def layout_key(digest: str, method: str, params: ExploreConfig, k: int) -> dict:
    """What a layout depends on: the layer's bytes, and the settings it was made with."""
    return {
        "version": LAYOUT_VERSION,
        "layer": digest,
        "projection": method,
        "neighbours": k,
        "seed": params.seed,
    }


def cached_layout(path: Path, embeddings: Embeddings, digest: str, params: ExploreConfig) -> Layout:
    """The layout in `path` when it was made from this layer with these settings; otherwise
    computed (the vectors normalised in place) and kept there."""
    from pipeline.search.vectors import map_rows_in_place, normalise

    n = len(embeddings.ids)
    method = projection_method(params.projection, n, params.umap_min_images)
    k = min(n - 1, max(params.neighbours, UMAP_NEIGHBOURS - 1 if method == "umap" else 0))
    key = layout_key(digest, method, params, k)
    found = read_layout(path, key, embeddings.ids)
    if found is not None:
        log.info("the map and the neighbours from %s (made for this layer before)", path)
        return found
    unit = map_rows_in_place(embeddings.vectors, normalise, embeddings.vectors.shape[1])
    with step(f"the {k} nearest neighbours of {n:,} images"):
        nearest = nearest_neighbours(unit, k, params.seed)
    with step(f"the map of {n:,} images ({method})"):
        if method == "umap":
            xy = umap_map(unit, *nearest, params.seed)
        else:
            xy = pca_map(unit, params.seed)
    layout = Layout(xy, *nearest, method)
    write_layout(path, key, embeddings.ids, layout)
    return layout


def nearest_neighbours(unit: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k most similar others (rows, similarities), by pipeline.search: exact, or
    IVF with its recall measured for large sets on the CPU (it says which)."""
    from pipeline.search import neighbours

    found = neighbours.search(unit, k, threshold=1.0, seed=seed)
    log.info("%s", found.reason)
    return found.knn_indices, found.knn_similarities


def pca_map(unit: np.ndarray, seed: int) -> np.ndarray:
    """The first two principal components, fitted on up to PCA_SAMPLE rows."""
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(seed)
    fitted = unit if len(unit) <= PCA_SAMPLE else unit[np.sort(rng.choice(len(unit), PCA_SAMPLE))]
    pca = PCA(n_components=2, random_state=seed).fit(fitted)
    xy = np.empty((len(unit), 2), np.float32)
    for start in range(0, len(unit), CHUNK_ROWS):
        xy[start : start + CHUNK_ROWS] = pca.transform(unit[start : start + CHUNK_ROWS])
    return xy


def umap_map(unit: np.ndarray, rows: np.ndarray, similarity: np.ndarray, seed: int) -> np.ndarray:
    """UMAP (cosine) on the neighbours already found: its graph is each row and its
    UMAP_NEIGHBOURS - 1 nearest others, so umap-learn searches nothing itself."""
    import umap

    n = len(unit)
    width = min(UMAP_NEIGHBOURS - 1, rows.shape[1])
    indices = np.hstack([np.arange(n)[:, None], rows[:, :width]]).astype(np.int64)
    distances = np.hstack([np.zeros((n, 1)), 1 - similarity[:, :width]]).astype(np.float32)
    distances[indices < 0] = np.inf  # umap-learn skips the -1 of a row with fewer neighbours
    np.maximum(distances, 0, out=distances)  # rounding: a similarity a hair above 1
    reducer = umap.UMAP(
        n_neighbors=width + 1,
        n_components=2,
        metric="cosine",
        precomputed_knn=(indices, distances),
        random_state=seed,  # the same map for the same layer (one thread: umap-learn's rule)
        low_memory=True,
    )
    with warnings.catch_warnings():
        # "no search index: transform unavailable", "random_state overrides n_jobs": both meant.
        warnings.simplefilter("ignore", UserWarning)
        return reducer.fit_transform(unit).astype(np.float32)


def read_layout(path: Path, key: dict, ids: list[str]) -> Layout | None:
    """The layout kept in `path`, if it was made with `key` for these images in this order."""
    import pyarrow.parquet as pq

    if not path.is_file():
        return None
    try:
        schema = pq.read_schema(path)
        made = json.loads((schema.metadata or {}).get(CACHE_KEY, b"{}"))
        if made.get("key") != key:
            return None
        table = pq.read_table(path)
    except (OSError, ValueError) as err:  # unreadable: made again
        log.warning("%s is unreadable (%s): the layout is made again", path, err)
        return None
    if table.column("image_id").to_pylist() != ids:
        return None
    k = key["neighbours"]
    return Layout(
        xy=np.column_stack([table["x"].to_numpy(), table["y"].to_numpy()]).astype(np.float32),
        neighbours=flat_values(table["neighbours"]).reshape(-1, k).astype(np.int64),
        similarity=flat_values(table["similarity"]).reshape(-1, k).astype(np.float32),
        method=key["projection"],
    )


def flat_values(column: pa.ChunkedArray) -> np.ndarray:
    """The values of a fixed-size-list column, one flat array."""
    return np.concatenate([chunk.flatten().to_numpy() for chunk in column.chunks])


def write_layout(path: Path, key: dict, ids: list[str], layout: Layout) -> None:
    import pyarrow as pa

    from pipeline.storage.contract import write_parquet

    k = layout.neighbours.shape[1]
    table = pa.table(
        {
            "image_id": pa.array(ids, pa.string()),
            "x": layout.xy[:, 0],
            "y": layout.xy[:, 1],
            "neighbours": pa.FixedSizeListArray.from_arrays(
                pa.array(layout.neighbours.ravel(), pa.int64()), k
            ),
            "similarity": pa.FixedSizeListArray.from_arrays(
                pa.array(layout.similarity.ravel(), pa.float32()), k
            ),
        }
    )
    write_parquet(path, table.replace_schema_metadata({CACHE_KEY: json.dumps({"key": key})}))
