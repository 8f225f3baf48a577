"""python -m pipeline.explore [overrides]: one layer's images on a map, in Embedding Atlas.

Builds a table of the layer's images, one row each: `image_id`, `label`, `thumbnail` (JPEG
bytes, the longer side `explore.thumbnail` pixels), `x` and `y` (a 2D map of the L2-normalised
embeddings: UMAP where umap-learn is installed, else PCA), `cluster` (from
`python -m pipeline.cluster`'s assignments.parquet), `duplicate_group` (from
`python -m pipeline.dedup`'s groups.parquet) and `neighbours` (each image's
`explore.neighbours` nearest others by cosine, as row numbers and distances), and opens it in
Embedding Atlas (the `embedding-atlas` package, the `explore` extra): served on
`explore.host`:`explore.port` until Ctrl-C, its URL printed, or with `explore.export=<folder>`
written there as a static site that needs no server of ours (any static file server, offline).

Nothing is downloaded: Embedding Atlas gets our own map and neighbours, never computes
embeddings, and its page's code and DuckDB-WASM ship inside the package.

What costs time is computed once and kept in `explore.output_dir`: `layout.parquet` (the map
and the neighbours, valid while the layer's digest and the settings they were made with are
the same) and `thumbnails.parquet` (valid per image while its file's size and modification
time are). A second run on the same layer only reads them.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import socket
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.config import PipelineConfig, Projection
from pipeline.errors import ConfigError
from pipeline.progress import step, tick
from pipeline.projection import CACHE_KEY, Layout, cached_layout
from pipeline.results import StageResult

# pandas, pyarrow, scikit-learn, umap, faiss and embedding_atlas are imported where they are
# used: this module runs as `python -m pipeline.explore`, and its --help and config errors need
# none of them.
if TYPE_CHECKING:
    import pyarrow as pa

    from pipeline.storage.contract import Embeddings

log = logging.getLogger(__name__)
INSTALL = "pip install 'pipeline[explore]'"
LAYOUT_FILE = "layout.parquet"
THUMBNAILS_FILE = "thumbnails.parquet"
THUMBNAIL_QUALITY = 75
# Columns Embedding Atlas needs but need not show: it hides names that start with "__" from its
# charts, tooltips and table.
ROW = "__row"
NEIGHBOURS = "__neighbours"


def check(cfg: PipelineConfig) -> None:
    """What can be refused before anything is read: the layer, the package, the export folder."""
    from pipeline.storage.contract import existing_embeddings

    existing_embeddings(cfg.embeddings)
    if importlib.util.find_spec("embedding_atlas") is None:
        where = "" if sys.version_info >= (3, 11) else " (on Python 3.11 or later: it needs it)"
        raise ConfigError(
            f"the explorer needs embedding-atlas, which is not installed: {INSTALL}{where}"
        )
    params = cfg.explore
    if params.projection is Projection.umap and importlib.util.find_spec("umap") is None:
        raise ConfigError(
            f"explore.projection=umap needs umap-learn, which is not installed: {INSTALL}, "
            "or explore.projection=pca"
        )
    if params.export is not None:
        check_export_folder(Path(params.export))


def check_export_folder(folder: Path) -> None:
    """An export replaces its folder whole: only a folder that an export wrote (or none)."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"explore.export={folder} is a file: name a folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "data/metadata.json").is_file():
        raise ConfigError(
            f"explore.export={folder} holds other files, which an export would replace: name a "
            "new folder, or one an earlier export wrote"
        )


