"""MLflow tracking: the only module that imports mlflow.

One MLflow run per stage invocation; a Hydra multirun becomes a parent run with one child per
job. Tracking never costs the user their outputs: when the tracking store fails, a warning is
logged once, logging stops, the stage finishes, and only `tracking.required=true` makes the exit
status non-zero.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipeline.config import TrackingConfig, user_errors
from pipeline.plots import projection_figure
from pipeline.store import FAILURES_FILE, count_rows, layer_path, read_embeddings

if TYPE_CHECKING:
    from pipeline.extract import Summary

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///outputs/mlflow.db"
ARTIFACT_ROOT = Path("outputs/mlartifacts")
PARENT_RUN_FILE = "mlflow_parent_run_id"  # in the sweep folder, read by every job
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
GLANCE_ROWS = 5000  # points in the "embeddings at a glance" picture
# A server that is down should cost seconds, not MLflow's default minutes of retries.
for _name, _value in {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}.items():
    os.environ.setdefault(_name, _value)

from mlflow import MlflowClient  # noqa: E402 - reads the variables above
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param  # noqa: E402
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


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes; of a folder of part files, over their names and bytes."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(2**20), b""):
                digest.update(chunk)
    return digest.hexdigest()


class Run:
    """One MLflow run. Every call is guarded: the first failure is logged once and turns the
    rest into no-ops. With tracking off, every call is a no-op from the start."""

    def __init__(self, client: MlflowClient | None = None, run_id: str | None = None) -> None:
        self.client = client
        self.run_id = run_id
        self.error: Exception | None = None

    @property
    def active(self) -> bool:
        return self.client is not None and self.error is None

    def _guard(self, action: str, method: str, *args: Any, **kwargs: Any) -> None:
        """Call `self.client.<method>(...)` unless tracking is off or has already failed."""
        if not self.active:
            return
        try:
            getattr(self.client, method)(*args, **kwargs)
        except Exception as err:
            self.error = err
            log.warning(
                "tracking failed while %s (%s: %s); the outputs are written, this run "
                "is not fully tracked",
                action,
                type(err).__name__,
                str(err).splitlines()[0] if str(err) else "",
            )

    def log_params(self, params: Mapping[str, str]) -> None:
        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow's batch limit
            self._guard(
                "logging params",
                "log_batch",
                self.run_id,
                params=items[start : start + 100],
            )

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._guard("logging metrics", "log_batch", self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self._guard("setting tags", "set_tag", self.run_id, key, value)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self._guard(f"logging {path.name}", "log_artifact", self.run_id, str(path), folder)

    def log_text(self, text: str, name: str) -> None:
        self._guard(f"logging {name}", "log_text", self.run_id, text, name)

    def log_dict(self, value: Any, name: str) -> None:
        self._guard(f"logging {name}", "log_dict", self.run_id, value, name)

    def log_figure(self, figure: Any, name: str) -> None:
        self._guard(f"logging {name}", "log_figure", self.run_id, figure, name)

    def log_dataset(self, name: str, digest: str, source: str, context: str) -> None:
        dataset = DatasetInput(
            Dataset(name=name, digest=digest[:36], source_type="local", source=source),
            tags=[InputTag("mlflow.data.context", context)],
        )
        self._guard("logging the dataset", "log_inputs", self.run_id, [dataset])

    def end(self, status: str) -> None:
        self._guard("ending the run", "set_terminated", self.run_id, status)


def _client(settings: TrackingConfig) -> MlflowClient:
    return MlflowClient(tracking_uri(settings))


def _experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    local = client._tracking_client.tracking_uri.startswith("sqlite:")
    # A local store keeps artifacts beside its database; a server decides for itself.
    location = ARTIFACT_ROOT.resolve().as_uri() if local else None
    return client.create_experiment(name, artifact_location=location)


def _start_run(settings: TrackingConfig, stage: str, run_name: str, tags: Mapping[str, str]) -> Run:
    client = _client(settings)
    run = client.create_run(
        _experiment_id(client, settings.experiment),
        run_name=run_name,
        tags={
            MLFLOW_RUN_NAME: run_name,
            "stage": stage,
            "host": socket.gethostname(),
            **git_tags(),
            **tags,
        },
    )
    return Run(client, run.info.run_id)


def _sweep_parent() -> str | None:
    """The parent run of the Hydra sweep this job belongs to, if any."""
    if not HydraConfig.initialized() or HydraConfig.get().mode is not RunMode.MULTIRUN:
        return None
    marker = Path(HydraConfig.get().sweep.dir) / PARENT_RUN_FILE
    return marker.read_text().strip() if marker.is_file() else None


def _job_name(stage: str) -> str:
    if HydraConfig.initialized() and HydraConfig.get().mode is RunMode.MULTIRUN:
        job = HydraConfig.get().job
        return f"{stage} #{job.num}: {job.override_dirname or 'defaults'}"
    return stage


@contextlib.contextmanager
def tracked(
    settings: TrackingConfig, stage: str, config: DictConfig, tags: Mapping[str, str] | None = None
) -> Iterator[Run]:
    """An MLflow run around a stage, with the resolved config as params and artifact.

    The run ends FINISHED, or FAILED if the stage raised. When tracking failed on the way and
    `settings.required`, TrackingError is raised after the stage has finished its own work.
    """
    if settings.backend == "none":
        yield Run()
        return
    tags = dict(tags or {})
    parent = _sweep_parent()
    if parent:
        tags[MLFLOW_PARENT_RUN_ID] = parent
    run = Run()
    try:
        run = _start_run(settings, stage, _job_name(stage), tags)
    except Exception as err:
        run.error = err
        log.warning(
            "tracking failed: could not start an MLflow run at %s (%s: %s); the outputs "
            "are written but not tracked",
            tracking_uri(settings),
            type(err).__name__,
            str(err).splitlines()[0] if str(err) else "",
        )
    run.log_params(flatten(OmegaConf.to_container(config, resolve=True, enum_to_str=True)))
    run.log_text(OmegaConf.to_yaml(config, resolve=True), "config.yaml")
    try:
        yield run
    except BaseException:
        run.end("FAILED")
        raise
    run.end("FINISHED")
    if run.error is not None and settings.required:
        raise TrackingError(
            f"tracking failed ({type(run.error).__name__}: {run.error}) and tracking.required=true"
        )


def log_extraction(run: Run, summary: Summary) -> None:
    """An extraction's figures, layer table, output files and a picture of the embeddings."""
    if not run.active:
        return
    run.set_tags({"device": summary.device, "precision": summary.precision})
    run.log_metrics(
        {
            "images": summary.images,
            "failures": summary.failures,
            "seconds": summary.seconds,
            "images_per_s": summary.images_per_s,
            **{f"dim.{name}": layer.dim for name, layer in summary.layers.items()},
        }
    )
    run.log_dict(
        {
            name: {"output_shape": list(layer.shape), "pool": layer.pool.value, "dim": layer.dim}
            for name, layer in summary.layers.items()
        },
        "layers.json",
    )
    files = [layer_path(summary.output_dir, name) for name in summary.layers]
    files.append(summary.output_dir / FAILURES_FILE)
    run.log_dict(
        {str(path): {"bytes": path.stat().st_size, "sha256": file_digest(path)} for path in files},
        "outputs.json",
    )
    run.log_dataset(
        summary.dataset, summary.manifest_digest, str(summary.output_dir.resolve()), "extract"
    )
    if summary.failures:
        run.log_artifact(summary.output_dir / FAILURES_FILE)
    last = files[-2]  # the last requested layer: the embedding most people look at
    total = count_rows(last)
    if total >= 3:
        rows = None if total <= GLANCE_ROWS else np.linspace(0, total - 1, GLANCE_ROWS).astype(int)
        embeddings = read_embeddings(last, rows)
        figure = projection_figure(
            embeddings.vectors, embeddings.labels, f"{last.stem}: {total} images, PCA"
        )
        run.log_figure(figure, "embeddings_pca.png")
        plt.close(figure)


