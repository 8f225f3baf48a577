"""The Parquet contract, both sides: part files written once with their digests, and
`read_embeddings` for the downstream stages.

A layer's embeddings are a Parquet dataset: `<output_dir>/<layer>.parquet/`, a folder of part
files (`part-000000.parquet`, ...) in dataset order, with columns `image_id` (string), `label`
(string, when the dataset has labels) and `embedding` (fixed_size_list<float32>[D]), and JSON
metadata under the schema key `pipeline`. `_manifest.json` beside the parts lists each part's
rows, bytes and SHA-256 and the dataset's digest; readers skip it (pyarrow ignores names that
start with `_`). How parts are staged, resumed and published is `staging.py`'s business.

The calibration copies (near-duplicates of a sample of the images, for `dedup.threshold=auto`)
follow the same contract in `<layer>.parquet/_calibration/`, with a `source_id` column naming
the image each copy was made from, and the layer's metadata plus `calibration`. A layer folder
also holds `_images.arrow`, its ledger (`ledger.py`): every image it was published for, the
file's identity, and why an image is not a row.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ConfigError
from pipeline.progress import tick
from pipeline.results import DatasetRef

if TYPE_CHECKING:
    import pyarrow.dataset as ds  # imported by `_dataset`: it loads pandas (0.5 s) with it

METADATA_KEY = b"pipeline"
FAILURES_FILE = "failures.parquet"
FAILURE_COLUMNS = ("image_id", "error", "reason")
MANIFEST_FILE = "_manifest.json"
CALIBRATION_DIR = "_calibration"  # in a layer's folder: its calibration copies, a layer folder
# Rows per row group: small enough that a reader taking a sample of rows decodes little,
# large enough that a full scan is not dominated by per-group overhead.
ROW_GROUP_BYTES = 16 * 2**20


def layer_path(output_dir: Path, layer: str) -> Path:
    """Where a layer's embeddings go: the layer name verbatim, dots kept."""
    return output_dir / f"{layer}.parquet"


def calibration_path(layer: Path) -> Path:
    """Where the calibration copies of a layer's embeddings are: inside its folder, published
    with it (readers of the layer skip `_` folders)."""
    return layer / CALIBRATION_DIR


def layer_folders(folder: Path) -> list[Path]:
    """Every layer folder under an extraction's folder: its own, and those of sweep jobs in
    sub-folders (pool=gem, ...); not the calibration copies."""
    return sorted(
        p
        for p in folder.rglob("*.parquet")
        if p.is_dir() and CALIBRATION_DIR not in p.relative_to(folder).parts
    )


def part_name(index: int) -> str:
    return f"part-{index:06d}.parquet"


def embedding_schema(
    dim: int, labelled: bool, metadata: dict[str, Any], sourced: bool = False
) -> pa.Schema:
    """The contract's schema; `sourced` adds the calibration copies' `source_id` column."""
    fields = [pa.field("image_id", pa.string(), nullable=False)]
    if labelled:
        fields.append(pa.field("label", pa.string()))
    if sourced:
        fields.append(pa.field("source_id", pa.string(), nullable=False))
    fields.append(pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False))
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})


def embedding_table(
    schema: pa.Schema,
    ids: list[str],
    labels: list[str] | None,
    embeddings: np.ndarray,
    sources: list[str] | None = None,
) -> pa.Table:
    """Rows in the contract's layout; `embeddings` is float32 of shape (len(ids), dim)."""
    dim = schema.field("embedding").type.list_size
    if embeddings.shape != (len(ids), dim):
        raise ValueError(
            f"got embeddings of shape {embeddings.shape}, expected ({len(ids)}, {dim})"
        )
    flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1))
    columns = [pa.array(ids, pa.string())]
    if "label" in schema.names:
        columns.append(pa.array(labels, pa.string()))
    if "source_id" in schema.names:
        columns.append(pa.array(sources, pa.string()))
    columns.append(pa.FixedSizeListArray.from_arrays(flat, dim))
    return pa.Table.from_arrays(columns, schema=schema)


