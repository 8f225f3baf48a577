"""What `python -m pipeline.dedup` reads, all of it checked before anything is written: its
settings, the layer's embeddings, the calibration copies the extraction embedded beside them,
the true groups when a manifest names them, and a person's review.csv (`dedup.reviewed`).
A ConfigError here leaves the stage's output folder as it was."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.config import DedupConfig, PipelineConfig
from pipeline.errors import ConfigError
from pipeline.results import DatasetRef
from pipeline.search.vectors import MIN_WHITENED

if TYPE_CHECKING:
    from pipeline.search.reviewed import Reviewed
    from pipeline.storage.contract import Embeddings


def fixed_threshold(value: float | str) -> float | None:
    """dedup.threshold as a number, or None for auto."""
    if value == "auto":
        return None
    try:
        threshold = float(value)
    except ValueError:
        raise ConfigError(
            f"dedup.threshold is auto or a cosine similarity, got {value!r}"
        ) from None
    if not -1 < threshold <= 1:
        raise ConfigError(f"dedup.threshold is a cosine similarity in (-1, 1], got {threshold}")
    return threshold


@dataclass
class Copies:
    """The calibration copies of the embedded images: vectors, and each one's source row."""

    vectors: np.ndarray
    sources: np.ndarray
    images: int  # how many images they were made from


def calibration_copies(
    source: Path, embeddings: Embeddings, required: bool, verify: bool = True
) -> Copies | None:
    """The copies the extraction embedded beside these embeddings (read and checked as the
    layer is); a ConfigError when they are `required` (threshold=auto) and missing, or when
    they belong to another extraction."""
    from pipeline.storage.contract import calibration_path
    from pipeline.storage.inputs import read_layer

    path = calibration_path(source)
    if not path.is_dir():
        if required:
            raise ConfigError(
                f"dedup.threshold=auto needs the calibration copies the extraction embeds, and "
                f"{path} does not exist: extract again with calibration.images > 0 (the "
                "default), or set dedup.threshold to the value calibration_curve.png of a "
                "calibrated run of this layer marks (whitened similarities run far below "
                "plain cosine ones)"
            )
        return None
    copies = read_layer(path, verify)
    rows = {image_id: i for i, image_id in enumerate(embeddings.ids)}
    stale = copies.metadata.get("config_hash") != embeddings.metadata.get("config_hash") or any(
        s not in rows for s in copies.sources
    )
    if stale or not copies.sources:
        raise ConfigError(
            f"the calibration copies in {path} were not made with these embeddings: extract "
            "again (python -m pipeline with the same overrides)"
        )
    sources = np.array([rows[s] for s in copies.sources])
    return Copies(copies.vectors, sources, len(set(copies.sources)))


def check_params(params: DedupConfig) -> None:
    """dedup's numbers within their ranges, or a ConfigError naming the setting."""
    if params.k < 1:
        raise ConfigError(f"dedup.k must be at least 1, got {params.k}")
    if not 0 < params.target_precision <= 1:
        raise ConfigError(
            f"dedup.target_precision is a fraction in (0, 1], got {params.target_precision}"
        )
    if not 0 <= params.whiten_shrinkage <= 1:
        raise ConfigError(
            f"dedup.whiten_shrinkage is a fraction in [0, 1], got {params.whiten_shrinkage}"
        )
    if params.whiten_dim is not None and params.whiten_dim < 1:
        raise ConfigError(f"dedup.whiten_dim must be at least 1 or null, got {params.whiten_dim}")
    if not 0 < params.min_recall <= 1:
        raise ConfigError(f"dedup.min_recall is a share in (0, 1], got {params.min_recall}")
    if params.whiten_sample < MIN_WHITENED:
        raise ConfigError(
            f"dedup.whiten_sample must be at least {MIN_WHITENED}, got {params.whiten_sample}"
        )
    if params.review_pairs < 1:
        raise ConfigError(f"dedup.review_pairs must be at least 1, got {params.review_pairs}")


@dataclass
class DedupInputs:
    """What dedup reads, all of it checked before anything is written."""

    source: Path
    embeddings: Embeddings
    record: DatasetRef  # the embeddings as the run's input
    copies: Copies | None
    codes: np.ndarray | None  # each image's true group as a number, when a truth is named
    threshold: float | None  # None: calibrated on the copies
    reviewed: Reviewed | None  # the pairs of dedup.reviewed, when named


def read_inputs(cfg: PipelineConfig) -> DedupInputs:
    """The settings, the embeddings, their calibration copies and the true groups, read and
    checked: a ConfigError here leaves the output folder as it was."""
    from pipeline.search.reviewed import reviewed_pairs
    from pipeline.storage.contract import embeddings_input, existing_embeddings
    from pipeline.storage.inputs import read_layer

    params = cfg.dedup
    threshold = fixed_threshold(params.threshold)
    check_params(params)
    source = existing_embeddings(cfg.embeddings)
    embeddings = read_layer(source, cfg.verify)
    record = embeddings_input(source, embeddings.metadata)
    if not embeddings.ids:
        raise ConfigError(f"embeddings {source} hold no images: nothing to compare")
    copies = calibration_copies(source, embeddings, threshold is None, cfg.verify)
    codes = known_truth(params, embeddings)
    reviewed = reviewed_pairs(params.reviewed, embeddings.ids)
    return DedupInputs(source, embeddings, record, copies, codes, threshold, reviewed)


def known_truth(params: DedupConfig, embeddings: Embeddings) -> np.ndarray | None:
    """Each image's true group as a number, from dedup.truth or else the truth the extraction
    recorded for its dataset; None when neither names one."""
    from pipeline.search.truth import truth_codes, truth_groups

    recorded = embeddings.metadata.get("dataset")
    truth = params.truth or (recorded.get("truth") if isinstance(recorded, dict) else None)
    if truth is None:
        return None
    path, ids = Path(truth).expanduser(), embeddings.ids
    return truth_codes(truth_groups(path, params.truth_id_column, params.truth_group_column, ids))
