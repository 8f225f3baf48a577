"""Pairs a person reviewed, read back and scored: `review.csv`, as dedup's `review.html` saves
it (`image_a`, `image_b`, `similarity`, `decision`: same or different), named by
`dedup.reviewed`.

The decisions are about the images, not about a run: each reviewed pair is scored at the
similarity the current run gives it (its rows' vectors as searched), so one review scores any
threshold, layer or whitening of the same images; the CSV's `similarity` column is not read.
On the reviewed pairs, at the threshold: precision (of the reviewed pairs at or above it, the
share marked same), recall (of the pairs marked same, the share at or above it: kept) and F1;
and the threshold they suggest: the lowest similarity at which the reviewed pairs kept are
marked same in at least `dedup.target_precision` of cases (`calibration.threshold_at_precision`,
as the copies calibrate the automatic one). The page shows the pairs nearest the threshold, so
these numbers describe the threshold's neighbourhood, where its mistakes are: not the whole
set's precision and recall, which only a truth (`dedup.truth`) gives.

Reading the file needs neither the embeddings nor pandas (`read_decisions`, for dedup's check
before anything is loaded); the images it names are matched to the embeddings' after.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)
COLUMNS = ("image_a", "image_b", "decision")  # and `similarity`, written for people, not read
DECISIONS = ("same", "different")


def read_decisions(path: Path) -> dict[tuple[str, str], bool]:
    """Each reviewed pair (its two ids in sorted order) and whether it was marked same; the
    last row wins where a pair is repeated. A ConfigError, saying what to do, for a file that
    is missing, is not a CSV, lacks a column, holds no decision or one that is neither same nor
    different."""
    where = f"dedup.reviewed {path}"
    if not path.is_file():
        raise ConfigError(
            f"{where} does not exist: point it at the review.csv that review.html (in dedup's "
            "output folder) saves, or set dedup.reviewed=null"
        )
    decisions: dict[tuple[str, str], bool] = {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:
            rows = csv.DictReader(file)
            missing = [c for c in COLUMNS if c not in (rows.fieldnames or [])]
            if missing:
                raise ConfigError(
                    f"{where} has no column {missing[0]!r}: it needs the columns "
                    f"{','.join(COLUMNS)} (review.html saves them)"
                )
            for row in rows:
                a, b, decision = (row[c] for c in COLUMNS)
                said = (decision or "").strip().lower()
                if not a or not b or said not in DECISIONS:
                    raise ConfigError(
                        f"{where} line {rows.line_num}: needs two image ids and a decision "
                        f"same or different, got {a!r}, {b!r}, {decision!r}: fix or remove "
                        "the row"
                    )
                decisions[(min(a, b), max(a, b))] = said == "same"
    except (UnicodeDecodeError, csv.Error) as err:
        raise ConfigError(f"{where} is not a CSV file ({err}): save it from review.html") from None
    if not decisions:
        raise ConfigError(
            f"{where} holds no decisions: mark pairs on review.html (s: same, d: different) "
            "and save them"
        )
    return decisions


@dataclass
class Reviewed:
    """Reviewed pairs as rows of the embeddings, and whether each was marked same."""

    a: np.ndarray
    b: np.ndarray
    same: np.ndarray  # bool

    def __len__(self) -> int:
        return len(self.a)

    def pairs(self, ids: list[str]) -> list[tuple[str, str, str]]:
        """(image_a, image_b, decision) of each, as review.html shows decisions."""
        return [
            (ids[a], ids[b], DECISIONS[0] if same else DECISIONS[1])
            for a, b, same in zip(self.a, self.b, self.same, strict=True)
        ]

    def similarities(self, unit: np.ndarray) -> np.ndarray:
        """Each pair's cosine similarity in `unit` (the rows as the search compared them)."""
        return np.einsum("ij,ij->i", unit[self.a], unit[self.b])


