"""The write path: parts written once with their digests, read whole by every reader the README
shows, staged under a lock, resumed only from parts that are there, published as a complete
set even when a crash interrupts the publish at any step."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline import staging, store
from pipeline.errors import OutputBusy
from pipeline.staging import Staging, published, staging_root
from pipeline.store import (
    MANIFEST_FILE,
    embedding_schema,
    embedding_table,
    failures_table,
    read_embeddings,
    read_metadata,
    write_part,
)

LAYERS = ["blocks.1", "pool"]
DIMS = {"blocks.1": 3, "pool": 5}


def _table(layer: str, ids: list[str], scale: float = 1.0) -> pa.Table:
    schema = embedding_schema(DIMS[layer], True, {"layer": layer, "dim": DIMS[layer]})
    values = np.array([[int(i[3:]) * scale] * DIMS[layer] for i in ids], np.float32)
    return embedding_table(schema, ids, [str(int(i[3:]) % 2) for i in ids], values)


def stage(out: Path, n: int, key: str = "k", scale: float = 1.0, failed: tuple[int, ...] = ()):
    """A whole staged run of n images in chunks of 4, then its publish."""
    ids = [f"img{i}" for i in range(n)]
    with Staging(out, key, LAYERS) as run:
        chunks = run.resume(True)
        if chunks is None:  # an interrupted publish, finished by resume
            return published(out, LAYERS)
        for index, start in enumerate(range(0, n, 4)):
            if index < len(chunks):
                continue
            part = [i for i in ids[start : start + 4] if int(i[3:]) not in failed]
            bad = [(i, "ImageError", "broken") for i in ids[start : start + 4] if i not in part]
            tables = {layer: _table(layer, part, scale) for layer in LAYERS}
            chunks.append(
                run.write_chunk(index, start, min(n, start + 4), tables, failures_table(bad))
            )
        return run.publish(chunks, ids)


def test_parts_carry_the_digest_of_their_bytes_and_bounded_row_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "ROW_GROUP_BYTES", 4 * 5 * 10)  # ten rows of 5 floats
    record = write_part(_table("pool", [f"img{i}" for i in range(95)]), tmp_path / "p.parquet")
    data = (tmp_path / "p.parquet").read_bytes()
    assert record.sha256 == hashlib.sha256(data).hexdigest() and record.bytes == len(data)
    assert record.rows == 95
    metadata = pq.ParquetFile(tmp_path / "p.parquet").metadata
    assert metadata.num_row_groups == 10
    chunk = metadata.row_group(0)
    columns = {chunk.column(i).path_in_schema: chunk.column(i) for i in range(chunk.num_columns)}
    embedding = next(c for name, c in columns.items() if name.startswith("embedding"))
    assert not embedding.has_dictionary_page
    assert list(tmp_path.iterdir()) == [tmp_path / "p.parquet"]  # no temporary file left


def test_every_reader_reads_a_layer_folder_whole_and_in_order(tmp_path: Path) -> None:
    outputs = stage(tmp_path / "out", 10, failed=(3,))
    folder = outputs["pool"].path
    assert folder == tmp_path / "out/pool.parquet" and outputs["pool"].parts == 3
    expected = [f"img{i}" for i in range(10) if i != 3]
    assert pd.read_parquet(folder)["image_id"].tolist() == expected
    assert ds.dataset(folder).to_table().column("image_id").to_pylist() == expected
    glob = str(folder / "*.parquet")
    assert [
        r[0] for r in duckdb.sql(f"SELECT image_id FROM read_parquet('{glob}')").fetchall()
    ] == (expected)
    assert pl.read_parquet(glob)["image_id"].to_list() == expected
    back = read_embeddings(folder)
    assert back.ids == expected and back.vectors.shape == (9, 5) and back.vectors[-1, 0] == 9
    assert read_metadata(folder) == {"layer": "pool", "dim": 5}
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert manifest["rows"] == 9 and manifest["sha256"] == outputs["pool"].sha256
    for part in manifest["parts"]:
        assert hashlib.sha256((folder / part["name"]).read_bytes()).hexdigest() == part["sha256"]
    assert pd.read_parquet(tmp_path / "out/failures.parquet")["image_id"].tolist() == ["img3"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "blocks.1.parquet",
        "failures.parquet",
        "pool.parquet",
    ]


def test_a_record_is_trusted_only_with_its_parts(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with Staging(out, "k", LAYERS) as run:
        for index in range(3):
            ids = [f"img{i}" for i in range(index * 4, index * 4 + 4)]
            run.write_chunk(
                index,
                index * 4,
                index * 4 + 4,
                {layer: _table(layer, ids) for layer in LAYERS},
                failures_table([]),
            )
        (run.dir / "pool.parquet" / "part-000001.parquet").unlink()  # lost in a crash
        (run.dir / "blocks.1.parquet" / "part-000004.parquet").write_bytes(b"half")
        assert [c.index for c in run.resume(True)] == [0]
        assert sorted(p.name for p in (run.dir / "pool.parquet").iterdir()) == [
            "part-000000.parquet"
        ]
        assert not (run.dir / "chunks/000001.json").exists()
        assert run.resume(False) == [] and not list(run.dir.rglob("*.parquet"))


def test_a_second_writer_of_the_same_outputs_is_refused(tmp_path: Path) -> None:
    with Staging(tmp_path / "out", "k", LAYERS), pytest.raises(OutputBusy) as refused:
        Staging(tmp_path / "out", "k", LAYERS).__enter__()
    assert f"pid {os.getpid()}" in str(refused.value)
    with Staging(tmp_path / "out", "k", LAYERS):  # released on exit
        pass


def test_inconsistent_parts_are_never_published(tmp_path: Path) -> None:
    out = tmp_path / "out"
    stage(out, 8)
    old = (out / "pool.parquet" / "part-000000.parquet").read_bytes()
    with Staging(out, "k2", LAYERS) as run:
        tables = {layer: _table(layer, ["img0", "img0", "img2", "img3"]) for layer in LAYERS}
        chunks = [run.write_chunk(0, 0, 4, tables, failures_table([]))]
        tables = {layer: _table(layer, [f"img{i}" for i in range(4, 8)]) for layer in LAYERS}
        chunks.append(run.write_chunk(1, 4, 8, tables, failures_table([])))
        with pytest.raises(RuntimeError, match="inconsistent"):
            run.publish(chunks, [f"img{i}" for i in range(8)])
    assert (out / "pool.parquet" / "part-000000.parquet").read_bytes() == old


@pytest.mark.parametrize("crash_at", range(1, 24))  # a run of 3 chunks takes 23 steps
def test_a_crash_anywhere_in_publishing_ends_in_the_complete_new_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at: int
) -> None:
    """Kill a run at its n-th file-system step (each part's rename, each record's, then each
    step of publishing and cleaning up); the rerun of the same command always ends with the
    whole new set, never a mix or a loss."""
    out = tmp_path / "out"
    stage(out, 10, scale=1.0)  # the old outputs
    steps = {"n": 0}

    def crashing(real):
        def step(*args, **kwargs):
            steps["n"] += 1
            if steps["n"] == crash_at:
                raise KeyboardInterrupt("killed")
            return real(*args, **kwargs)

        return step

    with monkeypatch.context() as patch:
        patch.setattr(staging.os, "rename", crashing(os.rename))
        patch.setattr(staging.os, "replace", crashing(os.replace))
        patch.setattr(staging.shutil, "rmtree", crashing(shutil.rmtree))
        with contextlib.suppress(KeyboardInterrupt):
            stage(out, 10, scale=2.0)
    assert steps["n"] == crash_at, "the run takes fewer steps: update the range"
    for layer in LAYERS:  # readable at every point: old or new, never half
        if (out / f"{layer}.parquet").exists():
            assert len(pd.read_parquet(out / f"{layer}.parquet")) == 10
    stage(out, 10, scale=2.0)  # the rerun
    for layer in LAYERS:
        frame = pd.read_parquet(out / f"{layer}.parquet")
        assert frame["image_id"].tolist() == [f"img{i}" for i in range(10)]
        assert np.stack(frame["embedding"])[:, 0].tolist() == [2.0 * i for i in range(10)]
    assert not [p for p in staging_root(out).iterdir() if p.is_dir()]
