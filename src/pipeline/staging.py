"""An extraction's parts on their way to the output folder: locked, resumable after a crash at
any instruction, and published only as a complete, checked set.

    <output_dir's parent>/.<output_dir name>.staging/
        <key>.lock                   held by the run writing <key> (released by the OS if it dies)
        <key>/<layer>.parquet/part-*.parquet
        <key>/failures/part-*.parquet
        <key>/chunks/000000.json     a chunk's record, written after its parts: what a rerun trusts
        <key>/failures.parquet       all failures, written when every chunk is in
        <key>/calibration/<layer>.parquet/  the calibration copies, when the run embeds them
        <key>/publish.json           written once everything is checked: the intent to publish

`<key>` names everything that decides the parts' bytes (config, image list, batch and chunk
size), so a rerun resumes only its own parts. Publishing moves each staged target into the
output folder with renames, the old one moved aside first; `publish.json` lets a rerun finish
a publish that a kill interrupted, so the outputs end as the complete new set. Staging sits
beside the output folder, not in it: the output folder holds published results only (what DVC
hashes), and DVC's removal of a stage's outputs before it runs does not lose resumable work.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.errors import OutputBusy
from pipeline.store import (
    CALIBRATION_DIR,
    FAILURES_FILE,
    FileRecord,
    layer_path,
    part_name,
    read_manifest,
    write_json,
    write_manifest,
    write_part,
)

log = logging.getLogger(__name__)
TRASH_PREFIX = ".trash-"
PUBLISH_FILE = "publish.json"


@dataclass(frozen=True)
class Chunk:
    """A finished chunk of images [start, stop): its rows per layer and failures, as written."""

    index: int
    start: int
    stop: int
    layers: dict[str, FileRecord]
    failures: FileRecord

    @classmethod
    def load(cls, path: Path) -> Chunk:
        raw = json.loads(path.read_text())
        return cls(
            raw["index"],
            raw["start"],
            raw["stop"],
            {name: FileRecord(**r) for name, r in raw["layers"].items()},
            FileRecord(**raw["failures"]),
        )


@dataclass(frozen=True)
class LayerOutput:
    """A published layer folder: where it is, its rows, bytes and content digest."""

    path: Path
    rows: int
    bytes: int
    sha256: str
    parts: int


class Lock:
    """An exclusive OS file lock (flock): released when the process ends, however it ends, so
    a killed run never leaves a stale lock. The holder writes its pid and host into the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def acquire(self, wait: bool) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = self.path.open("a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            file.close()
            return False
        file.seek(0)
        file.truncate()
        file.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}\n")
        file.flush()
        self._file = file
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file releases the lock
            self._file = None


