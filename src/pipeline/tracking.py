"""MLflow tracking of a stage: the run around it, and what it returned recorded in it (metrics,
tags, inputs linked to the runs that made them, files and figures). Only this module and the
two beneath it import mlflow: `tracking_runs` (one run, its calls guarded and bounded) and
`tracking_sweeps` (a Hydra multirun as a parent run). Only `tracking.required=true` makes a
failure of tracking a non-zero exit.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.config import TrackingConfig
from pipeline.results import DatasetRef, StageResult
from pipeline.tracking_runs import MAX_PARAM_LENGTH, Run
from pipeline.tracking_sweeps import job_run


class TrackingError(RuntimeError):
    """Tracking failed and the user asked for it to be required."""


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
    run = job_run(settings, stage, name)
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
