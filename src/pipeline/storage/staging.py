"""An extraction's work on its way to the output folder: locked, resumable after a crash at any
instruction, and kept apart from what is published until `publish.py` swaps it in.

    <output_dir's parent>/.<output_dir name>.staging/
        runs.lock                    shared by the runs in here; the last one out removes the folder
        locks/<layer>.lock           held by the run writing <layer> (released by the OS if it dies)
        <key>.lock                   held by the run staging into <key>/
        <key>/run.json               the layers <key> stages
        <key>/<layer>.parquet/part-*.parquet   a chunk's rows of each layer
        <key>/images/part-*.parquet  a chunk's ledger: its images, their identity and failures
        <key>/chunks/000000.json     a chunk's record, written after its parts: what a rerun trusts
        <key>/calibration/<layer>.parquet/     calibration copies, when the run embeds them
        <key>/publish/               the new layer folders, assembled for publishing
        building-*, ready-*, old-*   publishes under way (publish.py)

`<key>` names what decides the staged bytes (config, layers, batch and chunk size), not the image
list: a chunk's ledger says which images, and which files, its rows are of, so a rerun after the
folder grew still reuses them. Staging sits beside the output folder, not in it: the output
folder holds published results only (what DVC hashes and readers read). A run that ends with no
other run in the staging folder and nothing there worth keeping (lock files only: no staged
chunks a rerun resumes, no publish a rerun finishes) removes the folder (`tidy`).
"""

from __future__ import annotations

import contextlib
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
import pyarrow.parquet as pq

from pipeline.errors import OutputBusy
from pipeline.storage.contract import FileRecord, layer_path, part_name, write_json, write_part

log = logging.getLogger(__name__)
TRASH_PREFIX = ".trash-"
IMAGES_DIR = "images"
PUBLISH_DIR = "publish"
RUN_FILE = "run.json"
RUNS_LOCK = "runs.lock"  # shared by the runs using a staging folder, exclusive to remove it


@dataclass(frozen=True)
class Chunk:
    """A finished chunk: its rows per layer and the ledger of its images, as written."""

    index: int
    layers: dict[str, FileRecord]
    images: FileRecord

    @classmethod
    def load(cls, path: Path) -> Chunk:
        raw = json.loads(path.read_text())
        return cls(
            raw["index"],
            {name: FileRecord(**r) for name, r in raw["layers"].items()},
            FileRecord(**raw["images"]),
        )


_held: set[Lock] = set()


def _close_in_child() -> None:
    """A forked process (a DataLoader worker) gets a copy of every open file, locks included:
    a flock lives while any copy is open, so a killed run's orphaned workers would hold its
    outputs. The child closes its copies (closing, never unlocking: that would free the
    parent's lock)."""
    for lock in list(_held):
        if lock._file is not None:
            lock._file.close()
            lock._file = None
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


