"""A downstream stage's input: one layer's embeddings, read and checked against what the
writer promised, by `read_layer`, the one way cluster, dedup and probe read a layer.

The writer promises the parts `_manifest.json` lists (names, sizes, SHA-256 digests) and, in
them, rows of the contract: a unique text id and a finite vector each, all of one length.
`store.read_embeddings` decodes a layer and refuses what does not fit the contract's types;
this module adds the promises beyond the types. A layer that breaks one is refused before a
stage computes or writes anything, in one line that names the file and what to do (a
ConfigError: exit code 2).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError
from pipeline.progress import bar, step
from pipeline.storage.contract import (
    EXTRACT_AGAIN,
    MANIFEST_FILE,
    Embeddings,
    FileRecord,
    dataset_digest,
    read_embeddings,
    read_manifest,
)

# Values checked for NaN at once: the check's booleans take 64 MiB, whatever the layer's size.
FINITE_CHECK_VALUES = 64 * 2**20
HASH_BLOCK = 16 * 2**20  # bytes read at once for a part's SHA-256


def read_layer(path: Path, verify: bool = True) -> Embeddings:
    """A layer's embeddings as every stage takes them in: refused with a ConfigError (one line
    naming the file and what to do) unless they are what the writer promised. That is: the
    parts `_manifest.json` lists, by name and size and (`verify`) SHA-256; a text id on every
    row, each id once; a vector on every row, all of one length, finite. A folder without a
    manifest (written elsewhere) or a single file gets every check but the manifest's."""
    with step(f"reading {path}"):
        check_parts(path, verify)
        embeddings = read_embeddings(path)
        _check_values(path, embeddings)
    return embeddings


def check_parts(path: Path, verify: bool = True) -> None:
    """Refuse a layer folder whose files are not the parts its `_manifest.json` lists, by name
    and size and, when `verify`, by SHA-256 (which reads every byte)."""
    manifest_file = path / MANIFEST_FILE
    if not manifest_file.is_file():
        return
    try:  # a manifest may carry more keys than these; only these are the writer's promise
        manifest = read_manifest(path)
        parts = [
            FileRecord(str(p["name"]), 0, int(p["bytes"]), str(p["sha256"]))
            for p in manifest["parts"]
        ]
        digest = manifest["sha256"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(
            f"{manifest_file} does not list the layer's parts as the pipeline writes them: "
            + EXTRACT_AGAIN
        ) from None
    found = _part_files(path)
    missing = [p.name for p in parts if p.name not in found]
    if missing:
        raise ConfigError(
            f"{path / missing[0]} is listed in {MANIFEST_FILE} but missing: {EXTRACT_AGAIN}"
        )
    unlisted = sorted(found - {p.name for p in parts})
    if unlisted:
        raise ConfigError(
            f"{path / unlisted[0]} is not a part {MANIFEST_FILE} lists (added after the layer "
            f"was written): move it out of the folder, or {EXTRACT_AGAIN}"
        )
    if digest != dataset_digest(parts):
        raise ConfigError(
            f"{manifest_file}: its sha256 is not the digest of the parts it lists: {EXTRACT_AGAIN}"
        )
    for part in parts:
        size = (path / part.name).stat().st_size
        if size != part.bytes:
            raise ConfigError(
                f"{path / part.name} has {size} bytes, {MANIFEST_FILE} says {part.bytes}: it "
                f"changed after it was written; {EXTRACT_AGAIN}"
            )
    if not verify:
        return
    with bar(f"checking {path.name}", sum(p.bytes for p in parts), "B", unit_divisor=1024) as read:
        for part in parts:
            if _sha256(path / part.name, read.update) != part.sha256:
                raise ConfigError(
                    f"{path / part.name} does not match its SHA-256 in {MANIFEST_FILE}: it "
                    f"changed after it was written; {EXTRACT_AGAIN}"
                )


def _sha256(file: Path, read: Callable[[int], object]) -> str:
    """The file's SHA-256, read a block at a time, each block's size told to `read`."""
    digest = hashlib.sha256()
    with file.open("rb") as stream:
        while block := stream.read(HASH_BLOCK):
            digest.update(block)
            read(len(block))
    return digest.hexdigest()


def _part_files(folder: Path) -> set[str]:
    """The files pyarrow reads as a folder's dataset, relative to it: all, at any depth, but
    those under a name that starts with `_` or `.` (the manifest, a writer's other files)."""
    files = (p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    return {f.as_posix() for f in files if not any(n[0] in "_." for n in f.parts)}


def _check_values(path: Path, embeddings: Embeddings) -> None:
    """Refuse NaN or Inf values and repeated ids, naming the first image that has them."""
    vectors = embeddings.vectors
    step = max(1, FINITE_CHECK_VALUES // max(1, vectors.shape[1]))
    for start in range(0, len(vectors), step):
        finite = np.isfinite(vectors[start : start + step]).all(axis=1)
        if not finite.all():
            image = embeddings.ids[start + int(finite.argmin())]
            raise ConfigError(
                f"embeddings {path} hold NaN or Inf values (image {image!r} first): extract "
                "again with precision=fp32"
            )
    seen: set[str] = set()
    for image in embeddings.ids:
        if image in seen:
            raise ConfigError(
                f"embeddings {path} repeat image id {image!r}: each image may appear once; "
                + EXTRACT_AGAIN
            )
        seen.add(image)
