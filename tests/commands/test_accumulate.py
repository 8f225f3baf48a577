"""Work that accumulates, through the command a user types: a sweep adds layers and keeps the
others' results, a finished command does nothing again, a grown folder embeds only what is
new, runs of other configs never overwrite a layer under way, a rerun never slips past the
failure-rate guard, and a killed run's orphaned loader processes never hold its outputs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.storage.contract import read_metadata
from pipeline.storage.inputs import read_layer

from conftest import (
    SMALL,
    flip_a_bit,
    one_line_error,
    photos_in,
    run_cli,
    start_until_chunks,
    write_image,
)

pytestmark = pytest.mark.slow


def folder_args(root: Path, out: Path, *more: str) -> list[str]:
    return [*SMALL, "dataset=folder", f"dataset.root={root}", f"output_dir={out}", *more]


def logged(done) -> str:
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def test_a_layer_sweep_keeps_the_other_layers_and_their_calibration_copies(
    tmp_path: Path,
) -> None:
    root, out = tmp_path / "images", tmp_path / "out"
    photos_in(root, 12)
    args = folder_args(root, out, "calibration.images=4")
    logged(run_cli(*args, cwd=tmp_path))  # the default layers: global_pool
    logged(run_cli("-m", *args, "layers=[blocks.1],[blocks.2]", cwd=tmp_path))
    for layer in ("global_pool", "blocks.1", "blocks.2"):
        assert len(pd.read_parquet(out / f"{layer}.parquet")) == 12
        copies = pd.read_parquet(out / f"{layer}.parquet/_calibration")
        assert len(copies) == 8 and read_metadata(out / f"{layer}.parquet")["layer"] == layer
    for layer in ("global_pool", "blocks.1"):  # dedup's calibrated threshold needs the copies
        done = run_cli(
            *folder_args(root, out), f"layer={layer}", "dedup.threshold=auto",
            module="pipeline.dedup", cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr


def test_a_rerun_does_only_what_is_new_and_matches_a_fresh_run(tmp_path: Path) -> None:
    """The finished command again does nothing. Then images added (at the end and in the
    middle), one rewritten, one removed: only those are embedded; every other row keeps its
    bytes, the layer equals a fresh run's, and dedup reads the whole updated layer."""
    root, out = tmp_path / "images", tmp_path / "out"
    names = photos_in(root, 60)
    args = ["batch_size=8", "save_every=16", "num_workers=2", "layers=[blocks.2,global_pool]"]
    logged(run_cli(*folder_args(root, out, *args), cwd=tmp_path))
    # The same command again: nothing to do, no model built, not a file touched.
    files = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*")}
    again = logged(run_cli(*folder_args(root, out, *args), cwd=tmp_path))
    assert "up to date: all 60 images of blocks.2, global_pool" in again
    assert "loader:" not in again and "extract:" not in again
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*")} == files
    before = pq.read_table(out / "global_pool.parquet").to_pandas().set_index("image_id")
    photos_in(root, 3, start=5000)  # 5000.jpg ... sort after the others
    write_image(root / "0007b.jpg", np.full((40, 48, 3), 90, np.uint8))  # one in the middle
    write_image(root / names[20], np.full((40, 48, 3), 200, np.uint8))  # one rewritten
    os.utime(root / names[20], ns=(1, 1))  # and dated in the past: its size differs
    (root / names[30]).unlink()  # one removed
    update = logged(run_cli(*folder_args(root, out, *args), cwd=tmp_path))
    assert "4 new, 1 changed, 1 removed, 58 reused: embedding 5 of 63 images" in update
    fresh = tmp_path / "fresh"
    logged(run_cli(*folder_args(root, fresh, *args), cwd=tmp_path))
    for layer in ("blocks.2", "global_pool"):
        got = pd.read_parquet(out / f"{layer}.parquet")
        want = pd.read_parquet(fresh / f"{layer}.parquet")
        assert got["image_id"].tolist() == want["image_id"].tolist() == sorted(os.listdir(root))
        np.testing.assert_allclose(
            np.stack(got["embedding"]), np.stack(want["embedding"]), rtol=1e-5, atol=1e-6
        )
    after = pd.read_parquet(out / "global_pool.parquet").set_index("image_id")
    kept = [n for n in names if n not in (names[20], names[30])]
    for name in kept:  # reused rows: the very same values
        assert np.array_equal(after.loc[name, "embedding"], before.loc[name, "embedding"])
    assert not np.array_equal(after.loc[names[20], "embedding"], before.loc[names[20], "embedding"])
    # The downstream stages read the whole updated layer.
    dedup = run_cli(
        *folder_args(root, out), "layer=global_pool", "dedup.threshold=0.9",
        module="pipeline.dedup", cwd=tmp_path,
    )  # fmt: skip
    assert dedup.returncode == 0, dedup.stderr
    metrics = next((tmp_path / "outputs/dedup").rglob("metrics.json"))
    assert json.loads(metrics.read_text())["n_images"] == 63