@dataclass(frozen=True)
class FileRecord:
    """A file as written: its name, rows, size and SHA-256, known without reading it back."""

    name: str
    rows: int
    bytes: int
    sha256: str


def write_part(table: pa.Table, path: Path) -> FileRecord:
    """Write `table` once, durably, under its final name by an atomic rename.

    The Parquet bytes are built in memory (one part is bounded in size), hashed there and
    written in one go, so the digest costs no second read.
    """
    sink = pa.BufferOutputStream()
    if "embedding" in table.column_names:
        dim = table.schema.field("embedding").type.list_size
        rows_per_group = max(1, ROW_GROUP_BYTES // (4 * dim))
        pq.write_table(
            table,
            sink,
            row_group_size=rows_per_group,
            # Floats neither dictionary-encode nor have useful min/max statistics.
            use_dictionary=[c for c in ("image_id", "label") if c in table.column_names],
            write_statistics=[c for c in ("image_id", "label") if c in table.column_names],
            compression="zstd",
        )
    else:
        pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue().to_pybytes()
    write_bytes(path, data)
    return FileRecord(path.name, len(table), len(data), hashlib.sha256(data).hexdigest())


def write_parquet(path: Path, table: pa.Table) -> None:
    """A small Parquet file (a stage's cache, a table of results) written whole: `write_bytes`."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes(path, buffer.getvalue())


def write_bytes(path: Path, data: bytes) -> None:
    """Write a whole file under a temporary name, flush it to disk, then rename it into place:
    after a crash, the name holds the complete old content or the complete new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with partial.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise disk_error(err, path, len(data)) from err
    os.replace(partial, path)


def write_json(path: Path, value: Any) -> None:
    write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def disk_error(err: OSError, path: Path, needed: int) -> OSError:
    """A full disk as one readable line; other OS errors as they are."""
    import errno
    import shutil

    if err.errno != errno.ENOSPC:
        return err
    free = shutil.disk_usage(path.parent).free
    return ConfigError(
        f"disk full writing {path} ({needed / 2**20:.1f} MiB needed, {free / 2**20:.1f} MiB "
        "free): free some space and rerun the same command; finished work is kept"
    )


def dataset_digest(parts: Sequence[FileRecord]) -> str:
    """One SHA-256 for a folder of parts: over their names and digests, in order."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(f"{part.name} {part.sha256}\n".encode())
    return digest.hexdigest()


def write_manifest(
    folder: Path, parts: Sequence[FileRecord], about: dict[str, Any] | None = None
) -> dict[str, Any]:
    """`_manifest.json` of a layer folder: its parts and digest, for tracking and checks, and
    `about` it (what the extraction needs to tell whether the layer is up to date)."""
    manifest = {
        **(about or {}),
        "rows": sum(p.rows for p in parts),
        "bytes": sum(p.bytes for p in parts),
        "sha256": dataset_digest(parts),
        "parts": [asdict(p) for p in parts],
    }
    write_json(folder / MANIFEST_FILE, manifest)
    return manifest


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """A layer folder's `_manifest.json`, or None for a single file or a foreign folder."""
    file = Path(path) / MANIFEST_FILE
    return json.loads(file.read_text()) if file.is_file() else None


# --- reading -----------------------------------------------------------------------------------

# What to do about a layer that is not what its writer promised. resume=false: a rerun that
# finds the layer up to date (its manifest says so) would otherwise leave it as it is.
EXTRACT_AGAIN = "extract it again (python -m pipeline with the same overrides and resume=false)"


@dataclass
class Embeddings:
    """One layer's embeddings, read back: ids and labels in dataset order, a float32 matrix;
    for calibration copies, the image each was made from."""

    ids: list[str]
    labels: list[str] | None
    vectors: np.ndarray
    metadata: dict[str, Any]
    sources: list[str] | None = None


def existing_embeddings(path: str) -> Path:
    """The path of a layer's embeddings, or a ConfigError that says how to make them."""
    source = Path(path).expanduser()
    if not source.exists():
        raise ConfigError(
            f"embeddings {source} do not exist: run `python -m pipeline` first "
            "(with the same dataset= and model=), or point embeddings= at a layer's .parquet"
        )
    return source


def _dataset(path: str | Path) -> ds.Dataset:
    import pyarrow.dataset as ds

    try:
        return ds.dataset(path, format="parquet")
    except (pa.ArrowInvalid, OSError) as err:
        raise ConfigError(f"{path} is not a Parquet file or folder of them: {err}") from None


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The `pipeline` metadata of a layer's Parquet dataset (folder of parts, or one file)."""
    schema = _dataset(path).schema
    if not schema.metadata or METADATA_KEY not in schema.metadata:
        raise ConfigError(
            f"{path} was not written by this pipeline (no '{METADATA_KEY.decode()}' metadata): "
            "point embeddings= at a layer folder that `python -m pipeline` wrote"
        )
    try:
        metadata = json.loads(schema.metadata[METADATA_KEY])
    except ValueError:
        metadata = None
    if not isinstance(metadata, dict):
        raise ConfigError(
            f"{path}: its '{METADATA_KEY.decode()}' metadata is not a JSON object: point "
            "embeddings= at a layer folder that `python -m pipeline` wrote"
        )
    return metadata


def read_embeddings(path: str | Path, rows: Sequence[int] | None = None) -> Embeddings:
    """Read a layer's embeddings whole, or only the given rows. The vectors are one writable
    float32 matrix, filled a record batch at a time: no second copy of a large layer. What does
    not fit the contract (an id that is null or not text; a vector that is null, not floats, or
    of another length than the other parts') is a ConfigError naming the part that holds it."""
    dataset = _dataset(path)
    metadata = read_metadata(path)
    dim = _vector_dim(path, dataset)
    columns = [c for c in ("image_id", "label", "source_id") if c in dataset.schema.names]
    count = dataset.count_rows() if rows is None else len(rows)
    vectors = np.empty((count, dim), np.float32)
    ids: list[str] = []
    extra: dict[str, list[str]] = {"label": [], "source_id": []}
    batches = _batches(path, dataset, [*columns, "embedding"], rows)
    for file, batch in tick(batches, f"reading {Path(path).name}", count, "row", _rows):
        if batch.column("image_id").null_count:
            raise ConfigError(f"{file} has rows without an image_id (null): {EXTRACT_AGAIN}")
        embedding = batch.column("embedding")
        values = embedding.flatten()
        if embedding.null_count or values.null_count:
            raise ConfigError(f"{file} has null vectors or null values in them: {EXTRACT_AGAIN}")
        start = len(ids)
        ids += batch.column("image_id").to_pylist()
        for column in extra:
            if column in columns:
                extra[column] += batch.column(column).to_pylist()
        vectors[start : len(ids)] = values.to_numpy(zero_copy_only=False).reshape(-1, dim)
    labels = extra["label"] if "label" in columns else None
    sources = extra["source_id"] if "source_id" in columns else None
    return Embeddings(ids, labels, vectors, metadata, sources)


def _vector_dim(path: str | Path, dataset: ds.Dataset) -> int:
    """The vectors' length, the same in every part's schema; a ConfigError naming the first
    part whose columns differ from the others', or whose ids are not text or vectors not of
    the contract's type (fixed-size lists of floats: rows of mixed length are not)."""
    dims: dict[int, str] = {}
    columns = set(dataset.schema.names)
    if not {"image_id", "embedding"} <= columns:
        raise ConfigError(f"{path} has no image_id and embedding columns")
    for fragment in dataset.get_fragments():
        with _readable(fragment.path):
            schema, file = fragment.physical_schema, fragment.path
        if set(schema.names) != columns:
            raise ConfigError(
                f"{file} has columns {sorted(schema.names)}, the layer's first part "
                f"{sorted(columns)}: parts of two extractions; {EXTRACT_AGAIN}"
            )
        ids, vectors = schema.field("image_id").type, schema.field("embedding").type
        ids = ids.value_type if pa.types.is_dictionary(ids) else ids
        if not (pa.types.is_string(ids) or pa.types.is_large_string(ids)):
            raise ConfigError(
                f"{file}: image_id is {ids}, not text (the images' paths): {EXTRACT_AGAIN}"
            )
        if not (pa.types.is_fixed_size_list(vectors) and pa.types.is_floating(vectors.value_type)):
            raise ConfigError(
                f"{file}: embedding is {vectors}, not vectors of one length (a fixed-size list "
                f"of floats): {EXTRACT_AGAIN}"
            )
        dims.setdefault(vectors.list_size, file)
    if len(dims) > 1:
        (a, first), (b, other) = list(dims.items())[:2]
        raise ConfigError(
            f"{path} mixes vectors of {a} values ({Path(first).name}) and of {b} "
            f"({Path(other).name}): parts of two extractions; {EXTRACT_AGAIN}"
        )
    return next(iter(dims))


def _batches(
    path: str | Path, dataset: ds.Dataset, columns: list[str], rows: Sequence[int] | None
) -> Iterator[tuple[str, pa.RecordBatch]]:
    """The record batches in dataset order, each with the file it comes from (for `rows`, the
    layer's path). Each part is read as it is, so a check can name the one that is wrong."""
    if rows is not None:
        with _readable(str(path)):
            taken = dataset.take(pa.array(rows, pa.int64()), columns=columns)
        yield from ((str(path), batch) for batch in taken.to_batches())
        return
    for fragment in dataset.get_fragments():
        with _readable(fragment.path):
            for batch in fragment.to_batches(columns=columns):
                yield fragment.path, batch


def _rows(read: tuple[str, pa.RecordBatch]) -> int:
    return read[1].num_rows


@contextmanager
def _readable(file: str) -> Iterator[None]:
    """Arrow's error for a part it cannot read (cut short, garbled, or a null vector in a
    fixed-size column, which pyarrow cannot read back) as a ConfigError naming the part."""
    try:
        yield
    except (pa.ArrowException, OSError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"{file} cannot be read ({reason}): {EXTRACT_AGAIN}") from None


def embeddings_input(path: Path, metadata: dict[str, Any]) -> DatasetRef:
    """A layer's embeddings as a stage's input: named, and digested from `_manifest.json`
    (bytes are hashed only for a single file written elsewhere)."""
    manifest = read_manifest(path)
    if manifest is not None:
        digest = manifest["sha256"]
    else:
        files = sorted(p for p in path.rglob("*.parquet")) if path.is_dir() else [path]
        digest = dataset_digest(
            [FileRecord(f.name, 0, 0, hashlib.sha256(f.read_bytes()).hexdigest()) for f in files]
        )
    dataset = metadata.get("dataset", {})
    name = dataset.get("name", "?") if isinstance(dataset, dict) else str(dataset)
    return DatasetRef(
        f"{name}/{metadata.get('model')}/{metadata.get('layer')}",
        digest,
        str(path.resolve()),
        "embeddings",
    )


def images_root(configured: str | None, metadata: dict[str, Any]) -> Path | None:
    """Where the image ids point: the configured root, else the one the extraction recorded."""
    dataset = metadata.get("dataset")
    recorded = dataset.get("root") if isinstance(dataset, dict) else None
    root = configured or recorded
    return Path(root).expanduser() if root else None


def count_rows(path: str | Path) -> int:
    return _dataset(path).count_rows()


def failures_table(rows: Sequence[tuple[str, str, str]]) -> pa.Table:
    """Images that could not be used, as (image_id, error, reason) rows."""
    columns = list(zip(*rows, strict=True)) if rows else [(), (), ()]
    return pa.table(
        {
            name: pa.array(list(values), pa.string())
            for name, values in zip(FAILURE_COLUMNS, columns, strict=True)
        }
    )
