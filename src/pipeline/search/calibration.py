"""The similarity threshold of near-duplicate detection, chosen on the user's own images.

The extraction embeds copies of a sample of the images (`images.augment`: cropped, turned or
framed, recoloured or blurred, rescaled, saved as low-quality JPEG). Here each copy's
similarity to the image it was made from is a positive: a pair the detector should find; so is
the similarity of two copies of one image, as a set's duplicates are often two altered versions
of one picture rather than a picture and its copy (and such pairs are the less alike: on the
hard benchmarks, half the true pairs). Each copy's similarities to its `k` nearest other images
in the set are negatives: pairs it would find too, at a threshold below them. The threshold is
the lowest similarity at which the copy pairs are found at the target precision.

A set worth deduplicating holds duplicates, and nothing marks them: a sampled image's own
near-duplicates in the set would count as negatives although a copy is right to find them,
and on a set with many duplicates they push the threshold above every copy. So an image the
source itself resembles at least as much as most copies resemble it (the
PRESUMED_DUPLICATE_QUANTILE of the copies' similarities) is presumed to be one of its
duplicates and is not a negative of its copies; at most the MAX_PRESUMED_DUPLICATES closest
of them, so that a descriptor under which everything looks alike cannot explain its hard
negatives away.

That presumption is a guess, and the copies are not the set's own duplicates, so the precision at
the threshold is reported with what it rests on: `precision_low`, the precision with
every presumed duplicate counted as a negative (the worst case: none of them is a duplicate);
`precision_interval`, a bootstrap over the sampled images (5% to 95%); the presumed duplicates
per sampled image; the negatives near the copies. On a set where other pictures of the same
scene (overlapping crops, frames of a burst) sit near the copies, the rule removes exactly the
hard negatives, and the estimate says too much: when the rule fires for half its cap per image or
more, the bootstrap interval is wider than MAX_INTERVAL, or fewer than MIN_NEAR_NEGATIVES
negatives lie among the copies, the calibration says it cannot tell (`doubts`), with the numbers.
Its `expected_precision`, the number to expect on the set, is then the worst case when the rule
fired often (measured on the hard benchmarks: the presumed precision said 0.95 where 0.58 was
true, the worst case 0.61), and the presumed precision otherwise (0.95 said, 0.89 true).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)
PRESUMED_DUPLICATE_QUANTILE = 0.05
MAX_PRESUMED_DUPLICATES = 10  # per sampled image: a descriptor that finds more is not trusted
BLOCK_BYTES = 64 * 2**20  # similarities computed at once
CURVE_POINTS = 101
BOOTSTRAP = 200  # resamples of the sampled images, for the interval of the precision
MAX_INTERVAL = 0.1  # a wider bootstrap interval (5% to 95%) of the precision: cannot tell
PRESUMED_DOUBT = MAX_PRESUMED_DUPLICATES / 2  # presumed per sampled image: cannot tell
MIN_NEAR_NEGATIVES = 20  # negatives at or above the weakest 5% of copies: fewer, cannot tell


@dataclass
class CopyScores:
    """Similarities of the calibration copies: to their sources and to each other, and to
    their nearest others."""

    positives: np.ndarray  # (copies + copy pairs,): copy to source, then copy to copy
    positive_sources: np.ndarray  # the sampled image each positive pair is a copy of
    negatives: np.ndarray  # (copies * up to k,)
    presumed_duplicates: int  # set images left out as a sampled image's own duplicates
    # (copies, k): each copy's k nearest others, presumed duplicates left out (-inf pads), and
    # with them counted as negatives: the two ends of what the presumption can change.
    per_copy: np.ndarray
    per_copy_all: np.ndarray
    sources: np.ndarray  # (copies,): which set image each copy was made from

    @property
    def to_sources(self) -> np.ndarray:
        """Each copy's similarity to the image it was made from."""
        return self.positives[: len(self.sources)]


