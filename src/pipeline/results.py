"""What a stage hands back: its files, figures and numbers, for the caller and for tracking.

Stages compute and return a `StageResult`; the app layer gives it to `tracking`, which only
records it. A notebook user gets the same object from `run(cfg)`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DatasetRef:
    """A dataset a stage read, as MLflow's dataset inputs name it: what, which version, where."""

    name: str
    digest: str
    source: str
    context: str  # "images" for the extraction's image list, "embeddings" for a layer


@dataclass
class StageResult:
    """What every stage returns."""

    output_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    # Small files worth keeping with the run (JSON, CSV, pictures); never embeddings.
    artifacts: list[Path] = field(default_factory=list)
    # JSON documents tracking stores under these names (tables that are not files here).
    documents: dict[str, Any] = field(default_factory=dict)
    # Pictures drawn only when tracking asks for them (matplotlib figures, by artifact name).
    figures: dict[str, Callable[[], Any]] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    inputs: list[DatasetRef] = field(default_factory=list)
    summary: str = ""  # the one line a person reads at the end


# The figures that compare runs of a layer (report.md's columns, `dvc exp show`'s), each the
# first of its keys found in the stage's metrics: dedup's against the true groups when known,
# else on the calibration copies.
HEADLINE: dict[str, tuple[str, ...]] = {
    "cluster_nmi": ("nmi",),
    "dedup_ap": ("ap", "calibration_ap"),
    "dedup_f1": ("f1", "calibration_f1"),
    "probe_accuracy": ("accuracy",),
}


def write_headline(
    path: str | None, layer: str, metrics: Mapping[str, Any], names: Sequence[str]
) -> Path | None:
    """Write the HEADLINE figures `names` of a stage's `metrics` to `path` (None: nowhere) as
    `{layer: {name: value}}`. A file this small is meant for git: DVC compares it across
    commits and experiments, under a column name that says the layer (`blocks.4.dedup_f1`)."""
    if path is None:
        return None
    figures = {}
    for name in names:
        found = [metrics[key] for key in HEADLINE[name] if key in metrics]
        if found:  # none, for example, is an NMI without labels
            figures[name] = found[0]
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({layer: figures}, indent=2) + "\n")
    return target
