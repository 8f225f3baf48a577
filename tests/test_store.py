"""The Parquet contract: schema, metadata, order, streaming and atomic appearance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline import store
from pipeline.store import (
    EmbeddingWriter,
    embedding_schema,
    failures_table,
    read_embeddings,
    read_metadata,
    write_failures,
)


def _write(path: Path, n: int, dim: int, batch: int, labelled: bool = True) -> np.ndarray:
    vectors = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    with EmbeddingWriter(
        path, embedding_schema(dim, labelled, {"layer": "x", "dim": dim})
    ) as writer:
        for start in range(0, n, batch):
            ids = [f"img/{i:04d}.jpg" for i in range(start, min(n, start + batch))]
            labels = [str(i % 3) for i in range(start, start + len(ids))] if labelled else None
            writer.write(ids, labels, vectors[start : start + len(ids)])
    return vectors


def test_round_trip_through_pandas_pyarrow_and_reader(tmp_path: Path) -> None:
    path = store.layer_path(tmp_path, "blocks.3")
    vectors = _write(path, n=50, dim=8, batch=7)
    assert path.name == "blocks.3.parquet"
    schema = pq.read_schema(path)
    assert schema.field("embedding").type == pa.list_(pa.float32(), 8)
    assert schema.field("image_id").type == pa.string()
    assert read_metadata(path) == {"layer": "x", "dim": 8}

    frame = pd.read_parquet(path)
    assert frame["image_id"].tolist() == [f"img/{i:04d}.jpg" for i in range(50)]
    np.testing.assert_array_equal(np.stack(frame["embedding"].to_numpy()), vectors)
    assert ds.dataset(path).count_rows() == 50

    back = read_embeddings(path)
    assert back.vectors.dtype == np.float32
    np.testing.assert_array_equal(back.vectors, vectors)
    assert back.labels[:4] == ["0", "1", "2", "0"]


def test_embedding_column_is_not_dictionary_encoded(tmp_path: Path) -> None:
    path = tmp_path / "l.parquet"
    _write(path, n=20, dim=4, batch=20)
    meta = pq.ParquetFile(path).metadata.row_group(0)
    columns = {meta.column(i).path_in_schema: meta.column(i) for i in range(meta.num_columns)}
    embedding = next(c for name, c in columns.items() if name.startswith("embedding"))
    assert not embedding.has_dictionary_page


def test_streams_in_row_groups_bounded_by_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "ROW_GROUP_BYTES", 4 * 16 * 10)  # ten rows of 16 floats
    path = tmp_path / "l.parquet"
    _write(path, n=95, dim=16, batch=5, labelled=False)
    metadata = pq.ParquetFile(path).metadata
    assert metadata.num_row_groups == 10
    assert max(metadata.row_group(i).num_rows for i in range(10)) == 10
    assert read_embeddings(path).labels is None


def test_failed_write_leaves_no_file_under_the_final_name(tmp_path: Path) -> None:
    path = tmp_path / "l.parquet"
    with (
        pytest.raises(RuntimeError),
        EmbeddingWriter(path, embedding_schema(4, False, {})) as writer,
    ):
        writer.write(["a"], None, np.zeros((1, 4), np.float32))
        raise RuntimeError("killed mid-run")
    assert list(tmp_path.iterdir()) == []


def test_wrong_shape_is_refused(tmp_path: Path) -> None:
    with (
        pytest.raises(ValueError, match="expected"),
        EmbeddingWriter(tmp_path / "l.parquet", embedding_schema(4, False, {})) as writer,
    ):
        writer.write(["a", "b"], None, np.zeros((2, 5), np.float32))


def test_failures_table(tmp_path: Path) -> None:
    write_failures(
        tmp_path / "failures.parquet", failures_table([("a.jpg", "ImageError", "empty file")])
    )
    write_failures(tmp_path / "none.parquet", failures_table([]))
    assert pd.read_parquet(tmp_path / "failures.parquet").to_dict("records") == [
        {"image_id": "a.jpg", "error": "ImageError", "reason": "empty file"}
    ]
    assert pd.read_parquet(tmp_path / "none.parquet").columns.tolist() == [
        "image_id",
        "error",
        "reason",
    ]
