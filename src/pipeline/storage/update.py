"""What a run must compute, and how each of its layers is put together from what is reused and
what is new: the incremental part of the extraction.

Sources of an image's outcome (a row or a failure), for each layer of the run:
  1. the published layer, when it was made with the same config and weights (`values`) and its
     ledger has the image with the same label and file identity;
  2. the run's staged chunks (an earlier, interrupted run of the same command, or this one).
An image that has no outcome in every layer is embedded (all layers at once, one forward pass).
Then each layer whose content would change is assembled and published; a rerun with nothing
new and nothing removed publishes nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.errors import ConfigError, TooManyFailures
from pipeline.storage import ledger
from pipeline.storage.contract import CALIBRATION_DIR, FileRecord, layer_path, read_manifest
from pipeline.storage.inputs import check_parts
from pipeline.storage.publish import Source, assemble, link_tree, publish
from pipeline.storage.staging import Chunk, Staging

log = logging.getLogger(__name__)
MIN_IMAGES_FOR_FAILURE_RATE = 100  # judge the failure rate on no fewer images


@dataclass
class Outcomes:
    """Where each image's outcome is in one ledger: its row's global index or its failure."""

    keys: dict[str, str]
    rows: dict[str, int]
    failures: dict[str, tuple[str, str]]
    starts: np.ndarray  # each part's first row index

    @classmethod
    def of(cls, images: pa.Table | None, parts: Sequence[FileRecord]) -> Outcomes:
        if images is None:
            return cls({}, {}, {}, np.zeros(0, np.int64))
        ids = images.column("image_id").to_pylist()
        is_row = ledger.rows_mask(images)
        errors = images.column("error").to_pylist()
        reasons = images.column("reason").to_pylist()
        index = np.cumsum(is_row) - 1
        rows = {i: int(r) for i, ok, r in zip(ids, is_row, index, strict=True) if ok}
        failures = {
            i: (e, r) for i, ok, e, r in zip(ids, is_row, errors, reasons, strict=True) if not ok
        }
        starts = np.cumsum([0] + [p.rows for p in parts])[:-1]
        return cls(ledger.keys(images), rows, failures, starts)

    def has(self, image_id: str, key: str) -> bool:
        return self.keys.get(image_id) == key

    def location(self, image_id: str) -> tuple[int, int]:
        """(part, offset) of an image's row."""
        row = self.rows[image_id]
        part = int(np.searchsorted(self.starts, row, side="right") - 1)
        return part, row - int(self.starts[part])


@dataclass
class Published:
    """A published layer that rows may be reused from."""

    folder: Path
    manifest: dict[str, Any]
    outcomes: Outcomes

    @property
    def parts(self) -> tuple[FileRecord, ...]:
        return tuple(FileRecord(**p) for p in self.manifest["parts"])

    def holds_exactly(self, keys: dict[str, str]) -> bool:
        """Whether the layer was published for exactly these images (`ledger.keys`), in order."""
        return list(self.outcomes.keys.items()) == list(keys.items())


def published(folder: Path, values: str, verify: bool) -> Published | None:
    """The layer published in `folder`, if its rows can be reused: made with the same
    `values` key, with a ledger, and its parts as its manifest lists them (names and sizes;
    SHA-256 too with `verify`, as the downstream stages check them)."""
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("values") != values:
        return None
    images = ledger.read(folder)
    if images is None:
        return None
    try:
        check_parts(folder, verify)
    except ConfigError as err:
        log.warning("%s: embedding its images again", err)
        return None
    parts = [FileRecord(**p) for p in manifest["parts"]]
    return Published(folder, manifest, Outcomes.of(images, parts))


