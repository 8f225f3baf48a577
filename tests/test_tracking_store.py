"""pipeline.tracking against a real local SQLite store, in process: runs that collide with
another process writing the same store retry, and anything else still turns tracking off."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline import tracking
from pipeline.config import TrackingConfig
from pipeline.results import DatasetRef

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
    run = tracking.start_run(settings, "extract", "photos", {})
    calls = _failing_first(run.client, "log_inputs", UNIQUE_DATASET)
    run.log_inputs([DatasetRef("photos", "a" * 64, "/data/photos", "images")])
    run.end("FINISHED")
    assert run.active and len(calls) == 2
    stored = MlflowClient(settings.uri).get_run(run.run_id)
    assert stored.info.status == "FINISHED"
    assert [d.dataset.name for d in stored.inputs.dataset_inputs] == ["photos"]


def test_any_other_failure_turns_tracking_off_at_once(
    settings: TrackingConfig, caplog: pytest.LogCaptureFixture
) -> None:
    run = tracking.start_run(settings, "extract", "photos", {})
    calls = _failing_first(run.client, "set_tag", "RESOURCE_DOES_NOT_EXIST: no such run")
    run.set_tags({"a": "1", "b": "2"})
    assert not run.active and len(calls) == 1
    assert "tracking failed while setting tags" in caplog.text


def test_an_experiment_another_run_just_created_is_used(settings: TrackingConfig) -> None:
    made = MlflowClient(settings.uri).create_experiment(settings.experiment)
    client = MlflowClient(settings.uri)
    # This run looked before the other created it, and finds the name taken when it creates it.
    looks, real = [], client.get_experiment_by_name

    def looked_too_early(name: str) -> object:
        looks.append(name)
        return None if len(looks) == 1 else real(name)

    client.get_experiment_by_name = looked_too_early
    assert tracking._experiment_id(client, settings.experiment) == made
    assert len(looks) == 2
