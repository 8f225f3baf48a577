"""The Parquet contract, both sides: `EmbeddingWriter` streams a layer's embeddings out,
`read_embeddings` brings them back for the downstream stages.

One file per hooked layer, `<output_dir>/<layer>.parquet`, with columns `image_id` (string),
`label` (string, when the dataset has labels) and `embedding` (fixed_size_list<float32>[D]), rows
in dataset order, and JSON metadata under the schema key `pipeline`. A file is written under a
temporary name and appears under its final name only by an atomic rename, once complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.config import ConfigError

METADATA_KEY = b"pipeline"
FAILURES_FILE = "failures.parquet"
FAILURE_COLUMNS = ("image_id", "error", "reason")
PARTS_DIR = ".parts"
# Rows buffered before a row group is written: large enough for efficient reads, small enough
# that memory stays bounded by a few batches, not by the dataset.
ROW_GROUP_BYTES = 32 * 2**20


def layer_path(output_dir: Path, layer: str) -> Path:
    """Where a layer's embeddings go: the layer name verbatim, dots kept."""
    return output_dir / f"{layer}.parquet"


def embedding_schema(dim: int, labelled: bool, metadata: dict[str, Any]) -> pa.Schema:
    fields = [pa.field("image_id", pa.string(), nullable=False)]
    if labelled:
        fields.append(pa.field("label", pa.string()))
    fields.append(pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False))
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})


def embedding_batch(
    schema: pa.Schema, ids: list[str], labels: list[str] | None, embeddings: np.ndarray
) -> pa.RecordBatch:
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
    columns.append(pa.FixedSizeListArray.from_arrays(flat, dim))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _parquet_writer(path: Path, schema: pa.Schema) -> pq.ParquetWriter:
    return pq.ParquetWriter(
        path,
        schema,
        # Floats neither dictionary-encode nor have useful min/max statistics.
        use_dictionary=["image_id", "label"],
        write_statistics=["image_id", "label"],
        compression="zstd",
    )


