"""Staging what an extraction computes: rows and failures collected in dataset order, each
finished chunk written as one part per layer with the ledger of its images."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.extraction.provenance import LayerInfo
from pipeline.storage import ledger
from pipeline.storage.contract import embedding_schema, embedding_table
from pipeline.storage.staging import IMAGES_DIR, Chunk, Staging
from pipeline.storage.update import Plan, judge_failures

CHUNK_BYTES = 64 * 2**20  # embeddings held in memory before a chunk is staged: a part's size
GLANCE_ROWS = 5000  # rows of the last layer kept for the "embeddings at a glance" picture


def chunk_rows(save_every: int, batch_size: int, total_dim: int) -> int:
    """Images per chunk: about `save_every`, at most ~CHUNK_BYTES of embeddings, and a whole
    number of batches, so that a resumed run sees the very same batches."""
    rows = min(save_every, max(1, CHUNK_BYTES // (4 * total_dim)))
    return max(1, rows // batch_size) * batch_size


def layer_schemas(
    info: dict[str, LayerInfo], labelled: bool, metadata: dict[str, Any], sourced: bool = False
) -> dict[str, pa.Schema]:
    """Each layer's Parquet schema, its metadata telling the layer's own shape and pooling;
    `sourced` for the calibration copies' layers."""
    return {
        name: embedding_schema(
            layer.dim,
            labelled,
            {
                **metadata,
                "layer": name,
                "output_shape": list(layer.shape),
                "pool": layer.pool.value,
                "pool_params": layer.params,
                "dim": layer.dim,
                "depth": layer.depth,
            },
            sourced,
        )
        for name, layer in info.items()
    }


class ChunkWriter:
    """Collects the rows and failures of the images a run embeds (`plan.work`, in dataset
    order) and stages each finished chunk of them with its ledger.

    Rows whose embedding has a NaN or Inf in any layer (fp16 overflow, broken weights) become
    failures, never rows. When more than `max_failure_rate` of the images judged so far (the
    reused ones included) have failed, the run stops after staging the chunk (what is staged
    stays, and a rerun judges it again).
    """

    def __init__(
        self,
        staging: Staging,
        schemas: dict[str, pa.Schema],
        plan: Plan,
        rows: int,
        done: list[Chunk],
        max_failure_rate: float,
        reused: tuple[int, int],
    ) -> None:
        self.staging, self.schemas, self.plan, self.rows = staging, schemas, plan, rows
        self.chunks = list(done)
        manifest = plan.manifest.iloc[plan.work]
        self.ids = manifest["image_id"].tolist()
        self.labels = manifest["label"].tolist() if "label" in manifest else None
        self.max_failure_rate = max_failure_rate
        self.judged, self.failed_before = reused
        self.start = 0
        self.last = list(schemas)[-1]
        count = len(self.ids)
        self.glance = set(np.linspace(0, count - 1, min(count, GLANCE_ROWS)).astype(int))
        self._sample: list[tuple[int, np.ndarray]] = []
        self._reset()

    def _reset(self) -> None:
        self.indices: list[int] = []
        self.arrays: dict[str, list[np.ndarray]] = {name: [] for name in self.schemas}
        self.failures: list[tuple[int, str, str]] = []
        self.seen = 0

    @property
    def sample(self) -> tuple[np.ndarray, list[str] | None] | None:
        """Rows of the last layer spread over the images embedded, for a picture."""
        if not self._sample:
            return None
        indices = [i for i, _ in self._sample]
        labels = [self.labels[i] for i in indices] if self.labels is not None else None
        return np.stack([v for _, v in self._sample]), labels

    def add(
        self,
        indices: list[int],
        outputs: dict[str, np.ndarray],
        failures: list[tuple[int, str, str]],
    ) -> None:
        self.seen += len(indices) + len(failures)
        finite = np.ones(len(indices), bool)
        for name, array in outputs.items():
            bad = ~np.isfinite(array).all(axis=1) & finite
            failures = failures + [
                (
                    indices[i],
                    "NonFiniteEmbedding",
                    f"NaN or Inf in layer {name}: try precision=fp32, or check the weights",
                )
                for i in np.flatnonzero(bad)
            ]
            finite &= ~bad
        kept = [i for i, ok in zip(indices, finite, strict=True) if ok]
        self.indices += kept
        for name, array in outputs.items():
            self.arrays[name].append(array[finite])
        self._sample += [
            (i, v)
            for i, v in zip(kept, outputs[self.last][finite], strict=True)
            if i in self.glance
        ]
        self.failures += failures
        if self.seen >= self.rows:
            self.save()

    def save(self) -> None:
        if not self.seen:
            return
        stop = self.start + self.seen
        ids = [self.ids[i] for i in self.indices]
        labels = [self.labels[i] for i in self.indices] if self.labels is not None else None
        tables = {
            name: embedding_table(schema, ids, labels, np.concatenate(self.arrays[name]))
            for name, schema in self.schemas.items()
        }
        work = self.plan.work
        failed = {work[i]: (error, reason) for i, error, reason in self.failures}
        images = ledger.table(self.plan.manifest, work[self.start : stop], failed)
        self.chunks.append(self.staging.write_chunk(len(self.chunks), tables, images))
        self.judged += self.seen
        self.failed_before += len(self.failures)
        self.start = stop
        self._reset()
        judge_failures(
            self.judged,
            self.failed_before,
            len(self.plan.keys),
            self.max_failure_rate,
            self.staging.dir / IMAGES_DIR,
        )
