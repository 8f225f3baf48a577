"""What the tests share, in every folder under tests/ (`from conftest import ...`): small real
photos on disk, a way to run the CLI as a user would, image files as bytes, scraped folders of
bad and good files, and layer folders as the writer publishes them or broken."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image

from pipeline.app import compose_config
from pipeline.config import PipelineConfig
from pipeline.storage.contract import (
    MANIFEST_FILE,
    METADATA_KEY,
    embedding_schema,
    embedding_table,
    part_name,
    write_manifest,
    write_part,
)

REPO = Path(__file__).resolve().parents[1]
# A tiny timm model with random weights (fast, offline, a real architecture), untracked.
TINY_MODEL = [
    "model=timm",
    "model.name=test_efficientnet",
    "model.pretrained=false",
    "tracking=none",
]


# The tiny model on small inputs: the fastest real extraction, for tests of the runs themselves.
SMALL = [*TINY_MODEL, "model.input_size=[3,32,32]", "batch_size=4"]


def photos_in(root: Path, n: int, start: int = 0) -> list[str]:
    """n small random JPEGs named 0000.jpg, 0001.jpg, ... from `start`: their names."""
    rng = np.random.default_rng(start)
    names = [f"{i:04d}.jpg" for i in range(start, start + n)]
    for name in names:
        write_image(root / name, rng.integers(0, 255, (40, 48, 3), np.uint8))
    return names


def one_line_error(done: subprocess.CompletedProcess, code: int, text: str) -> None:
    """The command failed with `code` and one line on stderr that says `text`."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], done.stderr


def write_image(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    bgr = rgb if rgb.ndim == 2 else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    assert cv2.imwrite(str(path), bgr)
    return path


# --- image files as bytes -----------------------------------------------------------------------


def encoded(image: np.ndarray, ext: str, *params: int) -> bytes:
    """`image` (grey, RGB or RGBA; 8 or 16 bits) as the bytes of an `ext` file, by OpenCV."""
    channels = image.shape[2] if image.ndim == 3 else 1
    if channels in (3, 4):  # OpenCV's order: BGR, BGRA
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR if channels == 3 else cv2.COLOR_RGBA2BGRA)
    ok, data = cv2.imencode(ext, image, list(params))
    assert ok, ext
    return data.tobytes()


def jpeg_bytes(rgb: np.ndarray, quality: int = 90) -> bytes:
    return encoded(rgb, ".jpg", cv2.IMWRITE_JPEG_QUALITY, quality)


def png_bytes(image: np.ndarray) -> bytes:
    return encoded(image, ".png")


def pil_bytes(image: np.ndarray, fmt: str, mode: str | None = None, **options: object) -> bytes:
    """`image` saved by Pillow as `fmt` (with its `options`), converted to `mode` first."""
    picture = Image.fromarray(image)
    out = io.BytesIO()
    (picture.convert(mode) if mode else picture).save(out, fmt, **options)
    return out.getvalue()


def bad_and_good_files(root: Path) -> dict[str, str | None]:
    """Every kind of file a scraped folder holds: id -> the reason it must fail, or None."""
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 255, (40, 48, 3), np.uint8)
    files: dict[str, tuple[bytes, str | None]] = {
        "empty.jpg": (b"", "empty file"),
        "truncated.jpg": (jpeg_bytes(photo)[:300], "truncated JPEG"),
        "truncated.png": (png_bytes(photo)[:200], "truncated PNG"),
        "text.png": (b"this is not an image\n" * 20, "not an image"),
        "huge.png": (png_bytes(np.zeros((300, 300), np.uint8)), "over max_image_pixels"),
        "cmyk.jpg": (pil_bytes(photo, "JPEG", "CMYK"), None),
        "sixteen.png": (png_bytes(np.full((30, 30, 3), 40000, np.uint16)), None),
        "palette.png": (pil_bytes(photo, "PNG", "P"), None),
        "alpha.png": (png_bytes(np.full((30, 30, 4), 200, np.uint8)), None),
        "tiny.png": (png_bytes(np.full((1, 1, 3), 9, np.uint8)), None),
    }
    for i in range(8):
        files[f"good{i}.jpg"] = (jpeg_bytes(rng.integers(0, 255, (36, 36, 3), np.uint8)), None)
    root.mkdir(parents=True, exist_ok=True)
    for name, (data, _) in files.items():
        (root / name).write_bytes(data)
    return {name: reason for name, (_, reason) in files.items()}


