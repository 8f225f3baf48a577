"""Near-duplicate detection: planted pairs are found and scored, and the CLI writes the
contract's files (the search itself is tests/search/test_neighbours.py's)."""

from __future__ import annotations

import json
import logging
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import dedup
from pipeline.errors import ConfigError
from pipeline.search import neighbours
from pipeline.search import vectors as vectors_module
from pipeline.search.truth import (
    count_true_pairs,
    pair_scores,
    pr_curve,
    shares_group,
    truth_codes,
)
from pipeline.search.vectors import normalise
from pipeline.storage.contract import calibration_path

from conftest import N_PHOTOS, TINY_MODEL, composed, run_cli, write_image, write_layer


def unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return normalise(rng.standard_normal((n, dim)).astype(np.float32))


def test_planted_duplicates_found_with_full_precision_and_recall() -> None:
    rng = np.random.default_rng(1)
    originals = unit_vectors(200, 64, seed=2)
    copies = normalise(originals[:50] + rng.standard_normal((50, 64)).astype(np.float32) * 0.02)
    unit = np.concatenate([originals, copies])
    found = neighbours.search(unit, k=5, threshold=0.9)
    candidates = pd.DataFrame(dict(zip(("a", "b", "similarity"), found.candidates(), strict=True)))
    above = candidates["similarity"].to_numpy() >= 0.9
    # The truth: copy i of original i, every other image in a group of its own.
    codes = truth_codes(pd.Series([*range(200), *range(50)]))
    hits = shares_group(codes, candidates["a"].to_numpy(), candidates["b"].to_numpy())
    scores = pair_scores(int(above.sum()), int(hits[above].sum()), count_true_pairs(codes))
    assert scores == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert set(zip(found.pairs_a, found.pairs_b, strict=True)) == {(i, 200 + i) for i in range(50)}
    groups = neighbours.groups(len(unit), found.pairs_a, found.pairs_b)
    assert (groups[:50] == groups[200:]).all() and (groups[50:200] == -1).all()
    curve = pr_curve(candidates["similarity"].to_numpy(), hits, count_true_pairs(codes))
    assert curve.loc[curve["threshold"] == 0.9, "f1"].item() == 1.0
    assert curve["recall"].is_monotonic_decreasing


