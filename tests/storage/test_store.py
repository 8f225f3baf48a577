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

from pipeline.errors import OutputBusy
from pipeline.storage import contract as store
from pipeline.storage import ledger, publish, staging
from pipeline.storage.contract import (
    MANIFEST_FILE,
    embedding_schema,
    embedding_table,
    read_embeddings,
    read_metadata,
    write_part,
)
from pipeline.storage.publish import LayerOutput, published_outputs
from pipeline.storage.staging import Staging, staging_root
from pipeline.storage.update import Plan, publish_changes

LAYERS = ["blocks.1", "pool"]
DIMS = {"blocks.1": 3, "pool": 5}


def _table(layer: str, ids: list[str], scale: float = 1.0) -> pa.Table:
    schema = embedding_schema(DIMS[layer], True, {"layer": layer, "dim": DIMS[layer]})
    values = np.array([[int(i[3:]) * scale] * DIMS[layer] for i in ids], np.float32)
    values = values.reshape(len(ids), DIMS[layer])
    return embedding_table(schema, ids, [str(int(i[3:]) % 2) for i in ids], values)


def images(n: int, changed: tuple[int, ...] = (), skip: tuple[int, ...] = ()) -> pd.DataFrame:
    """A manifest of n images with file identities (no files: the rows are made up), those in
    `changed` with another size, those in `skip` left out."""
    numbers = [i for i in range(n) if i not in skip]
    return pd.DataFrame(
        {
            "image_id": [f"img{i:02d}" for i in numbers],
            "path": [f"/nowhere/img{i:02d}" for i in numbers],
            "label": [str(i % 2) for i in numbers],
            "size": [1000 + i + (7 if i in changed else 0) for i in numbers],
            "mtime_ns": [i for i in numbers],
            "sha256": [None] * len(numbers),
        }
    )


def stage(
    out: Path,
    manifest: pd.DataFrame | int,
    values: str = "v1",
    scale: float = 1.0,
    failed: tuple[int, ...] = (),
    key: str = "k",
    layers: list[str] = LAYERS,
) -> dict[str, LayerOutput]:
    """A run as the extraction does it, with made-up rows: stage what the plan says to embed
    (in chunks of 4), then publish what changed."""
    manifest = images(manifest) if isinstance(manifest, int) else manifest
    with Staging(out, key, layers) as run:
        chunks = run.resume(True)
        plan = Plan.make(manifest, out, layers, values, run, chunks, reuse=True)
        for start in range(0, len(plan.work), 4):
            positions = plan.work[start : start + 4]
            ids = manifest["image_id"].iloc[positions].tolist()
            bad = {
                p: ("ImageError", "broken")
                for p, i in zip(positions, ids, strict=True)
                if _n(i) in failed
            }
            kept = [i for i in ids if _n(i) not in failed]
            tables = {layer: _table(layer, kept, scale) for layer in layers}
            chunks.append(
                run.write_chunk(len(chunks), tables, ledger.table(manifest, positions, bad))
            )
        schemas = {layer: _table(layer, []).schema for layer in layers}
        publish_changes(plan, run, chunks, schemas, 4, values, {"images": 0}, lambda _: None)
        run.clear()
    return published_outputs(out, layers)


def _n(image_id: str) -> int:
    return int(image_id[3:])


def _staged_dirs(out: Path) -> list[Path]:
    root = staging_root(out)
    return [p for p in root.iterdir() if p.is_dir() and p.name != "locks"] if root.is_dir() else []


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
    expected = [f"img{i:02d}" for i in range(10) if i != 3]
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
    assert pd.read_parquet(tmp_path / "out/failures.parquet")["image_id"].tolist() == ["img03"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "blocks.1.parquet",
        "failures.parquet",
        "pool.parquet",
    ]


