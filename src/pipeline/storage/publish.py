"""Publishing: the new layer folders assembled from reused and new rows, then swapped into the
output folder in one step that every reader sees whole.

A run publishes only the layers it produced. The next state of the output folder is built
beside it under the publish lock: every entry of the current folder that this run does not
replace is hard-linked into it (other layers, from other runs, stay as they are), this run's
layer folders are moved in, and `failures.parquet` is derived from every layer's ledger. Then
one `renameat2(RENAME_EXCHANGE)` swaps the two folders: a reader opening the output folder
sees the previous complete set or the new complete set, never a mixture and never a missing
layer, at every instruction a kill could stop at. Where the file system cannot exchange two
folders the swap is two renames; a kill between them leaves the new set ready beside the
missing folder, and the next run (or publish) moves it in before anything else.

A layer folder is assembled in dataset order from its sources: the published layer's parts
and the run's staged chunks. A source part whose rows come next, whole and in order, is
hard-linked as it is (a grown folder keeps every part before the first change); the other
rows are gathered and written as new parts. Reused rows keep their exact bytes.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.storage import ledger
from pipeline.storage.contract import (
    FAILURES_FILE,
    MANIFEST_FILE,
    FileRecord,
    failures_table,
    layer_path,
    part_name,
    read_manifest,
    write_bytes,
    write_manifest,
    write_part,
)
from pipeline.storage.staging import discard, publish_lock, recover, staging_root

log = logging.getLogger(__name__)
RENAME_EXCHANGE = 2  # linux/fs.h
AT_FDCWD = -100


@dataclass(frozen=True)
class LayerOutput:
    """A published layer folder: where it is, its rows, bytes and content digest."""

    path: Path
    rows: int
    bytes: int
    sha256: str
    parts: int


def published_outputs(output_dir: Path, layers: Sequence[str]) -> dict[str, LayerOutput]:
    """The published layer folders, as their `_manifest.json` files describe them."""
    outputs = {}
    for layer in layers:
        path = layer_path(output_dir, layer)
        manifest = read_manifest(path)
        if manifest is None:
            raise FileNotFoundError(f"{path} has no {MANIFEST_FILE}: it was not published")
        outputs[layer] = LayerOutput(
            path, manifest["rows"], manifest["bytes"], manifest["sha256"], len(manifest["parts"])
        )
    return outputs


@dataclass(frozen=True)
class Source:
    """A folder of parts that rows can be taken from, in its parts' order."""

    folder: Path
    parts: tuple[FileRecord, ...]


def assemble(
    dest: Path,
    images: pa.Table,
    rows_from: tuple[np.ndarray, np.ndarray, np.ndarray],
    sources: Sequence[Source],
    schema: pa.Schema,
    rows_per_part: int,
    about: dict[str, Any],
) -> dict[str, Any]:
    """Write the layer folder `dest`: its rows (the images of the ledger `images` that did not
    fail, in its order), each taken from `sources[s].parts[p]` at offset `o` as `rows_from`
    (three arrays s, p, o) says; then its ledger and `_manifest.json` (with `about`)."""
    dest.mkdir(parents=True)
    source, part, offset = rows_from
    read = _PartReader()
    records: list[FileRecord] = []
    pending: list[tuple[int, int, int, int]] = []  # (source, part, start, stop) slices
    pending_rows = 0

    def flush() -> None:
        nonlocal pending, pending_rows
        if pending:
            table = pa.concat_tables(
                read(sources[s].folder / sources[s].parts[p].name).slice(a, b - a)
                for s, p, a, b in pending
            )
            cast = pa.Table.from_arrays(table.columns, schema=schema)
            records.append(write_part(cast, dest / part_name(len(records))))
        pending, pending_rows = [], 0

    position, total = 0, len(source)
    while position < total:
        s, p, o = int(source[position]), int(part[position]), int(offset[position])
        length = sources[s].parts[p].rows
        if o == 0 and _whole(rows_from, position, length):
            flush()
            record = sources[s].parts[p]
            name = part_name(len(records))
            os.link(sources[s].folder / record.name, dest / name)
            records.append(FileRecord(name, record.rows, record.bytes, record.sha256))
            position += length
            continue
        stop = _run_end(rows_from, position, min(total, position + rows_per_part - pending_rows))
        if pending and pending[-1][:2] == (s, p) and pending[-1][3] == o:
            pending[-1] = (s, p, pending[-1][2], o + stop - position)
        else:
            pending.append((s, p, o, o + stop - position))
        pending_rows += stop - position
        position = stop
        if pending_rows >= rows_per_part:
            flush()
    flush()
    if not records:  # no image is a row: one empty part keeps the schema for readers
        records.append(write_part(schema.empty_table(), dest / part_name(0)))
    _check(dest, images)
    write_bytes(dest / ledger.LEDGER_FILE, ledger.to_bytes(images))
    return write_manifest(dest, records, about)


