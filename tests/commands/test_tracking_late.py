"""Tracking that is never lost silently, through the CLI: a new local store that takes 15 s to
make its tables is waited for (a command and a sweep started at once, under CPU load), and a
server that answers after the deadline leaves no run RUNNING and no sweep job without its
parent."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from conftest import N_PHOTOS, TINY_MODEL, run_cli
from patched import patched_env

pytestmark = pytest.mark.slow

TRACKED = [*(a for a in TINY_MODEL if a != "tracking=none"), "tracking=mlflow"]
SMALL = [*TRACKED, "model.input_size=[3,32,32]", "dataset=folder", "dataset.name=photos"]


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
    env = patched_env(SLOW_STORE_S="15")
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
    assert all(r.data.metrics["images"] == N_PHOTOS for r in extracts)


class LateServer(ThreadingHTTPServer):
    """Just enough of MLflow's REST API, on 127.0.0.1, for runs to be created, logged to and
    ended (artifacts go straight to a local folder); it answers the first request to create a
    run `late_s` late. `runs` is what a real server would show: each run's status, tags and
    params, by id: `run<n>` for the n-th request to create one."""

    def __init__(self, late_s: float, artifacts: Path) -> None:
        super().__init__(("127.0.0.1", 0), LateHandler)
        self.late_s, self.artifacts = late_s, artifacts
        self.runs: dict[str, dict[str, Any]] = {}
        self.asked_to_create = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def info(self, run_id: str) -> dict[str, Any]:
        """The run as MLflow's REST API describes it."""
        return {
            "run_id": run_id,
            "run_uuid": run_id,
            "experiment_id": "1",
            "status": self.runs[run_id]["status"],
            "lifecycle_stage": "active",
            "artifact_uri": (self.artifacts / run_id).as_uri(),
        }


class LateHandler(BaseHTTPRequestHandler):
    server: LateServer

    def do_GET(self) -> None:
        if "/runs/get" in self.path:  # where to put artifacts
            run_id = self.path.split("run_id=")[1].split("&")[0]
            return self._answer({"run": {"info": self.server.info(run_id), "data": {}}})
        self._answer({"experiment": {"experiment_id": "1", "name": "embeddings"}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        endpoint = self.path.split("/mlflow/", 1)[-1]
        server = self.server
        if endpoint == "runs/create":
            with server.lock:
                run_id = f"run{server.asked_to_create}"
                server.asked_to_create += 1
            if run_id == "run0":
                time.sleep(server.late_s)
            tags = {t["key"]: t["value"] for t in body.get("tags", [])}
            with server.lock:
                server.runs[run_id] = {"status": "RUNNING", "tags": tags, "params": {}}
            return self._answer({"run": {"info": server.info(run_id), "data": {}}})
        with server.lock:
            run = server.runs.get(body.get("run_id") or body.get("run_uuid"), {})
            if endpoint == "runs/set-tag":
                run["tags"][body["key"]] = body["value"]
            elif endpoint == "runs/log-batch":
                run["params"].update({p["key"]: p["value"] for p in body.get("params", [])})
            elif endpoint == "runs/update":
                run["status"] = body["status"]
        self._answer({})

    def _answer(self, document: dict[str, Any]) -> None:
        data = json.dumps(document).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_: Any) -> None:  # quiet
        pass


@pytest.fixture
def late_server(tmp_path: Path) -> Iterator[LateServer]:
    """A server that creates the first run 11 s late: after the 10 s deadline of a first call,
    before MLflow's own 20 s HTTP timeout, so the answer does arrive, late."""
    server = LateServer(11.0, tmp_path / "artifacts")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_that_answers_late_leaves_no_run_running_and_the_jobs_a_parent(
    tmp_path: Path, photos: Path, late_server: LateServer
) -> None:
    """A sweep whose start gives up on its parent run (the server answers after the deadline):
    that run, made late, is ended FAILED with the reason; the first job makes the parent, and
    both jobs are tracked under it."""
    done = run_cli(
        "-m",
        *SMALL,
        f"dataset.root={photos}",
        "layers=[blocks.0],[global_pool]",
        f"tracking.uri={late_server.url}",
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    runs = late_server.runs
    assert sorted(runs) == ["run0", "run1", "run2", "run3"]
    late, parent, jobs = runs["run0"], runs["run1"], [runs["run2"], runs["run3"]]
    assert late["status"] == "FAILED", late
    assert "did not answer within 10 s" in late["tags"]["tracking_error"]
    assert parent["status"] == "FINISHED" and parent["tags"]["stage"] == "sweep"
    assert [j["tags"]["mlflow.parentRunId"] for j in jobs] == ["run1", "run1"]
    assert sorted(j["params"]["layers"] for j in jobs) == ["['blocks.0']", "['global_pool']"]
    assert [j["status"] for j in jobs] == ["FINISHED"] * 2
    assert "tracking failed: no MLflow run 'sweep " in done.stdout + done.stderr  # said
