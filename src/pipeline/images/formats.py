"""Image files at the byte level: reading one safely, and what its header says before anything
is decoded.

This module owns the checks that come before a decoder: `read_image_file` reads a regular file
without blocking and refuses it unread when over `DEFAULT_MAX_FILE_BYTES` (or the caller's
limit); `read_header` names the format by the signature OpenCV picks its decoder by, and the
JPEG, PNG, WebP, BMP and TIFF parsers give its size (for `DEFAULT_MAX_PIXELS`), where the image
ends, and whether a GPU decoder would render it as OpenCV does. What fails here is an
`ImageError`, which becomes a row of failures.parquet. Pure Python on bytes: no OpenCV, no torch.
"""

from __future__ import annotations

import os
import re
import stat
from typing import NamedTuple


class ImageError(ValueError):
    """A file that cannot be used as an image; it becomes a row of failures.parquet."""


DEFAULT_MAX_PIXELS = 178_956_970
DEFAULT_MAX_FILE_BYTES = 256 * 2**20

_FILE_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def read_image_file(path: str, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """The bytes of the regular file at `path`, refused unread when over `max_bytes`.

    Opened without blocking, so a FIFO or a device named like an image is refused instead of
    hanging its loader; type and size come from the open descriptor, so what is checked is what
    is read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = _FILE_KINDS.get(stat.S_IFMT(info.st_mode), "an unknown kind")
            raise ImageError(f"not a regular file ({kind})")
        if info.st_size > max_bytes:
            raise ImageError(f"{info.st_size} bytes, over max_file_bytes={max_bytes}")
        with open(fd, "rb", closefd=False) as file:
            return file.read(info.st_size)
    finally:
        os.close(fd)


class Header(NamedTuple):
    format: str
    width: int
    height: int
    end: int  # where the image ends: what follows (a motion photo's video, padding) is not read
    # A JPEG that torchvision's decode_jpeg renders as OpenCV does, on a GPU as well: Huffman
    # coded (baseline, extended or progressive), 8-bit, grey or YCbCr (no Adobe colour
    # transform: CMYK, RGB), upright (nvJPEG ignores EXIF orientation; OpenCV applies it).
    device_decodable: bool = False


# Signatures of formats OpenCV decodes but whose size is not read here, to name them.
_UNSIZED_FORMATS = (
    (b"#?RADIANCE", "Radiance HDR"),
    (b"#?RGBE", "Radiance HDR"),
    (b"PF", "PFM"),
    (b"Pf", "PFM"),
    (b"GIF8", "GIF"),
    (b"\x59\xa6\x6a\x95", "Sun raster"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"v/1\x01", "OpenEXR"),
)


def read_header(data: bytes) -> Header:
    """Format, size and end of the image in `data`, by the signatures OpenCV picks decoders by."""
    if data.startswith(b"\xff\xd8\xff"):
        return _jpeg_header(data)
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png_header(data)
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return Header("WebP", *_webp_size(data), len(data))
    if data.startswith(b"BM"):
        return Header("BMP", *_bmp_size(data), len(data))
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return Header("TIFF", *_tiff_size(data), len(data))
    kind = next((name for magic, name in _UNSIZED_FORMATS if data.startswith(magic)), None)
    if kind is None and data[:1] == b"P" and data[1:2] in (b"1", b"2", b"3", b"4", b"5", b"6"):
        kind = "PNM"
    if kind is None:
        raise ImageError("not an image this pipeline reads (JPEG, PNG, WebP, BMP or TIFF)")
    raise ImageError(
        f"{kind} image: not read, as its size cannot be checked before decoding "
        "(JPEG, PNG, WebP, BMP and TIFF are read)"
    )


# A marker: 0xFF then a code that is not stuffing (00), fill (FF) or a restart marker (D0-D7), so
# the search skips entropy-coded data in C. Fixed width: no backtracking on runs of 0xFF.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xff\xd0-\xd7]")
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOFn, not DHT, JPG, DAC
_JPEG_HUFFMAN_FRAMES = frozenset((0xC0, 0xC1, 0xC2))  # baseline, extended, progressive
_JPEG_EOI, _JPEG_TEM, _JPEG_APP1, _JPEG_APP14 = 0xD9, 0x01, 0xE1, 0xEE


def _jpeg_header(data: bytes) -> Header:
    """Size from the first frame header, end after the end-of-image marker, found by walking
    the segments by their lengths (an EXIF thumbnail's markers are inside one)."""
    size: tuple[int, int] | None = None
    decodable = True
    at = 2
    while (marker := _JPEG_MARKER.search(data, at)) is not None:
        code, at = data[marker.start() + 1], marker.end()
        if code == _JPEG_EOI:
            if size is None:
                raise ImageError("JPEG without a frame header (corrupt)")
            return Header("JPEG", *size, at, decodable)
        if code == _JPEG_TEM:
            continue  # no length
        length = int.from_bytes(data[at : at + 2], "big")
        if code in _JPEG_FRAMES and size is None:
            size = (
                int.from_bytes(data[at + 5 : at + 7], "big"),
                int.from_bytes(data[at + 3 : at + 5], "big"),
            )
            decodable &= (  # slices: a header cut short must not raise here
                code in _JPEG_HUFFMAN_FRAMES
                and data[at + 2 : at + 3] == b"\x08"
                and data[at + 7 : at + 8] in (b"\x01", b"\x03")
            )
        elif code == _JPEG_APP14 and data[at + 2 : at + 7] == b"Adobe":
            decodable = False
        elif code == _JPEG_APP1 and data[at + 2 : at + 8] == b"Exif\x00\x00":
            decodable &= _exif_orientation(data[at + 8 : at + max(length, 2)]) in (0, 1)
        at += max(length, 2)
    raise ImageError("truncated JPEG (no end-of-image marker)")


def _exif_orientation(tiff: bytes) -> int:
    """The Orientation tag (0x0112) of an EXIF block's first directory; 0 when there is none
    or the block cannot be read (OpenCV then applies none either)."""
    order = "little" if tiff[:2] == b"II" else "big"
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 0
    directory = int.from_bytes(tiff[4:8], order)
    entries = int.from_bytes(tiff[directory : directory + 2], order)
    for at in range(directory + 2, min(len(tiff) - 11, directory + 2 + 12 * entries), 12):
        if int.from_bytes(tiff[at : at + 2], order) == 0x0112:
            return int.from_bytes(tiff[at + 8 : at + 10], order)
    return 0


def _png_header(data: bytes) -> Header:
    """Size from IHDR (libpng requires it first), end after the IEND chunk, chunk by chunk."""
    if data[12:16] != b"IHDR" or len(data) < 24:
        raise ImageError("truncated PNG (no IHDR chunk)" if len(data) < 24 else "corrupt PNG")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    at = 8
    while at + 8 <= len(data):
        length, kind = int.from_bytes(data[at : at + 4], "big"), data[at + 4 : at + 8]
        at += length + 12  # length, type, data, CRC
        if kind == b"IEND" and at <= len(data):
            return Header("PNG", width, height, at)
    raise ImageError("truncated PNG (no IEND chunk)")


def _webp_size(data: bytes) -> tuple[int, int]:
    """The canvas size, as libwebp's WebPGetFeatures (OpenCV's header reader) reports it."""
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + (bits >> 14 & 0x3FFF)
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return (
            int.from_bytes(data[26:28], "little") & 0x3FFF,
            int.from_bytes(data[28:30], "little") & 0x3FFF,
        )
    raise ImageError("corrupt or truncated WebP header")


def _bmp_size(data: bytes) -> tuple[int, int]:
    """As OpenCV's BMP reader: an OS/2 header has 16-bit sizes, the others signed 32-bit (a
    negative height is a top-down image)."""
    if len(data) < 26:
        raise ImageError("truncated BMP header")
    if int.from_bytes(data[14:18], "little") == 12:
        return int.from_bytes(data[18:20], "little"), int.from_bytes(data[20:22], "little")
    width = int.from_bytes(data[18:22], "little", signed=True)
    return abs(width), abs(int.from_bytes(data[22:26], "little", signed=True))


_TIFF_VALUE_SIZES = {3: 2, 4: 4, 16: 8}  # SHORT, LONG, LONG8


def _tiff_size(data: bytes) -> tuple[int, int]:
    """ImageWidth and ImageLength of the first directory, the page OpenCV decodes; classic
    and BigTIFF, either byte order."""
    order = "little" if data[:2] == b"II" else "big"

    def number(at: int, size: int) -> int:
        if at + size > len(data):
            raise ImageError("truncated TIFF header")
        return int.from_bytes(data[at : at + size], order)

    big = number(2, 2) == 43
    offset_size, entry_size = (8, 20) if big else (4, 12)
    directory = number(4 if not big else 8, offset_size)
    entries = number(directory, 8 if big else 2)
    if entries > 0xFFFF:
        raise ImageError("corrupt TIFF directory")
    size: dict[int, int] = {}
    for at in range(directory + (8 if big else 2), len(data), entry_size)[:entries]:
        tag, kind = number(at, 2), number(at + 2, 2)
        if tag in (256, 257) and tag not in size and kind in _TIFF_VALUE_SIZES:
            size[tag] = number(at + 4 + offset_size, _TIFF_VALUE_SIZES[kind])
    if len(size) < 2:
        raise ImageError("TIFF without a width and height (corrupt or truncated)")
    return size[256], size[257]