def test_a_record_is_trusted_only_with_its_parts(tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = images(12)
    with Staging(out, "k", LAYERS) as run:
        for index in range(3):
            ids = [f"img{i:02d}" for i in range(index * 4, index * 4 + 4)]
            run.write_chunk(
                index,
                {layer: _table(layer, ids) for layer in LAYERS},
                ledger.table(manifest, range(index * 4, index * 4 + 4), {}),
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


def test_runs_sharing_a_layer_exclude_each_other_and_disjoint_runs_both_add(
    tmp_path: Path,
) -> None:
    """Another config writing one of the same layers is refused, naming the layer; runs of
    other layers proceed, and each publishes without removing what the other published."""
    out = tmp_path / "out"
    with Staging(out, "k", ["blocks.1"]), pytest.raises(OutputBusy, match=r"blocks\.1"):
        Staging(out, "other-config", ["blocks.1", "pool"]).__enter__()
    stage(out, 8, layers=["pool"], key="a")
    stage(out, 8, layers=["blocks.1"], key="b")
    assert sorted(p.name for p in out.iterdir()) == [
        "blocks.1.parquet",
        "failures.parquet",
        "pool.parquet",
    ]
    assert len(pd.read_parquet(out / "pool.parquet")) == 8


def test_inconsistent_parts_are_never_published(tmp_path: Path) -> None:
    out = tmp_path / "out"
    stage(out, 8)
    old = (out / "pool.parquet" / "part-000000.parquet").read_bytes()
    manifest = images(8)
    with Staging(out, "k2", LAYERS) as run:
        plan = Plan.make(manifest, out, LAYERS, "v2", run, [], reuse=True)
        tables = {layer: _table(layer, ["img00", "img00", "img02", "img03"]) for layer in LAYERS}
        chunks = [run.write_chunk(0, tables, ledger.table(manifest, range(4), {}))]
        tables = {layer: _table(layer, [f"img{i:02d}" for i in range(4, 8)]) for layer in LAYERS}
        chunks.append(run.write_chunk(1, tables, ledger.table(manifest, range(4, 8), {})))
        schemas = {layer: _table(layer, []).schema for layer in LAYERS}
        with pytest.raises(RuntimeError, match="inconsistent"):
            publish_changes(plan, run, chunks, schemas, 4, "v2", {"images": 0}, lambda _: None)
    assert (out / "pool.parquet" / "part-000000.parquet").read_bytes() == old


def test_a_grown_set_reuses_its_rows_and_parts_and_drops_what_left(tmp_path: Path) -> None:
    out = tmp_path / "out"
    stage(out, 10)
    first = {p.name: p.stat().st_ino for p in (out / "pool.parquet").glob("part-*")}
    # Two images added at the end, one removed in the middle, one changed: only three embedded,
    # with another scale so the test can tell new rows from reused ones.
    grown = images(12, changed=(6,), skip=(5,))
    with Staging(out, "k", LAYERS) as run:
        plan = Plan.make(grown, out, LAYERS, "v1", run, [], reuse=True)
    assert [grown["image_id"].iloc[p] for p in plan.work] == ["img06", "img10", "img11"]
    assert plan.counts == {"new": 2, "changed": 1, "removed": 1, "reused": 8, "missing": 0}
    with Staging(out, "k2", [*LAYERS, "head"]) as run:  # a layer the others lack
        plan = Plan.make(grown, out, [*LAYERS, "head"], "v1", run, [], reuse=True)
    assert plan.counts["missing"] == 8 and "(8 for layers that lack them)" in plan.describe()
    stage(out, grown, scale=10.0)
    frame = pd.read_parquet(out / "pool.parquet")
    assert frame["image_id"].tolist() == grown["image_id"].tolist()
    scale = {"img06": 10, "img10": 10, "img11": 10}
    assert [v[0] for v in frame["embedding"]] == [
        _n(i) * scale.get(i, 1) for i in frame["image_id"]
    ]
    # The first part (img00-03) was reused as it is: the same file, hard-linked.
    assert (out / "pool.parquet/part-000000.parquet").stat().st_ino == first["part-000000.parquet"]
    published = ledger.read(out / "pool.parquet")
    assert published.column("image_id").to_pylist() == grown["image_id"].tolist()


def test_a_finished_run_publishes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    stage(out, 10, failed=(4,))
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*")}
    stage(out, 10, failed=(4,))
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*")} == before


def _snapshot(out: Path) -> object:
    """What a reader of `out` sees: each layer's rows and the failures (None: no folder)."""
    if not out.exists():
        return None
    seen = {layer: pd.read_parquet(out / f"{layer}.parquet").to_dict("list") for layer in LAYERS}
    seen["failures"] = pd.read_parquet(out / "failures.parquet")["image_id"].tolist()
    return repr(seen)


UPDATES = {  # a run that replaces every row, and one that adds two images and changes one
    "config": (images(10), {"values": "v2", "scale": 2.0}),
    "grown": (images(12, changed=(6,)), {"scale": 2.0}),
}


@pytest.mark.parametrize("update", UPDATES)
def test_a_crash_anywhere_in_publishing_shows_readers_one_whole_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, update: str
) -> None:
    """Kill a run at each of its file-system steps in turn (each part's write, each record's,
    each link and rename of assembling and publishing, the swap, the cleaning up): a reader
    of the output folder sees the old set or the new set, whole, at every point (never a
    mixture, never a missing layer), and the rerun of the same command ends with the new
    set. The same with a file system that cannot exchange two folders."""
    manifest, settings = UPDATES[update]
    steps = {"n": 0, "crash_at": 0}

    def crashing(real):
        def step(*args, **kwargs):
            steps["n"] += 1
            if steps["n"] == steps["crash_at"]:
                raise KeyboardInterrupt("killed")
            return real(*args, **kwargs)

        return step

    def run(out: Path, crash_at: int) -> int:
        steps.update(n=0, crash_at=crash_at)
        with monkeypatch.context() as patch:
            for name in ("rename", "replace", "link"):  # the os module staging, publish and
                patch.setattr(os, name, crashing(getattr(os, name)))  # store all call
            patch.setattr(publish, "_exchange", crashing(publish._exchange))
            patch.setattr(staging.shutil, "rmtree", crashing(shutil.rmtree))
            with contextlib.suppress(KeyboardInterrupt):
                stage(out, manifest, failed=(3,), **settings)
        return steps["n"]

    stage(tmp_path / "old", 10, failed=(3,))
    stage(tmp_path / "new", 10, failed=(3,))
    stage(tmp_path / "new", manifest, failed=(3,), **settings)
    old, new = _snapshot(tmp_path / "old"), _snapshot(tmp_path / "new")
    assert old != new
    for exchange in (True, False):
        if not exchange:
            monkeypatch.setattr(publish, "_exchange", lambda a, b: False)
        stage(tmp_path / f"count-{exchange}", 10, failed=(3,))
        total, missing = run(tmp_path / f"count-{exchange}", 0), 0
        for crash_at in range(1, total + 1):
            out = tmp_path / f"{exchange}-{crash_at}" / "out"
            stage(out, 10, failed=(3,))  # the old set
            run(out, crash_at)
            seen = _snapshot(out)
            # Without an exchange, the swap is two renames: between them the folder is missing
            # (and the next run moves the new set in); with one, never.
            assert seen in ((old, new) if exchange else (old, new, None)), f"step {crash_at}"
            missing += seen is None
            stage(out, manifest, failed=(3,), **settings)  # the rerun
            assert _snapshot(out) == new
            assert not _staged_dirs(out)
        assert missing == (0 if exchange else 1)