def test_true_pairs_are_counted_not_listed() -> None:
    codes = truth_codes(pd.Series(["a", "b", "a", "a", None, None]))
    assert count_true_pairs(codes) == 3  # (0, 2), (0, 3), (2, 3); unknowns pair with none
    a, b = np.array([0, 0, 1, 4]), np.array([2, 1, 3, 5])
    assert shares_group(codes, a, b).tolist() == [True, False, False, False]
    # Two groups of 100,000: ten billion true pairs, which no set of tuples would hold.
    assert count_true_pairs(np.repeat([0, 1], 100_000)) == 2 * (100_000 * 99_999 // 2)


@pytest.mark.slow
def test_cli_finds_planted_pairs_and_exact_copies(tmp_path: Path) -> None:
    root = tmp_path / "images"
    ids = []
    for i in range(6):
        ids.append(f"{i}.png")
        write_image(root / ids[-1], np.full((8, 8, 3), i * 20, np.uint8))
    (root / "6.png").write_bytes((root / "0.png").read_bytes())  # a byte-for-byte copy
    ids.append("6.png")
    vectors = unit_vectors(7, 16)
    vectors[6] = vectors[0]
    vectors[3] = normalise(vectors[1:2] + 0.01)[0]
    layer = write_layer(tmp_path / "embeddings/set/m/l.parquet", vectors, ids, None)
    manifest = pd.DataFrame({"path": ids, "group": ["x", "y", "2", "y", "4", "5", "x"]})
    manifest.to_csv(root / "manifest.csv", index=False)
    done = run_cli(
        f"embeddings={layer}",
        f"images_root={root}",
        f"dedup.truth={root / 'manifest.csv'}",
        "tracking=none",
        "dedup.threshold=0.95",
        module="pipeline.dedup",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    out = tmp_path / "outputs/dedup/set/m/l"
    pairs = pd.read_parquet(out / "pairs.parquet")
    assert set(zip(pairs["image_a"], pairs["image_b"], strict=True)) == {
        ("0.png", "6.png"),
        ("1.png", "3.png"),
    }
    assert pd.read_parquet(out / "groups.parquet")["group"].nunique() == 2
    assert pd.read_parquet(out / "exact_duplicates.parquet")["image_id"].tolist() == [
        "0.png",
        "6.png",
    ]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["precision"] == metrics["recall"] == 1.0 and metrics["exact_duplicates"] == 2
    assert list(pd.read_csv(out / "pr_curve.csv").columns) == [
        "threshold",
        "precision",
        "recall",
        "f1",
    ]
    assert (out / "pr_curve.png").is_file()
    with Image.open(out / "top_pairs.png") as picture:
        assert 0.5 <= picture.width / picture.height <= 2.5
        assert picture.width >= 2 * 128 and picture.height >= 2 * 128  # a row each side


@pytest.mark.slow
def test_cli_on_photos_draws_the_pairs_in_a_grid(tmp_path: Path, photos: Path) -> None:
    """The tiny model's embeddings of the photos, every pair a candidate: top_pairs.png is a
    grid of 128-pixel pairs of a sane shape, whatever the threshold calibrated to."""
    same = [*TINY_MODEL, "dataset=folder", f"dataset.root={photos}", "dataset.name=photos"]
    extracted = run_cli(*same, cwd=tmp_path)
    assert extracted.returncode == 0, extracted.stderr
    done = run_cli(*same, f"dedup.top_pairs={N_PHOTOS * 2}", module="pipeline.dedup", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "outputs/dedup/photos/test_efficientnet-random/global_pool"
    with Image.open(out / "top_pairs.png") as picture:
        assert 0.5 <= picture.width / picture.height <= 2.5
        assert picture.width >= 3 * (2 * 128)  # pairs side by side


@pytest.mark.slow
@pytest.mark.parametrize(
    "override",
    [
        "dedup.threshold=1.5",
        "dedup.threshold=high",
        "dedup.k=0",
        "dedup.target_precision=0",
        "dedup.review_pairs=0",
    ],
)
def test_cli_bad_parameters_exit_2(tmp_path: Path, override: str) -> None:
    done = run_cli(override, "tracking=none", module="pipeline.dedup", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("error: dedup.")


def stage_config(*overrides: str) -> object:
    """The dedup config as `python -m pipeline.dedup overrides...` composes it, untracked."""
    return composed("tracking=none", *overrides)


def test_run_without_images_or_truth_still_writes_pairs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    vectors = unit_vectors(5, 8)
    vectors[4] = vectors[0]
    layer = write_layer(tmp_path / "l.parquet", vectors, [f"{i}.png" for i in range(5)], None)
    out = tmp_path / "out"
    out.mkdir()
    (out / "pr_curve.csv").write_text("stale\n")  # from an earlier run that had a truth
    cfg = stage_config(
        f"embeddings={layer}",
        f"dedup.output_dir={out}",
        f"images_root={tmp_path / 'nowhere'}",
        "dedup.threshold=0.99",
    )
    with caplog.at_level(logging.WARNING):
        metrics = dedup.run(cfg).metrics
    assert metrics["n_pairs"] == 1 and "precision" not in metrics
    assert "does not hold the images" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == [
        "groups.parquet",
        "metrics.json",
        "pairs.parquet",
        "review.html",  # with the ids in place of the pictures
    ]


def test_run_with_no_pairs_still_draws_the_picture(tmp_path: Path) -> None:
    root = tmp_path / "images"
    ids = [f"{i}.png" for i in range(3)]
    for i, name in enumerate(ids):
        write_image(root / name, np.full((8, 8, 3), 80 * i, np.uint8))
    layer = write_layer(tmp_path / "l.parquet", np.eye(3, dtype=np.float32), ids, None)
    cfg = stage_config(
        f"embeddings={layer}",
        f"dedup.output_dir={tmp_path / 'out'}",
        f"images_root={root}",
        "dedup.threshold=0.7",
    )
    cfg.dedup.truth = str(tmp_path / "missing.csv")
    with pytest.raises(ConfigError, match=r"dedup\.truth .* does not exist"):
        dedup.run(cfg)  # a truth that is named must be there
    cfg.dedup.truth = None  # the default: none recorded with these embeddings, none used
    metrics = dedup.run(cfg).metrics
    assert metrics["n_pairs"] == metrics["n_groups"] == metrics["exact_duplicates"] == 0
    assert (tmp_path / "out/top_pairs.png").stat().st_size > 0


def test_run_refuses_empty_embeddings(tmp_path: Path) -> None:
    layer = write_layer(tmp_path / "l.parquet", np.empty((0, 8), np.float32), [], None)
    cfg = stage_config(f"embeddings={layer}", f"dedup.output_dir={tmp_path / 'out'}")
    with pytest.raises(ConfigError, match="hold no images"):
        dedup.run(cfg)


def test_the_pairs_shown_are_those_nearest_the_threshold() -> None:
    """What a person checks: the weakest pairs kept and the strongest left out."""
    similarities = np.round(np.arange(0.99, 0.40, -0.05), 2)
    candidates = pd.DataFrame(
        {
            "a": range(len(similarities)),
            "b": range(1, len(similarities) + 1),
            "similarity": similarities,
        }
    )
    shown = dedup.around_threshold(candidates, threshold=0.7, count=4)
    assert shown["similarity"].tolist() == [0.79, 0.74, 0.69, 0.64]  # two above, two below


def test_auto_threshold_needs_the_extractions_calibration_copies(tmp_path: Path) -> None:
    layer = write_layer(tmp_path / "l.parquet", unit_vectors(5, 8), list("abcde"), None)
    cfg = stage_config(f"embeddings={layer}", f"dedup.output_dir={tmp_path / 'out'}")
    assert cfg.dedup.threshold == "auto"  # the default
    with pytest.raises(ConfigError, match=r"calibration copies .* calibration\.images > 0"):
        dedup.run(cfg)
    write_layer(
        calibration_path(layer), unit_vectors(2, 8), ["a#copy0", "x#copy0"], None, ["a", "x"]
    )
    with pytest.raises(ConfigError, match="not made with these embeddings"):
        dedup.run(cfg)  # a copy of an image these embeddings do not hold


def planted(tmp_path: Path) -> tuple[Path, np.ndarray, list[str]]:
    """60 unrelated images in 32 dims and 20 pairs of near-duplicates among them, with 2
    calibration copies of each of the first 30 images."""
    rng = np.random.default_rng(5)
    vectors = unit_vectors(60, 32, seed=6)
    vectors[40:] = normalise(vectors[:20] + rng.standard_normal((20, 32)).astype(np.float32) * 0.1)
    ids = [f"{i}.png" for i in range(60)]
    layer = write_layer(tmp_path / "l.parquet", vectors, ids, None, config_hash="h")
    sources = np.repeat(np.arange(30), 2)
    copies = normalise(vectors[sources] + rng.standard_normal((60, 32)).astype(np.float32) * 0.1)
    write_layer(
        calibration_path(layer),
        copies,
        [f"{i}#copy{j % 2}" for j, i in enumerate(sources)],
        None,
        [ids[i] for i in sources],
        config_hash="h",
    )
    truth = pd.DataFrame({"path": ids, "group": [i % 40 for i in range(60)]})
    truth.to_csv(tmp_path / "truth.csv", index=False)
    return layer, vectors, ids


def test_run_calibrates_on_the_copies_and_records_the_whitening(tmp_path: Path) -> None:
    layer, vectors, ids = planted(tmp_path)
    out = tmp_path / "out"
    cfg = stage_config(
        f"embeddings={layer}", f"dedup.output_dir={out}", f"dedup.truth={tmp_path / 'truth.csv'}"
    )
    metrics = json.loads((dedup.run(cfg).output_dir / "metrics.json").read_text())
    assert metrics["threshold_auto"] and metrics["calibration_reached"]
    assert metrics["calibration_copies"] == 60 and metrics["calibration_images"] == 30
    assert metrics["calibration_precision"] >= 0.95 and metrics["calibration_recall"] > 0.9
    # Two copies of one image are a pair less alike than an image and its copy, and the
    # threshold comes down to find them: every planted pair, at about the target precision.
    assert metrics["recall"] == metrics["ap"] == 1.0 and metrics["precision"] >= 0.95
    assert metrics["whiten_dim"] > 0
    curve = pd.read_csv(out / "calibration_curve.csv")
    assert curve["recall"].is_monotonic_decreasing and (out / "calibration_curve.png").is_file()
    # whitening.npz maps the L2-normalised embeddings into the space the pairs were found in.
    saved = np.load(out / "whitening.npz")
    again = normalise((normalise(vectors) - saved["mean"]) @ saved["projection"])
    pairs = pd.read_parquet(out / "pairs.parquet")
    a = [ids.index(i) for i in pairs["image_a"]]
    b = [ids.index(i) for i in pairs["image_b"]]
    np.testing.assert_allclose(
        np.sum(again[a] * again[b], axis=1), pairs["similarity"], rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("whiten_dim", ["null", "16"])
def test_postprocess_whitens_the_embeddings_in_place(
    whiten_dim: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whitened rows are the embeddings' own memory (a million rows of 1280 floats get no
    second 5 GB copy), equal to whitening a copy of them whole; with whiten_dim, compacted."""
    rng = np.random.default_rng(7)
    vectors = (rng.standard_normal((20_000, 32)) * np.arange(1, 33)).astype(np.float32)
    copies = vectors[:40] + 0.01
    original = vectors.copy()
    params = stage_config(f"dedup.whiten_dim={whiten_dim}", "dedup.whiten_sample=500").dedup
    monkeypatch.setattr(vectors_module, "MAP_CHUNK_VALUES", 32 * 1000)  # 20 chunks
    tracemalloc.start()
    unit, copies_unit, whitening = vectors_module.postprocess(vectors, copies, params, seed=0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert np.shares_memory(unit, vectors)
    assert unit.shape == (20_000, 32 if whiten_dim == "null" else 16)
    np.testing.assert_allclose(unit, whitening.apply(normalise(original)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(copies_unit, whitening.apply(normalise(copies)), atol=1e-5)
    # The fit (on 500 rows and the copies, in float64) and a chunk of 1,000 rows: no copy of all.
    assert peak < 0.3 * original.nbytes


def test_fixed_threshold_and_no_whitening_still_work(tmp_path: Path) -> None:
    layer, _, _ = planted(tmp_path)
    out = tmp_path / "out"
    cfg = stage_config(
        f"embeddings={layer}",
        f"dedup.output_dir={out}",
        "dedup.threshold=0.75",
        "dedup.whiten=false",
    )
    metrics = dedup.run(cfg).metrics
    assert metrics["threshold"] == 0.75 and not metrics["threshold_auto"]
    assert metrics["whiten_dim"] == 0 and metrics["n_pairs"] == 20
    assert not (out / "whitening.npz").exists()
    assert "calibration_ap" in metrics  # the copies still show what the threshold does


@pytest.mark.parametrize("identical", [False, True])
def test_whitening_never_loses_near_identical_images(
    tmp_path: Path, identical: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A set dominated by a burst of 30 near-identical frames (or 30 identical vectors):
    whitening fitted on it spreads the frames apart, and a threshold of 0.9 found 4 of the 435
    pairs. Images more alike than any calibration copy is to its source are pairs whatever the
    threshold, and the log and metrics.json say how many whitening put below it."""
    rng = np.random.default_rng(8)
    scene = rng.standard_normal(64).astype(np.float32)
    noise = 0 if identical else 0.03
    burst = normalise(scene + noise * rng.standard_normal((30, 64)).astype(np.float32))
    vectors = np.concatenate([burst, unit_vectors(10, 64, seed=9)])
    ids = [f"{i}.png" for i in range(40)]
    layer = write_layer(tmp_path / "l.parquet", vectors, ids, None, config_hash="h")
    # Copies of 10 images, altered more than the frames are (plain cosine about 0.96).
    sources = np.repeat([0, 1, 2, *range(30, 37)], 1)
    copies = normalise(vectors[sources] + 0.3 * unit_vectors(10, 64, seed=10))
    sampled = [ids[i] for i in sources]
    write_layer(
        calibration_path(layer),
        copies,
        [f"{i}#copy0" for i in sampled],
        None,
        sampled,
        config_hash="h",
    )
    truth = tmp_path / "truth.csv"
    pd.DataFrame({"path": ids, "group": ["burst"] * 30 + ids[30:]}).to_csv(truth, index=False)
    # Exactly (a small set on the CPU), and over inverted lists as where the search is
    # approximate (large sets on the CPU): widened until the copies probe their sources' lists.
    for threshold, method in (("0.9", "auto"), ("0.99", "auto"), ("0.9", "ivf"), ("0.9", "hnsw")):
        out = tmp_path / f"{threshold}-{method}"
        cfg = stage_config(
            f"embeddings={layer}",
            f"dedup.output_dir={out}",
            f"dedup.threshold={threshold}",
            f"dedup.truth={truth}",
            f"dedup.method={method}",
        )
        with caplog.at_level(logging.INFO, logger="pipeline.dedup"):
            metrics = dedup.run(cfg).metrics
        assert metrics["whiten_dim"] > 0 and metrics["n_pairs"] == 435  # 30 * 29 / 2
        assert metrics["precision"] == metrics["recall"] == 1.0  # scored as reported
        assert 0.9 < metrics["near_identical_bound"] < 0.99
        pairs = pd.read_parquet(out / "pairs.parquet")
        assert set(pairs["image_a"]) | set(pairs["image_b"]) == set(ids[:30])
    assert "near-identical images looked for by ivf on CPU" in caplog.text
    # Identical vectors stay identical after whitening unless they are the mean; frames do not.
    assert ("near-identical pair(s)" in caplog.text) != identical
    assert (metrics["near_identical_below"] > 0) != identical


def test_a_given_threshold_that_misses_the_copies_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    layer, _, _ = planted(tmp_path)
    cfg = stage_config(
        f"embeddings={layer}", f"dedup.output_dir={tmp_path / 'out'}", "dedup.threshold=0.99"
    )
    with caplog.at_level(logging.WARNING, logger="pipeline.dedup"):
        dedup.run(cfg)
    assert "dedup.threshold=0.99 finds 0% of the calibration copies" in caplog.text
    assert "whitened similarities run far below plain cosine ones" in caplog.text
    caplog.clear()
    cfg = stage_config(
        f"embeddings={layer}", f"dedup.output_dir={tmp_path / 'auto'}", "dedup.threshold=auto"
    )
    with caplog.at_level(logging.WARNING, logger="pipeline.dedup"):
        dedup.run(cfg)
    assert "of the calibration copies" not in caplog.text
