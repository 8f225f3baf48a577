"""python -m pipeline.probe [overrides]: a linear probe on one layer's embeddings.

How much of the labels a layer makes linearly readable: a logistic regression on the
standardised embeddings. Up to `probe.sample` labelled images it is scored by stratified k-fold
cross-validation over all of them; beyond, it is trained once on `probe.sample` of them
(stratified, drawn with `probe.seed`) and scored on all the others, held out, read a chunk at a
time: the cost of training stays that of `probe.sample` images, and memory one copy of the layer.
Writes `probe.json`: accuracy and macro-F1 with their spread (over the folds; held out, over
`folds` disjoint parts of the held-out images), and the chance level to compare with.
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
# Values standardised and predicted at once on the held-out images: 64 MiB of float32.
CHUNK_VALUES = 16 * 2**20


def check_classes(counts: np.ndarray, images: int) -> None:
    """A probe needs 2 labels or more, each on 2 images or more."""
    if len(counts) < 2 or counts.min() < 2:
        raise ConfigError(
            "a probe needs at least 2 labels with 2 images each; these embeddings have "
            f"{len(counts)} label(s), the rarest with {counts.min(initial=images)} "
            f"image(s): extract with more labelled images ({LABEL_KEYS})"
        )


def probe_model(c: float, max_iter: int):
    """The probe: standardisation, then a logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))


