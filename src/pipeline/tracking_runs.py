"""MLflow runs: one per stage invocation, made in a store or on a server, every call guarded.
Tracking never costs the user their outputs: the first failure turns tracking off for the rest
of the run with one warning, and the run it leaves is ended FAILED with the reason, never left
RUNNING.

A store on this machine (the default SQLite file) is waited for, however long it takes: it
answers or fails on its own. A server gets a deadline per call, so one that never answers costs
seconds, not the user's run; a call that answers after its deadline is undone (the run it made
is ended FAILED), and the command waits for such calls at exit, at most CALL_S. How a call is
bounded, undone and waited for, and how a new local store is opened one process at a time, is
`tracking_calls`, which needs no MLflow.
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import os
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.config import TrackingConfig
from pipeline.results import DatasetRef
from pipeline.tracking_calls import (
    in_background,
    local_store_made_once,
    wait_for_late_calls,
    within,
)

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///outputs/mlflow.db"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
ARTIFACT_ROOT = Path("outputs/mlartifacts")
# A server's deadlines. The first call decides whether it answers at all; every later call gets
# its own. CALL_S is also MLflow's HTTP timeout (below), so a first call past its deadline still
# has time to answer, and the run it made can then be ended. A local store has none: making a new
# SQLite store's tables took 11.6 s at load 9 on 2 cores, and cutting that off lost the run.
FIRST_CALL_S = 10.0
CALL_S = 20.0
# Runs writing one SQLite store at once (a joblib sweep's jobs) can collide: MLflow inserts a
# dataset both jobs log after checking it is not there yet, so one insert breaks the unique
# key; a writer can find the database locked. Tried again, the call finds the other's row.
COLLISIONS = ("UNIQUE constraint failed", "database is locked")
TRIES = 3
for _name, _value in {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(CALL_S)),
}.items():
    os.environ.setdefault(_name, _value)

from mlflow import MlflowClient  # noqa: E402 - reads the variables above
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.utils.mlflow_tags import (  # noqa: E402
    MLFLOW_GIT_COMMIT,
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_RUN_NAME,
)


def tracking_uri(settings: TrackingConfig) -> str:
    """`tracking.uri`, else MLFLOW_TRACKING_URI, else a local SQLite store under outputs/."""
    return settings.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def is_local(uri: str) -> bool:
    """A SQLite store: a file on this machine, as opposed to a server."""
    return uri.startswith("sqlite:")


# One client per store and process (MLflow opens the store, and a SQLite store checks its schema,
# when a client first asks), each experiment looked up once: a sweep's jobs in one process share
# them. Keyed with the working folder too: a relative SQLite path names another store there.
_clients: dict[tuple[str, str], MlflowClient] = {}
_experiments: dict[tuple[str, str, str], str] = {}


def store_client(uri: str) -> MlflowClient:
    """This process's client of the store at `uri`; the first one opens the store, making a
    new local store's tables one process at a time (`local_store_made_once`)."""
    key = (uri, os.getcwd())
    if key not in _clients:
        with local_store_made_once(uri):
            _clients[key] = MlflowClient(uri)
    return _clients[key]


def _experiment(client: MlflowClient, name: str) -> str:
    """`_experiment_id`, looked up (or made) once per process and store."""
    key = (client.tracking_uri, os.getcwd(), name)
    if key not in _experiments:
        with local_store_made_once(client.tracking_uri):
            _experiments[key] = _experiment_id(client, name)
    return _experiments[key]


@atexit.register
def _wait_for_late_calls() -> None:
    """At most CALL_S: by then MLflow's HTTP timeout has ended the late calls."""
    wait_for_late_calls(CALL_S)


def _reason(err: BaseException) -> str:
    """An error in one line: its type and its message's first line."""
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


