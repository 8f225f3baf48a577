"""python -m pipeline.visualize [overrides]: what each layer responds to, for one image or a few.

One forward pass with hooks on the chosen layers; for each layer and image, a PNG with the input
(as the model saw it), the mean map of its strongest channels upsampled and blended over it, the
layer's name and output shape, and the activation maps of the channels with the largest mean
activation for that image with their colour scale (`pictures.feature_figure`). ViT token outputs
are reshaped to the patch grid. `<layer>.json` beside each picture lists the channels shown.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.config import PipelineConfig, Pool
from pipeline.errors import ConfigError
from pipeline.results import StageResult

# torch, timm and matplotlib are imported where they are used: this module runs as
# `python -m pipeline.visualize`, and its --help and config errors need none of them.
if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def as_maps(flat: torch.Tensor, shape: tuple[int, ...], prefix_tokens: int) -> torch.Tensor:
    """One image's layer output as (channels, height, width): conv maps as they are, tokens
    (T, D) as D maps over the square patch grid (prefix tokens such as the class token left out).
    """
    output = flat.reshape(shape)
    if output.ndim == 3:
        return output
    if output.ndim == 2:
        patches = output[prefix_tokens:]
        side = math.isqrt(len(patches))
        if side * side != len(patches):
            raise ConfigError(f"{len(patches)} tokens do not form a square patch grid")
        return patches.T.reshape(-1, side, side)
    raise ConfigError(
        f"an output of shape {shape} has no spatial maps to show: pick a conv "
        "or transformer-block layer (python -m pipeline.layers lists them)"
    )


def strongest_channels(maps: torch.Tensor, count: int) -> list[int]:
    """The channels with the largest mean activation, strongest first."""
    import torch

    means = maps.float().mean(dim=(1, 2))
    return torch.argsort(means, descending=True, stable=True)[:count].tolist()


def check(cfg: PipelineConfig) -> list[Path]:
    """The settings and the images, checked before the model is built: the images' paths."""
    v = cfg.visualize
    if v.normalise not in ("channel", "layer"):
        raise ConfigError(f"visualize.normalise is channel or layer, got {v.normalise!r}")
    paths = [Path(p).expanduser() for p in ([v.image] if v.image else []) + v.images]
    if not paths:
        raise ConfigError("no image given: visualize.image=path/to/photo.jpg")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(
            f"image {missing[0]} does not exist: check visualize.image= (the default is a "
            "demo photo: python -m pipeline.images.demo builds them)"
        )
    return paths


def run(cfg: PipelineConfig) -> StageResult:
    import torch

    from pipeline import plots
    from pipeline.extraction.devices import resolve_device
    from pipeline.extraction.hooks import LayerHooks
    from pipeline.extraction.models import build_model
    from pipeline.images.decode import decode_image
    from pipeline.images.preprocess import build_transform, resolve_preprocess
    from pipeline.pictures import feature_figure

    v = cfg.visualize
    paths = check(cfg)
    device = resolve_device(cfg.device)
    model = build_model(cfg.model).to(device)
    m = cfg.model
    preprocess = resolve_preprocess(model, m.input_size, m.crop_pct, m.interpolation, m.mean, m.std)
    transform = build_transform(preprocess)
    batch = torch.stack([transform(image=decode_image(p.read_bytes()))["image"] for p in paths])
    mean, std = np.array(preprocess.mean), np.array(preprocess.std)
    shown: dict[str, dict[str, list[int]]] = {}
    pictures: list[Path] = []
    # flatten keeps every value; the recorded shape turns it back into maps.
    with (
        torch.inference_mode(),
        LayerHooks(model, v.layers, Pool.flatten, cfg.output_key) as hooks,
    ):
        info = hooks.describe(batch[:1].to(device))
        outputs = hooks(batch.to(device))
    out = Path(v.output_dir)
    stems = [p.stem for p in paths]
    for i, path in enumerate(paths):
        # One folder per image, named after it; numbered when two images share a name.
        folder = out / (path.stem if stems.count(path.stem) == 1 else f"{i}-{path.stem}")
        folder.mkdir(parents=True, exist_ok=True)
        picture = np.clip(batch[i].permute(1, 2, 0).numpy() * std + mean, 0, 1)
        for layer, flat in outputs.items():
            maps = as_maps(flat[i].float().cpu(), info[layer].shape, hooks.prefix_tokens)
            channels = strongest_channels(maps, v.channels)
            title = f"{cfg.model.name} {layer}: output {'x'.join(map(str, info[layer].shape))}"
            png = plots.save(
                feature_figure(picture, maps.numpy(), channels, title, v.normalise),
                folder / f"{layer}.png",
            )
            (folder / f"{layer}.json").write_text(json.dumps({"channels": channels}) + "\n")
            pictures.append(png)
            shown.setdefault(folder.name, {})[layer] = channels
    summary = f"feature maps of {len(outputs)} layers for {len(paths)} image(s) -> {out}"
    log.info("%s", summary)
    return StageResult(
        output_dir=out, artifacts=pictures, documents={"channels.json": shown}, summary=summary
    )


if __name__ == "__main__":
    from pipeline.app import main

    main("visualize", run, check=check)
