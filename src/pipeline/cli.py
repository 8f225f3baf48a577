"""Console scripts, installed beside `python -m pipeline...`: `pipeline-extract`,
`pipeline-cluster`, `pipeline-dedup`, `pipeline-probe`, `pipeline-report`, `pipeline-visualize`,
`pipeline-layers`. Each takes the same Hydra overrides as its `python -m` twin."""

from __future__ import annotations

from pipeline.app import main, sleeping_openmp


def extract() -> None:
    sleeping_openmp()  # before torch loads
    from pipeline.extract import run

    main("extract", run)


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
