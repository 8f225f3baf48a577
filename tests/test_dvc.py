"""`dvc repro` in a fresh clone: the whole pipeline offline, then nothing re-runs, then only
what a changed parameter feeds re-runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def dvc(*args: str, cwd: Path) -> str:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(cwd / "src"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def ran(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


def test_repro_from_a_fresh_clone(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)

    first = ran(dvc("repro", cwd=clone))
    assert first[:2] == ["prepare", "extract"] and first[-1] == "report" and len(first) == 9

    embeddings = clone / "outputs/embeddings/demo/efficientnet_lite0"
    assert len(pd.read_parquet(embeddings / "global_pool.parquet")) == 120
    dedup = json.loads(
        (clone / "outputs/dedup/demo/efficientnet_lite0/global_pool/metrics.json").read_text()
    )
    cluster = json.loads(
        (clone / "outputs/cluster/demo/efficientnet_lite0/global_pool/metrics.json").read_text()
    )
    assert dedup["recall"] > 0.9 and dedup["precision"] > 0.9  # the planted near-duplicates
    assert cluster["nmi"] > 0.9
    report = pd.read_parquet(clone / "outputs/report/demo/efficientnet_lite0/report.parquet")
    assert report["layer"].tolist() == ["blocks.4", "global_pool"]
    assert report["probe_accuracy"].min() > 0.9
    assert "dedup/demo/efficientnet_lite0/global_pool/metrics.json" in dvc(
        "metrics", "show", cwd=clone
    )

    assert ran(dvc("repro", cwd=clone)) == []

    config = clone / "conf/dedup.yaml"
    config.write_text(config.read_text().replace("threshold: 0.7", "threshold: 0.75"))
    # Only the dedup stages, and the report that reads their metrics.
    assert sorted(ran(dvc("repro", cwd=clone))) == ["dedup@blocks.4", "dedup@global_pool", "report"]
