"""Shared fixtures: small real photos on disk and a way to run the CLI as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from pipeline.app import compose_config
from pipeline.config import PipelineConfig
from pipeline.store import embedding_schema, embedding_table, part_name, write_manifest, write_part

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


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six real photos from scikit-image, small, in two labelled folders."""
    root = tmp_path_factory.mktemp("photos")
    for label, names in {
        "animals": ["chelsea", "astronaut", "coffee"],
        "scenes": ["rocket", "camera", "coins"],
    }.items():
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
    from pipeline.staging import staging_root

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
    write_manifest(path, [write_part(table, path / part_name(0))])
    return path
