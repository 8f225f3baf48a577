"""Console scripts, installed beside `python -m pipeline...`: `pipeline-extract`,
`pipeline-cluster`, `pipeline-dedup`, `pipeline-probe`, `pipeline-report`, `pipeline-visualize`,
`pipeline-layers`, `pipeline-explore`. Each takes the same Hydra overrides as its `python -m` twin.

Each command's config and inputs are checked (`check`) before the libraries its work needs are
imported: a stage module imports torch, scikit-learn, faiss, pandas or matplotlib inside the
functions that use them, so `--help` and a config error answer in about a second."""

from __future__ import annotations

from typing import Any

from pipeline.app import main, sleeping_openmp
from pipeline.config import PipelineConfig


def extract() -> None:
    sleeping_openmp()  # before torch loads
    main("extract", _extract, check=_check_extract)


def _check_extract(cfg: PipelineConfig) -> None:
    """The dataset's folder and manifest, before torch, timm and MLflow load."""
    from pipeline.images.manifest import check_dataset

    check_dataset(cfg.dataset)


def _extract(cfg: PipelineConfig) -> Any:
    """The extraction, torch loaded only now that the config is checked: a config error answers
    in a second, not after torch's four, and Ctrl-C while torch loads is the promised one line."""
    from pipeline.extract import run

    return run(cfg)


def cluster() -> None:
    from pipeline.cluster import check, run

    main("cluster", run, check=check)


def dedup() -> None:
    from pipeline.dedup import APP_CONFIG, check, run

    main("dedup", run, config=APP_CONFIG, check=check)


def probe() -> None:
    from pipeline.probe import check, run

    main("probe", run, check=check)


def report() -> None:
    from pipeline.report import check, run

    main("report", run, check=check)


def visualize() -> None:
    from pipeline.visualize import check, run

    main("visualize", run, check=check)


def explore() -> None:
    from pipeline.explore import check, run

    main("explore", run, track=False, check=check)


def layers() -> None:
    from pipeline.layers import run

    main("layers", run, track=False)
