"""The copies people meet: near-duplicates of an image, made the way images get copied.

A copy is edited (cropped, straightened, or framed as a screenshot; brightened or blurred;
optionally mirrored), rescaled and saved again as a low-quality JPEG. The same family makes the
positives of the hard benchmark (`benchmarks/neardup_bench.py`) and the calibration copies the
extraction embeds for `dedup.threshold=auto`, each from its own seed. Everything is numpy and
OpenCV on uint8 RGB arrays, deterministic given the random generator.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import cv2
import numpy as np
import torch

from pipeline.images.decode import decode_image
from pipeline.images.preprocess import Transform

JPEG_QUALITY = (20, 60)
RESCALE = (0.4, 0.9)
CROP_KEEP = (0.80, 0.95)  # of each side
ROTATE_DEGREES = (1.0, 4.0)
BORDER = (0.02, 0.08)  # of the longer side, per edge (twice that at the top)


def crop(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Keep 80-95% of each side, at a random position."""
    h, w = image.shape[:2]
    ch, cw = (int(s * rng.uniform(*CROP_KEEP)) for s in (h, w))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    return image[y : y + ch, x : x + cw]


def rotate(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Turn by 1-4 degrees either way and keep the largest upright rectangle inside, as a
    photo editor's straighten tool does (no invented corners)."""
    h, w = image.shape[:2]
    angle = rng.uniform(*ROTATE_DEGREES) * rng.choice([-1, 1])
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    turned = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR)
    # The largest axis-aligned rectangle of the same aspect inside a rectangle turned by angle.
    a = np.deg2rad(abs(angle))
    shrink = min(h, w) / (min(h, w) * np.cos(a) + max(h, w) * np.sin(a))
    ih, iw = int(h * shrink), int(w * shrink)
    y, x = (h - ih) // 2, (w - iw) // 2
    return turned[y : y + ih, x : x + iw]


def screenshot(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Framed as a screenshot of it would be: a flat border, wider at the top (a title bar)."""
    side = max(image.shape[:2])
    edge = int(side * rng.uniform(*BORDER))
    colour = rng.integers(0, 256, size=3).tolist()
    return cv2.copyMakeBorder(image, 2 * edge, edge, edge, edge, cv2.BORDER_CONSTANT, value=colour)


def colour(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Contrast x0.7-1.3 about mid-grey, brightness -30..30."""
    contrast, brightness = rng.uniform(0.7, 1.3), rng.uniform(-30, 30)
    shifted = (image.astype(np.float32) - 128) * contrast + 128 + brightness
    return np.clip(shifted, 0, 255).astype(np.uint8)


def blur(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur, sigma 0.5-1.2 pixels."""
    return cv2.GaussianBlur(image, (0, 0), rng.uniform(0.5, 1.2))


def rescale(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Both sides times 0.4-0.9."""
    factor = rng.uniform(*RESCALE)
    h, w = image.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def mirror(image: np.ndarray, _: np.random.Generator) -> np.ndarray:
    return np.ascontiguousarray(image[:, ::-1])


def jpeg(image: np.ndarray, rng: np.random.Generator) -> bytes:
    """Saved as a JPEG file at quality 20-60."""
    quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
    bgr = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"OpenCV could not encode a {image.shape} image as JPEG")
    return encoded.tobytes()


Edit = Callable[[np.ndarray, np.random.Generator], np.ndarray]
GEOMETRIC: tuple[Edit, ...] = (crop, rotate, screenshot)
PHOTOMETRIC: tuple[Edit, ...] = (colour, blur)
FAMILY = "crop|rotate|screenshot, colour|blur, [mirror], rescale, jpeg"  # recorded with copies


def near_duplicate(image: np.ndarray, rng: np.random.Generator, flip: bool = False) -> bytes:
    """A copy of an RGB image as a JPEG file: one geometric edit (crop, rotate, screenshot
    border), one photometric (colour, blur), a mirror when `flip`, then rescaled to 0.4-0.9
    and saved at JPEG quality 20-60: edited, resized, saved, as copies travel."""
    edited = GEOMETRIC[rng.integers(len(GEOMETRIC))](image, rng)
    edited = PHOTOMETRIC[rng.integers(len(PHOTOMETRIC))](edited, rng)
    if flip:
        edited = mirror(edited, rng)
    return jpeg(rescale(edited, rng), rng)


class CopyTransform:
    """A loader transform that turns one decoded image into `copies` near-duplicates, each
    decoded back and given the model's own `transform`: {"image": (copies, C, H, W) tensor}.

    Each image's copies come from a generator seeded by `seed` and the image's pixels, so they
    are the same whatever the order, batch or worker that makes them.
    """

    def __init__(self, transform: Transform, copies: int, seed: int, flip: bool) -> None:
        self.transform, self.copies, self.seed, self.flip = transform, copies, seed, flip

    def __call__(self, image: np.ndarray) -> dict[str, torch.Tensor]:
        made = copies_of(image, self.copies, self.seed, self.flip)
        return {"image": torch.stack([self.transform(image=m)["image"] for m in made])}


def copies_of(image: np.ndarray, copies: int, seed: int, flip: bool) -> list[np.ndarray]:
    """`copies` near-duplicates of an RGB image, decoded: the same for the same pixels and seed."""
    rng = np.random.default_rng([seed, zlib.crc32(image.tobytes())])
    return [decode_image(near_duplicate(image, rng, flip)) for _ in range(copies)]
