"""The similarity threshold of near-duplicate detection, chosen on the user's own images.

The extraction embeds copies of a sample of the images (`images.augment`: cropped, turned or
framed, recoloured or blurred, rescaled, saved as low-quality JPEG). Here each copy's
similarity to the image it was made from is a positive: a pair the detector should find. Its
similarities to its `k` nearest other images in the set are negatives: pairs it would find
too, at a threshold below them. The threshold is the lowest similarity at which the copies are
found at the target precision.

A set worth deduplicating holds duplicates, and nothing marks them: a sampled image's own
near-duplicates in the set would count as negatives although a copy is right to find them,
and on a set with many duplicates they push the threshold above every copy. So an image the
source itself resembles at least as much as most copies resemble it (the
PRESUMED_DUPLICATE_QUANTILE of the copies' similarities) is presumed to be one of its
duplicates and is not a negative of its copies; at most the MAX_PRESUMED_DUPLICATES closest
of them, so that a descriptor under which everything looks alike cannot explain its hard
negatives away.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

PRESUMED_DUPLICATE_QUANTILE = 0.05
MAX_PRESUMED_DUPLICATES = 10  # per sampled image: a descriptor that finds more is not trusted
BLOCK_BYTES = 64 * 2**20  # similarities computed at once
CURVE_POINTS = 101


@dataclass
class CopyScores:
    """Similarities of the calibration copies: to their sources, and to their nearest others."""

    positives: np.ndarray  # (copies,)
    negatives: np.ndarray  # (copies * up to k,)
    presumed_duplicates: int  # set images left out as a sampled image's own duplicates


def copy_scores(base: np.ndarray, copies: np.ndarray, sources: np.ndarray, k: int) -> CopyScores:
    """Positives and negatives of L2-normalised `copies` against the L2-normalised set
    `base`; `sources[i]` is the row of `base` that copy i was made from."""
    positives = np.einsum("ij,ij->i", copies, base[sources])
    floor = np.quantile(positives, PRESUMED_DUPLICATE_QUANTILE)
    unique, inverse = np.unique(sources, return_inverse=True)
    # Each source's nearest images (itself among them), the closest few above the floor
    # presumed to be its duplicates.
    near, near_sims = nearest(base[unique], base, MAX_PRESUMED_DUPLICATES + 1)
    presumed = np.where((near_sims >= floor) & (near != unique[:, None]), near, -1)
    # Each copy's nearest images, enough of them to leave k after dropping its source and the
    # source's presumed duplicates.
    found, sims = nearest(copies, base, k + MAX_PRESUMED_DUPLICATES + 1)
    own = (found == sources[:, None]) | (found[:, :, None] == presumed[inverse][:, None, :]).any(
        axis=2
    )
    sims = np.where(own, -np.inf, sims)
    negatives = -np.sort(-sims, axis=1)[:, :k]
    return CopyScores(positives, negatives[np.isfinite(negatives)], int((presumed >= 0).sum()))


def nearest(queries: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's k most similar rows of `base` (indices, similarities; unordered), read in
    blocks of rows so that memory stays bounded whatever the size of `base`."""
    k = min(k, len(base))
    indices = np.zeros((len(queries), 0), np.int64)
    sims = np.zeros((len(queries), 0), np.float32)
    block = max(1, BLOCK_BYTES // (12 * max(1, len(queries))))
    for start in range(0, len(base), block):
        block_sims = queries @ base[start : start + block].T
        block_indices = np.broadcast_to(
            np.arange(start, start + block_sims.shape[1]), block_sims.shape
        )
        sims = np.concatenate([sims, block_sims], axis=1)
        indices = np.concatenate([indices, block_indices], axis=1)
        if sims.shape[1] > k:
            keep = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            sims = np.take_along_axis(sims, keep, axis=1)
            indices = np.take_along_axis(indices, keep, axis=1)
    return indices, sims


def threshold_at_precision(
    positives: np.ndarray, negatives: np.ndarray, target: float
) -> tuple[float, bool]:
    """The lowest similarity t at which the pairs at or above t are positives in at least
    `target` of cases, and whether there is one; if not, a threshold just above the highest
    negative (nothing of the calibration set is found below it)."""
    scores, hits = _ranked(positives, negatives)
    tp, found, at = _steps(scores, hits)
    meeting = np.flatnonzero((tp / found >= target) & (tp > 0))
    if len(meeting):
        return float(at[meeting[-1]]), True
    return float(np.nextafter(np.float32(negatives.max()), np.float32(np.inf))), False


def average_precision(scores: np.ndarray, hits: np.ndarray, total: int | None = None) -> float:
    """Average precision of ranking pairs by score: the mean, over the true pairs, of the
    precision at the score that finds each (ties count as found together, as in scikit-learn).
    `total` true pairs, if more exist than `hits` marks, count as never found."""
    total = int(hits.sum()) if total is None else total
    if total == 0:
        return 0.0
    scores, hits = _ranked_pairs(scores, hits)
    tp, found, _ = _steps(scores, hits)
    recall_steps = np.diff(np.concatenate([[0], tp])) / total
    return float(np.sum(recall_steps * tp / found))


def precision_curve(
    positives: np.ndarray, negatives: np.ndarray, thresholds: np.ndarray
) -> pd.DataFrame:
    """Precision, recall (of the copies) and F1 of `similarity >= t` for each threshold t."""
    pos, neg = np.sort(positives), np.sort(negatives)
    found_pos = len(pos) - np.searchsorted(pos, thresholds, side="left")
    found_neg = len(neg) - np.searchsorted(neg, thresholds, side="left")
    found = found_pos + found_neg
    precision = np.divide(found_pos, found, out=np.ones(len(thresholds)), where=found > 0)
    recall = found_pos / len(pos)
    f1 = np.divide(
        2 * precision * recall,
        precision + recall,
        out=np.zeros(len(thresholds)),
        where=precision + recall > 0,
    )
    return pd.DataFrame(
        {
            "threshold": thresholds,
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "copies_found": found_pos,
            "others_found": found_neg,
        }
    )


@dataclass
class Calibration:
    """A threshold chosen on copies, with the numbers and the curve that show why."""

    threshold: float
    target_precision: float
    reached: bool  # False: no threshold finds copies at the target precision
    copies: int
    negatives: int
    presumed_duplicates: int
    precision: float  # on the copies, at the threshold
    recall: float
    f1: float
    average_precision: float
    curve: pd.DataFrame

    def metrics(self) -> dict[str, float | int | bool]:
        """Flat numbers for metrics.json, named `calibration_*`."""
        return {
            f"calibration_{k}": v
            for k, v in {
                "target_precision": self.target_precision,
                "reached": self.reached,
                "copies": self.copies,
                "negatives": self.negatives,
                "presumed_duplicates": self.presumed_duplicates,
                "precision": self.precision,
                "recall": self.recall,
                "f1": self.f1,
                "ap": self.average_precision,
            }.items()
        }


def calibrate(
    base: np.ndarray, copies: np.ndarray, sources: np.ndarray, k: int, target: float
) -> Calibration:
    """The threshold at which `copies` of images of `base` are found at precision `target`
    against their `k` nearest other images (vectors L2-normalised; see `copy_scores`)."""
    scores = copy_scores(base, copies, sources, k)
    threshold, reached = threshold_at_precision(scores.positives, scores.negatives, target)
    everything = np.concatenate([scores.positives, scores.negatives])
    grid = np.linspace(scores.positives.min(), everything.max(), CURVE_POINTS)
    curve = precision_curve(scores.positives, scores.negatives, grid)
    at = precision_curve(scores.positives, scores.negatives, np.array([threshold])).iloc[0]
    hits = np.concatenate([np.ones(len(scores.positives)), np.zeros(len(scores.negatives))])
    return Calibration(
        threshold=threshold,
        target_precision=target,
        reached=reached,
        copies=len(scores.positives),
        negatives=len(scores.negatives),
        presumed_duplicates=scores.presumed_duplicates,
        precision=float(at["precision"]),
        recall=float(at["recall"]),
        f1=float(at["f1"]),
        average_precision=average_precision(everything, hits.astype(bool)),
        curve=curve,
    )


def _ranked(positives: np.ndarray, negatives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.concatenate([positives, negatives])
    hits = np.concatenate([np.ones(len(positives), bool), np.zeros(len(negatives), bool)])
    return _ranked_pairs(scores, hits)


def _ranked_pairs(scores: np.ndarray, hits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-scores, kind="stable")
    return scores[order], hits[order]


def _steps(scores: np.ndarray, hits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """At each distinct score, highest first: true pairs found, pairs found, the score."""
    ends = np.r_[scores[1:] != scores[:-1], True] if len(scores) else np.zeros(0, bool)
    tp = np.cumsum(hits)[ends]
    found = np.arange(1, len(scores) + 1)[ends]
    return tp, found, scores[ends]
