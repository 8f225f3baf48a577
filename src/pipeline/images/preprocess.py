"""Preprocessing: what turns a decoded image into the model's input, as timm's eval transform.

This module owns `Preprocess` (input size, crop, interpolation, normalisation: recorded in every
Parquet file), `resolve_preprocess` (the model's own data config with the user's overrides),
`build_transform` (that transform in albumentations, on OpenCV's arrays), the `INTERPOLATIONS`
it accepts, and `Transform`, the call every transform answers: transform(image=x)["image"].
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no version check over the network

import albumentations as A
import cv2
import torch
from albumentations.pytorch import ToTensorV2
from timm.data import resolve_model_data_config

from pipeline.errors import ConfigError

INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}

Transform = Callable[..., dict[str, Any]]  # albumentations' call: transform(image=x)["image"]


@dataclass(frozen=True)
class Preprocess:
    """What turns a decoded image into the model's input; recorded in every Parquet file."""

    input_size: tuple[int, int, int]
    crop_pct: float
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def resize_to(self) -> tuple[int, int]:
        """(height, width) the resize aims at before the centre crop: the input over crop_pct."""
        _, height, width = self.input_size
        return math.floor(height / self.crop_pct), math.floor(width / self.crop_pct)

    @property
    def min_side(self) -> int:
        """The shortest side a decoded image may have without the resize enlarging it."""
        return max(self.resize_to)


def resolve_preprocess(
    model: torch.nn.Module,
    input_size: Sequence[int] | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Preprocess:
    """The model's own data config (timm's, or ImageNet's defaults), with the given overrides."""
    args = {
        k: v
        for k, v in {
            "input_size": input_size,
            "crop_pct": crop_pct,
            "interpolation": interpolation,
            "mean": mean,
            "std": std,
        }.items()
        if v is not None
    }
    resolved = resolve_model_data_config(model, args=args)
    if resolved["interpolation"] not in INTERPOLATIONS:
        raise ConfigError(
            f"interpolation {resolved['interpolation']!r} is not one of "
            f"{sorted(INTERPOLATIONS)}: set model.interpolation"
        )
    return Preprocess(
        input_size=tuple(int(s) for s in resolved["input_size"]),
        crop_pct=float(resolved["crop_pct"]),
        interpolation=str(resolved["interpolation"]),
        mean=tuple(float(m) for m in resolved["mean"]),
        std=tuple(float(s) for s in resolved["std"]),
    )


def build_transform(preprocess: Preprocess) -> A.Compose:
    """timm's eval transform in albumentations: resize the short side, centre-crop, normalise.

    Downscaling uses area interpolation, which anti-aliases like PIL's resize does for timm.
    """
    _, height, width = preprocess.input_size
    interpolation = INTERPOLATIONS[preprocess.interpolation]
    scale = preprocess.resize_to
    if height == width:
        resize = A.SmallestMaxSize(
            max_size=scale[0], interpolation=interpolation, area_for_downscale="image"
        )
    else:
        resize = A.Resize(*scale, interpolation=interpolation, area_for_downscale="image")
    return A.Compose(
        [
            resize,
            A.CenterCrop(height, width),
            A.Normalize(mean=preprocess.mean, std=preprocess.std, max_pixel_value=255.0),
            ToTensorV2(),
        ]
    )
