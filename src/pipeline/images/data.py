"""Images in: manifests, decoding with OpenCV, and albumentations preprocessing.

A manifest is a DataFrame with one row per image in dataset order: `image_id` (the path relative
to the dataset root, `/`-separated, always valid UTF-8), `path` (where to read it, exactly as the
OS names it, so of object dtype: it may not be UTF-8), `error` (why the image cannot be used,
when listing it already tells; missing otherwise) and, when known, `label` (a string, or None
for an image whose label is missing).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import multiprocessing
import os
import re
import signal
import stat
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no version check over the network

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from albumentations.pytorch import ToTensorV2
from timm.data import resolve_model_data_config

from pipeline.config import DatasetConfig, DatasetKind
from pipeline.errors import ConfigError

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
            _existing_dir(dataset.root),
            dataset.extensions,
            dataset.labels_from_folders,
            allow_outside_root=dataset.allow_outside_root,
        )
    if dataset.kind is DatasetKind.demo:
        from pipeline.images import demo  # only the demo needs scikit-image and scikit-learn

        demo.ensure(Path(dataset.root))
    return table_manifest(
        Path(dataset.path).expanduser(),
        _existing_dir(dataset.root),
        dataset.path_column,
        dataset.label_column,
        dataset.allow_outside_root,
    )


def folder_manifest(
    root: Path,
    extensions: Sequence[str],
    labels_from_folders: bool,
    allow_outside_root: bool = False,
) -> pd.DataFrame:
    """Every entry under `root` named with one of `extensions`, recursively, sorted by id.

    What cannot be an image is listed all the same, so that it becomes a failure row with its
    reason instead of vanishing: a folder named x.jpg, a FIFO, a broken symlink or a symlink
    loop fail when read; a name that is not UTF-8, a symlink whose target leaves the root
    (unless `allow_outside_root`) and a subfolder that cannot be listed carry their reason in
    the `error` column. Files with other extensions are counted in `manifest.attrs["skipped"]`
    (extension -> count) for the caller to report, and so are symlinked folders, which are not
    entered (a loop cannot trap the walk; list their images in a manifest instead).
    """
    suffixes = {e.lower() for e in extensions}
    real_root = os.path.realpath(root)
    real_dirs: dict[str, str] = {}
    found: dict[str, str | None] = {}  # relative path -> error
    skipped: Counter[str] = Counter()
    pending = [(str(root), "")]
    while pending:
        folder, prefix = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as err:
            if not prefix:
                raise ConfigError(f"dataset.root {root} cannot be listed: {err.strerror}") from None
            found[prefix.rstrip("/")] = f"cannot list this folder: {err.strerror}"
            continue
        for entry in entries:
            relative = prefix + entry.name
            is_dir = entry.is_dir(follow_symlinks=False)
            if is_dir:
                pending.append((entry.path, relative + "/"))
            suffix = os.path.splitext(entry.name)[1].lower()
            if suffix in suffixes:
                outside = (
                    entry.is_symlink()
                    and not allow_outside_root
                    and _outside_root(entry.path, real_root, real_dirs)
                )
                found.setdefault(relative, _outside_root_error(outside) if outside else None)
            elif entry.is_symlink() and entry.is_dir():
                skipped["(symlinked folder)"] += 1
            elif not is_dir:
                skipped[suffix or "(no extension)"] += 1
    if not found:
        raise ConfigError(
            f"no images ({', '.join(sorted(suffixes))}) under {root}: "
            "check dataset.root or dataset.extensions"
        )
    rows = sorted(((*_utf8_id(r, e), r) for r, e in found.items()), key=lambda row: row[0])
    manifest = pd.DataFrame(
        {
            "image_id": [i for i, _, _ in rows],
            "path": pd.Series([str(root / r) for _, _, r in rows], dtype=object),
            "error": [e for _, e, _ in rows],
        }
    )
    if labels_from_folders:
        manifest["label"] = [Path(i).parent.name for i, _, _ in rows]
    manifest.attrs["skipped"] = dict(sorted(skipped.items()))
    return manifest


def table_manifest(
    path: Path,
    root: Path,
    path_column: str,
    label_column: str | None,
    allow_outside_root: bool = False,
) -> pd.DataFrame:
    """A CSV or Parquet manifest with a path column (relative to `root`) and an optional label.

    A path that leaves `root`, by `..` or through a symlink, is refused unless
    `allow_outside_root`, and its id is then its absolute path: `..` refuses the whole manifest
    (a wrong root, most likely), a symlink only its own row. A name that is not valid UTF-8
    (a CSV in another encoding, a binary Parquet column) gets a readable id and a failure row.
    """
    if not path.is_file():
        raise ConfigError(f"manifest {path} does not exist: check dataset.path")
    table = _read_table(path)
    if table.empty:
        raise ConfigError(f"manifest {path} lists no images: check dataset.path")
    wanted = [c for c in (path_column, label_column) if c is not None]
    missing = [c for c in wanted if c not in table.columns]
    if missing:
        raise ConfigError(
            f"manifest {path} has no column {', '.join(map(repr, missing))}; "
            f"its columns are {list(table.columns)}: set dataset.path_column / "
            "dataset.label_column"
        )
    names = [os.fsdecode(p) if isinstance(p, bytes) else str(p) for p in table[path_column]]
    relative = [_image_id(name, root, allow_outside_root) for name in names]
    real_root, real_dirs = os.path.realpath(root), {}
    ids, errors = [], []
    for name in relative:
        outside = not allow_outside_root and _outside_root(str(root / name), real_root, real_dirs)
        image_id, error = _utf8_id(name, _outside_root_error(outside) if outside else None)
        ids.append(image_id)
        errors.append(error)
    paths = pd.Series([str(root / r) for r in relative], dtype=object)
    manifest = pd.DataFrame({"image_id": ids, "path": paths, "error": errors})
    duplicated = manifest["image_id"][manifest["image_id"].duplicated()]
    if len(duplicated):
        raise ConfigError(
            f"manifest {path} lists {duplicated.iloc[0]!r} more than once "
            f"({len(duplicated)} repeats): each image may appear once"
        )
    if label_column is not None:
        manifest["label"] = labels(table[label_column], manifest.index)
    return manifest


def labels(values: Iterable[Any], index: pd.Index) -> pd.Series:
    """A manifest's `label` column (on `index`) as the Parquet files hold it: strings, valid
    UTF-8 (bytes that are not are escaped, as ids are), None where a label is missing (an empty
    CSV cell, a null, NaN). Of object dtype: pandas would infer `str` and make None a NaN."""
    return pd.Series(
        [None if pd.isna(label) else _utf8_id(str(label), None)[0] for label in values],
        index=index,
        dtype=object,
    )


PARQUET_MAGIC = b"PAR1"


def _read_table(path: Path) -> pd.DataFrame:
    """A manifest file: Parquet (by its suffix or its first bytes), else CSV; anything else is
    a config error naming the file."""
    try:
        with path.open("rb") as file:
            parquet = path.suffix in (".parquet", ".pq") or file.read(4) == PARQUET_MAGIC
    except OSError as err:
        raise ConfigError(f"manifest {path} cannot be read: {err.strerror}") from None
    if parquet:
        try:
            return pd.read_parquet(path)
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
            reason = str(err).splitlines()[0]
            raise ConfigError(
                f"manifest {path} is not a readable Parquet file ({reason}): check dataset.path"
            ) from None
    try:
        # Undecodable bytes stay as surrogates: they name files on disk in another encoding.
        return pd.read_csv(path, dtype=object, encoding_errors="surrogateescape")
    except pd.errors.EmptyDataError:
        raise ConfigError(f"manifest {path} is empty: check dataset.path") from None
    except (pd.errors.ParserError, UnicodeError) as err:
        reason = str(err).splitlines()[0]
        raise ConfigError(
            f"manifest {path} cannot be read as CSV or Parquet ({reason}): check dataset.path"
        ) from None


def _image_id(path: str, root: Path, allow_outside_root: bool) -> str:
    # Lexical normalisation: `..` may not climb out; symlinks are _outside_root's to judge.
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


def _outside_root(path: str, real_root: str, real_dirs: dict[str, str]) -> str | None:
    """Where `path` really leads if that is outside `real_root`, else None.

    Folders are resolved once each (`real_dirs` caches them) and the file itself only when it
    is a symlink: one lstat per image, not one per path component.
    """
    folder, name = os.path.split(path)
    if folder not in real_dirs:
        real_dirs[folder] = os.path.realpath(folder)
    real = os.path.join(real_dirs[folder], name)
    if os.path.islink(real):
        real = os.path.realpath(real)
    return None if os.path.commonpath([real, real_root]) == real_root else real


def _outside_root_error(target: str) -> str:
    return (
        f"symlink points outside dataset.root (to {target}): "
        "set dataset.allow_outside_root=true to read it"
    )


def _utf8_id(name: str, error: str | None) -> tuple[str, str | None]:
    """`name` and `error`; for a name that is not valid UTF-8 (its undecodable bytes arrive as
    surrogates), the name with those bytes backslash-escaped, and a failure. Parquet, CSV and
    the trackers all need UTF-8."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        escaped = os.fsencode(name).decode("utf-8", "backslashreplace")
        return escaped, "file name is not valid UTF-8: rename it"
    return name, error


