"""Which images a layer holds, and the file each row was computed from: what makes a rerun do
only what is new.

A layer's ledger has one row per image of the dataset it was published for, in dataset order:
`image_id`, `label`, the file's identity when it was read (`size` and `mtime_ns`, or its
`sha256` with `dataset.identity=content`) and, for an image that is not a row, `error` and
`reason`. The images without an error are the layer's rows, in the same order. A staged chunk
carries the ledger of its own images beside its parts; a published layer keeps its ledger in
`<layer>.parquet/_images.arrow` (Arrow IPC: a name `*.parquet` globs would pick up as a part).

An image is up to date in a ledger when its id, label and identity are the same: its row (or
its failure) is reused as it is. Anything else (a new file, one rewritten or relabelled) is
embedded again; an image no longer in the dataset leaves the layer when it is published.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.config import Identity

LEDGER_FILE = "_images.arrow"
IDENTITY_COLUMNS = ("size", "mtime_ns", "sha256")
SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("mtime_ns", pa.int64()),
        pa.field("sha256", pa.string()),
        pa.field("error", pa.string()),
        pa.field("reason", pa.string()),
    ]
)
READ_BLOCK = 2**20


def with_identity(manifest: pd.DataFrame, identity: Identity) -> pd.DataFrame:
    """The manifest with each file's identity columns: size and modification time (one `stat`
    an image), and its content's SHA-256 with `identity=content`. A file that cannot be read
    (or an entry that already carries an `error`) gets nulls and is embedded, so it fails with
    its reason, whenever it is asked for."""
    sizes, mtimes, digests = [], [], []
    errors = manifest["error"] if "error" in manifest else pd.Series([None] * len(manifest))
    for path, error in zip(manifest["path"], errors, strict=True):
        size = mtime = digest = None
        if error is None or pd.isna(error):
            try:
                stat = os.stat(path)
                size, mtime = stat.st_size, stat.st_mtime_ns
                if identity is Identity.content:
                    digest = _sha256(path)
            except OSError:
                size = mtime = digest = None
        sizes.append(size)
        mtimes.append(mtime)
        digests.append(digest)
    out = manifest.copy()
    out["size"] = pd.array(sizes, dtype="Int64")
    out["mtime_ns"] = pd.array(mtimes, dtype="Int64")
    out["sha256"] = pd.Series(digests, dtype=object)
    if identity is Identity.content:
        out["mtime_ns"] = pd.array([None] * len(out), dtype="Int64")  # the content decides
    return out


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(READ_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def keys(frame: pd.DataFrame | pa.Table) -> dict[str, str]:
    """image_id -> what must be equal for its row to be reused (label and identity)."""

    def column(name: str) -> list[Any]:
        if isinstance(frame, pa.Table):
            return (
                frame.column(name).to_pylist()
                if name in frame.column_names
                else [None] * len(frame)
            )
        if name not in frame:
            return [None] * len(frame)
        return [None if pd.isna(v) else v for v in frame[name].tolist()]

    ids = column("image_id")
    labels = [None if v is None else str(v) for v in column("label")]  # as the ledger has them
    values = [labels, *(column(c) for c in IDENTITY_COLUMNS)]
    return {i: repr(v) for i, *v in zip(ids, *values, strict=True)}


def table(
    manifest: pd.DataFrame, positions: Sequence[int], failures: dict[int, tuple[str, str]]
) -> pa.Table:
    """The ledger rows of the manifest's images at `positions`; `failures` maps a position to
    its (error, reason)."""
    part = manifest.iloc[list(positions)]
    labels = part["label"].tolist() if "label" in part else [None] * len(part)
    outcome = [failures.get(p, (None, None)) for p in positions]
    return pa.Table.from_arrays(
        [
            pa.array(part["image_id"].tolist(), pa.string()),
            pa.array([None if pd.isna(v) else str(v) for v in labels], pa.string()),
            pa.array(_ints(part, "size"), pa.int64()),
            pa.array(_ints(part, "mtime_ns"), pa.int64()),
            pa.array(
                part["sha256"].tolist() if "sha256" in part else [None] * len(part), pa.string()
            ),
            pa.array([e for e, _ in outcome], pa.string()),
            pa.array([r for _, r in outcome], pa.string()),
        ],
        schema=SCHEMA,
    )


def _ints(part: pd.DataFrame, column: str) -> list[int | None]:
    if column not in part:
        return [None] * len(part)
    return [None if pd.isna(v) else int(v) for v in part[column]]


def to_bytes(ledger: pa.Table) -> bytes:
    """A published ledger's bytes (Arrow IPC, compressed), for `store.write_bytes`."""
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.ipc.new_file(sink, ledger.schema, options=options) as writer:
        writer.write_table(ledger)
    return sink.getvalue().to_pybytes()


def read(layer: Path) -> pa.Table | None:
    """A published layer's ledger, or None when it has none (written before ledgers were)."""
    path = layer / LEDGER_FILE
    if not path.is_file():
        return None
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()


def rows_mask(ledger: pa.Table) -> np.ndarray:
    """Which of the ledger's images are rows (the others failed)."""
    return np.asarray(ledger.column("error").is_null().to_numpy(zero_copy_only=False), bool)