class Lock:
    """An exclusive OS file lock (flock): released when the process ends, however it ends, so
    a killed run never leaves a stale lock, and never held by the processes it forks. The
    holder writes its pid and host into the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def acquire(self, wait: bool, shared: bool = False) -> bool:
        """Take the lock (`shared`: alongside other shared holders, never an exclusive one);
        without `wait`, False at once while another process holds it. A lock file may be
        removed by a process that holds it (`tidy`): a lock got on a file no longer at `path`
        is let go, and taken again on the file there now."""
        mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                file = self.path.open("a+")
            except FileNotFoundError:  # its folder was removed meanwhile
                continue
            except FileExistsError:  # mkdir found the folder, then it was removed before
                folder = self.path.parent  # pathlib looked again: made again, unless a file
                if folder.exists() and not folder.is_dir():
                    raise
                continue
            try:
                fcntl.flock(file, mode)
            except BlockingIOError:
                file.close()
                return False
            if _same_file(file, self.path):
                break
            file.close()
        if not shared:
            file.seek(0)
            file.truncate()
            file.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}\n")
            file.flush()
        self._file = file
        _held.add(self)
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        _held.discard(self)
        if self._file is not None:
            self._file.close()  # closing the file releases the lock
            self._file = None


def _same_file(file: IO[str], path: Path) -> bool:
    """`file` is still the file at `path` (not one removed, or replaced, since it was opened)."""
    try:
        now = path.stat()
    except FileNotFoundError:
        return False
    opened = os.fstat(file.fileno())
    return (opened.st_dev, opened.st_ino) == (now.st_dev, now.st_ino)


class Staging:
    """The staged chunks of one run (use as a context manager: it holds the locks of the run's
    layers, so no other run writes them meanwhile, whatever its config; on leaving, the staging
    folder is removed when no other run is in it and nothing in it is worth keeping)."""

    def __init__(self, output_dir: Path, key: str, layers: Sequence[str]) -> None:
        self.output_dir = output_dir
        self.root = staging_root(output_dir)
        self.dir = self.root / key
        self.layers = list(layers)
        self._locks = [self.root / "locks" / f"{layer}.lock" for layer in sorted(self.layers)]
        self._locks = [Lock(path) for path in self._locks] + [Lock(self.root / f"{key}.lock")]
        self._inside = Lock(self.root / RUNS_LOCK)  # shared: this run is in the folder

    def __enter__(self) -> Staging:
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise OutputBusy(f"output_dir {self.output_dir} is a file: choose a folder")
        self._inside.acquire(wait=True, shared=True)  # waits only while a run removes the folder
        for lock in self._locks:
            if not lock.acquire(wait=False):
                self.__exit__()
                what = lock.path.stem if lock.path.parent.name == "locks" else "these layers"
                raise OutputBusy(
                    f"another run ({lock.holder()}) is writing {what} to {self.output_dir}: "
                    "wait for it to finish, or set output_dir elsewhere"
                )
        try:
            lock = publish_lock(self.output_dir)
            if lock.acquire(wait=False):  # else a publish is under way: it tidies itself
                try:
                    recover(self.output_dir)
                finally:
                    lock.release()
            self._tidy_others()
            self.dir.mkdir(parents=True, exist_ok=True)
            write_json(self.dir / RUN_FILE, {"layers": self.layers})
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        for lock in reversed(self._locks):
            lock.release()
        self._inside.release()
        try:
            tidy(self.root)
        except OSError as err:  # a folder left behind is only untidy
            log.debug("staging folder %s kept: %s", self.root, err)

    def _tidy_others(self) -> None:
        """Drop what no live run needs: trash, and the staged work of dead runs that wrote any
        of this run's layers (this run supersedes it). Dead runs of other layers keep theirs,
        for their own rerun. A folder whose lock is held belongs to a live run."""
        for other in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if other == self.dir or other.name == "locks" or other.name.startswith(PUBLISHING):
                continue
            if other.name.startswith(TRASH_PREFIX):
                shutil.rmtree(other, ignore_errors=True)
                continue
            lock = Lock(self.root / f"{other.name}.lock")
            if not lock.acquire(wait=False):
                continue
            try:
                staged = _staged_layers(other)
                if staged is None or set(staged) & set(self.layers):
                    discard(other)
            finally:
                lock.release()

    def clear(self) -> None:
        """Drop this run's staged work: published, or no longer wanted."""
        if self.dir.exists():
            discard(self.dir)

    # --- resuming --------------------------------------------------------------------------

    def resume(self, enabled: bool) -> list[Chunk]:
        """The chunks an earlier run of this key finished, in order; everything else in the
        folder (a chunk under way when it died, a publish it was assembling) is removed.
        Without `enabled`, none."""
        chunks: list[Chunk] = []
        if enabled:
            while (record := self._record(len(chunks))).is_file():
                chunk = Chunk.load(record)
                if not self._intact(chunk):
                    break
                chunks.append(chunk)
        kept = {self._part(layer, c.index) for c in chunks for layer in self.layers}
        kept |= {self._images_part(c.index) for c in chunks}
        kept |= {self._record(c.index) for c in chunks} | {self.dir / RUN_FILE}
        for path in sorted(self.dir.rglob("*"), reverse=True):
            if path in kept:
                continue
            if path.is_dir() and not path.is_symlink():
                if not any(path.iterdir()):
                    path.rmdir()
            else:
                path.unlink()
        return chunks

    def _intact(self, chunk: Chunk) -> bool:
        """A record is trusted only with every file it lists, at the size it lists."""
        files = [(self._part(n, chunk.index), r) for n, r in chunk.layers.items()]
        files.append((self._images_part(chunk.index), chunk.images))
        return set(chunk.layers) == set(self.layers) and all(
            path.is_file() and path.stat().st_size == record.bytes for path, record in files
        )

    def _record(self, index: int) -> Path:
        return self.dir / "chunks" / f"{index:06d}.json"

    def part(self, layer: str, chunk: Chunk) -> Path:
        return self._part(layer, chunk.index)

    def _part(self, layer: str, index: int) -> Path:
        return layer_path(self.dir, layer) / part_name(index)

    def _images_part(self, index: int) -> Path:
        return self.dir / IMAGES_DIR / part_name(index)

    # --- writing ---------------------------------------------------------------------------

    def write_chunk(self, index: int, tables: dict[str, pa.Table], images: pa.Table) -> Chunk:
        """Each layer's part and the chunk's ledger, then the record that vouches for them."""
        chunk = Chunk(
            index,
            {layer: write_part(tables[layer], self._part(layer, index)) for layer in self.layers},
            write_part(images, self._images_part(index)),
        )
        write_json(self._record(index), asdict(chunk))
        return chunk

    def ledger(self, chunks: Sequence[Chunk]) -> pa.Table | None:
        """The staged chunks' ledgers, in order: every image they hold, with its outcome."""
        tables = [pq.read_table(self._images_part(c.index)) for c in chunks]
        return pa.concat_tables(tables) if tables else None

    @property
    def publish_dir(self) -> Path:
        return self.dir / PUBLISH_DIR