def _existing_dir(root: str | None) -> Path:
    if root is None:
        raise ConfigError("dataset.root is not set: dataset.root=/path/to/images")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise ConfigError(f"dataset.root {path} is not a folder: check the path")
    return path


# --- reading and decoding ----------------------------------------------------------------------


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


Transform = Callable[..., dict[str, Any]]  # albumentations' call: transform(image=x)["image"]


class ImageDataset(torch.utils.data.Dataset):
    """Reads, decodes and transforms one image; a failure is returned, never raised.

    Args:
        paths: the files, in manifest order.
        transform: from `build_transform` (or one that makes several tensors of an image,
            as `augment.CopyTransform` does).
        max_pixels: see `decode_image`.
        errors: per path, a reason it fails without being opened (the manifest's `error`
            column, sliced like `paths`), or None.
        min_side: see `decode_image`; `Preprocess.min_side` lets large JPEGs decode faster.
        max_file_bytes: files larger than this are refused before they are read.
    """

    def __init__(
        self,
        paths: Sequence[str],
        transform: Transform,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        *,
        errors: Sequence[str | None] | None = None,
        min_side: int | None = None,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    ) -> None:
        self.paths = list(paths)
        self.errors = None if errors is None else list(errors)
        if self.errors is not None and len(self.errors) != len(self.paths):
            raise ValueError(f"{len(self.errors)} errors for {len(self.paths)} paths")
        self.transform = transform
        self.max_pixels = max_pixels
        self.min_side = min_side
        self.max_file_bytes = max_file_bytes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, tuple[str, str] | None]:
        try:
            return index, self.transformed(self.read(index)), None
        except Exception as err:
            return index, None, failure(err)

    def read(self, index: int) -> bytes:
        """The file's bytes, or the manifest's reason it cannot be used, raised."""
        # A string, not just truthy: a manifest read back may hold NaN for "no error".
        if self.errors is not None and isinstance(reason := self.errors[index], str):
            raise ImageError(reason)
        return read_image_file(self.paths[index], self.max_file_bytes)

    def transformed(self, data: bytes) -> torch.Tensor:
        """The model's input from a file's bytes, decoded with OpenCV."""
        image = decode_image(data, self.max_pixels, min_side=self.min_side)
        return self.transform(image=image)["image"]