class Run:
    """One MLflow run. Every call is guarded, and bounded for a server: the first failure is
    logged once, ends the run FAILED and turns the rest into no-ops. With tracking off, every
    call is a no-op from the start."""

    def __init__(
        self,
        client: MlflowClient | None = None,
        run_id: str | None = None,
        error: Exception | None = None,
        experiment_id: str | None = None,
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.error = error  # set: tracking is off
        self.experiment_id = experiment_id
        self.deadline_s = None if client is None or is_local(client.tracking_uri) else CALL_S

    @property
    def active(self) -> bool:
        return self.client is not None and self.error is None

    def call(self, action: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """`self.client.<method>(...)` unless tracking is off or has already failed."""
        if not self.active:
            return None
        for tried in range(1, TRIES + 1):
            try:
                return within(self.deadline_s, getattr(self.client, method), *args, **kwargs)
            except Exception as err:
                if tried == TRIES or not any(c in str(err) for c in COLLISIONS):
                    self.fail(err, f"while {action}")
                    return None
            time.sleep(0.1 * tried)

    def fail(self, err: Exception, action: str) -> None:
        self.error = err
        reason = _reason(err)
        log.warning(
            "tracking failed %s (%s); the outputs are written, tracking is off for the rest of "
            "this run",
            action,
            reason,
        )
        # Left alone, the run would show RUNNING forever. A server may be the problem: there
        # this goes on in the background, and the command waits for it at exit.
        undo = functools.partial(self.abandon, f"tracking failed {action} ({reason})")
        if self.deadline_s is None:
            undo()
        else:
            in_background(undo)

    def abandon(self, reason: str) -> None:
        """End the run FAILED with `reason` as its `tracking_error` tag, straight through the
        client (for a server, callers run this in the background); quiet if it fails too."""
        try:
            self.client.set_tag(self.run_id, "tracking_error", reason[:MAX_PARAM_LENGTH])
            self.client.set_terminated(self.run_id, "FAILED")
        except Exception as err:
            log.debug("could not end run %s: %s", self.run_id, err)

    def log_params(self, params: Mapping[str, str]) -> None:
        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow's batch limit
            self.call("logging params", "log_batch", self.run_id, params=items[start : start + 100])

    def log_batch(self, metrics: Mapping[str, float], tags: Mapping[str, str]) -> None:
        """Metrics and tags in one call; more only past MLflow's limits (1000 a call)."""
        now = int(time.time() * 1000)
        values = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        labels = [RunTag(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in tags.items()]
        for i in range(max(math.ceil(len(values) / 900), math.ceil(len(labels) / 100))):
            chunk = {
                "metrics": values[900 * i : 900 * (i + 1)],
                "tags": labels[100 * i : 100 * (i + 1)],
            }
            self.call("logging metrics and tags", "log_batch", self.run_id, **chunk)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.call("setting tags", "set_tag", self.run_id, key, str(value)[:MAX_PARAM_LENGTH])

    def log_inputs(self, inputs: list[DatasetRef]) -> None:
        datasets = [
            DatasetInput(
                Dataset(name=d.name, digest=d.digest[:36], source_type="local", source=d.source),
                tags=[InputTag("mlflow.data.context", d.context)],
            )
            for d in inputs
        ]
        if datasets:
            self.call("logging the inputs", "log_inputs", self.run_id, datasets)

    def end(self, status: str) -> None:
        self.call("ending the run", "set_terminated", self.run_id, status)


# Tells MLflow's UI these are model-development runs: it opens on the runs table, not GenAI's.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def _experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # A local store keeps artifacts beside its database; a server decides for itself.
    location = ARTIFACT_ROOT.resolve().as_uri() if is_local(client.tracking_uri) else None
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
    except MlflowException:
        experiment = client.get_experiment_by_name(name)  # another run created it meanwhile
        if experiment is None:
            raise
        return experiment.experiment_id


def start_run(
    settings: TrackingConfig,
    stage: str,
    name: str,
    tags: Mapping[str, str],
    consequence: str = "the outputs are written but not tracked",
    parent: str | None = None,
) -> Run:
    """A new run (a child of the run `parent`, when given), or an inactive one (with a warning
    that ends in `consequence`) when the store fails, or when a server does not answer within
    FIRST_CALL_S: a run it makes after that is ended FAILED."""
    uri = tracking_uri(settings)
    if parent is not None:
        tags = {**tags, MLFLOW_PARENT_RUN_ID: parent}

    def create() -> Run:
        client = store_client(uri)
        experiment_id = _experiment(client, settings.experiment)
        run = client.create_run(
            experiment_id,
            run_name=name,
            tags={
                MLFLOW_RUN_NAME: name,
                "stage": stage,
                "host": socket.gethostname(),
                **git_tags(),
                **tags,
            },
        )
        return Run(client, run.info.run_id, experiment_id=experiment_id)

    gave_up = f"tracking gave up on this run: the server did not answer within {FIRST_CALL_S:.0f} s"
    try:
        return within(
            None if is_local(uri) else FIRST_CALL_S, create, late=lambda run: run.abandon(gave_up)
        )
    except Exception as err:
        log.warning(
            "tracking failed: no MLflow run %r at %s (%s); %s", name, uri, _reason(err), consequence
        )
        return Run(error=err)


@functools.cache
def git_tags() -> dict[str, str]:
    """The commit the code came from and whether the work tree had changes."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args],
            cwd=Path(__file__).parent,
            check=True,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()

    try:
        commit, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "-uno")
    except (OSError, subprocess.SubprocessError):
        return {}
    return {MLFLOW_GIT_COMMIT: commit, "git_dirty": str(bool(dirty)).lower()}