class Staging:
    """The staged parts of one run (use as a context manager: it holds the run's lock)."""

    def __init__(self, output_dir: Path, key: str, layers: Sequence[str]) -> None:
        self.output_dir = output_dir
        self.root = staging_root(output_dir)
        self.dir = self.root / key
        self.layers = list(layers)
        self._lock = Lock(self.root / f"{key}.lock")

    def __enter__(self) -> Staging:
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise OutputBusy(f"output_dir {self.output_dir} is a file: choose a folder")
        if not self._lock.acquire(wait=False):
            raise OutputBusy(
                f"another run ({self._lock.holder()}) is writing the same outputs to "
                f"{self.output_dir}: wait for it to finish, or set output_dir elsewhere"
            )
        self._tidy_others()
        return self

    def __exit__(self, *_: object) -> None:
        self._lock.release()

    def _tidy_others(self) -> None:
        """Finish publishes that a killed run left half done; drop other configs' parts and
        leftover trash. Folders whose lock is held belong to a live run and are left alone."""
        for other in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if other == self.dir:
                continue
            if other.name.startswith(TRASH_PREFIX):
                shutil.rmtree(other, ignore_errors=True)
                continue
            lock = Lock(self.root / f"{other.name}.lock")
            if not lock.acquire(wait=False):
                continue
            try:
                if (other / PUBLISH_FILE).is_file():
                    log.info("finishing the publish of an earlier run, interrupted: %s", other)
                    _finish_publish(other, self.output_dir)
                else:
                    _discard(other)
            finally:
                lock.release()

    # --- resuming --------------------------------------------------------------------------

    def resume(self, enabled: bool) -> list[Chunk] | None:
        """The chunks an earlier run of this key finished, in order; everything else in the
        folder (a chunk under way when it died) is removed. Without `enabled`, none. None when
        an earlier run had written and checked everything and was killed while publishing:
        its publish is finished now, and there is nothing left to do."""
        if (self.dir / PUBLISH_FILE).is_file():
            if enabled:
                _finish_publish(self.dir, self.output_dir)
                return None
            _discard(self.dir)
        chunks: list[Chunk] = []
        if enabled:
            while (record := self.dir / "chunks" / f"{len(chunks):06d}.json").is_file():
                chunk = Chunk.load(record)
                if not self._intact(chunk):
                    break
                chunks.append(chunk)
        kept = {self._part(layer, c.index) for c in chunks for layer in self.layers}
        kept |= {self._failure_part(c.index) for c in chunks}
        kept |= {self.dir / "chunks" / f"{c.index:06d}.json" for c in chunks}
        for path in sorted(self.dir.rglob("*"), reverse=True):
            if path in kept:
                continue
            if path.is_dir():
                if not any(path.iterdir()):
                    path.rmdir()
            else:
                path.unlink()
        return chunks

    def _intact(self, chunk: Chunk) -> bool:
        """A record is trusted only with every file it lists, at the size it lists."""
        files = [(self._part(n, chunk.index), r) for n, r in chunk.layers.items()]
        files.append((self._failure_part(chunk.index), chunk.failures))
        return set(chunk.layers) == set(self.layers) and all(
            path.is_file() and path.stat().st_size == record.bytes for path, record in files
        )

    def _part(self, layer: str, index: int) -> Path:
        return layer_path(self.dir, layer) / part_name(index)

    def _failure_part(self, index: int) -> Path:
        return self.dir / "failures" / part_name(index)

    # --- writing ---------------------------------------------------------------------------

    def write_chunk(
        self, index: int, start: int, stop: int, tables: dict[str, pa.Table], failures: pa.Table
    ) -> Chunk:
        """Each layer's part and the failures part, then the record that vouches for them."""
        chunk = Chunk(
            index,
            start,
            stop,
            {layer: write_part(tables[layer], self._part(layer, index)) for layer in self.layers},
            write_part(failures, self._failure_part(index)),
        )
        write_json(self.dir / "chunks" / f"{index:06d}.json", asdict(chunk))
        return chunk

    def failures(self) -> pa.Table | None:
        parts = sorted((self.dir / "failures").glob("*.parquet"))
        return pa.concat_tables([pq.read_table(p) for p in parts]) if parts else None

    # --- publishing ------------------------------------------------------------------------

    def publish(self, chunks: Sequence[Chunk], ids: Sequence[str]) -> dict[str, LayerOutput]:
        """Check that every image is a row or a failure, once and in order, in every layer;
        then move the new set into the output folder, with the calibration copies staged in
        `calibration/` if any. Nothing old is touched before the check.
        """
        self._check(chunks, ids)
        failures = self.failures()
        write_part(failures, self.dir / FAILURES_FILE)
        for layer in self.layers:
            write_manifest(layer_path(self.dir, layer), [c.layers[layer] for c in chunks])
        targets = [layer_path(Path(), layer).name for layer in self.layers] + [FAILURES_FILE]
        if (self.dir / CALIBRATION_DIR).is_dir():
            targets.append(CALIBRATION_DIR)
        write_json(self.dir / PUBLISH_FILE, {"targets": targets})
        _finish_publish(self.dir, self.output_dir)
        return published(self.output_dir, self.layers)

    def _check(self, chunks: Sequence[Chunk], ids: Sequence[str]) -> None:
        """dinov2's check, made strict: chunks tile the image list, and each layer holds exactly
        the images that did not fail, in dataset order, each once."""
        stops = [0] + [c.stop for c in chunks]
        if [c.start for c in chunks] != stops[:-1] or stops[-1] != len(ids):
            raise RuntimeError(f"staged chunks {stops} do not cover the {len(ids)} images")
        failures = self.failures()
        failed = failures.column("image_id").to_pylist() if failures is not None else []
        if len(set(failed)) != len(failed) or not set(failed) <= set(ids):
            raise RuntimeError("failures repeat an image or name one not in the dataset")
        failed_set = set(failed)
        expected = [i for i in ids if i not in failed_set]
        for layer in self.layers:
            written = ds.dataset(layer_path(self.dir, layer)).to_table(["image_id"])
            if written.column("image_id").to_pylist() != expected:
                raise RuntimeError(
                    f"layer {layer}: {written.num_rows} rows staged, {len(expected)} images "
                    "expected in dataset order; the staged parts are inconsistent "
                    f"(remove {self.dir} and rerun)"
                )


def published(output_dir: Path, layers: Sequence[str]) -> dict[str, LayerOutput]:
    """The published layer folders, as their `_manifest.json` files describe them."""
    outputs = {}
    for layer in layers:
        path = layer_path(output_dir, layer)
        manifest = read_manifest(path)
        outputs[layer] = LayerOutput(
            path, manifest["rows"], manifest["bytes"], manifest["sha256"], len(manifest["parts"])
        )
    return outputs


def staging_root(output_dir: Path) -> Path:
    return output_dir.parent / f".{output_dir.name}.staging"


def _finish_publish(staged: Path, output_dir: Path) -> None:
    """Move every staged target listed in `publish.json` into `output_dir`, then drop the
    staging folder. Safe to repeat after a crash at any point: each step checks what is done.
    """
    lock = Lock(staging_root(output_dir) / "publish.lock")
    lock.acquire(wait=True)  # two runs publishing into one folder take turns
    try:
        targets = json.loads((staged / PUBLISH_FILE).read_text())["targets"]
        output_dir.mkdir(parents=True, exist_ok=True)
        for name in targets:
            source, final = staged / name, output_dir / name
            if not source.exists():
                continue  # moved by an earlier try
            if source.is_dir() and final.exists():
                aside = staged / "replaced" / name
                aside.parent.mkdir(exist_ok=True)
                if aside.exists():
                    shutil.rmtree(aside)
                os.rename(final, aside)
            os.replace(source, final)
        _fsync_dir(output_dir)
    finally:
        lock.release()
    _discard(staged)


def _discard(folder: Path) -> None:
    """Remove a staging folder so that no crash leaves a part of it that looks trustworthy:
    renamed away first (one atomic step), deleted after."""
    trash = folder.parent / f"{TRASH_PREFIX}{folder.name}-{uuid.uuid4().hex[:8]}"
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
