"""The pipeline from Python, for notebooks: `from pipeline import embed`.

    frame = embed("photos/", model="resnet50", layers=["layer3", "global_pool"])
    vectors = np.stack(frame["global_pool"])            # (N, 2048) float32

Images are a folder, a list of paths, a DataFrame (`path` column, optional `label`) or a tensor
batch already preprocessed; the model a preset name (as `model=` on the command line) or any
`torch.nn.Module`. Every setting not given is the config's, as `python -m pipeline` would run
with it: the same layers, pooling, batch size, device and loader. Files go through the same
loader, hooks, checks and write path; with `output_dir` the Parquet contract (calibration copies
included) is kept there, otherwise it is written to a temporary folder and read back. A model
named by its settings is built once and kept for the next call (`clear_model_cache()`). For
hooks on your own loop, use `pipeline.extraction.hooks.LayerHooks`, the context manager
underneath. docs/notebook.ipynb runs all of it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from pipeline.app import check_overrides, compose_config
from pipeline.config import ModelConfig, PipelineConfig, Pool
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
from pipeline.extraction.models import build_model, checkpoint_path, weights_provenance
from pipeline.images.manifest import folder_manifest, labels
from pipeline.images.preprocess import resolve_preprocess
from pipeline.search.vectors import non_finite_rows
from pipeline.storage.contract import FAILURES_FILE, read_embeddings

Images = str | os.PathLike | Sequence[str | os.PathLike] | pd.DataFrame | torch.Tensor
NON_FINITE_HINT = "try precision=fp32, or check the weights"  # as extraction's failure rows say
# The model settings `build_model` reads: the same ones, the same model. Preprocessing and the
# default layers are not among them; `seed` is, for weights drawn at random.
BUILD_KEYS = ("name", "pretrained", "checkpoint", "checkpoint_keys", "num_classes", "module")


def embed(
    images: Images,
    model: str | torch.nn.Module | None = None,
    layers: Sequence[str] | str | None = None,
    pool: str | Pool | None = None,
    *,
    output_dir: str | os.PathLike | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    num_workers: int | None = None,
    overrides: Sequence[str] = (),
) -> pd.DataFrame:
    """Embeddings of `images` at `layers`: a DataFrame with `image_id`, `label` (when known,
    None where missing) and one column per layer holding float32 vectors. Images that could
    not be read, and those whose embedding holds a NaN or Inf, are in `frame.attrs["failures"]`
    (`image_id`, `error`, `reason`), not rows.

    Every keyword left at None is the config's, as `python -m pipeline` runs with it, so a call
    gives the rows and widths of the command with the same settings: `model` the default
    preset (efficientnet_lite0), `layers` the preset's embedding and near-duplicate layers
    (`global_pool` for a module of your own that has one), `pool` grid (4 x 4 cells of each
    map, 16 x channels values; `pool="auto"` averages a map), `batch_size` 32, `device` auto,
    `num_workers` the loader plan for the cores and device. `overrides` are any other
    command-line overrides (`model.input_size=[3,160,160]`, `pool_grid=2`), for files and
    tensors alike. A tensor batch is (N, C, H, W) as the model's preprocessing makes it
    (`model.input_size`); its ids are the positions, "0", "1", ...

    Calibration copies (near-duplicate copies of a sample of the images, which
    `python -m pipeline.dedup dedup.threshold=auto` calibrates on) are embedded only with
    `output_dir`, into each layer's `_calibration/` as the config's `calibration` says
    (`overrides=["calibration.images=0"]` for none): without it the frame is all that is
    kept, and nothing would read them.

    A model given by name is built once and kept, with its weights on the device it last ran
    on, for the next call with the same model settings (`model.name`, `pretrained`,
    `checkpoint` and that file's size and time, `num_classes`, `module`; `seed` for random
    weights, drawn as the command draws them); `clear_model_cache()` frees it. The last model
    built is the one kept. A `torch.nn.Module` you pass is used as it is and never kept.

    Raises:
        ConfigError (a ValueError): a setting or input that cannot work, before any work: an
            image given twice, a tensor of another shape, an unknown key or preset.
    """
    if isinstance(layers, str):
        layers = [layers]
    given = {
        "pool": pool.value if isinstance(pool, Enum) else pool,
        "batch_size": batch_size,
        "device": device,
        "num_workers": num_workers,
        "model": model if isinstance(model, str) else None,
        "layers": f"[{','.join(layers)}]" if layers else None,
    }
    settings = [
        "tracking=none",
        *(f"{key}={value}" for key, value in given.items() if value is not None),
        *overrides,
    ]
    own_layers = bool(layers) or any(_key(o) == "layers" for o in overrides)
    if isinstance(images, torch.Tensor):
        cfg = _config(settings, model, own_layers)
        return _embed_tensor(images, _model(cfg, model).network, cfg)
    manifest = _manifest(images)
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(output_dir) if output_dir is not None else Path(scratch) / "embeddings"
        # Without output_dir the folder goes with the call: no calibration copies for it.
        kept = [] if output_dir is not None else ["calibration.images=0"]
        cfg = _config([*settings, f"output_dir={out}", *kept], model, own_layers)
        built = _model(cfg, model)
        result = extract_images(built.network, manifest, cfg, built.weights)
        return _read_back(out, list(result.layers))


def clear_model_cache() -> None:
    """Forget the model `embed` keeps between calls (and free its memory): the next call
    builds its model again."""
    _kept.clear()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@dataclass
class _Built:
    """A model ready to embed with, the weights it holds, and the hooks it had when built
    (any more were left on it: it is not used again)."""

    network: torch.nn.Module
    weights: dict[str, Any]
    hooks: int = 0


_kept: dict[str, _Built] = {}  # at most one: the last model built, by its settings


def _model(cfg: PipelineConfig, model: str | torch.nn.Module | None) -> _Built:
    """The model `cfg` names, built or kept from an earlier call; a module given, as it is."""
    if isinstance(model, torch.nn.Module):
        target = f"{type(model).__module__}.{type(model).__name__}"
        return _Built(model, {"init": "module", "target": target})
    key = _model_key(cfg)
    kept = _kept.get(key)
    if kept is not None and _hook_count(kept.network) == kept.hooks:
        return kept
    clear_model_cache()  # one model kept: the last one goes before another is built
    # The weights a random init draws are the command's (it seeds torch with `seed` first),
    # and the caller's random state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(cfg.seed)
        network = build_model(cfg.model)
    built = _Built(network, weights_provenance(cfg.model), _hook_count(network))
    _kept[key] = built
    return built


def _model_key(cfg: PipelineConfig) -> str:
    """The settings a built model depends on, as text: the same text, the same model."""
    m: ModelConfig = cfg.model
    settings: dict[str, Any] = {k: v for k, v in asdict(m).items() if k in BUILD_KEYS}
    if m.checkpoint is not None:
        path = checkpoint_path(m.checkpoint)
        stat = path.stat() if path.is_file() else None  # a changed file: other weights
        settings["file"] = [stat.st_size, stat.st_mtime_ns] if stat else None
    if m.checkpoint is None and (m.module is not None or not m.pretrained):
        settings["seed"] = cfg.seed
    return json.dumps(
        settings, sort_keys=True, default=lambda v: v.value if isinstance(v, Enum) else str(v)
    )


def _hook_count(network: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in network.modules()
    )


def _key(override: str) -> str:
    return override.lstrip("~+").partition("=")[0].partition("@")[0]


def _config(
    overrides: list[str], model: str | torch.nn.Module | None, own_layers: bool
) -> PipelineConfig:
    """The typed config of `overrides`, composed once; a module's own name, and its default
    layers unless the call names them."""
    check_overrides(overrides)  # one line naming the closest key, not Hydra's page
    cfg = compose_config(overrides)
    if isinstance(model, torch.nn.Module):
        if not own_layers:
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
