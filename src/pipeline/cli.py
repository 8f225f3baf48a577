"""Console scripts, installed beside `python -m pipeline...`: `pipeline-extract`,
`pipeline-cluster`, `pipeline-dedup`, `pipeline-probe`, `pipeline-report`, `pipeline-visualize`,
`pipeline-layers`. Each takes the same Hydra overrides as its `python -m` twin."""

from __future__ import annotations

from typing import Any

from pipeline.app import main, sleeping_openmp
from pipeline.config import PipelineConfig


def extract() -> None:
    sleeping_openmp()  # before torch loads
    main("extract", _extract)


def _extract(cfg: PipelineConfig) -> Any:
    """The extraction, torch loaded only now that the config is checked: a config error answers
    in a second, not after torch's four, and Ctrl-C while torch loads is the promised one line."""
    from pipeline.extract import run

    return run(cfg)


def cluster() -> None:
    from pipeline.cluster import run

    main("cluster", run)


def dedup() -> None:
    from pipeline.dedup import run

    main("dedup", run)


def probe() -> None:
    from pipeline.probe import run

    main("probe", run)


def report() -> None:
    from pipeline.report import run

    main("report", run)


def visualize() -> None:
    from pipeline.visualize import run

    main("visualize", run)


def layers() -> None:
    from pipeline.layers import run

    main("layers", run, track=False)
