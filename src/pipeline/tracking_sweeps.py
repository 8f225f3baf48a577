"""A Hydra multirun as one MLflow parent run with a child run per job: the parent made by the
sweep's start (or its first job, one process at a time), each job's outcome a tag on it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.config import TrackingConfig
from pipeline.storage.staging import Lock
from pipeline.tracking_runs import Run, start_run, store_client, tracking_uri

PARENT_RUN_FILE = "mlflow_parent_run_id"  # in the sweep folder, read by every job
MAX_RUN_NAME = 250  # a sweep's parent run is named by its overrides, at most this long


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


def job_run(settings: TrackingConfig, stage: str, name: str) -> Run:
    """The stage's run; in a sweep, a child of the sweep's parent run, and none without one: a
    job's run would be lost among the others, outside its sweep."""
    folder = sweep_dir()
    if folder is None:
        return start_run(settings, stage, name, {})
    parent = sweep_parent(settings, folder)
    if parent is None:
        return Run(error=RuntimeError("the sweep's parent run could not be made"))
    return start_run(settings, stage, name, {}, parent=parent)


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
    run = Run(store_client(tracking_uri(settings)), parent)
    failed = job_return.status.name == "FAILED"
    outcome = f"FAILED: {job_return._return_value}" if failed else "COMPLETED"
    run.set_tags({f"job.{HydraConfig.get().job.num}": outcome})
    if failed:
        run.end("FAILED")


def end_sweep(config: DictConfig) -> None:
    settings, parent = _settings(config), _parent_id(Path(config.hydra.sweep.dir))
    if settings is not None and parent:
        Run(store_client(tracking_uri(settings)), parent).end("FINISHED")
