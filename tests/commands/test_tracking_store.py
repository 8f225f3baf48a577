"""pipeline.tracking in process, against a real local SQLite store (waited for, however slow:
runs that collide with another process writing it retry, anything else turns tracking off and
ends the run FAILED; a sweep's parent run made once) and against a server that answers late."""

from __future__ import annotations

import json
import multiprocessing
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput
from mlflow.exceptions import MlflowException
from omegaconf import OmegaConf

from pipeline import tracking, tracking_runs, tracking_sweeps
from pipeline.config import TrackingConfig
from pipeline.results import DatasetRef, StageResult

# What MLflow raised in a joblib sweep when both jobs logged the same dataset at once.
UNIQUE_DATASET = (
    "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, datasets.name, "
    "datasets.digest"
)


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TrackingConfig:
    monkeypatch.chdir(tmp_path)  # where a local store keeps its artifacts
    return TrackingConfig("mlflow", f"sqlite:///{tmp_path}/mlflow.db", "embeddings", False)


def _failing_first(client: MlflowClient, method: str, message: str) -> list[int]:
    """`client.<method>` raising `message` on its first call, then MLflow's own; the calls."""
    real, calls = getattr(client, method), []

    def once(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            raise MlflowException(message)
        return real(*args, **kwargs)

    setattr(client, method, once)
    return calls


def test_a_collision_with_another_writer_is_tried_again(settings: TrackingConfig) -> None:
    run = tracking_runs.start_run(settings, "extract", "photos", {})
    calls = _failing_first(run.client, "log_inputs", UNIQUE_DATASET)
    run.log_inputs([DatasetRef("photos", "a" * 64, "/data/photos", "images")])
    run.end("FINISHED")
    assert run.active and len(calls) == 2
    stored = MlflowClient(settings.uri).get_run(run.run_id)
    assert stored.info.status == "FINISHED"
    assert [d.dataset.name for d in stored.inputs.dataset_inputs] == ["photos"]


def test_any_other_failure_turns_tracking_off_at_once_and_ends_the_run(
    settings: TrackingConfig, caplog: pytest.LogCaptureFixture
) -> None:
    run = tracking_runs.start_run(settings, "extract", "photos", {})
    _failing_first(run.client, "set_tag", "RESOURCE_DOES_NOT_EXIST: no such run")
    run.set_tags({"a": "1", "b": "2"})
    run.end("FINISHED")  # a no-op now
    assert not run.active
    assert "tracking failed while setting tags" in caplog.text
    stored = MlflowClient(settings.uri).get_run(run.run_id)
    assert stored.info.status == "FAILED"  # not RUNNING forever
    assert "no such run" in stored.data.tags["tracking_error"]
    assert not {"a", "b"} & set(stored.data.tags)  # neither tried again nor the next one


def test_an_experiment_another_run_just_created_is_used(settings: TrackingConfig) -> None:
    made = MlflowClient(settings.uri).create_experiment(settings.experiment)
    client = MlflowClient(settings.uri)
    # This run looked before the other created it, and finds the name taken when it creates it.
    looks, real = [], client.get_experiment_by_name

    def looked_too_early(name: str) -> object:
        looks.append(name)
        return None if len(looks) == 1 else real(name)

    client.get_experiment_by_name = looked_too_early
    assert tracking_runs._experiment_id(client, settings.experiment) == made
    assert len(looks) == 2


def _figure() -> Figure:
    figure = Figure()
    figure.add_subplot().plot([1, 3, 2])
    return figure


def test_a_process_opens_its_store_once_and_logs_a_runs_files_in_one_call(
    settings: TrackingConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What tracking costs a run beyond MLflow's import: one client (the store opened, its
    schema checked) per process however many runs it records, as a sweep's jobs do; a stage's
    metrics and tags in one call, its files, documents and figures in another."""
    opened: list[str] = []
    real_client, real_call = tracking_runs.MlflowClient, tracking_runs.Run.call
    monkeypatch.setattr(
        tracking_runs, "MlflowClient", lambda uri: opened.append(uri) or real_client(uri)
    )
    calls: Counter[str] = Counter()

    def counted(run: tracking_runs.Run, action: str, method: str, *args: Any, **kwargs: Any) -> Any:
        calls[method] += 1
        return real_call(run, action, method, *args, **kwargs)

    monkeypatch.setattr(tracking_runs.Run, "call", counted)
    files = [tmp_path / "metrics.json", tmp_path / "sizes.json"]
    for file in files:
        file.write_text(json.dumps({"file": file.name}))
    for i in range(3):
        result = StageResult(
            output_dir=tmp_path,
            metrics={"nmi": 0.5, "ari": 0.25},
            artifacts=files,
            documents={"layers.json": {"layer": i}},
            figures={"projection.png": _figure},
            tags={"device": "cpu", "k": "3"},
        )
        with tracking.tracked(
            settings, "cluster", f"cluster {i}", OmegaConf.create({"k": 3})
        ) as record:
            record(result)
    assert opened == [settings.uri]
    assert calls["log_artifacts"] == 3  # a run's files in one call
    assert not calls["log_artifact"] + calls["log_dict"] + calls["log_figure"] + calls["set_tag"]
    assert calls["log_batch"] == 3 * 2  # the params; the metrics with the tags
    client = MlflowClient(settings.uri)
    experiment = client.get_experiment_by_name(settings.experiment).experiment_id
    runs = client.search_runs([experiment], order_by=["attributes.start_time"])
    assert [r.info.run_name for r in runs] == ["cluster 0", "cluster 1", "cluster 2"]
    for i, run in enumerate(runs):
        assert run.info.status == "FINISHED" and run.data.params == {"k": "3"}
        assert run.data.metrics == {"nmi": 0.5, "ari": 0.25}
        assert {"device": "cpu", "k": "3"}.items() <= run.data.tags.items()
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert names == {
            "config.yaml",
            "metrics.json",
            "sizes.json",
            "layers.json",
            "projection.png",
        }
        local = Path(client.download_artifacts(run.info.run_id, "layers.json", str(tmp_path)))
        assert json.loads(local.read_text()) == {"layer": i}


def _in_two_processes_at_once(target: Callable[..., None], *args: object) -> list[Any]:
    """`target(*args, barrier, out)` in two spawned processes that meet at `barrier.wait()`;
    what each put on `out`."""
    context = multiprocessing.get_context("spawn")
    barrier, out = context.Barrier(2), context.Queue()
    workers = [context.Process(target=target, args=(*args, barrier, out)) for _ in range(2)]
    for worker in workers:
        worker.start()
    results = [out.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join()
    return results


def _log_the_same_datasets(uri: str, experiment: str, rounds: int, barrier: Any, out: Any) -> None:
    """In a process of its own: each round, the same new dataset logged at the same moment as
    the other process, once with MLflow alone and once through tracking_runs.Run."""
    client = MlflowClient(uri)
    run_id = client.create_run(experiment).info.run_id
    collided = failed = 0
    for i in range(rounds):
        for name in ("mlflow", "ours"):
            dataset = Dataset(name="photos", digest=f"{name}{i}", source_type="local", source="/p")
            barrier.wait()
            if name == "mlflow":
                try:
                    client.log_inputs(run_id, [DatasetInput(dataset)])
                except MlflowException as err:
                    collided += "UNIQUE constraint failed" in str(err)
            else:
                run = tracking_runs.Run(client, run_id)
                run.call("logging the inputs", "log_inputs", run_id, [DatasetInput(dataset)])
                failed += not run.active
    out.put((run_id, collided, failed))


def test_two_processes_logging_one_dataset_at_once_both_record_it(
    settings: TrackingConfig,
) -> None:
    """The race itself: MLflow checks that a dataset is not stored yet, then inserts it, so two
    processes logging it at once collide (measured: 37 of 120 here); through tracking_runs.Run the
    loser tries again and finds the winner's row."""
    experiment = MlflowClient(settings.uri).create_experiment(settings.experiment)
    rounds = 60
    results = _in_two_processes_at_once(_log_the_same_datasets, settings.uri, experiment, rounds)
    assert sum(collided for _, collided, _ in results) > 0  # the rounds did meet the race
    assert [failed for _, _, failed in results] == [0, 0]
    client = MlflowClient(settings.uri)
    for run_id, _, _ in results:
        logged = {d.dataset.digest for d in client.get_run(run_id).inputs.dataset_inputs}
        assert {f"ours{i}" for i in range(rounds)} <= logged


def _start_a_run(uri: str, barrier: Any, out: Any) -> None:
    """In a process of its own: a run started at the same moment as the other process's."""
    barrier.wait()
    run = tracking_runs.start_run(TrackingConfig("mlflow", uri, "embeddings", False), "x", "x", {})
    if run.active:
        run.end("FINISHED")
    out.put(None if run.active else str(run.error).splitlines()[0])


def test_two_commands_starting_at_once_in_a_new_folder_are_both_tracked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow makes a new SQLite store's tables on first use: two processes doing it at once
    collided ("table runs already exists", "duplicate column name"; at least 5 of 8 rounds here)."""
    monkeypatch.chdir(tmp_path)  # the processes' own: where a local store keeps its artifacts
    for round_ in range(3):
        uri = f"sqlite:///{tmp_path}/{round_}/mlflow.db"
        assert _in_two_processes_at_once(_start_a_run, uri) == [None, None]
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("embeddings").experiment_id])
        assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]


def test_a_new_local_store_slow_to_make_its_tables_is_waited_for(
    settings: TrackingConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Making a new store's tables took 11.6 s on a loaded machine: a deadline meant for a
    dead server gave up on it, and the run went untracked. Here it takes longer than that."""
    import mlflow.store.db.utils

    make = mlflow.store.db.utils._initialize_tables

    def slowly(engine: object) -> None:
        time.sleep(1.5)
        make(engine)

    monkeypatch.setattr(tracking_runs, "FIRST_CALL_S", 0.5)  # the server's deadline, made short
    monkeypatch.setattr(mlflow.store.db.utils, "_initialize_tables", slowly)
    run = tracking_runs.start_run(settings, "extract", "photos", {})
    run.log_params({"model.name": "x"})
    run.end("FINISHED")
    assert run.active
    stored = MlflowClient(settings.uri).get_run(run.run_id)
    assert stored.info.status == "FINISHED" and stored.data.params == {"model.name": "x"}


class SlowServer:
    """A client of a server whose `log_batch` answers after `late_s`; what it was asked."""

    tracking_uri = "http://127.0.0.1:5000"

    def __init__(self, late_s: float) -> None:
        self.late_s = late_s
        self.asked: list[tuple[str, tuple[object, ...]]] = []

    def log_batch(self, *args: object, **_: object) -> None:
        time.sleep(self.late_s)
        self.asked.append(("log_batch", args))

    def set_tag(self, *args: object) -> None:
        self.asked.append(("set_tag", args))

    def set_terminated(self, *args: object) -> None:
        self.asked.append(("set_terminated", args))


def test_a_server_call_past_its_deadline_ends_the_run_failed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(tracking_runs, "CALL_S", 0.2)
    server = SlowServer(late_s=0.6)
    run = tracking_runs.Run(server, "run1")
    run.log_params({"a": "1"})
    run.end("FINISHED")  # a no-op: tracking is off
    assert not run.active and "tracking failed while logging params" in caplog.text
    deadline = time.monotonic() + 10
    while ("set_terminated", ("run1", "FAILED")) not in server.asked:
        assert time.monotonic() < deadline, server.asked  # left RUNNING
        time.sleep(0.05)
    [(_, (_, key, reason))] = [a for a in server.asked if a[0] == "set_tag"]
    assert key == "tracking_error" and "no answer within 0.2 s" in reason


def test_a_sweep_parent_is_made_once_by_whoever_needs_it_first(
    settings: TrackingConfig, tmp_path: Path
) -> None:
    """The sweep's start makes it, or else its first job (a server that did not answer the
    start); the others read its id from the sweep folder."""
    folder = tmp_path / "multirun/12-00-00"
    parent = tracking_sweeps.sweep_parent(settings, folder)
    assert parent is not None and tracking_sweeps.sweep_parent(settings, folder) == parent
    client = MlflowClient(settings.uri)
    [run] = client.search_runs([client.get_experiment_by_name(settings.experiment).experiment_id])
    assert run.info.run_id == parent and run.data.tags["stage"] == "sweep"


def test_a_sweep_parent_that_cannot_be_made_is_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "file").write_text("")  # a store under a file: it cannot be made
    settings = TrackingConfig("mlflow", f"sqlite:///{tmp_path}/file/mlflow.db", "e", False)
    assert tracking_sweeps.sweep_parent(settings, tmp_path / "sweep") is None
    assert "tracking failed: no MLflow run 'sweep sweep'" in caplog.text
    assert "each job tries again to make it, and is not tracked without it" in caplog.text
