"""Images in: manifests, decoding with OpenCV, and albumentations preprocessing.

A manifest is a DataFrame with one row per image in dataset order: `image_id` (the path relative
to the dataset root, `/`-separated), `path` (where to read it) and, when known, `label`.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no version check over the network

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image
from timm.data import resolve_model_data_config

from pipeline.config import ConfigError, DatasetConfig, DatasetKind

# Decoding runs in parallel across loader processes. OpenCV's own thread pool does not survive
# the fork that starts them (a child can hang on its locks), so it stays off.
cv2.setNumThreads(1)

INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}


# --- manifests ---------------------------------------------------------------------------------


def load_manifest(dataset: DatasetConfig) -> pd.DataFrame:
    """The images of a dataset, in the order they will be written."""
    if dataset.kind is DatasetKind.folder:
        return folder_manifest(
            _existing_dir(dataset.root), dataset.extensions, dataset.labels_from_folders
        )
    if dataset.kind is DatasetKind.demo:
        from pipeline import demo  # only the demo needs scikit-image and scikit-learn

        demo.ensure(Path(dataset.root))
    return table_manifest(
        Path(dataset.path).expanduser(),
        _existing_dir(dataset.root),
        dataset.path_column,
        dataset.label_column,
        dataset.allow_outside_root,
    )


def folder_manifest(
    root: Path, extensions: Sequence[str], labels_from_folders: bool
) -> pd.DataFrame:
    """Every image under `root`, recursively, sorted by relative path."""
    suffixes = {e.lower() for e in extensions}
    ids = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.suffix.lower() in suffixes and p.is_file()
    )
    if not ids:
        raise ConfigError(
            f"no images ({', '.join(sorted(suffixes))}) under {root}: "
            "check dataset.root or dataset.extensions"
        )
    manifest = pd.DataFrame({"image_id": ids, "path": [str(root / i) for i in ids]})
    if labels_from_folders:
        manifest["label"] = [Path(i).parent.name for i in ids]
    return manifest


def table_manifest(
    path: Path,
    root: Path,
    path_column: str,
    label_column: str | None,
    allow_outside_root: bool = False,
) -> pd.DataFrame:
    """A CSV or Parquet manifest with a path column (relative to `root`) and an optional label.

    A path that leaves `root` is refused unless `allow_outside_root`; its id is then its
    absolute path."""
    if not path.is_file():
        raise ConfigError(f"manifest {path} does not exist: check dataset.path")
    table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, dtype=str)
    wanted = [c for c in (path_column, label_column) if c is not None]
    missing = [c for c in wanted if c not in table.columns]
    if missing:
        raise ConfigError(
            f"manifest {path} has no column {', '.join(map(repr, missing))}; "
            f"its columns are {list(table.columns)}: set dataset.path_column / "
            "dataset.label_column"
        )
    ids = [_image_id(str(p), root, allow_outside_root) for p in table[path_column]]
    manifest = pd.DataFrame({"image_id": ids, "path": [str(root / i) for i in ids]})
    duplicated = manifest["image_id"][manifest["image_id"].duplicated()]
    if len(duplicated):
        raise ConfigError(
            f"manifest {path} lists {duplicated.iloc[0]!r} more than once "
            f"({len(duplicated)} repeats): each image may appear once"
        )
    if label_column is not None:
        manifest["label"] = table[label_column].astype(str).to_numpy()
    return manifest


def _image_id(path: str, root: Path, allow_outside_root: bool) -> str:
    # Lexical normalisation: `..` may not climb out, but a symlink inside the root may point out.
    absolute = Path(os.path.abspath(root / path))
    try:
        return absolute.relative_to(os.path.abspath(root)).as_posix()
    except ValueError:
        if allow_outside_root:
            return absolute.as_posix()
        raise ConfigError(
            f"manifest path {path!r} lies outside dataset.root ({root}): give paths relative "
            "to the root, or set dataset.allow_outside_root=true"
        ) from None


def _existing_dir(root: str | None) -> Path:
    if root is None:
        raise ConfigError("dataset.root is not set: dataset.root=/path/to/images")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise ConfigError(f"dataset.root {path} is not a folder: check the path")
    return path


# --- decoding and preprocessing ----------------------------------------------------------------


class ImageError(ValueError):
    """A file that cannot be used as an image; it becomes a row of failures.parquet."""


DEFAULT_MAX_PIXELS = 178_956_970
Image.MAX_IMAGE_PIXELS = None  # we check sizes ourselves, against max_image_pixels


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Any image OpenCV reads, as 8-bit RGB: grey, alpha, 16-bit and palette files included.

    IMREAD_COLOR_RGB drops alpha, expands grey, scales 16-bit to 8-bit and applies the EXIF
    orientation, as PIL's `convert("RGB")` plus `exif_transpose` would. Truncated JPEG and PNG
    files, which OpenCV would half-decode, and images over `max_pixels` are refused.
    """
    if not data:
        raise ImageError("empty file")
    if data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[-64:]:
        raise ImageError("truncated JPEG (no end-of-image marker)")
    if data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in data[-64:]:
        raise ImageError("truncated PNG (no IEND chunk)")
    width, height = _size_from_header(data)
    if width * height > max_pixels:
        raise ImageError(
            f"{width}x{height} pixels, over max_image_pixels={max_pixels} (a decompression bomb?)"
        )
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
    if image is None:
        raise ImageError("not an image OpenCV can decode (corrupt or unsupported format)")
    return image


def _size_from_header(data: bytes) -> tuple[int, int]:
    """(width, height) from the file header alone, before anything is decoded; (0, 0) when PIL
    does not know the format (OpenCV then applies its own limit)."""
    try:
        with Image.open(io.BytesIO(data)) as header:
            return header.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return 0, 0


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
    scale = [math.floor(s / preprocess.crop_pct) for s in (height, width)]
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


# --- loading -----------------------------------------------------------------------------------


@dataclass
class Batch:
    """Images that decoded, by manifest index, and (index, error, reason) for those that did not."""

    indices: list[int]
    images: torch.Tensor | None
    failures: list[tuple[int, str, str]]

    def pin_memory(self) -> Batch:
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


class ImageDataset(torch.utils.data.Dataset):
    """Reads, decodes and transforms one image; a failure is returned, never raised."""

    def __init__(
        self, paths: Sequence[str], transform: A.Compose, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, tuple[str, str] | None]:
        try:
            image = decode_image(Path(self.paths[index]).read_bytes(), self.max_pixels)
            return index, self.transform(image=image)["image"], None
        except Exception as err:
            return index, None, (type(err).__name__, str(err) or type(err).__name__)


def collate(samples: list[tuple[int, torch.Tensor | None, tuple[str, str] | None]]) -> Batch:
    good = [(i, x) for i, x, _ in samples if x is not None]
    return Batch(
        indices=[i for i, _ in good],
        images=torch.stack([x for _, x in good]) if good else None,
        failures=[(i, *err) for i, _, err in samples if err is not None],
    )


def image_loader(
    paths: Sequence[str],
    transform: A.Compose,
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
) -> torch.utils.data.DataLoader:
    """Batches in manifest order, decoded in `num_workers` processes."""
    return torch.utils.data.DataLoader(
        ImageDataset(paths, transform, max_image_pixels),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers else None,
    )
