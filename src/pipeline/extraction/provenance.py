"""What an extraction's rows depend on and say of themselves: the config's hash, the weights,
the values key a published layer is reused under, and the metadata every part carries.

It imports neither torch nor timm (nor pandas): an extraction whose layers are all published
already (`extract.up_to_date`) needs only this, and answers without loading them."""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import platform
from dataclasses import asdict, dataclass, field
from enum import Enum
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import Decode, ModelConfig, PipelineConfig, Pool, Precision
from pipeline.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

    from pipeline.images.preprocess import Preprocess

# Keys that decide the embedding values of a layer; the rest say where or how fast a run goes,
# or which layers (a layer's rows do not depend on which others are captured beside it).
HASHED_KEYS = (
    "dataset",
    "model",
    "pool",
    "gem_p",
    "pool_grid",
    "scales",
    "output_key",
    "precision",
    "decode",  # the GPU's decoder and resize give slightly different pixels
    "seed",
    "max_image_pixels",
    "max_file_bytes",
)


@dataclass(frozen=True)
class LayerInfo:
    """What one image's pass through a layer looks like."""

    shape: tuple[int, ...]  # raw output, without the batch dimension
    pool: Pool
    dim: int
    depth: int  # position in model.named_modules(); logits come after every module
    params: dict[str, float] = field(default_factory=dict)  # the pooling's (pool_params)


def checkpoint_path(checkpoint: str) -> Path:
    """A local path, or `pkg://package/path/in/it` for weights that ship inside a package."""
    if not checkpoint.startswith("pkg://"):
        return Path(checkpoint).expanduser()
    package, _, inner = checkpoint.removeprefix("pkg://").partition("/")
    try:
        return Path(str(importlib.resources.files(package).joinpath(inner)))
    except ModuleNotFoundError:
        raise ConfigError(
            f"model.checkpoint {checkpoint}: package {package!r} is not installed (pip install it)"
        ) from None


def weights_provenance(model: ModelConfig) -> dict[str, str | None]:
    """Which weights made these embeddings, for the Parquet metadata and MLflow: a checkpoint
    and its SHA-256, timm's pretrained weights and their hub id, or random init."""
    if model.checkpoint is not None:
        path = checkpoint_path(model.checkpoint)
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        return {"init": "checkpoint", "checkpoint": model.checkpoint, "sha256": digest}
    if model.module is not None:
        return {"init": "module", "target": str(model.module.get("_target_"))}
    if model.pretrained:
        import timm  # only here: the hub id of its pretrained weights

        cfg = timm.models.get_pretrained_cfg(model.name)
        hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        return {"init": "pretrained", "hub_id": hub_id or f"timm/{model.name}"}
    return {"init": "random"}


def config_hash(cfg: PipelineConfig) -> str:
    """A short digest of everything that decides the embedding values, to tell runs apart."""
    values = {k: getattr(cfg, k) for k in HASHED_KEYS}
    values["dataset"] = {
        k: v for k, v in asdict(cfg.dataset).items() if k not in ("truth", "identity")
    }
    text = json.dumps(
        values,
        sort_keys=True,
        default=lambda v: (
            v.value
            if isinstance(v, Enum)
            else asdict(v)
            if hasattr(v, "__dataclass_fields__")
            else str(v)
        ),
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def layer_info(metadata: dict[str, Any]) -> LayerInfo:
    """A published layer's LayerInfo, from its metadata."""
    return LayerInfo(
        tuple(metadata["output_shape"]),
        Pool(metadata["pool"]),
        metadata["dim"],
        metadata["depth"],
        metadata.get("pool_params") or {},
    )


def extraction_metadata(
    cfg: PipelineConfig,
    weights: dict[str, Any],
    preprocess: Preprocess,
    decode: Decode,
    device: str,
    precision: Precision,
) -> dict[str, Any]:
    """What every part's schema metadata says of the run that wrote it."""
    return {
        "model": cfg.model.name,
        "weights": weights,
        "dataset": {
            "name": cfg.dataset.name,
            "kind": cfg.dataset.kind.value,
            "root": str(Path(cfg.dataset.root or ".").expanduser().resolve()),
            "truth": str(Path(t).expanduser().resolve()) if (t := cfg.dataset.truth) else None,
            # Whether the labels are the images' folder names: `auto` as it was decided.
            "labels_from_folders": cfg.dataset.labels_from_folders,
        },
        "preprocess": {**preprocess.as_dict(), "decode": decode.value},
        "config_hash": config_hash(cfg),
        "engine": cfg.engine.name.value,
        "device": device,
        "precision": precision.value,
        "compile": cfg.compile,
        "scales": list(cfg.scales),
        "versions": versions(),
    }


def values_key(config: str, weights: dict[str, Any]) -> str:
    """What a published layer's rows depend on besides the layer: the config's hash and the
    weights. A layer published under another key is embedded again, whole."""
    text = json.dumps({"config": config, "weights": weights}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def calibration_spec(cfg: PipelineConfig) -> dict[str, Any]:
    return {**asdict(cfg.calibration), "seed": cfg.seed}


def manifest_digest(manifest: pd.DataFrame) -> str:
    """Of the ids and labels, in order: which images, not their bytes."""
    columns = [c for c in ("image_id", "label") if c in manifest]
    return hashlib.sha256(manifest[columns].to_csv(index=False).encode()).hexdigest()


def versions() -> dict[str, str]:
    import numpy as np
    import timm
    import torch

    return {
        "pipeline": _own_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _own_version() -> str:
    """This package's version, read as `pipeline.__version__` is (importing the package from
    here would close a cycle through its lazy `embed`)."""
    try:
        return version("pipeline")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"
