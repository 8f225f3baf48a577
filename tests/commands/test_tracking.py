"""MLflow tracking through the CLI, read back with MlflowClient: a local SQLite store, a real
`mlflow server` on 127.0.0.1, sweeps as parent and child runs, and a server that is down."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from pipeline.storage.contract import read_manifest, read_metadata

from conftest import N_PHOTOS, REPO, TINY_MODEL, run_cli

pytestmark = pytest.mark.slow

TRACKING_PAGE = REPO / "docs" / "tracking.md"
TRACKED_TINY = [a for a in TINY_MODEL if a != "tracking=none"] + ["model.input_size=[3,64,64]"]


def _folder_args(photos: Path) -> list[str]:
    return [
        *TRACKED_TINY,
        "dataset=folder",
        f"dataset.root={photos}",
        "dataset.labels_from_folders=true",
        "dataset.name=photos",
    ]


def _client(cwd: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{cwd}/outputs/mlflow.db")


def _runs(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name("embeddings")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time"])


def test_local_store_records_params_metrics_tags_artifacts(tmp_path: Path, photos: Path) -> None:
    done = run_cli(*_folder_args(photos), "layers=[blocks.1,global_pool]", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    client = _client(tmp_path)
    [run] = _runs(client)
    assert run.info.status == "FINISHED"
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert params["model.name"] == "test_efficientnet" and params["pool"] == "grid"
    assert params["layers"] == "['blocks.1', 'global_pool']" and params["dataset.kind"] == "folder"
    assert (
        metrics["images"] == N_PHOTOS and metrics["failures"] == 0 and metrics["images_per_s"] > 0
    )
    assert metrics["dim.blocks.1"] > 0 and metrics["dim.global_pool"] > 0
    assert tags["stage"] == "extract" and len(tags["config_hash"]) == 16
    assert tags["device"] == "cpu" and len(tags["mlflow.source.git.commit"]) == 40
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "layers.json", "outputs.json", "embeddings_pca.png"} <= artifacts
    local = Path(client.download_artifacts(run.info.run_id, "outputs.json", str(tmp_path)))
    outputs = json.loads(local.read_text())
    parquet = next(p for p in outputs if p.endswith("global_pool.parquet"))
    parts = sorted((tmp_path / parquet).glob("part-*.parquet"))
    assert outputs[parquet]["bytes"] == sum(p.stat().st_size for p in parts)
    assert outputs[parquet]["sha256"] == read_manifest(tmp_path / parquet)["sha256"]
    [dataset] = run.inputs.dataset_inputs
    assert dataset.dataset.name == "photos"


def test_sweep_is_a_parent_run_with_a_child_per_job(tmp_path: Path, photos: Path) -> None:
    done = run_cli(
        "-m", *_folder_args(photos), "layers=[blocks.0],[blocks.1],[global_pool]", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    runs = _runs(_client(tmp_path))
    [parent] = [r for r in runs if r.data.tags["stage"] == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(runs) == 4
    assert parent.info.run_name == "sweep layers=[blocks.0],[blocks.1],[global_pool]"  # what
    assert sorted(c.data.params["layers"] for c in children) == [
        "['blocks.0']",
        "['blocks.1']",
        "['global_pool']",
    ]
    assert all(c.info.status == "FINISHED" for c in children)
    out = tmp_path / "outputs/embeddings/photos/test_efficientnet-random"
    assert {p.name for p in out.glob("*.parquet")} == {
        "blocks.0.parquet",
        "blocks.1.parquet",
        "global_pool.parquet",
        "failures.parquet",
    }


def test_failed_job_does_not_hide_the_others(tmp_path: Path, photos: Path) -> None:
    done = run_cli("-m", *_folder_args(photos), "layers=[blocks.0],[no_such_layer]", cwd=tmp_path)
    assert done.returncode == 2  # a config error, as outside a sweep
    assert "layer 'no_such_layer' matches no module" in done.stderr
    assert "Traceback" not in done.stderr
    assert (
        tmp_path / "outputs/embeddings/photos/test_efficientnet-random/blocks.0.parquet"
    ).is_dir()
    runs = _runs(_client(tmp_path))
    [parent] = [r for r in runs if r.data.tags["stage"] == "sweep"]
    assert parent.info.status == "FAILED"
    assert parent.data.tags["job.0"] == "COMPLETED"
    assert "no_such_layer" in parent.data.tags["job.1"]
    assert sorted(r.info.status for r in runs if r.data.tags["stage"] == "extract") == [
        "FAILED",
        "FINISHED",
    ]
    [failed] = [r for r in runs if r.info.status == "FAILED" and r.data.tags["stage"] == "extract"]
    assert "layer 'no_such_layer' matches no module" in failed.data.tags["error"]
    assert failed.info.run_name == "extract photos/test_efficientnet-random [no_such_layer]"


def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path: Path, photos: Path) -> None:
    """Each job reads several batches with loader workers of its own, inside joblib's."""
    done = run_cli(
        "-m",
        *_folder_args(photos),
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "batch_size=2",
        "num_workers=2",
        "layers=[blocks.0],[global_pool]",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    runs = _runs(_client(tmp_path))
    [parent] = [r for r in runs if r.data.tags["stage"] == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    logs = "\n".join(f.read_text() for f in tmp_path.rglob("*.log"))  # the jobs' warnings
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children), logs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """A real tracking server on 127.0.0.1, stopped after the test."""
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path}/server.db",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, "mlflow server exited"
                assert time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_runs_go_to_a_tracking_server(tmp_path: Path, photos: Path, mlflow_server: str) -> None:
    done = run_cli(*_folder_args(photos), cwd=tmp_path, env={"MLFLOW_TRACKING_URI": mlflow_server})
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "outputs/mlflow.db").exists()
    client = MlflowClient(mlflow_server)
    [run] = _runs(client)
    assert run.info.status == "FINISHED" and run.data.metrics["images"] == N_PHOTOS
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "embeddings_pca.png"} <= artifacts