def run(cfg: PipelineConfig) -> StageResult:
    from pipeline.storage.contract import embeddings_input, existing_embeddings, images_root
    from pipeline.storage.inputs import read_layer

    params = cfg.explore
    source = existing_embeddings(cfg.embeddings)
    embeddings = read_layer(source, cfg.verify)
    record = embeddings_input(source, embeddings.metadata)
    n = len(embeddings.ids)
    if n < 3:
        raise ConfigError(f"embeddings {source} hold {n} image(s): a map needs 3 or more")
    out = Path(params.output_dir)
    layout = cached_layout(out / LAYOUT_FILE, embeddings, record.digest, params)
    embeddings.vectors = np.empty((0, 0), np.float32)  # normalised in place; needed no more
    root = images_root(cfg.images_root, embeddings.metadata)
    with step(f"the thumbnails of {n:,} images"):
        thumbnails = cached_thumbnails(
            out / THUMBNAILS_FILE, embeddings.ids, root, params.thumbnail
        )
    with step("joining the clusters and near-duplicate groups"):
        clusters = joined(Path(params.cluster_dir) / "assignments.parquet", "cluster", embeddings)
        groups = joined(Path(params.dedup_dir) / "groups.parquet", "group", embeddings)
        table = explore_table(embeddings, layout, thumbnails, clusters, groups, params.neighbours)
    title = f"{record.name} ({n:,} images, {layout.method})"
    data = atlas_source(table)
    if params.export is not None:
        folder = Path(params.export)
        with step(f"writing the static site {folder}"):
            export(data, folder)
        summary = (
            f"{title} -> {folder} (a static site: `python -m http.server -d {folder}` and open "
            "the URL it prints; it needs no network)"
        )
        log.info("%s", summary)
        return StageResult(output_dir=folder, inputs=[record], summary=summary)
    serve(data, params.host, params.port, title)
    return StageResult(output_dir=out, inputs=[record], summary=f"{title}: served")


# --- thumbnails ---------------------------------------------------------------------------


def cached_thumbnails(path: Path, ids: list[str], root: Path | None, side: int) -> list:
    """Each image's thumbnail (JPEG bytes, or None where its file cannot be read as an image):
    those kept in `path` for files of the same size and modification time, the others made
    (on every core) and kept there."""
    if root is None or not root.is_dir():
        log.warning(
            "no thumbnails: images_root=%s does not hold the images (set images_root=<their "
            "folder>); the map shows their ids",
            root,
        )
        return [None] * len(ids)
    files = [file_identity(root / i) for i in tick(ids, "reading the files' sizes", unit="file")]
    kept = read_thumbnails(path, side)
    thumbs: list = [None] * len(ids)
    todo = []
    for row, (image_id, identity) in enumerate(zip(ids, files, strict=True)):
        if identity is not None and kept.get(image_id, (None,))[0] == identity:
            thumbs[row] = kept[image_id][1]
        elif identity is not None:
            todo.append(row)
    del kept
    failed: list[str] = []
    if todo:
        made = make_thumbnails([root / ids[row] for row in todo], side, failed)
        for row, data in zip(todo, made, strict=True):
            thumbs[row] = data
        write_thumbnails(path, side, ids, files, thumbs)
    missing = sum(identity is None for identity in files)
    if missing or failed:
        log.warning(
            "%d of %d images have no thumbnail: %d files not found under %s, %d unreadable%s",
            missing + len(failed),
            len(ids),
            missing,
            root,
            len(failed),
            f" (the first: {failed[0]})" if failed else "",
        )
    return thumbs


def file_identity(path: Path) -> tuple[int, int] | None:
    """(size, mtime_ns) of a file, None when there is none."""
    try:
        info = path.stat()
    except OSError:
        return None
    return (info.st_size, info.st_mtime_ns)


def make_thumbnails(paths: list[Path], side: int, failed: list[str]) -> list[bytes | None]:
    """Each file's thumbnail, on a thread per core (OpenCV decodes without the GIL); a file
    that is not an image gets None and its reason in `failed`."""
    from pipeline.images.formats import ImageError
    from pipeline.images.thumbnails import thumbnail_jpeg

    def one(path: Path) -> bytes | None:
        try:
            return thumbnail_jpeg(path, side, THUMBNAIL_QUALITY)
        except (OSError, ImageError) as err:
            failed.append(f"{path}: {err}")
            return None

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        made = pool.map(one, paths, chunksize=64)
        return list(tick(made, "making thumbnails", total=len(paths), unit="image"))


