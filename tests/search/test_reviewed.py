"""Pairs a person reviewed on review.html, read back from its CSV and scored: precision and
recall at the threshold, and the threshold the decisions suggest, against numbers worked out by
hand; every kind of bad file is one ConfigError that says what to do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline import dedup
from pipeline.errors import ConfigError
from pipeline.search.reviewed import (
    read_decisions,
    reviewed_pairs,
    reviewed_scores,
    shortest_at_or_below,
    suggestion,
)

from conftest import composed

# Seven reviewed pairs, most similar first: S same, D different.
SIMILARITY = np.array([0.95, 0.90, 0.85, 0.80, 0.75, 0.70, 0.60])
SAME = np.array([True, True, False, True, False, True, False])


def test_precision_and_recall_at_the_threshold_on_the_reviewed_pairs() -> None:
    # At 0.78: kept 0.95 S, 0.90 S, 0.85 D, 0.80 S: 3 of 4 kept are same (precision 3/4); of
    # the 4 marked same, 3 are kept (recall 3/4).
    scores = reviewed_scores(SIMILARITY, SAME, threshold=0.78, target=0.95)
    assert scores["reviewed_pairs"] == 7 and scores["reviewed_same"] == 4
    assert scores["reviewed_precision"] == pytest.approx(0.75)
    assert scores["reviewed_recall"] == pytest.approx(0.75)
    assert scores["reviewed_f1"] == pytest.approx(0.75)
    # Precision from the top: 1/1, 2/2, 2/3, 3/4, 3/5, 4/6, 4/7. At 0.95 the lowest threshold
    # that keeps it is 0.90 (2 same of 2 kept; recall 2/4).
    assert scores["reviewed_threshold"] == 0.9 and scores["reviewed_threshold_reached"]
    assert scores["reviewed_threshold_precision"] == 1.0
    assert scores["reviewed_threshold_recall"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("target", "threshold", "precision", "recall"),
    [
        (0.7, 0.8, 3 / 4, 3 / 4),  # 0.85 is at 2/3 but 0.80 back at 3/4: the lowest wins
        (0.6, 0.7, 4 / 6, 4 / 4),  # all four same pairs, and two different ones
        (0.5, 0.6, 4 / 7, 4 / 4),  # everything reviewed
    ],
)
def test_the_suggested_threshold_is_the_lowest_reaching_the_target(
    target: float, threshold: float, precision: float, recall: float
) -> None:
    scores = reviewed_scores(SIMILARITY, SAME, threshold=0.78, target=target)
    assert scores["reviewed_threshold"] == threshold
    assert scores["reviewed_threshold_precision"] == pytest.approx(precision)
    assert scores["reviewed_threshold_recall"] == pytest.approx(recall)
    line = suggestion(scores, target)
    assert line.startswith(f"dedup.threshold={threshold} keeps precision >= {target} on your 7")


def test_no_threshold_reaches_the_target_when_every_same_pair_is_below_a_different_one() -> None:
    similarity, same = np.array([0.9, 0.8, 0.7], np.float32), np.array([False, True, True])
    scores = reviewed_scores(similarity, same, threshold=0.75, target=0.95)
    assert scores["reviewed_precision"] == 0.5 and scores["reviewed_recall"] == 0.5
    assert not scores["reviewed_threshold_reached"]
    # Just above the pair marked different: it keeps nothing reviewed.
    assert 0.9 < scores["reviewed_threshold"] < 0.9001
    assert scores["reviewed_threshold_recall"] == 0.0
    assert suggestion(scores, 0.95).startswith("no threshold keeps precision >= 0.95")


def test_the_threshold_written_is_the_shortest_decimal_keeping_the_same_pairs() -> None:
    similarity = np.array([0.93, 0.8765, 0.87], np.float32)
    # 0.8765 as float32 is 0.87650001...: 0.8 and 0.87 would keep 0.87 too, 0.876 does not.
    assert shortest_at_or_below(float(similarity[1]), similarity) == 0.876
    assert shortest_at_or_below(0.93, similarity) == 0.9


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_the_csv_the_page_saves_is_read_by_pair(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "review.csv",
        "image_a,image_b,similarity,decision\n"
        "b.png,a.png,0.91,same\n"
        '"c,1.png",a.png,0.5, Different \n'
        "a.png,b.png,0.91,different\n",  # the same pair again: the last decision counts
    )
    assert read_decisions(path) == {("a.png", "b.png"): False, ("a.png", "c,1.png"): False}
    reviewed = reviewed_pairs(str(path), ["a.png", "b.png", "c,1.png"])
    assert reviewed.a.tolist() == [0, 0] and reviewed.b.tolist() == [1, 2]
    assert reviewed.same.tolist() == [False, False]
    unit = np.eye(3, dtype=np.float32)
    unit[1] = [0.6, 0.8, 0]
    assert reviewed.similarities(unit).tolist() == pytest.approx([0.6, 0.0])
    assert reviewed_pairs(None, ["a.png"]) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, r"does not exist: point it at the review\.csv"),
        ("a,b,label\nx,y,same\n", r"has no column 'image_a': it needs the columns"),
        ("image_a,image_b,decision\na.png,b.png,same\na.png,c.png,maybe\n", r"line 3: .*'maybe'"),
        ("image_a,image_b,decision\na.png,,same\n", r"line 2: needs two image ids"),
        ("image_a,image_b,decision\na.png,b.png\n", r"line 2: .*None"),
        ("image_a,image_b,similarity,decision\n", r"holds no decisions: mark pairs"),
        (b"\xff\xfe\x00\x01binary", r"is not a CSV file"),
    ],
    ids=["missing", "columns", "decision", "no id", "short row", "no rows", "binary"],
)
def test_a_bad_csv_is_one_config_error_that_says_what_to_do(
    tmp_path: Path, text: str | bytes | None, message: str
) -> None:
    path = tmp_path / "review.csv"
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=message) as raised:
        read_decisions(path)
    assert "\n" not in str(raised.value) and str(raised.value).startswith("dedup.reviewed ")
    # dedup refuses it before reading anything: no embeddings are named here.
    with pytest.raises(ConfigError, match=message):
        dedup.check(composed("tracking=none", f"dedup.reviewed={path}"))


def test_images_the_embeddings_do_not_hold_are_refused(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "review.csv", "image_a,image_b,decision\na.png,b.png,same\nb.png,zz.png,same\n"
    )
    with pytest.raises(ConfigError, match=r"names 1 image\(s\) .* \('zz\.png' first\)"):
        reviewed_pairs(str(path), ["a.png", "b.png"])
