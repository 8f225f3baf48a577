"""The inference loop: one forward pass per batch, every hooked layer pooled on the device and
streamed to its Parquet file, every image accounted for as a row or a failure.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import timm
import torch
from tqdm import tqdm

import pipeline
from pipeline.config import ConfigError, ExtractConfig, Precision, config_hash
from pipeline.data import build_transform, image_loader, load_manifest, resolve_preprocess
from pipeline.hooks import LayerHooks, LayerInfo
from pipeline.models import build_model
from pipeline.store import (
    FAILURES_FILE,
    RunParts,
    count_rows,
    embedding_schema,
    failures_table,
    layer_path,
)

log = logging.getLogger(__name__)
AUTOCAST_DTYPES = {Precision.fp16: torch.float16, Precision.bf16: torch.bfloat16}
CHUNK_BYTES = 64 * 2**20  # embeddings held in memory before a chunk is saved
MIN_IMAGES_FOR_FAILURE_RATE = 100  # judge the failure rate on no fewer images


class TooManyFailures(ConfigError):
    """Most images fail: a wrong config, not bad data. Exit code 3."""

    exit_code = 3


@dataclass
class Summary:
    """What a run did, for the console and for tracking."""

    images: int
    failures: int
    processed: int  # images read by this run: fewer than all when it resumed an earlier one
    seconds: float
    output_dir: Path
    layers: dict[str, LayerInfo]
    device: str
    precision: str
    dataset: str
    manifest_digest: str  # of the ids and labels, in order: which images, not their bytes

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds else 0.0


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: Precision, device: torch.device) -> Precision:
    """auto: bf16 autocast on GPUs that have it, else fp16 on CUDA; fp32 on the CPU."""
    if precision is not Precision.auto:
        return precision
    if device.type != "cuda":
        return Precision.fp32
    return Precision.bf16 if torch.cuda.is_bf16_supported() else Precision.fp16


def resolve_workers(num_workers: int | None, batches: int) -> int:
    """null: one loader process per core (at most 8), and none for a single batch."""
    if num_workers is not None:
        return num_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return 0 if batches <= 1 else min(8, cores or 1, batches)


def chunk_rows(save_every: int, batch_size: int, total_dim: int) -> int:
    """Images per saved chunk: about `save_every`, at most ~CHUNK_BYTES of embeddings, and a
    whole number of batches, so that a resumed run sees the very same batches."""
    rows = min(save_every, max(1, CHUNK_BYTES // (4 * total_dim)))
    return max(1, rows // batch_size) * batch_size


def layer_schemas(
    info: dict[str, LayerInfo], labelled: bool, metadata: dict[str, Any]
) -> dict[str, pa.Schema]:
    """Each layer's Parquet schema, its metadata telling the layer's own shape and pooling."""
    return {
        name: embedding_schema(
            layer.dim,
            labelled,
            {
                **metadata,
                "layer": name,
                "output_shape": list(layer.shape),
                "pool": layer.pool.value,
                "dim": layer.dim,
                "depth": layer.depth,
            },
        )
        for name, layer in info.items()
    }


def run(cfg: ExtractConfig) -> Summary:
    """Extract every configured layer for every image of the dataset into `cfg.output_dir`."""
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {cfg.batch_size}")
    if not 0 <= cfg.max_failure_rate <= 1:
        raise ConfigError(f"max_failure_rate is a fraction in [0, 1], got {cfg.max_failure_rate}")
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    manifest = load_manifest(cfg.dataset)
    model = build_model(cfg.model)
    m = cfg.model
    preprocess = resolve_preprocess(model, m.input_size, m.crop_pct, m.interpolation, m.mean, m.std)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    output_dir = Path(cfg.output_dir)
    ids = manifest["image_id"].tolist()
    labels = manifest["label"].tolist() if "label" in manifest else None
    digest = config_hash(cfg)
    base_metadata = {
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "preprocess": preprocess.as_dict(),
        "config_hash": digest,
        "device": device.type,
        "precision": precision.value,
        "versions": versions(),
    }
    with (
        LayerHooks(model, cfg.layers, cfg.pool, cfg.output_key) as hooks,
        torch.inference_mode(),
        torch.autocast(
            device.type,
            dtype=AUTOCAST_DTYPES.get(precision, torch.float32),
            enabled=precision in AUTOCAST_DTYPES,
        ),
    ):
        info = hooks.describe(torch.zeros((1, *preprocess.input_size), device=device))
        schemas = layer_schemas(info, labels is not None, base_metadata)
        rows = chunk_rows(cfg.save_every, cfg.batch_size, sum(i.dim for i in info.values()))
        parts = RunParts(output_dir, f"{digest}-b{cfg.batch_size}-c{rows}", schemas)
        first_chunk = parts.start(cfg.resume)
        start = min(len(ids), first_chunk * rows)
        if start:
            log.info(
                "resuming: %d of %d images were done by an earlier run of this config "
                "(resume=false starts afresh)",
                start,
                len(ids),
            )
        loader = image_loader(
            manifest["path"].tolist()[start:],
            build_transform(preprocess),
            cfg.batch_size,
            resolve_workers(cfg.num_workers, -(-(len(ids) - start) // cfg.batch_size)),
            pin_memory=device.type == "cuda",
            max_image_pixels=cfg.max_image_pixels,
        )
        chunks = Chunks(parts, rows, first_chunk, ids, labels, cfg.max_failure_rate)
        started = time.perf_counter()
        _extract(hooks, loader, chunks, start, device)
        seconds = time.perf_counter() - started
    parts.merge(output_dir)
    failures = len(pq.read_table(output_dir / FAILURES_FILE))
    written = count_rows(layer_path(output_dir, next(iter(info))))
    if written + failures != len(ids):  # every image a row or a failure (dinov2's check)
        raise RuntimeError(
            f"{len(ids)} images in the manifest but {written} written and "
            f"{failures} failed: some were lost or repeated"
        )
    summary = Summary(
        written,
        failures,
        len(ids) - start,
        seconds,
        output_dir,
        info,
        device.type,
        precision.value,
        cfg.dataset.name,
        _digest(manifest),
    )
    log.info(
        "%d embedded, %d failed%s in %.1f s (%.1f images/s) -> %s",
        written,
        failures,
        f", see {output_dir / FAILURES_FILE}" if failures else "",
        seconds,
        summary.images_per_s,
        output_dir,
    )
    return summary


class Chunks:
    """Collects rows and failures in dataset order and saves each finished chunk of images.

    Rows whose embedding has a NaN or Inf in any layer (fp16 overflow, broken weights) become
    failures, never rows. When more than `max_failure_rate` of the images so far have failed,
    the run stops after saving the chunk.
    """

    def __init__(
        self,
        parts: RunParts,
        rows: int,
        first: int,
        ids: list[str],
        labels: list[str] | None,
        max_failure_rate: float,
    ) -> None:
        self.parts, self.rows, self.chunk = parts, rows, first
        self.ids, self.labels = ids, labels
        self.max_failure_rate = max_failure_rate
        self.failed_before = len(parts.failures())
        self._reset()

    def _reset(self) -> None:
        self.indices: list[int] = []
        self.arrays: dict[str, list[np.ndarray]] = {name: [] for name in self.parts.schemas}
        self.failures: list[tuple[str, str, str]] = []
        self.seen = 0

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
        self.indices += [i for i, ok in zip(indices, finite, strict=True) if ok]
        for name, array in outputs.items():
            self.arrays[name].append(array[finite])
        self.failures += [(self.ids[i], error, reason) for i, error, reason in sorted(failures)]
        if self.seen >= self.rows:
            self.save()

    def save(self) -> None:
        if not self.seen:
            return
        labels = [self.labels[i] for i in self.indices] if self.labels is not None else None
        self.parts.write_chunk(
            self.chunk,
            [self.ids[i] for i in self.indices],
            labels,
            {name: np.concatenate(arrays) for name, arrays in self.arrays.items()},
            failures_table(self.failures),
        )
        done = min(len(self.ids), (self.chunk + 1) * self.rows)
        self.failed_before += len(self.failures)
        self.chunk += 1
        self._reset()
        if self.failed_before > self.max_failure_rate * done and done >= min(
            len(self.ids), MIN_IMAGES_FOR_FAILURE_RATE
        ):
            raise TooManyFailures(
                f"{self.failed_before} of the first {done} images failed, more than "
                f"max_failure_rate={self.max_failure_rate}: the config is probably wrong for "
                "this data (see the reasons in the failures parts under "
                f"{self.parts.dir}); fix it, or raise max_failure_rate"
            )


def _extract(
    hooks: LayerHooks,
    loader: torch.utils.data.DataLoader,
    chunks: Chunks,
    start: int,
    device: torch.device,
) -> None:
    """The batch loop. Pooled outputs are copied to the host asynchronously and handed on one
    batch later, so on a GPU the next forward pass overlaps the previous batch's saving."""
    pending: tuple[list[int], list[tuple[int, str, str]], dict[str, torch.Tensor], Any] | None
    pending = None

    def hand_on() -> None:
        indices, failures, outputs, copied = pending
        if copied is not None:
            copied.synchronize()
        chunks.add(indices, {name: t.numpy() for name, t in outputs.items()}, failures)

    with tqdm(
        total=len(chunks.ids), initial=start, unit="img", desc="extract", mininterval=1.0
    ) as progress:
        for batch in loader:
            indices = [start + i for i in batch.indices]
            failures = [(start + i, error, reason) for i, error, reason in batch.failures]
            outputs, copied = {}, None
            if batch.images is not None:
                images = batch.images.to(device, non_blocking=True)
                if device.type == "cuda":
                    images = images.contiguous(memory_format=torch.channels_last)
                outputs = {
                    name: out.float().to("cpu", non_blocking=True)
                    for name, out in hooks(images).items()
                }
                if device.type == "cuda":
                    copied = torch.cuda.Event()
                    copied.record()
            else:
                outputs = {name: torch.empty((0, info.dim)) for name, info in hooks.info.items()}
            if pending is not None:
                hand_on()
            pending = (indices, failures, outputs, copied)
            progress.update(len(indices) + len(failures))
        if pending is not None:
            hand_on()
    chunks.save()


def _digest(manifest: pd.DataFrame) -> str:
    columns = [c for c in ("image_id", "label") if c in manifest]
    return hashlib.sha256(manifest[columns].to_csv(index=False).encode()).hexdigest()


def versions() -> dict[str, str]:
    return {
        "pipeline": pipeline.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