def read_thumbnails(path: Path, side: int) -> dict[str, tuple[tuple[int, int], bytes]]:
    """image_id -> (the file's identity, its thumbnail) kept in `path` at this side."""
    import pyarrow.parquet as pq

    if not path.is_file():
        return {}
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as err:
        log.warning("%s is unreadable (%s): the thumbnails are made again", path, err)
        return {}
    made = json.loads((table.schema.metadata or {}).get(CACHE_KEY, b"{}"))
    if made.get("side") != side:
        return {}
    columns = [table[c].to_pylist() for c in ("image_id", "size", "mtime_ns", "thumbnail")]
    return {i: ((s, m), t) for i, s, m, t in zip(*columns, strict=True)}


def write_thumbnails(path: Path, side: int, ids: list[str], files: list, thumbs: list) -> None:
    import pyarrow as pa

    from pipeline.storage.contract import write_parquet

    rows = [r for r, data in enumerate(thumbs) if data is not None]
    table = pa.table(
        {
            "image_id": pa.array([ids[r] for r in rows], pa.string()),
            "size": pa.array([files[r][0] for r in rows], pa.int64()),
            "mtime_ns": pa.array([files[r][1] for r in rows], pa.int64()),
            "thumbnail": pa.array([thumbs[r] for r in rows], pa.binary()),
        }
    )
    metadata = {CACHE_KEY: json.dumps({"side": side, "quality": THUMBNAIL_QUALITY})}
    write_parquet(path, table.replace_schema_metadata(metadata))


# --- the table ------------------------------------------------------------------------------


def joined(path: Path, column: str, embeddings: Embeddings) -> np.ndarray | None:
    """A stage's `column` for each image, by image_id (-1 where it has none); None when the
    stage's file is not there."""
    import pandas as pd

    if not path.is_file():
        log.info("no %s column: %s does not exist (run that stage first)", column, path)
        return None
    frame = pd.read_parquet(path, columns=["image_id", column])
    found = pd.Series(frame[column].to_numpy(), index=frame["image_id"]).reindex(embeddings.ids)
    matched = int(found.notna().sum())
    if column == "cluster" and matched < len(embeddings.ids):
        log.warning(
            "%s assigns %d of these %d images: made from another layer or dataset?",
            path,
            matched,
            len(embeddings.ids),
        )
    return found.fillna(-1).to_numpy(np.int64)


def explore_table(
    embeddings: Embeddings,
    layout: Layout,
    thumbnails: list,
    clusters: np.ndarray | None,
    groups: np.ndarray | None,
    neighbours: int,
) -> pa.Table:
    """The table Embedding Atlas shows, a row per image in the layer's order: ROW (its number,
    which NEIGHBOURS refers to), image_id, label, thumbnail ({bytes, path}), x, y, cluster,
    duplicate_group (null: none) and NEIGHBOURS ({ids, distances}: the nearest first, cosine
    distances)."""
    import pyarrow as pa

    n, k = len(embeddings.ids), min(neighbours, layout.neighbours.shape[1])
    ids = pa.array(embeddings.ids, pa.string())
    columns: dict[str, pa.Array] = {ROW: pa.array(np.arange(n, dtype=np.int64)), "image_id": ids}
    if embeddings.labels is not None:
        columns["label"] = pa.array(embeddings.labels, pa.string())
    # {bytes, path}, as Hugging Face datasets store images: what Embedding Atlas shows as one.
    pictures = pa.array(thumbnails, pa.binary())
    columns["thumbnail"] = pa.StructArray.from_arrays(
        [pictures, ids], names=["bytes", "path"], mask=pictures.is_null()
    )
    columns["x"] = pa.array(layout.xy[:, 0])
    columns["y"] = pa.array(layout.xy[:, 1])
    for name, values in (("cluster", clusters), ("duplicate_group", groups)):
        if values is not None:
            columns[name] = pa.array(values, mask=values < 0)
    rows, similarity = layout.neighbours[:, :k], layout.similarity[:, :k]
    found = rows >= 0
    offsets = pa.array(np.concatenate([[0], np.cumsum(found.sum(axis=1))]).astype(np.int32))
    distances = np.clip(1 - similarity[found], 0, 2).astype(np.float32)
    columns[NEIGHBOURS] = pa.StructArray.from_arrays(
        [
            pa.ListArray.from_arrays(offsets, pa.array(rows[found])),
            pa.ListArray.from_arrays(offsets, pa.array(distances)),
        ],
        names=["ids", "distances"],
    )
    return pa.table(columns)


