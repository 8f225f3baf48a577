"""The true groups of near-duplicates (read from a manifest), and found pairs scored against
them: which pairs share a group, how many true pairs there are (counted, never listed: a group
of g images holds g(g-1)/2), precision, recall and F1 at a threshold, average precision, and the
curve over thresholds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import ConfigError
from pipeline.search.calibration import average_precision

PR_THRESHOLDS = np.round(np.arange(-1.0, 1.0, 0.01), 2)


def truth_groups(path: Path, id_column: str, group_column: str, ids: list[str]) -> pd.Series:
    """The true group of each embedded image (NaN where the manifest does not say)."""
    if not path.is_file():
        raise ConfigError(
            f"dedup.truth {path} does not exist: point it at a manifest with the "
            "true groups, or set dedup.truth=null"
        )
    manifest = pd.read_csv(path, dtype=str) if path.suffix != ".parquet" else pd.read_parquet(path)
    missing = [c for c in (id_column, group_column) if c not in manifest]
    if missing:
        raise ConfigError(
            f"dedup.truth {path} has no column {missing[0]!r}: set "
            "dedup.truth_id_column / dedup.truth_group_column"
        )
    groups = pd.Series(ids).map(manifest.set_index(id_column)[group_column])
    if groups.isna().all():
        raise ConfigError(
            f"dedup.truth {path} names none of the embedded images: point it at this "
            "dataset's manifest, or leave it null"
        )
    return groups


def truth_codes(groups: pd.Series) -> np.ndarray:
    """Each image's true group as a number, -1 where the truth does not say."""
    return pd.factorize(groups)[0]


def count_true_pairs(codes: np.ndarray) -> int:
    """How many pairs of images share a group, counted without listing them: a group of g
    images holds g(g-1)/2 pairs, which for large groups would not fit in memory as a list."""
    sizes = np.bincount(codes[codes >= 0])
    return int((sizes * (sizes - 1) // 2).sum())


def shares_group(codes: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whether each pair (a[i], b[i]) is a true pair: both in the same known group."""
    return (codes[a] == codes[b]) & (codes[a] >= 0)


def pair_scores(found: int, hits: int, truth: int) -> dict[str, float]:
    """Precision, recall and F1 from counts: pairs found, true pairs among them, true pairs."""
    precision = hits / found if found else 1.0
    recall = hits / truth if truth else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def pr_curve(similarities: np.ndarray, hits: np.ndarray, truth: int) -> pd.DataFrame:
    """Precision, recall and F1 of `similarity >= t` over the candidate pairs, for each
    threshold t; `hits` says which candidates are true pairs, `truth` how many there are."""
    rows = []
    for threshold in PR_THRESHOLDS:
        above = similarities >= threshold
        scores = pair_scores(int(above.sum()), int(hits[above].sum()), truth)
        rows.append({"threshold": float(threshold), **scores})
    return pd.DataFrame(rows)


def truth_scores(
    codes: np.ndarray,
    candidates: pd.DataFrame,
    threshold: float,
    kept: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[dict, pd.DataFrame]:
    """Of the candidate pairs (columns a, b, similarity) against the true groups `codes`:
    precision, recall and F1 at the threshold (of the pairs `kept`, when given: those a run
    reports, near-identical ones below the threshold among them), the true pairs and average
    precision; and the precision-recall curve over thresholds."""
    similarities = candidates["similarity"].to_numpy()
    above = similarities >= threshold
    hits = shares_group(codes, candidates["a"].to_numpy(), candidates["b"].to_numpy())
    n_true = count_true_pairs(codes)
    found = (int(above.sum()), int(hits[above].sum()))
    if kept is not None:
        found = (len(kept[0]), int(shares_group(codes, *kept).sum()))
    scores = {
        **pair_scores(*found, n_true),
        "true_pairs": n_true,
        "ap": average_precision(similarities, hits, n_true),
    }
    return scores, pr_curve(similarities, hits, n_true)