def run_stage(cfg: DictConfig, stage: str, run: Callable[[Any, Run], object]) -> None:
    """The body of a downstream stage's Hydra main: typed config, one tracked run, user errors
    as one line and an exit code."""
    config = OmegaConf.to_object(cfg)
    with user_errors(), tracked(config.tracking, stage, cfg) as run_log:
        run(config, run_log)


class SweepRun(Callback):
    """Hydra callback: one parent MLflow run per multirun, each job's run a child of it.

    The parent's id goes to a file in the sweep folder, which jobs read whether they run in
    this process, in joblib workers or on a cluster that shares the folder.
    """

    def on_multirun_start(self, config: DictConfig, **_: Any) -> None:
        settings = _tracking_settings(config)
        if settings is None:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            run = _start_run(
                settings, "sweep", f"sweep {sweep_dir.name}", {"sweep_dir": str(sweep_dir)}
            )
        except Exception as err:
            log.warning("tracking failed: no parent run for this sweep (%s)", err)
            return
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / PARENT_RUN_FILE).write_text(run.run_id)

    def on_job_end(self, config: DictConfig, job_return: Any, **_: Any) -> None:
        """Record each job's outcome on the parent, so a failed job shows in the sweep."""
        settings = _tracking_settings(config)
        parent = _sweep_parent()
        if settings is None or parent is None:
            return
        run = Run(_client(settings), parent)
        failed = job_return.status.name == "FAILED"
        outcome = "FAILED: " + str(job_return._return_value) if failed else "COMPLETED"
        run.set_tags({f"job.{HydraConfig.get().job.num}": outcome[:MAX_PARAM_LENGTH]})
        if failed:
            log.error(
                "sweep job #%d failed: %s", HydraConfig.get().job.num, job_return._return_value
            )
            run.end("FAILED")

    def on_multirun_end(self, config: DictConfig, **_: Any) -> None:
        settings = _tracking_settings(config)
        marker = Path(config.hydra.sweep.dir) / PARENT_RUN_FILE
        if settings is None or not marker.is_file():
            return
        Run(_client(settings), marker.read_text().strip()).end("FINISHED")


def _tracking_settings(config: DictConfig) -> TrackingConfig | None:
    tracking = config.get("tracking")
    if tracking is None or tracking.backend == "none":
        return None
    return OmegaConf.to_object(tracking) if isinstance(tracking, DictConfig) else tracking
