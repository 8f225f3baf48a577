"""MLflow tracking: the only module that imports mlflow. It records what a stage returned.

One MLflow run per stage invocation, named by what it did; a Hydra multirun is a parent run with
a child per job. Tracking never costs the user their outputs: the first failure turns tracking
off for the rest of the run with one warning, and the run it leaves is ended FAILED with the
reason, never left RUNNING. Only `tracking.required=true` makes that a non-zero exit.

A store on this machine (the default SQLite file) is waited for, however long it takes: it
answers or fails on its own. A server gets a deadline per call, so one that never answers costs
seconds, not the user's run; a call that answers after its deadline is undone (the run it made
is ended FAILED), and the command waits for such calls at exit, at most CALL_S. How a call is
bounded, undone and waited for, and how a new local store is opened one process at a time, is
`tracking_calls`, which needs no MLflow.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import math
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.config import TrackingConfig
from pipeline.results import DatasetRef, StageResult
from pipeline.storage.staging import Lock
from pipeline.tracking_calls import (
    in_background,
    local_store_made_once,
    wait_for_late_calls,
    within,
)

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///outputs/mlflow.db"
ARTIFACT_ROOT = Path("outputs/mlartifacts")
PARENT_RUN_FILE = "mlflow_parent_run_id"  # in the sweep folder, read by every job
MAX_RUN_NAME = 250  # a sweep's parent run is named by its overrides, at most this long
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
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


class TrackingError(RuntimeError):
    """Tracking failed and the user asked for it to be required."""


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


def _client(uri: str) -> MlflowClient:
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
) -> Run:
    """A new run, or an inactive one (with a warning that ends in `consequence`) when the store
    fails, or when a server does not answer within FIRST_CALL_S: a run it makes after that is
    ended FAILED."""
    uri = tracking_uri(settings)

    def create() -> Run:
        client = _client(uri)
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


@contextlib.contextmanager
def tracked(
    settings: TrackingConfig, stage: str, name: str, config: DictConfig
) -> Iterator[Callable[[StageResult], None]]:
    """An MLflow run around a stage; yields the function that records the stage's result.

    The run ends FINISHED, or FAILED with the error's first line as a tag if the stage raised.
    When tracking failed on the way and `settings.required`, TrackingError is raised after the
    stage has finished its own work.
    """
    if settings.backend == "none":
        yield lambda result: None
        return
    run = _job_run(settings, stage, name)
    run.log_params(flatten(OmegaConf.to_container(config, resolve=True, enum_to_str=True)))
    run.call(
        "logging config.yaml",
        "log_text",
        run.run_id,
        OmegaConf.to_yaml(config, resolve=True),
        "config.yaml",
    )
    try:
        yield lambda result: record(run, result)
    except BaseException as err:
        run.set_tags({"error": (str(err).splitlines() or [type(err).__name__])[0]})
        run.end("FAILED")
        raise
    run.end("FINISHED")
    if run.error is not None and settings.required:
        raise TrackingError(
            f"tracking failed ({type(run.error).__name__}: {run.error}) and tracking.required=true"
        )


def record(run: Run, result: StageResult) -> None:
    """A stage's result: metrics and tags in one call, inputs (linked to the runs that made
    them), and its files, documents and figures in one call."""
    if not run.active:
        return
    tags = dict(result.tags)
    for source in (d for d in result.inputs if d.context == "embeddings"):
        producer = _producer(run, source)
        if producer:
            tags["source_run_id"] = producer
    run.log_batch(result.metrics, tags)
    run.log_inputs(result.inputs)
    if result.artifacts or result.documents or result.figures:
        with tempfile.TemporaryDirectory(prefix="pipeline-artifacts-") as folder:
            try:
                _stage_artifacts(Path(folder), result)
            except Exception as err:  # a file gone, a figure that fails to draw
                run.fail(err, "while logging the artifacts")
                return
            run.call("logging the artifacts", "log_artifacts", run.run_id, folder)


def _stage_artifacts(folder: Path, result: StageResult) -> None:
    """The result's files, documents (as JSON, as MLflow's log_dict writes them) and figures
    (drawn now, as log_figure saves them) in `folder`, under the file names they are logged as."""
    for path in result.artifacts:
        shutil.copyfile(path, folder / path.name)
    for name, document in result.documents.items():
        (folder / name).write_text(json.dumps(document, indent=2))
    for name, draw in result.figures.items():
        import matplotlib.pyplot as plt

        figure = draw()
        figure.savefig(folder / name)
        plt.close(figure)


def _producer(run: Run, source: DatasetRef) -> str | None:
    """The extraction run whose output is this input (by content digest), if tracked."""
    if run.experiment_id is None:
        return None
    found = run.call(
        "finding the extraction run",
        "search_runs",
        [run.experiment_id],
        f"tags.`output.sha256` LIKE '%{source.digest}%'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return found[0].info.run_id if found else None


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"model": {"name": "x"}} -> {"model.name": "x"}; lists stay whole, as text."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


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


# --- sweeps: one parent run per Hydra multirun -------------------------------------------------


def sweep_dir() -> Path | None:
    """The folder of the Hydra sweep this job belongs to; None outside a multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode is not RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir)


