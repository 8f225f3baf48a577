"""Bad input, interruptions and hostile files: recorded, resumed or refused, never lost."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.images.decode import decode_image
from pipeline.images.formats import ImageError
from pipeline.images.loader import ImageDataset
from pipeline.images.manifest import table_manifest
from pipeline.images.preprocess import Preprocess, build_transform
from pipeline.storage.staging import RUNS_LOCK, Lock, staging_root

from conftest import (
    N_PHOTOS,
    SMALL,
    TINY_MODEL,
    bad_and_good_files,
    jpeg_bytes,
    many_images,
    png_bytes,
    run_cli,
    start_until_chunks,
    write_image,
)


@pytest.mark.slow
def test_bad_files_become_failure_rows_and_the_rest_embeddings(tmp_path: Path) -> None:
    root = tmp_path / "scraped"
    expected = bad_and_good_files(root)
    (root / "a_folder.jpg").mkdir()  # a path that is not a file
    names = [*sorted(expected), "missing.jpg", "a_folder.jpg"]
    expected |= {"missing.jpg": "No such file", "a_folder.jpg": "directory"}
    pd.DataFrame({"path": names}).to_csv(tmp_path / "list.csv", index=False)
    done = run_cli(
        *SMALL,
        "dataset=csv",
        f"dataset.path={tmp_path}/list.csv",
        f"dataset.root={root}",
        "max_image_pixels=50000",
        f"output_dir={tmp_path}/out",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    failing = {n for n, reason in expected.items() if reason}
    assert f"{len(names) - len(failing)} embedded, {len(failing)} failed, see" in done.stdout
    failures = pd.read_parquet(tmp_path / "out/failures.parquet").set_index("image_id")
    assert set(failures.index) == failing
    for name in failing:
        assert expected[name] in failures.loc[name, "reason"], name
    rows = pd.read_parquet(tmp_path / "out/global_pool.parquet")
    assert rows["image_id"].tolist() == [n for n in names if n not in failing]


@pytest.mark.slow
def test_mostly_failing_run_stops_with_exit_3(tmp_path: Path) -> None:
    root = tmp_path / "junk"
    root.mkdir()
    for i in range(12):
        (root / f"{i}.png").write_bytes(b"junk")
    write_image(root / "ok.png", np.zeros((8, 8, 3), np.uint8))
    done = run_cli(
        *SMALL, "dataset=folder", f"dataset.root={root}", f"output_dir={tmp_path}/out", cwd=tmp_path
    )
    assert done.returncode == 3
    assert "12 of the first 13 images failed, more than max_failure_rate=0.5" in done.stderr
    assert not (tmp_path / "out/global_pool.parquet").exists()


@pytest.mark.slow
def test_nan_embeddings_are_never_written_as_rows(tmp_path: Path, photos: Path) -> None:
    model = timm.create_model("test_efficientnet", pretrained=False)
    state = model.state_dict()
    state["classifier.bias"] = torch.full_like(state["classifier.bias"], float("nan"))
    torch.save(state, tmp_path / "broken.pth")
    done = run_cli(
        *SMALL,
        "dataset=folder",
        f"dataset.root={photos}",
        "layers=[logits]",
        f"model.checkpoint={tmp_path}/broken.pth",
        f"output_dir={tmp_path}/out",
        "max_failure_rate=1",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    failures = pd.read_parquet(tmp_path / "out/failures.parquet")
    assert len(failures) == N_PHOTOS and set(failures["error"]) == {"NonFiniteEmbedding"}
    assert "NaN or Inf in layer logits" in failures["reason"].iloc[0]
    assert len(pd.read_parquet(tmp_path / "out/logits.parquet")) == 0


@pytest.mark.slow
def test_killed_run_resumes_to_identical_files(tmp_path: Path) -> None:
    """SIGKILL partway, start again: the result equals an uninterrupted run's, row for row."""
    root = many_images(tmp_path / "images", 400)
    args = [
        *TINY_MODEL,
        "model.input_size=[3,64,64]",
        "dataset=folder",
        f"dataset.root={root}",
        "batch_size=8",
        "save_every=16",
        "num_workers=0",
        "layers=[blocks.2,global_pool]",
    ]
    reference = run_cli(*args, f"output_dir={tmp_path}/reference", cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "killed"
    victim = start_until_chunks([*args, f"output_dir={out}"], tmp_path, out, chunks=3)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (out / "global_pool.parquet").exists()  # nothing that looks complete

    resumed = run_cli(*args, f"output_dir={out}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming:" in resumed.stdout
    for layer in ("blocks.2", "global_pool"):
        a = pq.read_table(tmp_path / f"reference/{layer}.parquet")
        b = pq.read_table(out / f"{layer}.parquet")
        assert a.column("image_id").equals(b.column("image_id"))
        assert a.column("embedding").equals(b.column("embedding"))
        assert a.schema.metadata == b.schema.metadata
        # The very same part files: the same bytes, written once each.
        assert [
            p.read_bytes() for p in sorted((tmp_path / f"reference/{layer}.parquet").rglob("*.*"))
        ] == [p.read_bytes() for p in sorted((out / f"{layer}.parquet").rglob("*.*"))]
    assert not staging_root(out).exists()  # the staging folder gone, its locks with it


@pytest.mark.slow
def test_resume_false_starts_afresh_and_other_configs_parts_are_dropped(tmp_path: Path) -> None:
    root = many_images(tmp_path / "images", 12)
    out = tmp_path / "out"
    args = [*SMALL, "dataset=folder", f"dataset.root={root}", "save_every=4", f"output_dir={out}"]
    staged = staging_root(out)
    inside = Lock(staged / RUNS_LOCK)  # as another run in the staging folder: it stays
    inside.acquire(wait=True, shared=True)
    done = run_cli(*args, cwd=tmp_path)
    inside.release()
    assert done.returncode == 0, done.stderr
    # Parts left by a killed run of this config, and by a run of another config.
    [key] = [p.stem for p in staged.glob("*.lock") if p.name not in ("publish.lock", RUNS_LOCK)]
    plant = [staged / key / "chunks", staged / "another-config" / "chunks"]
    for folder in plant:
        folder.mkdir(parents=True)
        (folder / "000000.json").write_text("{}")  # a record that would not even parse
    fresh = run_cli(*args, "resume=false", cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    assert "resuming" not in fresh.stdout + fresh.stderr
    assert "12 embedded, 0 failed" in fresh.stdout + fresh.stderr
    assert not any(folder.exists() for folder in plant)
    assert len(pd.read_parquet(out / "global_pool.parquet")) == 12


def test_manifest_outside_root_only_when_allowed(tmp_path: Path) -> None:
    outside = write_image(tmp_path / "elsewhere" / "x.png", np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "root").mkdir()
    pd.DataFrame({"path": [str(outside)]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(ValueError, match="allow_outside_root"):
        table_manifest(tmp_path / "m.csv", tmp_path / "root", "path", None)
    manifest = table_manifest(tmp_path / "m.csv", tmp_path / "root", "path", None, True)
    assert manifest["image_id"].tolist() == [outside.as_posix()]


VALID = [
    png_bytes(np.full((9, 7, 3), 100, np.uint8)),
    jpeg_bytes(np.full((9, 7, 3), 100, np.uint8)),
]
DATASET = ImageDataset(
    [], build_transform(Preprocess((3, 16, 16), 0.875, "bilinear", (0.5,) * 3, (0.5,) * 3))
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=512),
        st.tuples(
            st.sampled_from(VALID), st.integers(0, 200), st.binary(min_size=1, max_size=8)
        ).map(lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + len(t[2]) :]),
        st.tuples(st.sampled_from(VALID), st.integers(1, 400)).map(lambda t: t[0][: t[1]]),
    )
)
def test_fuzzed_bytes_become_images_or_recorded_failures(data: bytes) -> None:
    """Random and mutated files: a tensor of the right shape or a failure, never a crash."""
    try:
        image = decode_image(data)
    except ImageError:  # a recorded failure; anything else (a ConfigError too) is a bug
        return
    tensor = DATASET.transform(image=image)["image"]
    assert tensor.shape == (3, 16, 16) and torch.isfinite(tensor).all()


def test_dataset_turns_any_error_into_a_failure(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    index, tensor, failure = ImageDataset([str(tmp_path / "bad.png")], DATASET.transform)[0]
    assert index == 0 and tensor is None and failure[0] == "ImageError"