def failure(err: Exception) -> tuple[str, str]:
    """(error, reason) of a failure row."""
    return type(err).__name__, str(err) or type(err).__name__


def collate(
    samples: list[tuple[int, torch.Tensor | None, tuple[str, str] | None]],
    *,
    shared: bool = True,
) -> Batch:
    """The samples as a Batch; `shared`: see `stack`."""
    good = [(i, x) for i, x, _ in samples if x is not None]
    return Batch(
        indices=[i for i, _ in good],
        images=stack((x for _, x in good), shared=shared),
        failures=[(i, *err) for i, _, err in samples if err is not None],
    )


def stack(images: Iterable[torch.Tensor], *, shared: bool = True) -> torch.Tensor | None:
    """The images as one batch tensor (None for none). `shared`: torch's default_collate stacks
    them straight into shared memory in a loader process, so the batch reaches the main process
    without the copy that moving a stacked tensor there costs (py-spy: a sixth of a loader
    process's time on 500x375 photos); a batch that stays in its process (the model runs there)
    is stacked in its own memory, without a fresh shared segment to fault in."""
    images = list(images)
    if not images:
        return None
    return torch.utils.data.default_collate(images) if shared else torch.stack(images)


def image_loader(
    paths: Sequence[str],
    transform: Transform,
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    errors: Sequence[str | None] | None = None,
    min_side: int | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    prefetch_factor: int | None = None,
) -> torch.utils.data.DataLoader:
    """Batches in manifest order, decoded in `num_workers` processes (keywords: ImageDataset)."""
    dataset = ImageDataset(
        paths,
        transform,
        max_image_pixels,
        errors=errors,
        min_side=min_side,
        max_file_bytes=max_file_bytes,
    )
    return batch_loader(dataset, collate, batch_size, num_workers, pin_memory, prefetch_factor)