def copy_pairs(sources: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (a, b) of copies made from the same image, by their rows."""
    order = np.argsort(sources, kind="stable")
    ordered = sources[order]
    a, b = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for lag in range(1, len(order)):  # each image's copies lie together once sorted
        same = ordered[lag:] == ordered[:-lag]
        if not same.any():
            break
        a.append(order[:-lag][same])
        b.append(order[lag:][same])
    return np.concatenate(a), np.concatenate(b)


def copy_scores(base: np.ndarray, copies: np.ndarray, sources: np.ndarray, k: int) -> CopyScores:
    """Positives and negatives of L2-normalised `copies` against the L2-normalised set
    `base`; `sources[i]` is the row of `base` that copy i was made from."""
    positives = np.einsum("ij,ij->i", copies, base[sources])
    floor = np.quantile(positives, PRESUMED_DUPLICATE_QUANTILE)
    a, b = copy_pairs(sources)
    between = np.einsum("ij,ij->i", copies[a], copies[b])
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
    kept = -np.sort(-np.where(own, -np.inf, sims), axis=1)[:, :k]
    every = -np.sort(-np.where(found == sources[:, None], -np.inf, sims), axis=1)[:, :k]
    return CopyScores(
        np.concatenate([positives, between]),
        np.concatenate([sources, sources[a]]),
        kept[np.isfinite(kept)],
        int((presumed >= 0).sum()),
        kept,
        every,
        sources,
    )


def precision_at(positives: np.ndarray, negatives: np.ndarray, threshold: float) -> float:
    """Share of copies among the pairs at or above `threshold` (1 when none is)."""
    hits = int((positives >= threshold).sum())
    found = hits + int((negatives >= threshold).sum())
    return hits / found if found else 1.0


def bootstrap_precision(scores: CopyScores, threshold: float, seed: int = 0) -> tuple[float, float]:
    """The 5% and 95% quantiles of the precision at `threshold` over BOOTSTRAP resamples of
    the sampled images (each with all its copies and their negatives)."""
    unique = np.unique(scores.sources)
    of_pair = np.searchsorted(unique, scores.positive_sources)
    of_copy = np.searchsorted(unique, scores.sources)
    hits = np.bincount(of_pair, scores.positives >= threshold, len(unique))
    false = np.bincount(of_copy, (scores.per_copy >= threshold).sum(axis=1), len(unique))
    weights = np.random.default_rng(seed).multinomial(
        len(unique), np.full(len(unique), 1 / len(unique)), BOOTSTRAP
    )
    found = weights @ (hits + false)
    precision = np.divide(weights @ hits, found, out=np.ones(BOOTSTRAP), where=found > 0)
    low, high = np.quantile(precision, [0.05, 0.95])
    return float(low), float(high)


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
    """Precision, recall (of the copy pairs) and F1 of `similarity >= t` for each threshold t."""
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
            "pairs_found": found_pos,
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
    pairs: int  # true pairs among the copies and their sources
    negatives: int
    presumed_duplicates: int
    precision: float  # on the copies, at the threshold
    recall: float
    f1: float
    average_precision: float
    curve: pd.DataFrame
    precision_low: float  # with every presumed duplicate counted as a negative
    precision_interval: tuple[float, float]  # bootstrap over the sampled images, 5% to 95%
    presumed_per_image: float  # presumed duplicates per sampled image
    near_negatives: int  # negatives at or above the weakest 5% of copies
    doubts: list[str]  # why the precision cannot be trusted, with the numbers; empty: none
    scores: CopyScores = field(repr=False)

    def at(self, threshold: float) -> pd.Series:
        """Precision, recall and F1 on the copies at another threshold."""
        at = np.array([threshold])
        return precision_curve(self.scores.positives, self.scores.negatives, at).iloc[0]

    @property
    def expected_precision(self) -> float:
        """The precision to expect on the set at the threshold: the worst case when the
        presumed-duplicate rule fired often, else the precision on the copies."""
        often = self.presumed_per_image >= PRESUMED_DOUBT
        return self.precision_low if often else self.precision

    def metrics(self) -> dict[str, float | int | bool | str]:
        """Flat numbers for metrics.json, named `calibration_*`."""
        return {
            f"calibration_{k}": v
            for k, v in {
                "target_precision": self.target_precision,
                "reached": self.reached,
                "copies": self.copies,
                "pairs": self.pairs,
                "negatives": self.negatives,
                "presumed_duplicates": self.presumed_duplicates,
                "precision": self.precision,
                "expected_precision": self.expected_precision,
                "precision_low": self.precision_low,
                "precision_interval_low": self.precision_interval[0],
                "precision_interval_high": self.precision_interval[1],
                "presumed_per_image": self.presumed_per_image,
                "near_negatives": self.near_negatives,
                "uncertain": bool(self.doubts),
                "doubts": "; ".join(self.doubts),
                "recall": self.recall,
                "f1": self.f1,
                "ap": self.average_precision,
            }.items()
        }


def doubts(
    interval: tuple[float, float], presumed_per_image: float, near_negatives: int
) -> list[str]:
    """What makes the calibrated precision untrustworthy, each with its numbers."""
    found = []
    if interval[1] - interval[0] > MAX_INTERVAL:
        found.append(
            f"unstable: over resamples of the sampled images the precision runs from "
            f"{interval[0]:.2f} to {interval[1]:.2f}"
        )
    if presumed_per_image >= PRESUMED_DOUBT:
        found.append(
            f"{presumed_per_image:.1f} set images per sampled image resemble it as much as its "
            "copies do and were presumed its duplicates, not counted against the copies: if "
            "they are other pictures of the same scene the precision is lower"
        )
    if near_negatives < MIN_NEAR_NEGATIVES:
        found.append(
            f"only {near_negatives} other images are as near the copies as the weakest 5% of "
            "copies are to their sources: too few to measure precision on"
        )
    return found


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
    every = scores.per_copy_all[np.isfinite(scores.per_copy_all)]
    curve["precision_worst"] = precision_curve(scores.positives, every, grid)["precision"]
    at = precision_curve(scores.positives, scores.negatives, np.array([threshold])).iloc[0]
    hits = np.concatenate([np.ones(len(scores.positives)), np.zeros(len(scores.negatives))])
    interval = bootstrap_precision(scores, threshold)
    presumed_per_image = scores.presumed_duplicates / max(1, len(np.unique(sources)))
    near = int((scores.negatives >= np.quantile(scores.to_sources, 0.05)).sum())
    return Calibration(
        threshold=threshold,
        target_precision=target,
        reached=reached,
        copies=len(scores.sources),
        pairs=len(scores.positives),
        negatives=len(scores.negatives),
        presumed_duplicates=scores.presumed_duplicates,
        precision=float(at["precision"]),
        recall=float(at["recall"]),
        f1=float(at["f1"]),
        average_precision=average_precision(everything, hits.astype(bool)),
        curve=curve,
        precision_low=precision_at(scores.positives, scores.per_copy_all, threshold),
        precision_interval=interval,
        presumed_per_image=presumed_per_image,
        near_negatives=near,
        doubts=doubts(interval, presumed_per_image, near),
        scores=scores,
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


def calibrated_threshold(calibration: Calibration | None, source: Path) -> float:
    """The calibrated threshold, with a warning when the target precision was out of reach."""
    if calibration is None:  # a single image: nothing to pair, any threshold will do
        return 1.0
    if not calibration.reached:
        log.warning(
            "%s: no similarity finds the calibration copies at precision %.2f against their "
            "nearest other images; the threshold is above them all (%.3f): try another layer "
            "or pooling (python -m pipeline.report compares them)",
            source,
            calibration.target_precision,
            calibration.threshold,
        )
    if calibration.doubts:
        log.warning(
            "%s: the calibration cannot tell how precise its threshold %.3f is: about %.2f (if "
            "none of the images it presumed duplicates is one) to %.2f (if all are), reported as "
            "%.2f; %s. Check the pairs near the threshold on review.html, or give dedup.threshold",
            source,
            calibration.threshold,
            calibration.precision_low,
            calibration.precision,
            calibration.expected_precision,
            "; ".join(calibration.doubts),
        )
    return calibration.threshold


def given_threshold_check(calibration: Calibration, threshold: float, whitened: bool) -> None:
    """A warning when a given threshold finds fewer than half the calibration copies: the
    number means something else in this layer's (whitened) similarities than where it was
    learnt, and the calibrated one, with its precision, is the number to compare it with."""
    curve = calibration.at(threshold)
    if curve["recall"] >= 0.5:
        return
    log.warning(
        "dedup.threshold=%s finds %.0f%% of the calibration copies (precision %.2f on them): "
        "%s; the calibrated threshold is %.3f (precision %.2f, recall %.2f on the copies). "
        "Read calibration_curve.png to choose, or leave dedup.threshold=auto",
        threshold,
        100 * curve["recall"],
        curve["precision"],
        "whitened similarities run far below plain cosine ones"
        if whitened
        else "in this layer copies are less alike than that",
        calibration.threshold,
        calibration.expected_precision,
        calibration.recall,
    )
