"""The offline demo data set: real photos that ship inside scikit-image and scikit-learn, each with
planted near-duplicates, so that clustering and duplicate detection have known answers.

    python -m pipeline.images.demo [ROOT]        # ROOT defaults to outputs/data/demo

Each photo becomes a group: the original (lossless PNG) and five altered copies (crop, mirror,
heavy JPEG, colour jitter, half size). `manifest.csv` lists `path`, `label` (the photo's name),
`group` (the near-duplicate group, here the same) and `variant`. The build is deterministic, and
the manifest is written last, by atomic rename, so its presence means the set is complete.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

# Real photographs bundled in scikit-image's wheel (no download); synthetic images left out.
SKIMAGE_PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "cell",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "microaneurysms",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
)
SKLEARN_PHOTOS = ("china", "flower")
DEFAULT_ROOT = Path("outputs/data/demo")


def photos() -> dict[str, np.ndarray]:
    """Each source photo by name, as uint8 RGB or grey."""
    import skimage.data  # heavy, and only the demo needs it
    from sklearn.datasets import load_sample_images

    images = {name: getattr(skimage.data, name)() for name in SKIMAGE_PHOTOS}
    sample = load_sample_images()
    for name, image in zip(SKLEARN_PHOTOS, sample.images, strict=True):
        images[name] = image
    return images


def _crop(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    y, x = rng.integers(0, h // 5 + 1), rng.integers(0, w // 5 + 1)
    return image[y : y + h * 4 // 5, x : x + w * 4 // 5]


def _jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gain = rng.uniform(0.8, 1.2, size=image.shape[2:] or (1,))
    offset = rng.uniform(-20, 20)
    return np.clip(image * gain + offset, 0, 255).astype(np.uint8)


def _half(image: np.ndarray, _: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    return cv2.resize(image, (w // 2, h // 2), interpolation=cv2.INTER_AREA)


# name -> (alteration, JPEG quality of the saved copy)
VARIANTS: dict[str, tuple[Callable[[np.ndarray, np.random.Generator], np.ndarray], int]] = {
    "crop": (_crop, 90),
    "mirror": (lambda image, _: image[:, ::-1], 90),
    "jpeg": (lambda image, _: image, 20),
    "jitter": (_jitter, 90),
    "half": (_half, 90),
}


def _write(path: Path, rgb: np.ndarray, jpeg_quality: int | None = None) -> None:
    bgr = rgb if rgb.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if jpeg_quality else []
    ok, encoded = cv2.imencode(path.suffix, bgr, params)
    if not ok:
        raise OSError(f"could not encode {path}")
    path.write_bytes(encoded.tobytes())


def build(root: Path) -> pd.DataFrame:
    """Write the demo images and their manifest under `root`."""
    rows = []
    for name, image in photos().items():
        folder = root / "images" / name
        folder.mkdir(parents=True, exist_ok=True)
        _write(folder / "original.png", image)
        rows.append((f"images/{name}/original.png", name, name, "original"))
        rng = np.random.default_rng(zlib.crc32(name.encode()))  # stable across runs
        for variant, (alter, quality) in VARIANTS.items():
            _write(folder / f"{variant}.jpg", alter(image, rng), quality)
            rows.append((f"images/{name}/{variant}.jpg", name, name, variant))
    manifest = pd.DataFrame(rows, columns=["path", "label", "group", "variant"])
    partial = root / "manifest.csv.partial"
    manifest.to_csv(partial, index=False)
    partial.replace(root / "manifest.csv")
    return manifest


def ensure(root: Path) -> None:
    """Build the demo set under `root` unless a complete one is already there."""
    if not (root / "manifest.csv").is_file():
        build(root)


def main(argv: list[str]) -> None:
    root = Path(argv[0]) if argv else DEFAULT_ROOT
    manifest = build(root)
    print(
        f"demo data set: {len(manifest)} images of {manifest['group'].nunique()} photos in {root}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