def balanced_batches(images: int, batch_size: int, workers: int) -> list[range]:
    """Batches of `batch_size` in order, but the last ones cut so that each of `workers` loader
    processes (dealt batches in turn, as torch's DataLoader does) gets the same number of
    images: where each process also runs the model, one left with a batch more than the others
    would keep the other cores idle at the end (a whole batch of 12 MP photos is a second)."""
    workers = max(1, workers)
    full = images // (workers * batch_size) * workers * batch_size
    rest, more = divmod(images - full, workers)
    sizes = [batch_size] * (full // batch_size) + [rest + (w < more) for w in range(workers)]
    cuts = np.cumsum([0, *sizes]).tolist()
    return [range(a, b) for a, b in itertools.pairwise(cuts) if b > a]


def batch_loader(
    dataset: torch.utils.data.Dataset,
    collate_fn: Callable[[list], object],
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    prefetch_factor: int | None = None,
    *,
    balanced: bool = False,
) -> torch.utils.data.DataLoader:
    """`dataset` in order, in batches, from `num_workers` single-threaded processes (see
    `pipeline.extraction.devices.plan_loader`); `balanced`: see `balanced_batches`."""
    batching: dict[str, Any] = (
        {"batch_sampler": balanced_batches(len(dataset), batch_size, num_workers)}
        if balanced
        else {"batch_size": batch_size, "shuffle": False}
    )
    return _Loader(
        dataset,
        **batching,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        prefetch_factor=(prefetch_factor or 2) if num_workers else None,
        multiprocessing_context=_worker_context() if num_workers else None,
        worker_init_fn=_start_worker if num_workers else None,
    )


class _Loader(torch.utils.data.DataLoader):
    """A DataLoader whose processes leave Ctrl-C to the main process, which ends them.

    A terminal's Ctrl-C reaches every process of the group. A loader process that took it as
    KeyboardInterrupt while half started printed a traceback, and so did the main process when
    it came in the middle of starting them (torch's iterator, half built, fails in `__del__`).
    So the loader processes ignore SIGINT, and while they are started the main process holds a
    Ctrl-C back and raises it once they all run: then the iterator is whole and ends them.
    """

    def __iter__(self) -> Iterator[Any]:
        if not self.num_workers:
            return super().__iter__()
        with _interrupts_held():
            return super().__iter__()


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """A SIGINT arriving inside the block is raised when it ends. Processes forked inside it
    inherit the handler that holds it, so they cannot be interrupted before they ignore it."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield  # handlers can only be set from the main thread, or one set outside Python
        return
    held: list[int] = []
    signal.signal(signal.SIGINT, lambda number, _frame: held.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        signal.raise_signal(signal.SIGINT)  # as it would have been: KeyboardInterrupt, usually


def _start_worker(_worker: int) -> None:
    """One thread per loader process: the processes are the parallelism (torch already sets
    its own; OpenCV's is set again, for a spawned process imports cv2 afresh). Ctrl-C is the
    main process's to handle (see `_Loader`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def _worker_context() -> multiprocessing.context.BaseContext:
    """The loader processes' start method, named rather than inherited: inside a joblib (loky)
    worker, as Hydra's joblib launcher runs jobs, the inherited default is loky's, which cannot
    start plain processes. fork where the platform has it (as torch's default on Linux), else
    spawn."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")