PUBLISHING = ("building-", "ready-", "old-")


def _staged_layers(folder: Path) -> list[str] | None:
    """The layers a staging folder holds; None for an older layout or a half-made folder,
    nothing worth keeping."""
    try:
        return list(json.loads((folder / RUN_FILE).read_text())["layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def publish_lock(output_dir: Path) -> Lock:
    """Held while a run publishes into `output_dir` (publish.py), so runs take turns."""
    return Lock(staging_root(output_dir) / "publish.lock")


def recover(output_dir: Path) -> None:
    """Finish or drop what a killed publish left (under the publish lock): a set ready while
    the output folder is missing is the new set, moved in; anything else is dropped."""
    root = staging_root(output_dir)
    if not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        if path.name.startswith("ready-") and not output_dir.exists():
            log.info("finishing a publish that was interrupted: %s", output_dir)
            os.rename(path, output_dir)
        elif path.name.startswith(PUBLISHING):
            discard(path)


def tidy(root: Path) -> None:
    """Remove the staging folder `root` when no run is in it (none holds its runs lock) and it
    holds lock files only: no staged chunks, no publish under way or to finish, not even a
    failed run's folder. A run that starts meanwhile waits for the removal (its shared lock on
    the exclusive one), then makes the folder afresh: the runs lock is removed last, so every
    run that arrives while the rest goes finds it and waits."""
    if not root.is_dir():
        return
    gate = Lock(root / RUNS_LOCK)
    if not gate.acquire(wait=False):
        return  # another run is in it, or removing it
    try:
        entries = list(root.iterdir())
        locks = root / "locks"
        inner = list(locks.iterdir()) if locks.is_dir() else []
        if not all(_only_a_lock(p) for p in [*entries, *inner] if p != locks):
            return
        for path in [*inner, *entries]:
            if path.name.startswith(TRASH_PREFIX):
                shutil.rmtree(path, ignore_errors=True)
            elif path == locks:
                locks.rmdir()
            elif path.name != RUNS_LOCK:
                path.unlink()
        gate.path.unlink()
        with contextlib.suppress(OSError):  # a run that arrived since made its runs lock anew
            root.rmdir()
    finally:
        gate.release()


def _only_a_lock(path: Path) -> bool:
    """What no one needs once no run holds it: a lock file, or trash."""
    if path.name.startswith(TRASH_PREFIX):
        return True
    return path.name.endswith(".lock") and path.is_file() and not path.is_symlink()


def staging_root(output_dir: Path) -> Path:
    return output_dir.parent / f".{output_dir.name}.staging"


def discard(folder: Path) -> None:
    """Remove a folder so that no crash leaves a part of it that looks trustworthy: renamed
    away first (one atomic step), deleted after."""
    trash = folder.parent / f"{TRASH_PREFIX}{folder.name}-{uuid.uuid4().hex[:8]}"
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)
