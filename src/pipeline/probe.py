"""python -m pipeline.probe [overrides]: a linear probe on one layer's embeddings.

How much of the labels a layer makes linearly readable: a logistic regression on the
standardised embeddings, scored by stratified k-fold cross-validation. Writes `probe.json`:
accuracy and macro-F1 with their spread over folds, and the chance level to compare with.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.config import PipelineConfig
from pipeline.errors import LABEL_KEYS, ConfigError
from pipeline.progress import Folds, step
from pipeline.results import DatasetRef, StageResult, write_headline

# scikit-learn and pyarrow are imported where they are used: this module runs as
# `python -m pipeline.probe`, and its --help and config errors need neither.
if TYPE_CHECKING:
    from pipeline.storage.contract import Embeddings

log = logging.getLogger(__name__)


def probe_scores(
    vectors: np.ndarray,
    labels: list[str],
    folds: int = 5,
    c: float = 1.0,
    max_iter: int = 2000,
    seed: int = 0,
) -> dict:
    """Cross-validated accuracy and macro-F1 of a logistic regression from vectors to labels."""
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2 or counts.min() < 2:
        raise ConfigError(
            "a probe needs at least 2 labels with 2 images each; these embeddings have "
            f"{len(classes)} label(s), the rarest with {counts.min(initial=len(labels))} "
            f"image(s): extract with more labelled images ({LABEL_KEYS})"
        )
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_validate
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    splits = StratifiedKFold(
        n_splits=int(min(folds, counts.min())), shuffle=True, random_state=seed
    )
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
    scores = cross_validate(
        model, vectors, labels, cv=Folds(splits, "probe"), scoring=("accuracy", "f1_macro")
    )
    accuracy, f1 = scores["test_accuracy"], scores["test_f1_macro"]
    return {
        "accuracy": float(accuracy.mean()),
        "accuracy_std": float(accuracy.std()),
        "f1_macro": float(f1.mean()),
        "f1_macro_std": float(f1.std()),
        "folds": splits.n_splits,
        "n_images": len(labels),
        "n_classes": len(classes),
        "chance": float(counts.max() / counts.sum()),
    }


def check(cfg: PipelineConfig) -> None:
    """What can be refused before anything is read (the command runs it before tracking)."""
    from pipeline.storage.contract import existing_embeddings

    existing_embeddings(cfg.embeddings)


def run(cfg: PipelineConfig) -> StageResult:
    p = cfg.probe
    source, embeddings, labelled, record = read_labelled(cfg)
    labels = [embeddings.labels[i] for i in labelled]
    with step(f"cross-validating a linear probe on {len(labels):,} images"):
        scores = probe_scores(
            embeddings.vectors[labelled], labels, p.folds, p.c, p.max_iter, p.seed
        )
    out = Path(p.output_dir)
    with step(f"writing {out}"):
        out.mkdir(parents=True, exist_ok=True)
        (out / "probe.json").write_text(json.dumps(scores, indent=2) + "\n")
        write_headline(p.headline_file, embeddings.metadata["layer"], scores, ["probe_accuracy"])
    summary = (
        f"linear probe on {source.stem}: accuracy {scores['accuracy']:.3f} "
        f"+- {scores['accuracy_std']:.3f}, macro-F1 {scores['f1_macro']:.3f} "
        f"(chance {scores['chance']:.3f}) -> {out}"
    )
    log.info("%s", summary)
    return StageResult(
        output_dir=out,
        metrics=scores,
        artifacts=[out / "probe.json"],
        inputs=[record],
        summary=summary,
    )


def read_labelled(cfg: PipelineConfig) -> tuple[Path, Embeddings, list[int], DatasetRef]:
    """The layer's folder, its embeddings (checked), the rows that have a label (the others are
    left out, and said to be), and the embeddings as the run's input."""
    from pipeline.storage.contract import embeddings_input, existing_embeddings
    from pipeline.storage.inputs import read_layer

    source = existing_embeddings(cfg.embeddings)
    embeddings = read_layer(source, cfg.verify)
    record = embeddings_input(source, embeddings.metadata)
    if not embeddings.ids:
        raise ConfigError(f"embeddings {source} hold no images: nothing to probe")
    labelled = [i for i, label in enumerate(embeddings.labels or []) if label is not None]
    if not labelled:
        raise ConfigError(
            f"no labels: set {LABEL_KEYS} and extract again ({source} has none to probe)"
        )
    if len(labelled) < len(embeddings.ids):
        log.info(
            "left out %d of %d images: they have no label",
            len(embeddings.ids) - len(labelled),
            len(embeddings.ids),
        )
    return source, embeddings, labelled, record


if __name__ == "__main__":
    from pipeline.app import main

    main("probe", run, check=check)
