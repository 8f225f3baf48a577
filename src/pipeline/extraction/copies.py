"""Calibration copies: near-duplicates of a sample of the images, embedded with the same hooks
into each layer's `_calibration/` folder, for dedup.threshold=auto to calibrate on."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from tqdm import tqdm

from pipeline.config import CalibrationConfig, PipelineConfig
from pipeline.extraction.devices import model_input, plan_loader
from pipeline.extraction.hooks import LayerHooks
from pipeline.images import augment
from pipeline.images.loader import image_loader
from pipeline.images.preprocess import Preprocess, build_transform
from pipeline.storage.contract import (
    embedding_table,
    layer_path,
    part_name,
    write_manifest,
    write_part,
)


def loader_options(cfg: PipelineConfig, device: torch.device, images: int) -> dict[str, Any]:
    """The keywords of `image_loader` that come from the config, for `images` images."""
    plan = plan_loader(cfg.num_workers, -(-images // cfg.batch_size), device)
    return {
        "num_workers": plan.workers,
        "pin_memory": plan.pin_memory,
        "prefetch_factor": plan.prefetch_factor,
        "max_image_pixels": cfg.max_image_pixels,
        "max_file_bytes": cfg.max_file_bytes,
    }


def copies_metadata(metadata: dict[str, Any], cfg: PipelineConfig) -> dict[str, Any]:
    """The layers' metadata, plus how their calibration copies were made."""
    return {
        **metadata,
        "calibration": {
            **asdict(cfg.calibration),
            "seed": cfg.seed,
            "transformations": augment.FAMILY,
        },
    }


def calibration_sample(images: int, wanted: int, seed: int) -> np.ndarray:
    """Which images get calibration copies: `wanted` of them at random, in dataset order."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(images, size=min(wanted, images), replace=False))


@dataclass(frozen=True)
class CopyPlan:
    """How the calibration copies are made and batched."""

    calibration: CalibrationConfig
    seed: int
    preprocess: Preprocess
    batch_size: int

    @property
    def images_per_batch(self) -> int:
        return max(1, self.batch_size // self.calibration.copies)

    @property
    def min_side(self) -> int:
        """Decode sources large enough that the smallest rescale of a copy still gives the
        model its full input; large JPEGs still decode at reduced scale."""
        return math.ceil(self.preprocess.min_side / augment.RESCALE[0])


def embed_copies(
    hooks: LayerHooks,
    sample: pd.DataFrame,
    plan: CopyPlan,
    schemas: dict[str, pa.Schema],
    folder: Path,
    device: torch.device,
    options: dict[str, Any],
    about: dict[str, Any],
) -> int:
    """Make `plan.calibration.copies` near-duplicates of each sampled image (manifest rows),
    embed them with the same hooks, and write one part per layer under `folder` (in staging,
    then published inside each layer's folder), its manifest saying `about` them and which
    images they were made from. Images that fail are left out. Returns how many copies."""
    copies = plan.calibration.copies
    transform = augment.CopyTransform(
        build_transform(plan.preprocess), copies, plan.seed, plan.calibration.flip
    )
    loader = image_loader(
        sample["path"].tolist(),
        transform,
        plan.images_per_batch,
        errors=sample["error"].tolist() if "error" in sample else None,
        min_side=plan.min_side,
        **options,
    )
    sources: list[str] = []
    arrays: dict[str, list[np.ndarray]] = {name: [] for name in schemas}
    for batch in tqdm(loader, unit="batch", desc="calibration copies", mininterval=1.0):
        if batch.images is None:
            continue
        images = model_input(batch.images.flatten(0, 1), device)  # copies in a row
        for name, out in hooks(images).items():
            arrays[name].append(out.float().cpu().numpy())
        sources += [sample["image_id"].iloc[i] for i in batch.indices for _ in range(copies)]
    ids = [f"{source}#copy{i % copies}" for i, source in enumerate(sources)]
    for name, schema in schemas.items():
        dim = schema.field("embedding").type.list_size
        vectors = np.concatenate(arrays[name]) if arrays[name] else np.empty((0, dim))
        table = embedding_table(schema, ids, None, vectors.astype(np.float32), sources)
        path = layer_path(folder, name)
        write_manifest(
            path,
            [write_part(table, path / part_name(0))],
            {**about, "sources": sorted(set(sources))},
        )
    return len(ids)