def reviewed_pairs(path: str | None, ids: list[str]) -> Reviewed | None:
    """The pairs `dedup.reviewed` names, as rows of these embeddings (`ids`); None when it is
    null; a ConfigError for a bad file or an image the embeddings do not hold."""
    if path is None:
        return None
    file = Path(path).expanduser()
    decisions = read_decisions(file)
    rows = {image_id: i for i, image_id in enumerate(ids)}
    unknown = sorted({i for pair in decisions for i in pair if i not in rows})
    if unknown:
        raise ConfigError(
            f"dedup.reviewed {file} names {len(unknown)} image(s) these embeddings do not hold "
            f"({unknown[0]!r} first): review the review.html of these embeddings, or set "
            "dedup.reviewed=null"
        )
    pairs = np.array([(rows[a], rows[b]) for a, b in decisions], np.int64).reshape(-1, 2)
    return Reviewed(pairs[:, 0], pairs[:, 1], np.array(list(decisions.values()), bool))


def reviewed_scores(
    similarity: np.ndarray, same: np.ndarray, threshold: float, target: float
) -> dict[str, float | int | bool]:
    """On the reviewed pairs (their similarities, and whether each was marked same): the pairs
    and those marked same; precision, recall and F1 at `threshold`; the suggested threshold
    (`reviewed_threshold`: the lowest at which precision reaches `target`, written as the
    shortest decimal that keeps the same reviewed pairs; `reviewed_threshold_reached` False when
    none does, and it sits just above every pair marked different) with its precision and
    recall. Named `reviewed_*` for metrics.json."""
    from pipeline.search.calibration import threshold_at_precision
    from pipeline.search.truth import pair_scores

    def scores_at(t: float) -> dict[str, float]:
        kept = similarity >= t
        return pair_scores(int(kept.sum()), int(same[kept].sum()), int(same.sum()))

    exact, reached = threshold_at_precision(similarity[same], similarity[~same], target)
    suggested = shortest_at_or_below(exact, similarity)
    at_suggested = scores_at(suggested)
    return {
        "reviewed_pairs": len(same),
        "reviewed_same": int(same.sum()),
        **{f"reviewed_{name}": value for name, value in scores_at(threshold).items()},
        "reviewed_threshold": suggested,
        "reviewed_threshold_reached": reached,
        "reviewed_threshold_precision": at_suggested["precision"],
        "reviewed_threshold_recall": at_suggested["recall"],
    }


def shortest_at_or_below(threshold: float, similarity: np.ndarray) -> float:
    """The decimal with the fewest digits, at or below `threshold`, that keeps the same pairs
    (`similarity >= it`) as the threshold: what a person types as dedup.threshold."""
    kept = similarity >= threshold
    for digits in range(1, 10):
        short = math.floor(threshold * 10**digits) / 10**digits
        if np.array_equal(similarity >= short, kept):
            return short
    return float(threshold)


def suggestion(metrics: dict, target: float) -> str:
    """The line that says which threshold the reviewed pairs suggest."""
    n, threshold = metrics["reviewed_pairs"], metrics["reviewed_threshold"]
    if not metrics["reviewed_threshold_reached"]:
        return (
            f"no threshold keeps precision >= {target} on your {n} reviewed pairs: none you "
            "marked same is more similar than all you marked different (dedup.threshold="
            f"{threshold} keeps none of them)"
        )
    return (
        f"dedup.threshold={threshold} keeps precision >= {target} on your {n} reviewed pairs "
        f"(precision {metrics['reviewed_threshold_precision']:.3f}, recall "
        f"{metrics['reviewed_threshold_recall']:.3f} there)"
    )


def score_reviewed(
    reviewed: Reviewed, unit: np.ndarray, threshold: float, target: float
) -> dict[str, float | int | bool]:
    """`reviewed_scores` of the reviewed pairs at their similarities in `unit`, the suggestion
    logged."""
    metrics = reviewed_scores(reviewed.similarities(unit), reviewed.same, threshold, target)
    log.info("%s", suggestion(metrics, target))
    return metrics


def summary(metrics: dict) -> str:
    """What the run's one line adds: precision and recall on the reviewed pairs, if any."""
    if "reviewed_pairs" not in metrics:
        return ""
    return (
        f" (reviewed: precision {metrics['reviewed_precision']:.3f}, recall "
        f"{metrics['reviewed_recall']:.3f} on {metrics['reviewed_pairs']} pairs)"
    )
