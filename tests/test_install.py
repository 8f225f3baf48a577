"""Installed without `-e`: a wheel of the project in a fresh virtual environment, run from a
folder that is not the clone. The configs must come from inside the package, and the console
scripts must be there. (The environment borrows this one's dependencies through a .pth file,
so the test builds and installs only the project itself.)"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_a_wheel_runs_from_anywhere(tmp_path: Path, photos: Path) -> None:
    wheels = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    [wheel] = wheels.glob("pipeline-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin/python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    where = subprocess.run(
        [str(python), "-c", "import pipeline; print(pipeline.__file__)"],
        cwd=elsewhere,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert where.startswith(site), where  # the installed copy, not the clone's src/
    done = subprocess.run(
        [
            str(venv / "bin/pipeline-extract"),
            "model=timm",
            "model.name=test_efficientnet",
            "model.pretrained=false",
            "dataset=folder",
            f"dataset.root={photos}",
            "tracking=none",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    frame = pd.read_parquet(
        elsewhere / f"outputs/embeddings/{photos.name}/test_efficientnet-random/global_pool.parquet"
    )
    assert len(frame) == 6
    listed = subprocess.run(
        [str(python), "-m", "pipeline.layers", "model=resnet18"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert listed.returncode == 0 and "layer4" in listed.stdout, listed.stderr
