"""The calibrated threshold: hand-computed cases, a planted set whose separating similarity is
known, duplicates already in the set, and average precision against scikit-learn."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from pipeline.search.calibration import (
    average_precision,
    calibrate,
    calibrated_threshold,
    copy_pairs,
    copy_scores,
    nearest,
    threshold_at_precision,
)
from pipeline.search.vectors import normalise


def test_threshold_is_the_lowest_similarity_meeting_the_target() -> None:
    positives, negatives = np.array([0.9, 0.8, 0.6]), np.array([0.7, 0.5])
    # At 0.6: 3 copies and 1 other found, precision 0.75; at 0.8: 2 of 2.
    assert threshold_at_precision(positives, negatives, 0.75) == (pytest.approx(0.6), True)
    assert threshold_at_precision(positives, negatives, 0.8) == (pytest.approx(0.8), True)


def test_unreachable_target_puts_the_threshold_above_every_negative() -> None:
    threshold, reached = threshold_at_precision(np.array([0.9]), np.array([0.95]), 0.9)
    assert not reached and 0.95 < threshold < 0.9501


def test_average_precision_matches_scikit_learn_with_ties() -> None:
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(300), 1)  # many ties
    hits = rng.random(300) < 0.3
    assert average_precision(scores, hits) == pytest.approx(average_precision_score(hits, scores))
    # True pairs never ranked count as missed: half of them here halves the average.
    assert average_precision(scores, hits, 2 * int(hits.sum())) == pytest.approx(
        average_precision_score(hits, scores) / 2
    )


def with_similarity(to: np.ndarray, similarity: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors with exactly the given cosine similarity to the rows of `to`."""
    noise = rng.standard_normal(to.shape)
    noise -= np.sum(noise * to, axis=1, keepdims=True) * to  # orthogonal to `to`
    noise = normalise(noise)
    s = similarity[:, None]
    return (s * to + np.sqrt(1 - s**2) * noise).astype(np.float32)


