"""Thumbnails: small copies of image files, for the pictures and pages that show images to a
person (contact sheets, dedup's pairs and review page, the explorer), never the originals.

Each file is read and decoded as the extraction reads and decodes it (`read_image_file`,
`decode_image`: the same refusals of hostile files), a large JPEG at a reduced DCT scale, then
shrunk so that its longer side is at most `side` pixels (and, for a page, encoded as JPEG).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pipeline.images.decode import decode_image
from pipeline.images.formats import read_image_file

QUALITY = 80


def thumbnail_rgb(path: Path, side: int) -> np.ndarray:
    """The image at `path` as RGB, its longer side at most `side` pixels. Raises OSError (the
    file) or ImageError (its content) where the extraction would refuse it."""
    image = decode_image(read_image_file(str(path)), min_side=side)
    scale = side / max(image.shape[:2])
    if scale < 1:
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return image


def thumbnail_jpeg(path: Path, side: int, quality: int = QUALITY) -> bytes:
    """`thumbnail_rgb` as JPEG bytes."""
    bgr = cv2.cvtColor(thumbnail_rgb(path, side), cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # OpenCV's JPEG encoder fails only on what decode_image never returns
        raise OSError(f"{path}: OpenCV could not encode its thumbnail")
    return data.tobytes()
