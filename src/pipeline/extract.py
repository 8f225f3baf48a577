"""The inference loop: one forward pass per batch, every hooked layer pooled on the device and
streamed to its Parquet file, every image accounted for as a row or a failure.
"""

from __future__ import annotations

import contextlib
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
import timm
import torch
from tqdm import tqdm

import pipeline
from pipeline.config import ExtractConfig, Precision, config_hash
from pipeline.data import build_transform, image_loader, load_manifest, resolve_preprocess
from pipeline.hooks import LayerHooks, LayerInfo
from pipeline.models import build_model
from pipeline.store import FAILURES_FILE, EmbeddingWriter, layer_path, write_failures

log = logging.getLogger(__name__)
AUTOCAST_DTYPES = {Precision.fp16: torch.float16, Precision.bf16: torch.bfloat16}


@dataclass
class Summary:
    """What a run did, for the console and for tracking."""

    images: int
    failures: int
    seconds: float
    output_dir: Path
    layers: dict[str, LayerInfo]
    device: str
    precision: str
    dataset: str
    manifest_digest: str  # of the ids and labels, in order: which images, not their bytes

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


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


def run(cfg: ExtractConfig) -> Summary:
    """Extract every configured layer for every image of the dataset into `cfg.output_dir`."""
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
    labels = manifest["label"].tolist() if "label" in manifest else None
    base_metadata = {
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "preprocess": preprocess.as_dict(),
        "config_hash": config_hash(cfg),
        "device": device.type,
        "precision": precision.value,
        "versions": versions(),
    }
    started = time.perf_counter()
    with (
        LayerHooks(model, cfg.layers, cfg.pool, cfg.output_key) as hooks,
        torch.inference_mode(),
        torch.autocast(
            device.type,
            dtype=AUTOCAST_DTYPES.get(precision, torch.float32),
            enabled=precision in AUTOCAST_DTYPES,
        ),
    ):
        example = torch.zeros((1, *preprocess.input_size), device=device)
        info = hooks.describe(example)
        loader = image_loader(
            manifest["path"].tolist(),
            build_transform(preprocess),
            cfg.batch_size,
            resolve_workers(cfg.num_workers, -(-len(manifest) // cfg.batch_size)),
            pin_memory=device.type == "cuda",
        )
        with contextlib.ExitStack() as files:
            writers = {
                name: files.enter_context(
                    EmbeddingWriter(
                        layer_path(output_dir, name),
                        layer.dim,
                        labels is not None,
                        {
                            **base_metadata,
                            "layer": name,
                            "output_shape": list(layer.shape),
                            "pool": layer.pool.value,
                            "dim": layer.dim,
                        },
                    )
                )
                for name, layer in info.items()
            }
            written, failed = _extract(
                hooks, loader, writers, manifest["image_id"].tolist(), labels, device
            )
    seconds = time.perf_counter() - started
    _check_accounted(len(manifest), written, failed)
    ids = manifest["image_id"].tolist()
    write_failures(output_dir / FAILURES_FILE, [(ids[i], err, why) for i, err, why in failed])
    summary = Summary(
        len(written),
        len(failed),
        seconds,
        output_dir,
        info,
        device.type,
        precision.value,
        cfg.dataset.name,
        _digest(manifest),
    )
    log.info(
        "%d embedded, %d failed in %.1f s (%.1f images/s) -> %s%s",
        summary.images,
        summary.failures,
        seconds,
        summary.images_per_s,
        output_dir,
        f"; see {output_dir / FAILURES_FILE}" if failed else "",
    )
    return summary


def _extract(
    hooks: LayerHooks,
    loader: torch.utils.data.DataLoader,
    writers: dict[str, EmbeddingWriter],
    ids: list[str],
    labels: list[str] | None,
    device: torch.device,
) -> tuple[list[int], list[tuple[int, str, str]]]:
    """The batch loop. Pooled outputs are copied to the host asynchronously and written one
    batch later, so on a GPU the next forward pass overlaps the previous batch's writing."""
    written: list[int] = []
    failed: list[tuple[int, str, str]] = []
    pending: tuple[list[int], dict[str, torch.Tensor], Any] | None = None

    def flush() -> None:
        indices, outputs, copied = pending
        if copied is not None:
            copied.synchronize()
        batch_labels = [labels[i] for i in indices] if labels is not None else None
        for name, tensor in outputs.items():
            writers[name].write([ids[i] for i in indices], batch_labels, tensor.numpy())
        written.extend(indices)

    with tqdm(total=len(ids), unit="img", desc="extract", mininterval=1.0) as progress:
        for batch in loader:
            failed.extend(batch.failures)
            if batch.images is not None:
                images = batch.images.to(device, non_blocking=True)
                if device.type == "cuda":
                    images = images.contiguous(memory_format=torch.channels_last)
                outputs = {
                    name: out.float().to("cpu", non_blocking=True)
                    for name, out in hooks(images).items()
                }
                copied = torch.cuda.Event() if device.type == "cuda" else None
                if copied is not None:
                    copied.record()
                if pending is not None:
                    flush()
                pending = (batch.indices, outputs, copied)
            progress.update(len(batch.indices) + len(batch.failures))
        if pending is not None:
            flush()
    return written, failed


def _check_accounted(total: int, written: list[int], failed: list[tuple[int, str, str]]) -> None:
    """Every image is either a row or a failure, exactly once (dinov2's end-of-run check)."""
    seen = sorted(written + [i for i, _, _ in failed])
    if seen != list(range(total)):
        raise RuntimeError(
            f"{total} images in the manifest but {len(written)} written and "
            f"{len(failed)} failed: some were lost or repeated"
        )


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