def many_images(root: Path, n: int) -> Path:
    """n small random PNGs, 0000.png, 0001.png, ..., in `root`."""
    rng = np.random.default_rng(7)
    for i in range(n):
        write_image(root / f"{i:04d}.png", rng.integers(0, 255, (24, 24, 3), np.uint8))
    return root


# What the `photos` fixture holds: scikit-image's photos by name, in a folder per label.
PHOTOS_BY_LABEL = {
    "animals": ["chelsea", "astronaut", "coffee"],
    "scenes": ["rocket", "camera", "coins"],
}
N_PHOTOS = sum(len(names) for names in PHOTOS_BY_LABEL.values())


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """N_PHOTOS real photos from scikit-image, small, in two labelled folders."""
    root = tmp_path_factory.mktemp("photos")
    for label, names in PHOTOS_BY_LABEL.items():
        for name in names:
            image = getattr(skimage.data, name)()
            small = cv2.resize(image, (96, 96), interpolation=cv2.INTER_AREA)
            write_image(root / label / f"{name}.png", small)
    return root


def run_cli(
    *args: str,
    cwd: Path,
    module: str = "pipeline",
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """`python -m <module> args...` in a subprocess, offline, as a user would type it, in `cwd`
    (where its outputs/ folder goes). Tracking goes to `cwd` unless `env` says otherwise."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env={**full_env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_until_chunks(
    args: list[str], cwd: Path, out: Path, chunks: int, **popen: object
) -> subprocess.Popen:
    """`python -m pipeline args...` started in the background, returned once it has staged
    `chunks` chunks of `out` (so a test can kill it, or start a second run, mid-way)."""
    from pipeline.storage.staging import staging_root

    run = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        **({"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL} | popen),
    )
    deadline = time.monotonic() + 300
    while len(list(staging_root(out).glob("*/chunks/*.json"))) < chunks:
        assert run.poll() is None, "the run ended before it staged enough chunks"
        assert time.monotonic() < deadline, "the run staged too little in 300 s"
        time.sleep(0.02)
    return run


def composed(*overrides: str) -> PipelineConfig:
    """The typed config `python -m pipeline.<stage> overrides...` would run with, in-process."""
    return compose_config(overrides)


def write_layer(
    path: Path,
    vectors: np.ndarray,
    ids: list[str],
    labels: list[str] | None,
    sources: list[str] | None = None,
    **metadata: object,
) -> Path:
    """A layer folder in the contract's layout, as an extraction would publish it; with
    `sources`, calibration copies of those images."""
    schema = embedding_schema(
        vectors.shape[1], labels is not None, {"layer": path.stem, **metadata}, sources is not None
    )
    table = embedding_table(schema, ids, labels, vectors.astype(np.float32), sources)
    return write_parts(path, [table])


def write_parts(path: Path, tables: list[pa.Table]) -> Path:
    """A layer folder of these tables, a part each, with its `_manifest.json`, as the writer
    publishes it (whatever the tables hold: a test of the readers makes them hostile)."""
    write_manifest(path, [write_part(table, path / part_name(i)) for i, table in enumerate(tables)])
    return path


# The promises of the writer's a layer can break, each made by `broken_layer`, with what
# the refusal says after the file it names.
BROKEN_LAYERS = {
    "part altered": "does not match its SHA-256 in _manifest.json",  # a bit flipped, same size
    "part missing": "is listed in _manifest.json but missing",
    "part added": "is not a part _manifest.json lists",
    "part cut short": "bytes, _manifest.json says",
    "manifest not JSON": "does not list the layer's parts",
    "null ids": "has rows without an image_id",
    "non-string ids": "image_id is int64, not text",
    "null vectors": "cannot be read",  # pyarrow cannot read a null in a fixed-size list back
    "rows of mixed length": "not vectors of one length",
    "parts of different dims": "mixes vectors of 4 values (part-000000.parquet) and of 8",
    "NaN": "hold NaN or Inf values (image '05.jpg' first)",
    "Inf": "hold NaN or Inf values (image '05.jpg' first)",
    "repeated ids": "repeat image id '03.jpg'",
    "metadata not an object": "'pipeline' metadata is not a JSON object",
}


def _table(
    ids: pa.Array, vectors: pa.Array, labels: list[str | None], metadata: bytes = b"{}"
) -> pa.Table:
    """Rows in any layout, under the pipeline's metadata key: what another writer might make."""
    table = pa.table(
        {"image_id": ids, "label": pa.array(labels, pa.string()), "embedding": vectors}
    )
    return table.replace_schema_metadata({METADATA_KEY: metadata})


def broken_layer(path: Path, case: str) -> Path:
    """A small layer at `path` (12 images, 4 dims, labels a, b, c, in two parts) that breaks
    the promise `case` names: one of BROKEN_LAYERS, a labelling case below, or "good"."""
    vectors = np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32)
    ids = [f"{i:02d}.jpg" for i in range(12)]
    labels: list[str | None] = {
        "labels all null": [None] * 12,
        "labels of one class, the rest null": ["a"] * 6 + [None] * 6,
        "labels partly null": ["a", "b", None] * 4,
    }.get(case, list("abc") * 4)
    vectors[5, 2] = {"NaN": np.nan, "Inf": -np.inf}.get(case, vectors[5, 2])
    ids[7] = ids[3] if case == "repeated ids" else ids[7]
    rows = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 4)
    if case == "rows of mixed length":  # only another writer makes lists of any length
        rows = pa.array([v[: 3 if i == 4 else 4].tolist() for i, v in enumerate(vectors)])
        pq.write_table(_table(pa.array(ids), rows, labels), path)
        return path
    tables = {
        "null ids": _table(pa.array([None, *ids[1:]], pa.string()), rows, labels),
        "non-string ids": _table(pa.array(range(12)), rows, labels),
        "null vectors": _table(
            pa.array(ids), pa.array([None, *rows[1:].to_pylist()], rows.type), labels
        ),
        "metadata not an object": _table(pa.array(ids), rows, labels, b'["a", "list"]'),
    }
    if case in tables:
        return write_parts(path, [tables[case]])
    schema = embedding_schema(4, True, {"layer": path.stem, "dim": 4})
    if case == "no rows":
        return write_parts(path, [embedding_table(schema, [], [], vectors[:0])])
    halves = [embedding_table(schema, ids[:6], labels[:6], vectors[:6])]
    if case == "parts of different dims":
        wide = embedding_schema(8, True, {"layer": path.stem, "dim": 8})
        halves.append(embedding_table(wide, ids[6:], labels[6:], np.tile(vectors[6:], 2)))
    else:
        halves.append(embedding_table(schema, ids[6:], labels[6:], vectors[6:]))
    write_parts(path, halves)
    first, second = path / part_name(0), path / part_name(1)
    if case == "part altered":
        flip_a_bit(first)
    elif case == "part missing":
        second.unlink()
    elif case == "part added":
        (path / part_name(2)).write_bytes(second.read_bytes())
    elif case == "part cut short":
        second.write_bytes(second.read_bytes()[:-1])
    elif case == "manifest not JSON":
        (path / MANIFEST_FILE).write_text("{")
    return path


def flip_a_bit(part: Path) -> None:
    """Change a part file after it was written: the lowest bit of its last embedding value
    (random floats are stored as they are, so the file has the same size and still reads)."""
    group = pq.ParquetFile(part).metadata.row_group(0)
    columns = [group.column(i) for i in range(group.num_columns)]
    chunk = next(c for c in columns if c.path_in_schema.startswith("embedding"))
    data = bytearray(part.read_bytes())
    data[chunk.data_page_offset + chunk.total_compressed_size - 4] ^= 1
    part.write_bytes(bytes(data))
