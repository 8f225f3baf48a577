"""What a stage hands back: its files, figures and numbers, for the caller and for tracking.

Stages compute and return a `StageResult`; the app layer gives it to `tracking`, which only
records it. A notebook user gets the same object from `run(cfg)`.
"""

from __future__ import annotations

from collections.abc import Callable
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