def test_server_down_costs_nothing_but_a_warning(tmp_path: Path, photos: Path) -> None:
    closed = f"http://127.0.0.1:{_free_port()}"
    done = run_cli(*_folder_args(photos), f"tracking.uri={closed}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "tracking failed" in done.stdout + done.stderr
    out = tmp_path / "outputs/embeddings/photos/test_efficientnet-random/global_pool.parquet"
    assert len(pd.read_parquet(out)) == N_PHOTOS

    shutil.rmtree(out)
    required = run_cli(
        *_folder_args(photos), f"tracking.uri={closed}", "tracking.required=true", cwd=tmp_path
    )
    assert required.returncode != 0
    assert "tracking.required=true" in required.stdout + required.stderr
    assert len(pd.read_parquet(out)) == N_PHOTOS


def test_sweep_jobs_never_overwrite_each_other(tmp_path: Path, photos: Path) -> None:
    """Jobs that differ only in a key the paths do not name get a sub-folder each."""
    args = [a if a != "model.input_size=[3,64,64]" else "tracking=none" for a in TRACKED_TINY]
    done = run_cli(
        "-m",
        *args,
        "dataset=folder",
        f"dataset.root={photos}",
        "dataset.name=photos",
        "layers=[blocks.1]",
        "pool=avg,max",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    out = tmp_path / "outputs/embeddings/photos/test_efficientnet-random"
    pools = {p.parent.name: read_metadata(p)["pool"] for p in out.glob("*/blocks.1.parquet")}
    assert pools == {"pool=avg": "avg", "pool=max": "max"}


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _browser(url: str, *flags: str, profile: Path) -> str:
    """Headless Chromium on a page of the local MLflow UI, with the page's scripts run."""
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--window-size=1600,1000",
            "--virtual-time-budget=20000",
            *flags,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (.ci/run installs Debian's)")
def test_the_mlflow_ui_shows_named_runs_a_grouped_sweep_and_lineage(
    tmp_path: Path, photos: Path, mlflow_server: str
) -> None:
    env = {"MLFLOW_TRACKING_URI": mlflow_server}
    sweep = run_cli(
        "-m", *_folder_args(photos), "layers=[blocks.0],[global_pool]", cwd=tmp_path, env=env
    )
    assert sweep.returncode == 0, sweep.stderr
    dedup = run_cli(*_folder_args(photos), module="pipeline.dedup", cwd=tmp_path, env=env)
    assert dedup.returncode == 0, dedup.stderr
    client = MlflowClient(mlflow_server)
    runs = {r.info.run_name: r for r in _runs(client)}
    extract = runs["extract photos/test_efficientnet-random [global_pool]"]
    [parent] = [r for name, r in runs.items() if name.startswith("sweep ")]
    children = [
        r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    ]
    assert len(children) == 2
    downstream = runs["dedup photos/test_efficientnet-random/global_pool"]
    assert downstream.data.tags["source_run_id"] == extract.info.run_id
    [source] = downstream.inputs.dataset_inputs
    assert source.dataset.name == "photos/test_efficientnet/global_pool"

    page = f"{mlflow_server}/#/experiments/{extract.info.experiment_id}/runs"
    _browser(page, f"--screenshot={tmp_path / 'mlflow_runs.png'}", profile=tmp_path / "p1")
    assert (tmp_path / "mlflow_runs.png").stat().st_size > 10_000  # for a person to look at
    dom = _browser(page, "--dump-dom", profile=tmp_path / "p2")
    assert "Training runs" in dom  # the runs table, not the GenAI overview
    assert parent.info.run_name in dom and downstream.info.run_name in dom

    # The page docs/tracking.md sends a user to: the runs, in MLflow 3's "Model training" mode.
    [documented] = re.findall(r"<(http://127\.0\.0\.1:5000/[^>]+)>", TRACKING_PAGE.read_text())
    assert f"/experiments/{extract.info.experiment_id}/" in documented  # its id in a new store
    shown = documented.replace("http://127.0.0.1:5000", mlflow_server)
    dom = _browser(shown, "--dump-dom", profile=tmp_path / "p3")
    assert ">Runs<" in dom and "Evaluation runs" not in dom  # not a GenAI page's side bar
    assert parent.info.run_name in dom and downstream.info.run_name in dom
