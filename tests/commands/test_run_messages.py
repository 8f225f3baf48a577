"""What a run tells and leaves: the summary line counts the images and the calibration copies
apart, a run that succeeds leaves no staging folder beside its output, and dedup without
calibration copies says how to choose a threshold instead of suggesting a number."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.storage.staging import staging_root

from conftest import N_PHOTOS, SMALL, one_line_error, run_cli, write_layer

pytestmark = pytest.mark.slow

SUMMARY = re.compile(
    r"(\d+) embedded, 0 failed \((\d+) images run through the model in [\d.]+ s, [\d.]+ images/s; "
    r"(\d+) calibration copies in [\d.]+ s\) -> "
)
# What benchmarks/throughput_bench.py and incremental_bench.py read off the line.
BENCHMARK_RATE = re.compile(
    r"\((\d+) images run through the model in [\d.]+ s, ([\d.]+) images/s[;)]"
)


def test_the_summary_counts_images_and_copies_apart_and_no_staging_is_left(
    photos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "embeddings" / "out"
    args = [*SMALL, "dataset=folder", f"dataset.root={photos}", f"output_dir={out}"]
    done = run_cli(*args, "calibration.copies=3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    log = done.stdout + done.stderr
    assert SUMMARY.search(log).groups() == (str(N_PHOTOS), str(N_PHOTOS), str(3 * N_PHOTOS)), log
    assert BENCHMARK_RATE.search(log).group(1) == str(N_PHOTOS)
    assert not staging_root(out).exists(), sorted(staging_root(out).rglob("*"))
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]

    again = run_cli(*args, "calibration.copies=3", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"{N_PHOTOS} embedded, 0 failed (nothing new to embed" in again.stdout + again.stderr
    assert not staging_root(out).exists()

    patterns = run_cli(*args, "calibration.copies=3", "layers=[global_*]", cwd=tmp_path)
    assert patterns.returncode == 0, patterns.stderr  # a pattern: staged, and nothing to publish
    assert "up to date: nothing new to embed or publish" in patterns.stdout + patterns.stderr
    assert not staging_root(out).exists()


def test_dedup_without_calibration_copies_says_how_to_read_a_threshold(tmp_path: Path) -> None:
    vectors = np.random.default_rng(0).normal(size=(20, 8))
    ids = [f"{i:02d}.jpg" for i in range(20)]
    layer = write_layer(tmp_path / "emb" / "global_pool.parquet", vectors, ids, None)
    done = run_cli(
        f"embeddings={layer}",
        "tracking=none",
        f"dedup.output_dir={tmp_path / 'dedup'}",
        module="pipeline.dedup",
        cwd=tmp_path,
    )
    one_line_error(done, 2, "calibration.images > 0")
    assert "calibration_curve.png" in done.stderr
    assert not re.search(r"threshold=0\.\d", done.stderr)  # no number that finds few duplicates