def planted_set(
    rng: np.random.Generator, duplicates_in_set: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """400 images in 512 dimensions (unrelated ones have similarity about 0 +- 0.05); each of
    the first 100 has a hard negative at similarity 0.50-0.68, and 2 copies at 0.74-0.95: the
    separating similarity lies between 0.68 and 0.74. With `duplicates_in_set`, 40 of the
    sampled images also have a near-duplicate in the set itself, at 0.80-0.95."""
    base = normalise(rng.standard_normal((400, 512))).astype(np.float32)
    sampled = np.arange(100)
    base[100:200] = with_similarity(base[sampled], rng.uniform(0.50, 0.68, 100), rng)
    if duplicates_in_set:
        base[200:240] = with_similarity(base[:40], rng.uniform(0.80, 0.95, 40), rng)
    sources = np.repeat(sampled, 2)
    copies = with_similarity(base[sources], rng.uniform(0.74, 0.95, len(sources)), rng)
    return base, copies, sources


@pytest.mark.parametrize("duplicates_in_set", [False, True])
def test_calibration_finds_the_separating_similarity(duplicates_in_set: bool) -> None:
    base, copies, sources = planted_set(np.random.default_rng(3), duplicates_in_set)
    scores = copy_scores(base, copies, sources, k=10)
    # As planted: every copy is nearer its source (>= 0.74) than any other image (< 0.7).
    separating = (scores.negatives.max(), scores.to_sources.min())
    assert separating[0] < 0.7 <= 0.74 <= separating[1]
    # The two copies of each image are a pair too, about as alike as the product of their
    # similarities to the source (0.55 to 0.9), some of them below the gap.
    assert len(scores.positives) == 200 + 100
    between = scores.positives[200:]
    assert between.min() < separating[0] and between.max() > 0.74
    exact = calibrate(base, copies, sources, k=10, target=1.0)
    above = scores.positives[scores.positives > separating[0]]
    assert exact.reached and exact.threshold == pytest.approx(above.min())
    assert exact.precision == 1.0 and exact.recall == pytest.approx(len(above) / 300)
    # A lower target may admit a few of the nearest others: within 0.05 below the gap.
    found = calibrate(base, copies, sources, k=10, target=0.95)
    assert found.reached and separating[0] - 0.05 <= found.threshold <= separating[1]
    assert found.precision >= 0.95 and found.copies == 200 and found.pairs == 300
    assert (scores.to_sources >= found.threshold).all()
    # The duplicates already in the set are presumed so, not counted against the copies.
    assert found.presumed_duplicates == (40 if duplicates_in_set else 0)
    assert list(found.curve.columns[:4]) == ["threshold", "precision", "recall", "f1"]
    assert found.curve["recall"].is_monotonic_decreasing


def test_copy_pairs_are_every_two_copies_of_one_image() -> None:
    sources = np.array([7, 3, 7, 5, 3, 7])  # 7 has three copies, 3 two, 5 one
    a, b = copy_pairs(sources)
    assert sorted(zip(a.tolist(), b.tolist(), strict=True)) == [(0, 2), (0, 5), (1, 4), (2, 5)]
    assert [len(x) for x in copy_pairs(np.array([4]))] == [0, 0]


def test_without_presuming_duplicates_the_threshold_would_leave_the_copies() -> None:
    """What the presumption prevents: the set's own duplicates counted as negatives push the
    threshold above most copies."""
    base, copies, sources = planted_set(np.random.default_rng(3), duplicates_in_set=True)
    scores = copy_scores(base, copies, sources, k=10)
    own = np.setdiff1d(np.arange(len(base)), sources)
    _, sims = nearest(copies, base[own], 10)
    naive, _ = threshold_at_precision(scores.positives, sims.ravel(), 0.95)
    assert naive > 0.85 and np.mean(scores.to_sources >= naive) < 0.5


def test_nearest_reads_in_blocks_and_finds_the_exact_neighbours(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pipeline.search import calibration

    monkeypatch.setattr(calibration, "BLOCK_BYTES", 12 * 7 * 5)  # blocks of 5 rows
    rng = np.random.default_rng(4)
    queries, base = rng.standard_normal((7, 4)), rng.standard_normal((23, 4))
    indices, sims = nearest(queries, base, 3)
    full = queries @ base.T
    expected = np.sort(np.argsort(-full, axis=1)[:, :3], axis=1)
    np.testing.assert_array_equal(np.sort(indices, axis=1), expected)
    np.testing.assert_allclose(np.sort(sims, axis=1), np.sort(full, axis=1)[:, -3:])


def scene_set(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The planted set, with 8 other pictures of each sampled image's scene (crops of the same
    photo) at similarity 0.80-0.95 to it: as near as its copies, and none a duplicate."""
    base, copies, sources = planted_set(rng, duplicates_in_set=False)
    crops = np.concatenate(
        [with_similarity(base[:100], rng.uniform(0.80, 0.95, 100), rng) for _ in range(8)]
    )
    return np.concatenate([base, crops]), copies, sources


def test_presumed_duplicates_that_are_other_pictures_make_it_say_it_cannot_tell() -> None:
    base, copies, sources = scene_set(np.random.default_rng(5))
    found = calibrate(base, copies, sources, k=10, target=0.95)
    # The 8 crops of each scene were presumed duplicates (at most 10 a sampled image)...
    assert found.presumed_per_image >= 8 and found.presumed_duplicates <= 10 * 100
    # ...so the copies look found at 0.95, where counting the crops says far less.
    assert found.precision >= 0.95 and found.precision_low < 0.5
    assert found.expected_precision == found.precision_low
    assert found.doubts and "presumed its duplicates" in found.doubts[0]
    metrics = found.metrics()
    assert metrics["calibration_uncertain"] and metrics["calibration_expected_precision"] < 0.5
    assert "8." in metrics["calibration_doubts"] or "9." in metrics["calibration_doubts"]


def test_a_calibration_that_cannot_tell_warns_with_both_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    base, copies, sources = scene_set(np.random.default_rng(5))
    found = calibrate(base, copies, sources, k=10, target=0.95)
    with caplog.at_level(logging.WARNING):
        assert calibrated_threshold(found, Path("l.parquet")) == found.threshold
    [warning] = caplog.messages
    assert f"cannot tell how precise its threshold {found.threshold:.3f}" in warning
    ends = f"about {found.precision_low:.2f} (if none of the images it presumed duplicates is "
    assert ends + f"one) to {found.precision:.2f} (if all are)" in warning
    assert f"reported as {found.expected_precision:.2f}" in warning and "presumed" in warning


def test_a_stable_calibration_brackets_its_precision() -> None:
    base, copies, sources = planted_set(np.random.default_rng(3), duplicates_in_set=True)
    found = calibrate(base, copies, sources, k=10, target=0.95)
    # Stable, and few presumed duplicates; but every other image is below the copies (the set
    # is planted so), so there is nothing near them to measure precision on, and it says so.
    assert found.doubts == [
        "only 0 other images are as near the copies as the weakest 5% of copies are to their "
        "sources: too few to measure precision on"
    ]
    assert found.expected_precision == found.precision
    low, high = found.precision_interval
    assert low <= found.precision <= high and high - low <= 0.1
    # The 40 duplicates in the set, counted as negatives, lower the worst case.
    assert found.precision_low < found.precision
