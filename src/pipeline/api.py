"""The pipeline from Python, for notebooks: `from pipeline import embed`.

    frame = embed("photos/", model="resnet50", layers=["layer3", "global_pool"])
    vectors = np.stack(frame["global_pool"])            # (N, 2048) float32

Images are a folder, a list of paths, a DataFrame (`path` column, optional `label`) or a tensor
batch already preprocessed; the model a preset name (as `model=` on the command line) or any
`torch.nn.Module`. Files go through the same loader, hooks, checks and write path as
`python -m pipeline`; with `output_dir` the Parquet contract is kept there, otherwise it is
written to a temporary folder and read back. For hooks on your own loop, use
`pipeline.hooks.LayerHooks`, the context manager underneath.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from hydra import compose, initialize_config_module

from pipeline.app import typed
from pipeline.config import PipelineConfig
from pipeline.data import folder_manifest, labels
from pipeline.errors import ConfigError
from pipeline.extract import extract_images
from pipeline.hooks import LayerHooks
from pipeline.models import build_model, weights_provenance
from pipeline.store import FAILURES_FILE, read_embeddings

Images = str | os.PathLike | Sequence[str | os.PathLike] | pd.DataFrame | torch.Tensor


def embed(
    images: Images,
    model: str | torch.nn.Module = "efficientnet_lite0",
    layers: Sequence[str] | str | None = None,
    pool: str = "auto",
    *,
    output_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    device: str = "auto",
    num_workers: int | None = 0,
    overrides: Sequence[str] = (),
) -> pd.DataFrame:
    """Embeddings of `images` at `layers`: a DataFrame with `image_id`, `label` (when known)
    and one column per layer holding float32 vectors. Images that could not be read are in
    `frame.attrs["failures"]` (`image_id`, `error`, `reason`), not rows.

    `layers` defaults to the preset's embedding layer (`global_pool` for a module that has
    one); `overrides` are any other command-line overrides (`model.input_size=[3,160,160]`).
    """
    if isinstance(layers, str):
        layers = [layers]
    if isinstance(images, torch.Tensor):
        return _embed_tensor(images, _module(model), layers or _default_layers(model), pool)
    settings = [
        f"pool={pool}",
        f"batch_size={batch_size}",
        f"device={device}",
        f"num_workers={'null' if num_workers is None else num_workers}",
        "tracking=none",
        *([f"model={model}"] if isinstance(model, str) else []),
        *([f"layers=[{','.join(layers)}]"] if layers else []),
        *overrides,
    ]
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(output_dir) if output_dir is not None else Path(scratch) / "embeddings"
        cfg = _config([*settings, f"output_dir={out}"])
        if not isinstance(model, str):
            if not layers:
                cfg.layers = _default_layers(model)
            cfg.model.name = type(model).__name__
        network = build_model(cfg.model) if isinstance(model, str) else model
        weights = (
            weights_provenance(cfg.model)
            if isinstance(model, str)
            else {"init": "module", "target": f"{type(model).__module__}.{type(model).__name__}"}
        )
        result = extract_images(network, _manifest(images), cfg, weights)
        return _read_back(out, list(result.layers))


def _config(overrides: list[str]) -> PipelineConfig:
    with initialize_config_module("pipeline.conf", version_base="1.3"):
        return typed(compose("config", overrides=overrides))


def _module(model: str | torch.nn.Module) -> torch.nn.Module:
    return build_model(_config([f"model={model}"]).model) if isinstance(model, str) else model


def _default_layers(model: str | torch.nn.Module) -> list[str]:
    if isinstance(model, str):
        return [_config([f"model={model}"]).model.embedding_layer]
    names = {name for name, _ in model.named_modules()}
    if "global_pool" in names:
        return ["global_pool"]
    raise ConfigError("name the layers to hook: embed(..., layers=['layer4'])")


def _manifest(images: Images) -> pd.DataFrame:
    """The loader's manifest (`image_id`, `path`, optional `label`) for files on disk."""
    if isinstance(images, str | os.PathLike) and Path(images).expanduser().is_dir():
        return folder_manifest(
            Path(images).expanduser(),
            (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"),
            False,
        )
    if isinstance(images, pd.DataFrame):
        if "path" not in images:
            raise ConfigError(f"the DataFrame needs a `path` column; it has {list(images)}")
        paths = [str(p) for p in images["path"]]
        manifest = pd.DataFrame({"image_id": paths, "path": paths})
        if "label" in images:
            manifest["label"] = labels(images["label"], manifest.index)
        return manifest
    if isinstance(images, str | os.PathLike):
        raise ConfigError(f"{images} is not a folder: pass a folder, a list of paths or a frame")
    paths = [str(p) for p in images]
    if not paths:
        raise ConfigError("no images given")
    return pd.DataFrame({"image_id": paths, "path": paths})


def _read_back(out: Path, layers: list[str]) -> pd.DataFrame:
    first = read_embeddings(out / f"{layers[0]}.parquet")
    frame = pd.DataFrame({"image_id": first.ids})
    if first.labels is not None:
        frame["label"] = first.labels
    for layer in layers:
        frame[layer] = list(read_embeddings(out / f"{layer}.parquet").vectors)
    frame.attrs["failures"] = pd.read_parquet(out / FAILURES_FILE)
    return frame


def _embed_tensor(
    batch: torch.Tensor, model: torch.nn.Module, layers: Sequence[str], pool: str
) -> pd.DataFrame:
    """A preprocessed batch (N, C, H, W): one forward pass, no files."""
    model.eval()
    device = next(model.parameters()).device
    with torch.inference_mode(), LayerHooks(model, layers, pool) as hooks:
        hooks.describe(batch[:1].to(device))
        outputs = hooks(batch.to(device))
    frame = pd.DataFrame({"image_id": [str(i) for i in range(len(batch))]})
    for layer, values in outputs.items():
        frame[layer] = list(values.float().cpu().numpy().astype(np.float32))
    frame.attrs["failures"] = pd.DataFrame(columns=["image_id", "error", "reason"])
    return frame