@dataclass
class Plan:
    """The run's images (the manifest with identities), what is reused, what is embedded."""

    manifest: pd.DataFrame
    keys: list[str]
    layers: dict[str, Published | None]
    staged: Outcomes
    work: list[int] = field(default_factory=list)  # positions in the manifest
    counts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def make(
        cls,
        manifest: pd.DataFrame,
        output_dir: Path,
        layers: Sequence[str],
        values: str,
        staging: Staging,
        chunks: Sequence[Chunk],
        reuse: bool,
        verify: bool = True,
    ) -> Plan:
        keys = ledger.keys(manifest)
        ordered = [keys[i] for i in manifest["image_id"]]
        previous = {
            name: published(layer_path(output_dir, name), values, verify) if reuse else None
            for name in layers
        }
        # A chunk's failures are failures in every layer, so its parts all hold the same rows.
        staged = Outcomes.of(staging.ledger(chunks), [c.layers[layers[0]] for c in chunks])
        plan = cls(manifest, ordered, previous, staged)
        ids = manifest["image_id"].tolist()
        plan.work = [
            position
            for position, (image_id, key) in enumerate(zip(ids, ordered, strict=True))
            if not staged.has(image_id, key)
            and not all(p is not None and p.outcomes.has(image_id, key) for p in previous.values())
        ]
        plan.counts = plan._counts(ids)
        return plan

    def _counts(self, ids: list[str]) -> dict[str, int]:
        """New, changed, removed and reused images, against what was published (or staged)."""
        known: dict[str, str] = dict(self.staged.keys)
        for layer in self.layers.values():
            if layer is not None:
                known.update(layer.outcomes.keys)
        current = set(ids)
        work = [(ids[p], self.keys[p]) for p in self.work]
        new = sum(1 for i, _ in work if i not in known)
        changed = sum(1 for i, k in work if i in known and known[i] != k)
        return {
            "new": new,
            "changed": changed,
            "removed": sum(1 for i in known if i not in current),
            "reused": len(ids) - len(self.work),
            "missing": len(self.work) - new - changed,  # as they were, but not in every layer
        }

    def describe(self) -> str:
        c = self.counts
        missing = f" ({c['missing']} for layers that lack them)" if c["missing"] else ""
        return (
            f"{c['new']} new, {c['changed']} changed, {c['removed']} removed, {c['reused']} "
            f"reused: embedding {len(self.work)} of {len(self.keys)} images{missing}"
        )

    def unchanged(self, layer: str) -> set[str]:
        """The images whose published outcome in `layer` is reused as it is."""
        previous = self.layers[layer]
        if previous is None:
            return set()
        ids = self.manifest["image_id"].tolist()
        return {i for i, k in zip(ids, self.keys, strict=True) if previous.outcomes.has(i, k)}

    # --- outcomes and failures -------------------------------------------------------------

    def _source(self, layer: str, image_id: str, key: str) -> tuple[int, Outcomes]:
        """0 and the published layer's outcomes when it has the image as it is, else 1 and the
        staged ones (which have every image the published layer lacks, once the work is done)."""
        previous = self.layers[layer]
        if previous is not None and previous.outcomes.has(image_id, key):
            return 0, previous.outcomes
        return 1, self.staged

    def reused_failures(self) -> tuple[int, int]:
        """(images, failed among them) of the images not embedded by this run."""
        work = set(self.work)
        ids = self.manifest["image_id"].tolist()
        failed = 0
        for position, (image_id, key) in enumerate(zip(ids, self.keys, strict=True)):
            if position in work:
                continue
            if any(
                image_id in self._source(layer, image_id, key)[1].failures for layer in self.layers
            ):
                failed += 1
        return len(ids) - len(work), failed

    # --- publishing ------------------------------------------------------------------------

    def changes(self, layer: str, copies_stale: bool) -> bool:
        """Whether publishing `layer` would change it."""
        previous = self.layers[layer]
        if previous is None or self.work or copies_stale:
            return True
        return not previous.holds_exactly(
            dict(zip(self.manifest["image_id"], self.keys, strict=True))
        )

    def assemble(
        self,
        layer: str,
        staging: Staging,
        chunks: Sequence[Chunk],
        schema: pa.Schema,
        rows_per_part: int,
        about: dict[str, Any],
        dest: Path,
    ) -> dict[str, Any]:
        """Write `layer`'s new folder at `dest` from the published layer and the staged chunks."""
        previous = self.layers[layer]
        sources = [
            Source(previous.folder, previous.parts) if previous else Source(dest, ()),
            Source(layer_path(staging.dir, layer), tuple(c.layers[layer] for c in chunks)),
        ]
        ids = self.manifest["image_id"].tolist()
        failures: dict[int, tuple[str, str]] = {}
        located: list[tuple[int, int, int]] = []
        for position, (image_id, key) in enumerate(zip(ids, self.keys, strict=True)):
            kind, outcomes = self._source(layer, image_id, key)
            if image_id in outcomes.failures:
                failures[position] = outcomes.failures[image_id]
            else:
                located.append((kind, *outcomes.location(image_id)))
        rows_from = tuple(np.asarray(c, np.int64).reshape(-1) for c in zip(*located, strict=True))
        if not located:
            rows_from = (np.zeros(0, np.int64),) * 3
        images = ledger.table(self.manifest, range(len(ids)), failures)
        return assemble(dest, images, rows_from, sources, schema, rows_per_part, about)


