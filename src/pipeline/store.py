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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

METADATA_KEY = b"pipeline"
FAILURES_FILE = "failures.parquet"
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


class EmbeddingWriter:
    """Streams one layer's embeddings to Parquet, a row group at a time.

    Use as a context manager: on a clean exit the file is renamed into place; on an error the
    partial file is removed, so a file under the final name is always complete.
    """

    def __init__(self, path: Path, dim: int, labelled: bool, metadata: dict[str, Any]) -> None:
        self.path = path
        self.dim = dim
        self.schema = embedding_schema(dim, labelled, metadata)
        self._partial = path.with_name(path.name + ".partial")
        self._rows_per_group = max(1, ROW_GROUP_BYTES // (4 * dim))
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> EmbeddingWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(
            self._partial,
            self.schema,
            # Floats neither dictionary-encode nor have useful min/max statistics.
            use_dictionary=["image_id", "label"],
            write_statistics=["image_id", "label"],
            compression="zstd",
        )
        return self

    def write(self, ids: list[str], labels: list[str] | None, embeddings: np.ndarray) -> None:
        """Append rows; `embeddings` is float32 of shape (len(ids), dim)."""
        if embeddings.shape != (len(ids), self.dim):
            raise ValueError(
                f"{self.path.name}: got embeddings of shape {embeddings.shape}, "
                f"expected ({len(ids)}, {self.dim})"
            )
        flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1))
        columns = [pa.array(ids, pa.string())]
        if labels is not None:
            columns.append(pa.array(labels, pa.string()))
        columns.append(pa.FixedSizeListArray.from_arrays(flat, self.dim))
        self._pending.append(pa.RecordBatch.from_arrays(columns, schema=self.schema))
        self._pending_rows += len(ids)
        if self._pending_rows >= self._rows_per_group:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            table = pa.Table.from_batches(self._pending, schema=self.schema)
            self._writer.write_table(table, row_group_size=len(table))
            self._pending, self._pending_rows = [], 0

    def __exit__(self, exc_type: type | None, *_: object) -> None:
        if exc_type is None:
            self._flush()
            self._writer.close()
            os.replace(self._partial, self.path)
        else:
            self._writer.close()
            self._partial.unlink(missing_ok=True)


@dataclass
class Embeddings:
    """One layer's embeddings, read back: ids and labels in dataset order, a float32 matrix."""

    ids: list[str]
    labels: list[str] | None
    vectors: np.ndarray
    metadata: dict[str, Any]


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


def write_failures(path: Path, failures: list[tuple[str, str, str]]) -> None:
    """Images that could not be used, as (image_id, error, reason) rows; written atomically."""
    ids, errors, reasons = (list(c) for c in zip(*failures, strict=True)) if failures else ([],) * 3
    table = pa.table(
        {
            "image_id": pa.array(ids, pa.string()),
            "error": pa.array(errors, pa.string()),
            "reason": pa.array(reasons, pa.string()),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    pq.write_table(table, partial)
    os.replace(partial, path)