def _parent_id(folder: Path) -> str | None:
    marker = folder / PARENT_RUN_FILE
    return marker.read_text().strip() if marker.is_file() else None


def sweep_name(folder: Path, overrides: list[str] | None = None) -> str:
    """The parent run's name: what the sweep varies, as typed (`sweep layers=[blocks.1],[blocks.3]
    pool=avg,max`), from its overrides or else those its folder's multirun.yaml saved; the
    folder's name (its start time) when neither says."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    saved = folder / "multirun.yaml"
    try:
        if overrides is None:
            overrides = list(OmegaConf.load(saved).hydra.overrides.task) if saved.is_file() else []
        parsed = OverridesParser.create().parse_overrides(overrides)
    except (OSError, ValueError, HydraException):
        parsed = []
    swept = [o.input_line or "" for o in parsed if o.is_sweep_override()]
    name = f"sweep {' '.join(swept)}" if swept else f"sweep {folder.name}"
    return name if len(name) <= MAX_RUN_NAME else name[: MAX_RUN_NAME - 3] + "..."


def sweep_parent(
    settings: TrackingConfig, folder: Path, overrides: list[str] | None = None
) -> str | None:
    """The parent run of the sweep in `folder`: made by the sweep's start, or else by its first
    job (a server may answer the jobs but not the start), one process at a time, named by what
    the sweep's `overrides` vary; None when it cannot be made (start_run has said why)."""
    if parent := _parent_id(folder):
        return parent
    lock = Lock(folder / f"{PARENT_RUN_FILE}.lock")
    lock.acquire(wait=True)
    try:
        if parent := _parent_id(folder):  # made while this job waited
            return parent
        run = start_run(
            settings,
            "sweep",
            sweep_name(folder, overrides),
            {"sweep_dir": str(folder)},
            "each job tries again to make it, and is not tracked without it",
        )
        if not run.active:
            return None
        partial = folder / f"{PARENT_RUN_FILE}.partial"  # jobs read it without the lock
        partial.write_text(run.run_id)
        partial.replace(folder / PARENT_RUN_FILE)
        return run.run_id
    finally:
        lock.release()


def _job_run(settings: TrackingConfig, stage: str, name: str) -> Run:
    """The stage's run; in a sweep, a child of the sweep's parent run, and none without one: a
    job's run would be lost among the others, outside its sweep."""
    folder = sweep_dir()
    if folder is None:
        return start_run(settings, stage, name, {})
    parent = sweep_parent(settings, folder)
    if parent is None:
        return Run(error=RuntimeError("the sweep's parent run could not be made"))
    return start_run(settings, stage, name, {MLFLOW_PARENT_RUN_ID: parent})


def _settings(config: DictConfig) -> TrackingConfig | None:
    tracking = config.get("tracking")
    if tracking is None or tracking.backend == "none":
        return None
    return TrackingConfig(**OmegaConf.to_container(tracking, resolve=True))


def start_sweep(config: DictConfig) -> None:
    """The parent run; its id goes to a file in the sweep folder, which jobs read whether they
    run in this process, in joblib workers or on cluster nodes that share the folder."""
    settings = _settings(config)
    if settings is not None:
        overrides = list(config.hydra.overrides.task)
        sweep_parent(settings, Path(config.hydra.sweep.dir), overrides)


def end_sweep_job(config: DictConfig, job_return: Any) -> None:
    """Each job's outcome as a tag on the parent, so a failed job shows in the sweep."""
    from hydra.core.hydra_config import HydraConfig

    folder = sweep_dir()
    settings = _settings(config)
    parent = _parent_id(folder) if folder is not None else None
    if settings is None or parent is None:
        return
    run = Run(_client(tracking_uri(settings)), parent)
    failed = job_return.status.name == "FAILED"
    outcome = f"FAILED: {job_return._return_value}" if failed else "COMPLETED"
    run.set_tags({f"job.{HydraConfig.get().job.num}": outcome})
    if failed:
        run.end("FAILED")


def end_sweep(config: DictConfig) -> None:
    settings, parent = _settings(config), _parent_id(Path(config.hydra.sweep.dir))
    if settings is not None and parent:
        Run(_client(tracking_uri(settings)), parent).end("FINISHED")