def _check(folder: Path, images: pa.Table) -> None:
    """dinov2's check, made strict: the layer holds exactly the images of its ledger that did
    not fail, in order, each once."""
    expected = images.filter(images.column("error").is_null()).column("image_id")
    written = ds.dataset(folder, format="parquet").to_table(["image_id"]).column("image_id")
    if not written.equals(expected):
        raise RuntimeError(
            f"{folder.name}: {len(written)} rows assembled, {len(expected)} images expected in "
            f"dataset order; the staged parts are inconsistent (remove {folder.parent.parent} "
            "and rerun)"
        )


def _whole(rows_from: tuple[np.ndarray, np.ndarray, np.ndarray], start: int, length: int) -> bool:
    """Whether the rows from `start` on are one source part, whole and in order."""
    source, part, offset = rows_from
    stop = start + length
    if stop > len(source):
        return False
    return bool(
        (source[start:stop] == source[start]).all()
        and (part[start:stop] == part[start]).all()
        and (offset[start:stop] == np.arange(length)).all()
    )


def _run_end(rows_from: tuple[np.ndarray, np.ndarray, np.ndarray], start: int, limit: int) -> int:
    """The end of the run of consecutive rows of one source part that starts at `start`."""
    source, part, offset = rows_from
    stop = start + 1
    while (
        stop < limit
        and source[stop] == source[start]
        and part[stop] == part[start]
        and offset[stop] == offset[stop - 1] + 1
    ):
        stop += 1
    return stop


class _PartReader:
    """Parts read whole, the last two kept: assembly walks each source in order, so a part is
    read once while its rows are gathered (and memory holds two parts at most)."""

    def __init__(self) -> None:
        self.tables: dict[Path, pa.Table] = {}

    def __call__(self, path: Path) -> pa.Table:
        if path not in self.tables:
            if len(self.tables) >= 2:
                del self.tables[next(iter(self.tables))]
            self.tables[path] = pq.read_table(path)
        return self.tables[path]


# --- the swap ---------------------------------------------------------------------------------


def publish(output_dir: Path, layers: dict[str, Path]) -> None:
    """Make `output_dir` hold its current entries with `layers` (folder name -> an assembled
    folder, moved in) added or replacing theirs, in one step for readers."""
    root = staging_root(output_dir)
    lock = publish_lock(output_dir)
    lock.acquire(wait=True)  # runs of other layers publishing into one folder take turns
    try:
        recover(output_dir)
        name = uuid.uuid4().hex[:12]
        building = root / f"building-{name}"
        building.mkdir(parents=True)
        replaced = set(layers)
        if output_dir.is_dir():
            for entry in output_dir.iterdir():
                if entry.name not in replaced and entry.name != FAILURES_FILE:
                    link_tree(entry, building / entry.name)
        for layer_name, folder in layers.items():
            os.rename(folder, building / layer_name)
        _write_failures(building, output_dir / FAILURES_FILE)
        _fsync_tree(building)
        ready = root / f"ready-{name}"
        os.rename(building, ready)
        _fsync_dir(root)
        _swap(ready, output_dir, root / f"old-{name}")
    finally:
        lock.release()


def _swap(ready: Path, output_dir: Path, old: Path) -> None:
    if not output_dir.exists():
        os.rename(ready, output_dir)
        return
    if _exchange(ready, output_dir):
        discard(ready)  # it holds the previous set now
        return
    os.rename(output_dir, old)  # no exchange here: a kill now is finished by `recover`
    os.rename(ready, output_dir)
    discard(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system cannot."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


@lru_cache(maxsize=1)
def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def link_tree(source: Path, target: Path) -> None:
    """`source` recreated at `target` with hard links: no bytes copied, none changed."""
    if source.is_dir() and not source.is_symlink():
        target.mkdir()
        for entry in source.iterdir():
            link_tree(entry, target / entry.name)
    else:
        os.link(source, target, follow_symlinks=False)


def _write_failures(folder: Path, previous: Path) -> None:
    """`failures.parquet`: every image that is not a row of some layer, once, with its reason.
    Layers published before ledgers existed keep the failures the previous file listed."""
    rows: dict[str, tuple[str, str]] = {}
    legacy = False
    for layer in sorted(p for p in folder.glob("*.parquet") if p.is_dir()):
        images = ledger.read(layer)
        if images is None:
            legacy = True
            continue
        failed = images.filter(images.column("error").is_valid())
        for image_id, error, reason in zip(
            *(failed.column(c).to_pylist() for c in ("image_id", "error", "reason")), strict=True
        ):
            rows.setdefault(image_id, (error, reason))
    if legacy and previous.is_file():
        old = pq.read_table(previous)
        for image_id, error, reason in zip(*(c.to_pylist() for c in old.columns), strict=True):
            rows.setdefault(image_id, (error, reason))
    table = failures_table([(i, e, r) for i, (e, r) in rows.items()])
    write_part(table, folder / FAILURES_FILE)


def _walk_dirs(folder: Path) -> Iterator[Path]:
    yield folder
    for path in folder.rglob("*"):
        if path.is_dir() and not path.is_symlink():
            yield path


def _fsync_tree(folder: Path) -> None:
    """Names made by links and renames are durable once their folders are flushed."""
    for path in _walk_dirs(folder):
        _fsync_dir(path)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