# --- Embedding Atlas ------------------------------------------------------------------------


def atlas_source(table: pa.Table) -> object:
    """The table and the view's settings as Embedding Atlas's DataSource: our map and
    neighbours (nothing computed or downloaded by it), the thumbnail as the image, the id as
    the text searched, the points coloured by label (else by cluster). The table stays an Arrow
    table: DataSource hands it to narwhals (for Parquet) and DuckDB, which take it as it is,
    with no Python object per value (pandas would make 100,000 bytes objects of the
    thumbnails) and no pandas metadata in the Parquet file it writes."""
    from embedding_atlas.data_source import DataSource
    from embedding_atlas.options import make_embedding_atlas_props

    data = {"x": "x", "y": "y", "text": "image_id", "image": "thumbnail", "neighbors": NEIGHBOURS}
    props = make_embedding_atlas_props(row_id=ROW, **data)
    colour = next((c for c in ("label", "cluster") if c in table.column_names), None)
    if colour is not None:
        props["defaultChartsConfig"] = {"embedding": {"data": {**data, "category": colour}}}
    # Its automatic labels are words of the text column: here, pieces of file names.
    props["embeddingViewConfig"] = {"autoLabelEnabled": False}
    identifier = f"pipeline-explore-{uuid.uuid4().hex}"  # its cache entries: this run's only
    return DataSource(identifier, table, {"props": props})


def static_files() -> str:
    """The page Embedding Atlas ships (its code, styles and DuckDB-WASM), inside the package."""
    import embedding_atlas

    return str(Path(embedding_atlas.__file__).parent / "static")


def export(data: object, folder: Path) -> None:
    """The static site written beside `folder`, then put in its place in one rename (an earlier
    export there moved aside first, then removed)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    ready = folder.with_name(f".{folder.name}.partial-{uuid.uuid4().hex[:8]}")
    old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
    try:
        data.export_to_folder(static_files(), str(ready))
        if folder.exists():
            folder.rename(old)
        ready.rename(folder)
    finally:
        shutil.rmtree(ready, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def listening_socket(host: str, port: int, tries: int = 20) -> socket.socket:
    """A socket listening on `host`:`port`, or on the next free port above it (0: any)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for candidate in [port] if port == 0 else range(port, min(port + tries, 65536)):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.bind((host, candidate))
        except OSError as err:
            sock.close()
            last = err
            continue
        sock.listen(128)
        return sock
    raise ConfigError(f"cannot listen on {host}:{port} or the {tries - 1} ports above: {last}")


def serve(data: object, host: str, port: int, title: str) -> None:
    """Embedding Atlas on `host`:`port` (the next free port when taken) until Ctrl-C, its URL
    printed on stdout."""
    import uvicorn
    from embedding_atlas.server import make_server

    # The queries run in DuckDB in this process ("server"), so the browser holds only what it
    # shows, not the whole table.
    app = make_server(data, static_path=static_files(), duckdb_uri="server")
    sock = listening_socket(host, port)
    bound, shown = sock.getsockname()[1], f"[{host}]" if ":" in host else host
    print(f"{title}: Embedding Atlas at http://{shown}:{bound}/ (Ctrl-C stops it)", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # a second Ctrl-C, while the server was stopping
        pass
    finally:
        sock.close()
    print("stopped", file=sys.stderr)


if __name__ == "__main__":
    from pipeline.app import main

    main("explore", run, track=False, check=check)