def test_a_rerun_of_a_run_that_failed_too_often_fails_again(tmp_path: Path) -> None:
    root, out = tmp_path / "images", tmp_path / "out"
    photos_in(root, 8)
    for i in range(9):
        (root / f"bad{i}.jpg").write_bytes(b"not an image")
    args = folder_args(root, out)
    for _ in range(2):
        done = run_cli(*args, cwd=tmp_path)
        assert done.returncode == 3, done.stderr
        assert "9 of the 17 images failed" in done.stderr or "9 of the first 17" in done.stderr
        assert not out.exists()
    assert logged(run_cli(*args, "max_failure_rate=0.6", cwd=tmp_path))
    assert len(pd.read_parquet(out / "global_pool.parquet")) == 8


def test_another_config_writing_a_layer_under_way_is_refused_and_layers_accumulate(
    tmp_path: Path,
) -> None:
    root, out = tmp_path / "images", tmp_path / "out"
    photos_in(root, 400)  # enough that the first run is still going when it is paused
    first_args = folder_args(root, out, "pool=avg", "layers=[blocks.1,blocks.2]", "save_every=16")
    first = start_until_chunks([*first_args, "num_workers=0"], tmp_path, out, chunks=1)
    first.send_signal(signal.SIGSTOP)  # paused mid-run, so the second surely meets it running
    try:
        second_args = folder_args(root, out, "pool=max", "layers=[blocks.2,global_pool]")
        second = run_cli(*second_args, cwd=tmp_path, timeout=120)
        one_line_error(second, 2, f"another run (pid {first.pid} on {socket.gethostname()}")
        assert "blocks.2" in second.stderr
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0
    logged(run_cli(*second_args, cwd=tmp_path))
    pools = {layer: read_metadata(out / f"{layer}.parquet")["pool"] for layer in
             ("blocks.1", "blocks.2", "global_pool")}  # fmt: skip
    assert pools == {"blocks.1": "avg", "blocks.2": "max", "global_pool": "none"}


def test_resume_false_never_loses_the_published_layer(tmp_path: Path) -> None:
    root, out = tmp_path / "images", tmp_path / "out"
    photos_in(root, 300)
    args = folder_args(root, out, "save_every=16", "num_workers=0")
    logged(run_cli(*args, cwd=tmp_path))
    published = pd.read_parquet(out / "global_pool.parquet")
    victim = start_until_chunks([*args, "resume=false"], tmp_path, out, chunks=2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    pd.testing.assert_frame_equal(pd.read_parquet(out / "global_pool.parquet"), published)
    logged(run_cli(*args, "resume=false", cwd=tmp_path))
    pd.testing.assert_frame_equal(pd.read_parquet(out / "global_pool.parquet"), published)


def test_killing_the_main_process_alone_frees_its_outputs_at_once(tmp_path: Path) -> None:
    """Loader processes outlive a SIGKILL of the main process until they notice (seconds);
    they must not hold its lock meanwhile, so the rerun starts at once and resumes. The test
    keeps them alive (stopped) for the whole rerun, so that it cannot pass by their dying."""
    root, out = tmp_path / "images", tmp_path / "out"
    photos_in(root, 600)
    args = folder_args(root, out, "save_every=16", "num_workers=2")
    victim = start_until_chunks(args, tmp_path, out, chunks=2)
    workers = [int(p) for p in os.popen(f"pgrep -P {victim.pid}").read().split()]
    assert workers, "the run should have loader processes"
    try:
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        rerun = run_cli(*args, cwd=tmp_path)
        assert rerun.returncode == 0, rerun.stderr
        assert "resuming:" in rerun.stdout
        assert len(pd.read_parquet(out / "global_pool.parquet")) == 600
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_published_part_altered_since_is_embedded_again_not_reused(tmp_path: Path) -> None:
    root, out = tmp_path / "images", tmp_path / "out"
    photos_in(root, 12)
    args = folder_args(root, out)
    logged(run_cli(*args, cwd=tmp_path))
    want = pd.read_parquet(out / "global_pool.parquet")
    flip_a_bit(out / "global_pool.parquet/part-000000.parquet")
    again = logged(run_cli(*args, cwd=tmp_path))
    assert "does not match" in again or "SHA-256" in again, again
    assert "embedding 12 of 12 images" in again
    read_layer(out / "global_pool.parquet")  # whole again, as its manifest says
    pd.testing.assert_frame_equal(pd.read_parquet(out / "global_pool.parquet"), want)
