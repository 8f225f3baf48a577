"""Tracking that is never lost silently, through the CLI: a new local store that takes 15 s to
make its tables is waited for (a command and a sweep started at once, under CPU load)."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import TINY_MODEL, run_cli

pytestmark = pytest.mark.slow

TRACKED = [*(a for a in TINY_MODEL if a != "tracking=none"), "tracking=mlflow"]
SMALL = [*TRACKED, "model.input_size=[3,32,32]", "dataset=folder", "dataset.name=photos"]
SLOW_STORE = Path(__file__).parent / "slow_store"  # a sitecustomize that slows MLflow down


def _busy(seconds: float) -> subprocess.Popen:
    """A process that keeps one core busy for `seconds`."""
    loop = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass"
    return subprocess.Popen([sys.executable, "-c", loop])


def test_a_command_and_a_sweep_at_once_on_a_slow_new_store_are_tracked_in_full(
    tmp_path: Path, photos: Path
) -> None:
    """A new local store whose tables take 15 s to make (11.6 s measured at load 9 on 2 cores),
    a command and a sweep started at once under CPU load: one makes the store, the other waits
    its turn, and every run is recorded with its params and FINISHED, the sweep's jobs under
    their parent. The 10 s deadline meant for a dead server used to give up on both."""
    path = os.pathsep.join(p for p in (str(SLOW_STORE), os.environ.get("PYTHONPATH")) if p)
    env = {"PYTHONPATH": path, "SLOW_STORE_S": "15"}
    command = [*SMALL, f"dataset.root={photos}", "layers=[blocks.1]", f"output_dir={tmp_path}/one"]
    sweep = ["-m", *SMALL, f"dataset.root={photos}", "layers=[blocks.0],[global_pool]"]
    load = [_busy(2) for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda args: run_cli(*args, cwd=tmp_path, env=env), [command, sweep]))
    for process in load:
        process.wait()
    for finished in done:
        assert finished.returncode == 0, finished.stderr
        assert "tracking failed" not in finished.stdout + finished.stderr
    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("embeddings").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 4
    [parent] = [r for r in runs if r.data.tags["stage"] == "sweep"]
    extracts = [r for r in runs if r.data.tags["stage"] == "extract"]
    jobs = [r for r in extracts if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.params["layers"] for r in extracts) == [
        "['blocks.0']",
        "['blocks.1']",
        "['global_pool']",
    ]
    assert sorted(r.data.params["layers"] for r in jobs) == ["['blocks.0']", "['global_pool']"]
    assert all(r.data.metrics["images"] == 6 for r in extracts)