def probe_scores(
    vectors: np.ndarray,
    labels: list[str],
    folds: int = 5,
    c: float = 1.0,
    max_iter: int = 2000,
    seed: int = 0,
) -> dict:
    """Cross-validated accuracy and macro-F1 of a logistic regression from vectors to labels."""
    from sklearn.model_selection import StratifiedKFold, cross_validate

    classes, counts = np.unique(labels, return_counts=True)
    check_classes(counts, len(labels))
    splits = StratifiedKFold(
        n_splits=int(min(folds, counts.min())), shuffle=True, random_state=seed
    )
    scores = cross_validate(
        probe_model(c, max_iter),
        vectors,
        labels,
        cv=Folds(splits, "probe"),
        scoring=("accuracy", "f1_macro"),
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

    if cfg.probe.folds < 2:
        raise ConfigError(f"probe.folds must be at least 2, got {cfg.probe.folds}")
    if cfg.probe.sample < 2:
        raise ConfigError(f"probe.sample must be at least 2, got {cfg.probe.sample}")
    existing_embeddings(cfg.embeddings)


def holdout_scores(
    vectors: np.ndarray,
    codes: np.ndarray,
    train_size: int,
    folds: int = 5,
    c: float = 1.0,
    max_iter: int = 2000,
    seed: int = 0,
) -> dict:
    """Accuracy and macro-F1 of a logistic regression trained on `train_size` of the labelled
    rows (`codes` >= 0; stratified) and scored on all the other labelled rows, with their
    spread over `folds` disjoint parts of those. `vectors` is read, never copied whole."""
    from sklearn.metrics import f1_score
    from sklearn.model_selection import train_test_split

    labelled = np.flatnonzero(codes >= 0)
    counts = np.bincount(codes[labelled])
    counts = counts[counts > 0]
    check_classes(counts, len(labelled))
    if not 0 < train_size < len(labelled):
        raise ConfigError(
            f"probe.sample must be between 1 and the labelled images ({len(labelled)}), "
            f"got {train_size}"
        )
    # Stratified where every class can be in both parts (else drawn as it comes).
    stratify = (
        codes[labelled] if len(counts) <= min(train_size, len(labelled) - train_size) else None
    )
    train, test = train_test_split(
        labelled, train_size=train_size, stratify=stratify, random_state=seed
    )
    train, test = np.sort(train), np.sort(test)
    model = probe_model(c, max_iter).fit(vectors[train], codes[train])
    predicted = np.empty(len(test), codes.dtype)
    at_once = max(1, CHUNK_VALUES // max(1, vectors.shape[1]))
    for start in range(0, len(test), at_once):
        rows = test[start : start + at_once]
        predicted[start : start + at_once] = model.predict(vectors[rows])
    truth = codes[test]
    parts = np.array_split(np.random.default_rng(seed).permutation(len(test)), folds)
    accuracy = [float(np.mean(predicted[p] == truth[p])) for p in parts]
    f1 = [f1_score(truth[p], predicted[p], average="macro") for p in parts]
    return {
        "accuracy": float(np.mean(predicted == truth)),
        "accuracy_std": float(np.std(accuracy)),
        "f1_macro": float(f1_score(truth, predicted, average="macro")),
        "f1_macro_std": float(np.std(f1)),
        "folds": folds,
        "n_images": len(labelled),
        "n_classes": len(counts),
        "chance": float(counts.max() / counts.sum()),
        "train_images": len(train),
        "test_images": len(test),
    }


def run(cfg: PipelineConfig) -> StageResult:
    p = cfg.probe
    source, embeddings, codes, record = read_labelled(cfg)
    labelled = np.flatnonzero(codes >= 0)
    if len(labelled) <= p.sample:
        labels = [embeddings.labels[i] for i in labelled]
        with step(f"cross-validating a linear probe on {len(labels):,} images"):
            scores = probe_scores(
                embeddings.vectors[labelled], labels, p.folds, p.c, p.max_iter, p.seed
            )
    else:
        log.info(
            "%d labelled images > probe.sample=%d: trained on %d of them, scored on the others",
            len(labelled),
            p.sample,
            p.sample,
        )
        with step(f"a linear probe trained on {p.sample:,} images, scored on the others"):
            scores = holdout_scores(
                embeddings.vectors, codes, p.sample, p.folds, p.c, p.max_iter, p.seed
            )
    out = Path(p.output_dir)
    with step(f"writing {out}"):
        out.mkdir(parents=True, exist_ok=True)
        (out / "probe.json").write_text(json.dumps(scores, indent=2) + "\n")
        write_headline(p.headline_file, embeddings.metadata["layer"], scores, ["probe_accuracy"])
    how = (
        f"trained on {scores['train_images']}, held out {scores['test_images']}"
        if "train_images" in scores
        else f"{scores['folds']}-fold CV"
    )
    summary = (
        f"linear probe on {source.stem}: accuracy {scores['accuracy']:.3f} "
        f"+- {scores['accuracy_std']:.3f}, macro-F1 {scores['f1_macro']:.3f} "
        f"(chance {scores['chance']:.3f}; {how}) -> {out}"
    )
    log.info("%s", summary)
    return StageResult(
        output_dir=out,
        metrics=scores,
        artifacts=[out / "probe.json"],
        inputs=[record],
        summary=summary,
    )


def read_labelled(cfg: PipelineConfig) -> tuple[Path, Embeddings, np.ndarray, DatasetRef]:
    """The layer's folder, its embeddings (checked), each row's label as a code (-1: none; those
    rows are left out, and said to be), and the embeddings as the run's input."""
    import pandas as pd

    from pipeline.storage.contract import embeddings_input, existing_embeddings
    from pipeline.storage.inputs import read_layer

    source = existing_embeddings(cfg.embeddings)
    embeddings = read_layer(source, cfg.verify)
    record = embeddings_input(source, embeddings.metadata)
    if not embeddings.ids:
        raise ConfigError(f"embeddings {source} hold no images: nothing to probe")
    labels = embeddings.labels or [None] * len(embeddings.ids)
    codes = pd.factorize(pd.Series(labels, dtype=object))[0]
    labelled = int((codes >= 0).sum())
    if not labelled:
        raise ConfigError(
            f"no labels: set {LABEL_KEYS} and extract again ({source} has none to probe)"
        )
    if labelled < len(embeddings.ids):
        log.info(
            "left out %d of %d images: they have no label",
            len(embeddings.ids) - labelled,
            len(embeddings.ids),
        )
    return source, embeddings, codes, record


if __name__ == "__main__":
    from pipeline.app import main

    main("probe", run, check=check)
