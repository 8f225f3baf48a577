"""Paths as people type them in a shell: `~` and $VARIABLES in a path key's value, bare. Bash
expands `~` after `=` only in an assignment, which `dataset.root=~/photos` is not, and Hydra's
override grammar has no bare `~`: the command expands and quotes them itself. Each through a
real bash, with HOME a folder of the test's own."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline.storage.contract import read_metadata

from conftest import N_PHOTOS, SMALL

pytestmark = pytest.mark.slow


def bash(command: str, home: Path) -> subprocess.CompletedProcess:
    """`command` as bash runs it, `python` being this interpreter, HOME `home`, offline."""
    env = {**os.environ, "HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    line = command.replace("python ", f"{shlex.quote(sys.executable)} ", 1)
    return subprocess.run(
        ["bash", "-c", line], cwd=home, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture
def home(tmp_path: Path, photos: Path) -> Path:
    """A home folder holding `photos/`."""
    shutil.copytree(photos, tmp_path / "home" / "photos")
    return tmp_path / "home"


def test_extraction_and_a_downstream_stage_take_paths_with_a_tilde(home: Path) -> None:
    small = " ".join(shlex.quote(a) for a in SMALL)
    done = bash(
        f"python -m pipeline {small} dataset=folder dataset.root=~/photos output_dir=~/emb", home
    )
    assert done.returncode == 0, done.stderr
    layer = home / "emb" / "global_pool.parquet"
    assert len(pd.read_parquet(layer)) == N_PHOTOS
    assert read_metadata(layer)["dataset"]["root"] == str(home / "photos")

    done = bash(
        "python -m pipeline.cluster tracking=none embeddings=~/emb/global_pool.parquet "
        "cluster.output_dir=$HOME/clusters images_root=~/photos",
        home,
    )
    assert done.returncode == 0, done.stderr
    assert (home / "clusters" / "metrics.json").is_file()
    assert (home / "clusters" / "contact_sheet.png").is_file()  # the images found under ~/photos


def test_a_sweep_over_paths_with_a_tilde(home: Path) -> None:
    small = " ".join(shlex.quote(a) for a in SMALL)
    done = bash(
        f"python -m pipeline -m {small} dataset=folder dataset.root=~/photos "
        "output_dir=~/sweep/a,~/sweep/b",
        home,
    )
    assert done.returncode == 0, done.stderr
    for job in ("a", "b"):
        assert len(pd.read_parquet(home / "sweep" / job / "global_pool.parquet")) == N_PHOTOS
    assert not (home / "~").exists()
