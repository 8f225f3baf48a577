"""Decoding with OpenCV: a file's bytes to 8-bit RGB, after its header passed the checks.

This module owns `decode_image` (the header read and sized by `formats`, then `cv2.imdecode`,
at a reduced DCT scale for a JPEG much larger than the model needs), `failure` (how a failure
becomes its row), and OpenCV's thread count. Nothing here sets it at import: a process that
exists to decode (a loader's, a Ray task's) calls `single_threaded_opencv`, and the extraction
holds `opencv_threads(1)` while it runs, since its parallelism is those processes (and OpenCV's
thread pool does not survive the fork that starts them: a child can hang on its locks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import cv2
import numpy as np

from pipeline.images.formats import DEFAULT_MAX_PIXELS, ImageError, read_header


def single_threaded_opencv() -> None:
    """OpenCV without its thread pool in this process, for good: for a process that exists to
    decode (a loader's, a Ray task's), one of many that are the parallelism."""
    cv2.setNumThreads(1)


@contextlib.contextmanager
def opencv_threads(threads: int) -> Iterator[None]:
    """OpenCV's thread count set for the block, and given back after (a notebook keeps its own
    setting). One thread before a fork stops OpenCV's pool, which the child could not use."""
    before = cv2.getNumThreads()
    cv2.setNumThreads(threads)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, *, min_side: int | None = None
) -> np.ndarray:
    """A JPEG, PNG, WebP, BMP or TIFF image as 8-bit RGB: grey, alpha, 16-bit, palette, CMYK.

    Before anything is decoded, the header is read by a parser for the format OpenCV will pick
    (OpenCV picks its decoder by signature, as `read_header` does), and images over
    `max_pixels` are refused. Other formats (Radiance HDR, PFM, PNM, GIF, JPEG 2000...) are
    refused, as their size cannot be checked first. OpenCV's own limits do not replace this:
    the environment variables OPENCV_IO_MAX_IMAGE_PIXELS (default 2**30) and
    OPENCV_IO_MAX_IMAGE_WIDTH / _HEIGHT (2**20) are read once, when cv2 loads, so they can
    neither follow `max_pixels` nor be set per call; what they refuse raises, as ImageError.

    A JPEG must reach its end-of-image marker and a PNG its IEND chunk, found by walking the
    segments and chunks from the start (about 20 us for a 500x375 JPEG, a C-level scan over its
    entropy-coded data; decoding it takes 550 us), so a file cut short is refused whatever the
    OpenCV version makes of it (libjpeg only warns about a premature end), while bytes after
    the end (a motion photo's video, padding) are accepted and never passed to OpenCV.

    IMREAD_COLOR_RGB drops alpha, expands grey, scales 16-bit to 8-bit and applies the EXIF
    orientation, as PIL's `convert("RGB")` plus `exif_transpose` would.

    Args:
        data: the file's bytes.
        max_pixels: the largest width x height decoded.
        min_side: the shortest side the caller needs (the resize's target, `Preprocess.min_side`).
            A JPEG whose short side is 2, 4 or 8 times that is decoded at 1/2, 1/4 or 1/8 scale
            in the DCT domain, much faster, never below `min_side`. Other formats decode whole.
    """
    if not data:
        raise ImageError("empty file")
    header = read_header(data)
    if header.width * header.height > max_pixels:
        raise ImageError(
            f"{header.width}x{header.height} pixels, over max_image_pixels={max_pixels} "
            "(a decompression bomb?)"
        )
    flags = cv2.IMREAD_COLOR_RGB
    if header.format == "JPEG" and min_side is not None:
        flags |= _jpeg_reduction(min(header.width, header.height), min_side)
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8, header.end), flags)
    except cv2.error as err:
        raise ImageError(f"OpenCV cannot decode it: {err.err}") from None
    if image is None:
        raise ImageError("not an image OpenCV can decode (corrupt or unsupported variant)")
    return image


# The scale bit alone: IMREAD_REDUCED_COLOR_N also sets IMREAD_COLOR_BGR, which OpenCV refuses
# alongside IMREAD_COLOR_RGB. EXIF orientation is still applied at reduced scale.
_JPEG_REDUCTIONS = (
    (8, cv2.IMREAD_REDUCED_GRAYSCALE_8),
    (4, cv2.IMREAD_REDUCED_GRAYSCALE_4),
    (2, cv2.IMREAD_REDUCED_GRAYSCALE_2),
)


def _jpeg_reduction(short_side: int, min_side: int) -> int:
    """The imdecode flag of the largest DCT scaling that keeps the short side >= `min_side`."""
    for factor, flag in _JPEG_REDUCTIONS:
        if -(-short_side // factor) >= min_side:  # libjpeg rounds scaled sizes up
            return flag
    return 0


def failure(err: Exception) -> tuple[str, str]:
    """(error, reason) of a failure row."""
    return type(err).__name__, str(err) or type(err).__name__