def judge_failures(
    judged: int, failed: int, total: int, max_rate: float, where: Path, before: bool = False
) -> None:
    """Stop the run when more than `max_rate` of the images judged so far (reused and new
    alike, so a rerun cannot slip past) failed, once enough are judged."""
    if failed > max_rate * judged and judged >= min(total, MIN_IMAGES_FOR_FAILURE_RATE):
        raise TooManyFailures(
            f"{failed} of {'the' if before else 'the first'} {judged} images failed, more than "
            f"max_failure_rate={max_rate}: the config is probably wrong for this data (the "
            f"reasons are in {where}); fix it, or raise max_failure_rate"
        )


def copies_stale(
    previous: Published | None, spec: dict[str, Any], values: str, unchanged: set[str]
) -> bool:
    """Whether a layer's calibration copies must be made again: none wanted (drop them), none
    there, made otherwise, or made from an image that is no longer there as it was."""
    if not spec["images"]:
        return previous is not None and (previous.folder / CALIBRATION_DIR).exists()
    if previous is None:
        return True
    copies = read_manifest(previous.folder / CALIBRATION_DIR)
    if copies is None or copies.get("calibration") != spec or copies.get("values") != values:
        return True
    return not set(copies.get("sources", [])) <= unchanged


def publish_changes(
    plan: Plan,
    staging: Staging,
    chunks: Sequence[Chunk],
    schemas: dict[str, pa.Schema],
    rows_per_part: int,
    values: str,
    spec: dict[str, Any],
    make_copies: Callable[[Path], None],
) -> list[str]:
    """Assemble every layer of the run whose content would change and publish them together;
    `make_copies(folder)` embeds calibration copies into `folder` when a layer needs new ones.
    The layers published (none: everything was up to date)."""
    layers = list(schemas)
    plan.staged = Outcomes.of(staging.ledger(chunks), [c.layers[layers[0]] for c in chunks])
    stale = {
        name: copies_stale(plan.layers[name], spec, values, plan.unchanged(name)) for name in layers
    }
    changed = [name for name in layers if plan.changes(name, stale[name])]
    if not changed:
        return []
    copies = None
    if spec["images"] and any(stale[name] for name in changed):
        copies = staging.dir / "calibration"
        make_copies(copies)
    folders = {}
    for name in changed:
        dest = staging.publish_dir / layer_path(Path(), name).name
        plan.assemble(name, staging, chunks, schemas[name], rows_per_part, {"values": values}, dest)
        _place_copies(
            dest, plan.layers[name], layer_path(copies, name) if copies else None, spec, stale[name]
        )
        folders[dest.name] = dest
    publish(staging.output_dir, folders)
    return changed


def _place_copies(
    dest: Path, previous: Published | None, made: Path | None, spec: dict[str, Any], stale: bool
) -> None:
    """Put the layer's calibration copies in its new folder: the ones just made, or the
    published ones while they still hold (hard-linked, not copied)."""
    if not spec["images"]:
        return
    if stale or previous is None:
        if made is not None:
            os.rename(made, dest / CALIBRATION_DIR)
    elif (previous.folder / CALIBRATION_DIR).is_dir():
        link_tree(previous.folder / CALIBRATION_DIR, dest / CALIBRATION_DIR)
