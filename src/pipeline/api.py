"""The pipeline from Python, for notebooks: `from pipeline import embed`.

    frame = embed("photos/", model="resnet50", layers=["layer3", "global_pool"])
    vectors = np.stack(frame["global_pool"])            # (N, 2048) float32

Images are a folder, a list of paths, a DataFrame (`path` column, optional `label`) or a tensor
batch already preprocessed; the model a preset name (as `model=` on the command line) or any
`torch.nn.Module`. Files go through the same loader, hooks, checks and write path as
`python -m pipeline`; with `output_dir` the Parquet contract is kept there, otherwise it is
written to a temporary folder and read back. For hooks on your own loop, use
`pipeline.extraction.hooks.LayerHooks`, the context manager underneath.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from pipeline.app import check_overrides, compose_config
from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError
from pipeline.extract import extract_images
from pipeline.extraction.devices import (
    computing,
    model_input,
    place_model,
    resolve_device,
    resolve_precision,
)
from pipeline.extraction.hooks import HookPlan
from pipeline.extraction.models import build_model, weights_provenance
from pipeline.images.manifest import folder_manifest, labels
from pipeline.images.preprocess import resolve_preprocess
from pipeline.search.vectors import non_finite_rows
from pipeline.storage.contract import FAILURES_FILE, read_embeddings

Images = str | os.PathLike | Sequence[str | os.PathLike] | pd.DataFrame | torch.Tensor
NON_FINITE_HINT = "try precision=fp32, or check the weights"  # as extraction's failure rows say


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
    """Embeddings of `images` at `layers`: a DataFrame with `image_id`, `label` (when known,
    None where missing) and one column per layer holding float32 vectors. Images that could
    not be read, and those whose embedding holds a NaN or Inf, are in `frame.attrs["failures"]`
    (`image_id`, `error`, `reason`), not rows.

    `layers` defaults to the config's (a preset's embedding and near-duplicate layers;
    `global_pool` for a module that has one); `overrides` are any other command-line overrides
    (`model.input_size=[3,160,160]`), for files and tensors alike. A tensor batch is
    (N, C, H, W) as the model's preprocessing makes it (`model.input_size`); its ids are the
    positions, "0", "1", ...

    Raises:
        ConfigError (a ValueError): a setting or input that cannot work, before any work: an
            image given twice, a tensor of another shape, an unknown key or preset.
    """
    if isinstance(layers, str):
        layers = [layers]
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
    if isinstance(images, torch.Tensor):
        cfg = _config(settings, model, layers)
        network = build_model(cfg.model) if isinstance(model, str) else model
        return _embed_tensor(images, network, cfg)
    manifest = _manifest(images)
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(output_dir) if output_dir is not None else Path(scratch) / "embeddings"
        cfg = _config([*settings, f"output_dir={out}"], model, layers)
        network = build_model(cfg.model) if isinstance(model, str) else model
        weights = (
            weights_provenance(cfg.model)
            if isinstance(model, str)
            else {"init": "module", "target": f"{type(model).__module__}.{type(model).__name__}"}
        )
        result = extract_images(network, manifest, cfg, weights)
        return _read_back(out, list(result.layers))


def _config(
    overrides: list[str], model: str | torch.nn.Module, layers: Sequence[str] | None
) -> PipelineConfig:
    """The typed config of `overrides`; a module's own name, and its default layers unless
    `layers` names them."""
    check_overrides(overrides)  # one line naming the closest key, not Hydra's page
    cfg = compose_config(overrides)
    if not isinstance(model, str):
        if not layers:
            cfg.layers = _default_layers(model)
        cfg.model.name = type(model).__name__
    return cfg


def _default_layers(model: torch.nn.Module) -> list[str]:
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
        _refuse_repeats(paths)
        manifest = pd.DataFrame({"image_id": paths, "path": paths})
        if "label" in images:
            manifest["label"] = labels(images["label"], manifest.index)
        return manifest
    if isinstance(images, str | os.PathLike):
        raise ConfigError(f"{images} is not a folder: pass a folder, a list of paths or a frame")
    paths = [str(p) for p in images]
    if not paths:
        raise ConfigError("no images given")
    _refuse_repeats(paths)
    return pd.DataFrame({"image_id": paths, "path": paths})


def _refuse_repeats(paths: list[str]) -> None:
    """Each image once: a path is an image's id, and ids are unique (two spellings of one file,
    `a/./b.jpg` and `a/b.jpg`, are the same image)."""
    files = pd.Series([os.path.normpath(os.path.abspath(p)) for p in paths])
    repeated = [p for p, again in zip(paths, files.duplicated(), strict=True) if again]
    if repeated:
        raise ConfigError(
            f"the images include {repeated[0]!r} more than once ({len(repeated)} repeats): "
            "give each image once"
        )


def _read_back(out: Path, layers: list[str]) -> pd.DataFrame:
    first = read_embeddings(out / f"{layers[0]}.parquet")
    frame = pd.DataFrame({"image_id": first.ids})
    if first.labels is not None:
        frame["label"] = first.labels
    for layer in layers:
        frame[layer] = list(read_embeddings(out / f"{layer}.parquet").vectors)
    frame.attrs["failures"] = pd.read_parquet(out / FAILURES_FILE)
    return frame


def _embed_tensor(batch: torch.Tensor, model: torch.nn.Module, cfg: PipelineConfig) -> pd.DataFrame:
    """A preprocessed batch: forward passes of `cfg.batch_size` images, no files, with the
    layers, pooling, device and precision the config says, as for files."""
    m = cfg.model
    preprocess = resolve_preprocess(model, m.input_size, m.crop_pct, m.interpolation, m.mean, m.std)
    expected = f"(N, {', '.join(map(str, preprocess.input_size))})"
    if (
        batch.ndim != 4
        or tuple(batch.shape[1:]) != preprocess.input_size
        or not batch.is_floating_point()
        or not len(batch)
    ):
        raise ConfigError(
            f"a tensor batch must be float, of shape {expected}, as the model's preprocessing "
            f"makes it (model.input_size in overrides changes it); got {batch.dtype} "
            f"{tuple(batch.shape)}"
        )
    device = resolve_device(cfg.device)
    plan = HookPlan(
        tuple(cfg.layers), cfg.pool, cfg.output_key, cfg.gem_p, cfg.pool_grid, tuple(cfg.scales)
    )
    place_model(model, device)
    with plan.on(model) as hooks, computing(device, resolve_precision(cfg.precision, device)):
        hooks.describe(model_input(batch[:1], device))
        parts = [hooks(model_input(images, device)) for images in batch.split(cfg.batch_size)]
    outputs = {
        name: torch.cat([part[name] for part in parts]).float().cpu().numpy() for name in hooks.info
    }
    bad = non_finite_rows(outputs)
    kept = [i for i in range(len(batch)) if i not in bad]
    frame = pd.DataFrame({"image_id": [str(i) for i in kept]})
    for name, rows in outputs.items():
        frame[name] = list(rows[kept])
    frame.attrs["failures"] = pd.DataFrame(
        [
            (str(i), "NonFiniteEmbedding", f"NaN or Inf in layer {layer}: {NON_FINITE_HINT}")
            for i, layer in sorted(bad.items())
        ],
        columns=["image_id", "error", "reason"],
    )
    return frame
