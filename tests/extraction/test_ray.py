"""engine=ray: the same Parquet as engine=local, in order, with failures, surviving a worker's
death. The CLI runs start their own local Ray cluster (all the cores here: 2 on the dev box)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import timm
import torch

from pipeline.config import Engine, EngineConfig, Pool, Precision
from pipeline.extraction.hooks import HookPlan, LayerHooks
from pipeline.images.loader import ImageDataset, batch_loader, collate
from pipeline.images.manifest import folder_manifest
from pipeline.images.preprocess import build_transform, resolve_preprocess
from pipeline.storage.contract import METADATA_KEY
from pipeline.storage.staging import staging_root

from conftest import TINY_MODEL, bad_and_good_files, many_images, run_cli

ray = pytest.importorskip("ray")
from pipeline.extraction.engines import ray as ray_engine  # noqa: E402
from pipeline.extraction.engines.ray import ModelPlan, Placement, RaySession  # noqa: E402

LAYERS = ["blocks.2", "global_pool"]
ARGS = [
    *TINY_MODEL,
    "model.input_size=[3,32,32]",
    "dataset=folder",
    "max_image_pixels=50000",
    f"layers=[{','.join(LAYERS)}]",
]


def images_with_bad_files(root: Path, n: int) -> Path:
    many_images(root, n)
    bad_and_good_files(root / "scraped")
    return root


def without_engine(metadata: dict[bytes, bytes]) -> dict:
    values = json.loads(metadata[METADATA_KEY])
    assert values.pop("engine") in ("local", "ray")
    return values


@pytest.mark.slow
def test_ray_engine_writes_the_local_engines_rows_in_order_with_the_same_failures(
    tmp_path: Path,
) -> None:
    root = images_with_bad_files(tmp_path / "images", 300)
    args = [*ARGS, f"dataset.root={root}", "batch_size=16", "save_every=64"]
    # One thread, as each model actor has (engine.cpus_per_worker=1): on the CPU a reduction
    # split over threads adds in another order, and the bytes would differ in the last bit.
    local = run_cli(
        *args, f"output_dir={tmp_path}/local", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"}
    )
    assert local.returncode == 0, local.stderr
    remote = run_cli(*args, "engine=ray", f"output_dir={tmp_path}/ray", cwd=tmp_path)
    assert remote.returncode == 0, remote.stderr
    assert "313 embedded, 5 failed" in remote.stdout
    for layer in LAYERS:
        a = pq.read_table(tmp_path / f"local/{layer}.parquet")
        b = pq.read_table(tmp_path / f"ray/{layer}.parquet")
        assert a.num_rows == 313
        assert a.column("image_id").equals(b.column("image_id"))
        assert a.column("embedding").equals(b.column("embedding"))  # bit for bit
        assert without_engine(a.schema.metadata) == without_engine(b.schema.metadata)
        assert json.loads(b.schema.metadata[METADATA_KEY])["engine"] == "ray"
        # The same chunks: part for part, the same rows.
        parts = [
            sorted((tmp_path / f"{o}/{layer}.parquet").glob("part-*")) for o in ("local", "ray")
        ]
        assert [pq.read_metadata(p).num_rows for p in parts[0]] == [
            pq.read_metadata(p).num_rows for p in parts[1]
        ]
    assert pq.read_table(tmp_path / "local/failures.parquet").equals(
        pq.read_table(tmp_path / "ray/failures.parquet")
    )


def _descendants(pid: int) -> Iterator[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            yield child
            pending.append(child)


def _model_actor(pid: int) -> int | None:
    """A model actor's process among `pid`'s descendants (Ray names it by its class)."""
    for child in _descendants(pid):
        try:
            if b"_Model" in Path(f"/proc/{child}/cmdline").read_bytes():
                return child
        except OSError:
            continue
    return None


@pytest.mark.slow
def test_a_killed_model_worker_is_restarted_and_every_image_is_written(tmp_path: Path) -> None:
    root = images_with_bad_files(tmp_path / "images", 400)
    out = tmp_path / "out"
    job = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline",
            *ARGS,
            f"dataset.root={root}",
            "model.input_size=[3,128,128]",  # blocks of 84 images: a few, each taking a while
            "batch_size=4",
            "save_every=4",
            "engine=ray",
            f"output_dir={out}",
        ],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 300
    victim = None
    # Mid-job: the actor has written batches (a chunk is staged) and more are to come.
    while victim is None or not list(staging_root(out).glob("*/chunks/*.json")):
        assert job.poll() is None, "the job ended before a worker could be killed"
        assert time.monotonic() < deadline
        victim = _model_actor(job.pid)
        time.sleep(0.01)
    os.kill(victim, signal.SIGKILL)
    output, _ = job.communicate(timeout=300)
    assert job.returncode == 0, output
    assert not Path(f"/proc/{victim}").exists()
    ids = folder_manifest(root, [".jpg", ".png"], False)["image_id"].tolist()
    failed = pd.read_parquet(out / "failures.parquet")["image_id"].tolist()
    for layer in LAYERS:
        written = pd.read_parquet(out / f"{layer}.parquet")["image_id"].tolist()
        assert written == [i for i in ids if i not in set(failed)]
    assert len(failed) == 5


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    ray.init(num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


def test_plan_hands_on_the_local_batches_in_order_with_their_failures(
    tmp_path: Path, cluster: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Ray plan's batches are the local DataLoader's: same indices, same failures, and
    the same pooled outputs, for a slice that starts mid-dataset as a resumed run's does,
    over blocks of two batches and a last one that is short."""
    monkeypatch.setattr(ray_engine, "BLOCK_IMAGES", 10)
    root = images_with_bad_files(tmp_path / "images", 40)
    paths = folder_manifest(root, [".jpg", ".png"], False)["path"].tolist()
    model = timm.create_model("test_efficientnet", pretrained=False).eval()
    preprocess = resolve_preprocess(model, input_size=(3, 32, 32))
    start, size = 12, 5
    dataset = ImageDataset(paths[start:], build_transform(preprocess), max_pixels=50000)
    loader = batch_loader(dataset, collate, size, 0, False)
    settings = EngineConfig(Engine.ray, None, 1, 0, 1, 2)  # 1 worker, 1 CPU, 2 decode tasks
    session = RaySession(settings, model)
    placement = Placement("cpu", Precision.fp32)
    plan = ModelPlan(HookPlan(tuple(LAYERS)), preprocess.input_size, placement)
    batches = list(session.batches(loader.dataset, start, plan, size))
    with LayerHooks(model, LAYERS, Pool.auto) as hooks, torch.inference_mode():
        expected = [
            (
                [start + i for i in batch.indices],
                hooks(batch.images) if batch.images is not None else None,
                [(start + i, e, r) for i, e, r in batch.failures],
            )
            for batch in loader
        ]
    assert len(batches) == len(expected) == -(-(len(paths) - start) // size)
    for got, (want_indices, want_outputs, want_failures) in zip(batches, expected, strict=True):
        indices, outputs, failures = got.indices, got.on_host(), got.failures
        assert indices == want_indices and failures == want_failures
        for name in LAYERS:
            if want_outputs is None:
                assert outputs[name].shape[0] == 0
            else:
                np.testing.assert_allclose(outputs[name], want_outputs[name].numpy(), atol=1e-6)
    assert sum(len(b.failures) for b in batches) == 5


@pytest.mark.slow
def test_a_killed_ray_job_resumes_without_redoing_staged_chunks(tmp_path: Path) -> None:
    """SIGKILL the driver partway, run again: finished chunks are kept, the result is whole."""
    root = images_with_bad_files(tmp_path / "images", 300)
    args = [
        *ARGS,
        f"dataset.root={root}",
        "model.input_size=[3,128,128]",  # blocks of 84 images: a few, each staged as it comes
        "batch_size=4",
        "save_every=4",
        "engine=ray",
    ]
    out = tmp_path / "out"
    job = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args, f"output_dir={out}"],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while len(chunks := list(staging_root(out).glob("*/chunks/*.json"))) < 3:
        assert job.poll() is None, "the job ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    job.kill()
    job.wait()
    staged = {p.name: p.stat().st_mtime_ns for p in chunks}
    resumed = run_cli(*args, f"output_dir={out}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming:" in resumed.stdout
    # The staged chunks' parts were published as they were written, not written again.
    manifest = json.loads((out / "global_pool.parquet/_manifest.json").read_text())
    assert len(manifest["parts"]) >= len(staged)
    ids = folder_manifest(root, [".jpg", ".png"], False)["image_id"].tolist()
    failed = set(pd.read_parquet(out / "failures.parquet")["image_id"])
    assert len(failed) == 5
    for layer in LAYERS:
        written = pd.read_parquet(out / f"{layer}.parquet")["image_id"].tolist()
        assert written == [i for i in ids if i not in failed]
    # The folder grows: the Ray job embeds only the new images, and keeps every other row.
    before = pd.read_parquet(out / "global_pool.parquet")
    many_images(root / "later", 6)
    grown = run_cli(*args, f"output_dir={out}", cwd=tmp_path)
    assert "6 new, 0 changed, 0 removed" in grown.stdout, grown.stderr
    after = pd.read_parquet(out / "global_pool.parquet").set_index("image_id")
    assert len(after) == len(before) + 6
    for image_id, vector in zip(before["image_id"], before["embedding"], strict=True):
        assert np.array_equal(after.loc[image_id, "embedding"], vector)