class EmbeddingWriter:
    """Streams one layer's embeddings to Parquet, a row group at a time.

    Use as a context manager: on a clean exit the file is renamed into place; on an error the
    partial file is removed, so a file under the final name is always complete.
    """

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = path
        self.schema = schema
        self._partial = path.with_name(path.name + ".partial")
        dim = schema.field("embedding").type.list_size
        self._rows_per_group = max(1, ROW_GROUP_BYTES // (4 * dim))
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> EmbeddingWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = _parquet_writer(self._partial, self.schema)
        return self

    def write(self, ids: list[str], labels: list[str] | None, embeddings: np.ndarray) -> None:
        """Append rows, buffered into row groups of about ROW_GROUP_BYTES."""
        self._pending.append(embedding_batch(self.schema, ids, labels, embeddings))
        self._pending_rows += len(ids)
        if self._pending_rows >= self._rows_per_group:
            self._flush()

    def write_table(self, table: pa.Table) -> None:
        """Append a whole table as one row group of its own."""
        self._flush()
        self._writer.write_table(
            table.replace_schema_metadata(self.schema.metadata), row_group_size=max(1, len(table))
        )

    def _flush(self) -> None:
        if self._pending:
            table = pa.Table.from_batches(self._pending, schema=self.schema)
            self._writer.write_table(table, row_group_size=max(1, len(table)))
            self._pending, self._pending_rows = [], 0

    def __exit__(self, exc_type: type | None, *_: object) -> None:
        if exc_type is None:
            self._flush()
            self._writer.close()
            os.replace(self._partial, self.path)
        else:
            self._writer.close()
            self._partial.unlink(missing_ok=True)


def _write_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    pq.write_table(table, partial)
    os.replace(partial, path)


class RunParts:
    """An extraction's progress on disk, so that a run killed at any point resumes.

    Images are taken in chunks, in dataset order. A finished chunk is one part file per layer
    and one of failures, each renamed into place, then a marker; so a restart redoes only the
    chunk that was under way. `merge` streams the parts into the final files. Parts live under
    `<output_dir>/.parts/<key>`, the key naming everything that decides their bytes.
    """

    def __init__(self, output_dir: Path, key: str, schemas: dict[str, pa.Schema]) -> None:
        self.root = output_dir / PARTS_DIR
        self.dir = self.root / key
        self.schemas = schemas

    def start(self, resume: bool) -> int:
        """How many chunks are already done; parts of other configs (or all, without resume)
        are dropped, never mixed in."""
        if self.root.is_dir():
            for other in self.root.iterdir():
                if other != self.dir or not resume:
                    shutil.rmtree(other)
        done = 0
        while (self.dir / f"{done:06d}.done").is_file():
            done += 1
        return done

    def write_chunk(
        self,
        chunk: int,
        ids: list[str],
        labels: list[str] | None,
        embeddings: dict[str, np.ndarray],
        failures: pa.Table,
    ) -> None:
        name = f"{chunk:06d}.parquet"
        for layer, schema in self.schemas.items():
            batch = embedding_batch(schema, ids, labels, embeddings[layer])
            _write_atomic(pa.Table.from_batches([batch]), self.dir / "layers" / layer / name)
        _write_atomic(failures, self.dir / "failures" / name)
        (self.dir / f"{chunk:06d}.done").touch()

    def failures(self) -> pa.Table:
        parts = sorted((self.dir / "failures").glob("*.parquet"))
        return pa.concat_tables([pq.read_table(p) for p in parts]) if parts else failures_table([])

    def merge(self, output_dir: Path) -> None:
        """Write the final files from the parts (a row group per chunk), then drop the parts."""
        for layer, schema in self.schemas.items():
            with EmbeddingWriter(layer_path(output_dir, layer), schema) as writer:
                for part in sorted((self.dir / "layers" / layer).glob("*.parquet")):
                    writer.write_table(pq.read_table(part))
        write_failures(output_dir / FAILURES_FILE, self.failures())
        shutil.rmtree(self.root)


@dataclass
class Embeddings:
    """One layer's embeddings, read back: ids and labels in dataset order, a float32 matrix."""

    ids: list[str]
    labels: list[str] | None
    vectors: np.ndarray
    metadata: dict[str, Any]


def existing_embeddings(path: str) -> Path:
    """The path of a layer's embeddings, or a ConfigError that says how to make them."""
    source = Path(path)
    if not source.exists():
        raise ConfigError(
            f"embeddings {source} do not exist: run `python -m pipeline` first, "
            "or point embeddings= at a layer's .parquet"
        )
    return source


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The `pipeline` metadata of a layer's Parquet file (or folder of part files)."""
    schema = pq.read_schema(path) if Path(path).is_file() else pq.ParquetDataset(path).schema
    return json.loads(schema.metadata[METADATA_KEY])


def read_embeddings(path: str | Path, rows: Sequence[int] | None = None) -> Embeddings:
    """Read a layer's Parquet file (or folder of part files) whole, or only the given rows."""
    if rows is None:
        table = pq.read_table(path)
    else:
        table = ds.dataset(path).take(pa.array(rows, pa.int64()))
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    vectors = column.values.to_numpy(zero_copy_only=False).reshape(-1, dim)
    labels = table.column("label").to_pylist() if "label" in table.column_names else None
    return Embeddings(table.column("image_id").to_pylist(), labels, vectors, read_metadata(path))


def count_rows(path: str | Path) -> int:
    return ds.dataset(path).count_rows()


def failures_table(rows: list[tuple[str, str, str]]) -> pa.Table:
    """Images that could not be used, as (image_id, error, reason) rows."""
    columns = list(zip(*rows, strict=True)) if rows else [(), (), ()]
    return pa.table(
        {
            name: pa.array(list(values), pa.string())
            for name, values in zip(FAILURE_COLUMNS, columns, strict=True)
        }
    )


def write_failures(path: Path, failures: pa.Table) -> None:
    """`failures.parquet`, written atomically."""
    _write_atomic(failures, path)
