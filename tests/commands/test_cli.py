"""Through the user's door: `python -m pipeline` in a subprocess, outputs read back with pandas
and pyarrow."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.storage.contract import read_metadata

from conftest import N_PHOTOS, PHOTOS_BY_LABEL, TINY_MODEL, run_cli, write_image

pytestmark = pytest.mark.slow


def test_demo_default_run(tmp_path: Path) -> None:
    """The README's first command: the offline demo with real pretrained weights."""
    done = run_cli(cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "outputs/embeddings/demo/efficientnet_lite0"
    manifest = pd.read_csv(tmp_path / "outputs/data/demo/manifest.csv")
    frame = pd.read_parquet(out / "global_pool.parquet")
    assert frame["image_id"].tolist() == manifest["path"].tolist()  # dataset order
    assert frame["label"].tolist() == manifest["label"].tolist()
    assert frame["image_id"].is_unique and len(frame) == 120
    schema = ds.dataset(out / "global_pool.parquet").schema
    assert str(schema.field("embedding").type) == "fixed_size_list<element: float>[1280]"
    meta = json.loads(schema.metadata[b"pipeline"])
    assert meta["model"] == "efficientnet_lite0" and meta["layer"] == "global_pool"
    assert meta["dim"] == 1280 and meta["output_shape"] == [1280]
    assert meta["preprocess"]["input_size"] == [3, 224, 224]
    assert meta["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    assert {"pipeline", "torch", "timm"} <= set(meta["versions"]) and meta["config_hash"]
    assert len(pd.read_parquet(out / "failures.parquet")) == 0
    # Real weights: each photo's altered copies sit nearer to it than any other photo does.
    vectors = np.stack(frame["embedding"].to_numpy())
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    nearest = (vectors @ vectors.T - 2 * np.eye(len(vectors))).argmax(axis=1)
    assert (frame["label"].to_numpy()[nearest] == frame["label"].to_numpy()).mean() > 0.9


def test_folder_several_layers_logits_and_a_corrupt_file(tmp_path: Path, photos: Path) -> None:
    root = tmp_path / "photos"
    shutil.copytree(photos, root)
    (root / "scenes" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    done = run_cli(
        *TINY_MODEL,
        "dataset=folder",
        f"dataset.root={root}",
        "dataset.labels_from_folders=true",
        "layers=[blocks.*,global_pool,logits]",
        "batch_size=4",
        "model.input_size=[3,64,64]",
        f"output_dir={tmp_path}/out",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    written = sorted(p.name for p in out.glob("*.parquet"))
    assert "global_pool.parquet" in written and "logits.parquet" in written
    assert "blocks.0.parquet" in written and "failures.parquet" in written
    frame = pd.read_parquet(out / "logits.parquet")
    assert len(frame) == N_PHOTOS and "scenes/broken.png" not in set(frame["image_id"])
    assert frame["label"].tolist() == [k for k, names in PHOTOS_BY_LABEL.items() for _ in names]
    assert len(frame["embedding"].iloc[0]) == 1000
    failures = pd.read_parquet(out / "failures.parquet")
    assert failures["image_id"].tolist() == ["scenes/broken.png"]
    assert failures["reason"].iloc[0] == "truncated PNG (no IHDR chunk)"
    assert ds.dataset(out / "blocks.0.parquet").count_rows() == N_PHOTOS


def test_csv_manifest_and_same_config_same_bytes(tmp_path: Path, photos: Path) -> None:
    csv = tmp_path / "train.csv"
    ids = ["scenes/rocket.png", "animals/chelsea.png", "animals/coffee.png"]
    pd.DataFrame({"image_id": ids, "label": [2, 0, 1]}).to_csv(csv, index=False)
    args = [
        *TINY_MODEL,
        "dataset=csv",
        f"dataset.path={csv}",
        f"dataset.root={photos}",
        "dataset.path_column=image_id",
        "dataset.label_column=label",
        "batch_size=2",
        "layers=[blocks.2]",
        "pool=max",
    ]
    first = run_cli(*args, f"output_dir={tmp_path}/a", cwd=tmp_path)
    second = run_cli(*args, f"output_dir={tmp_path}/b", "num_workers=0", cwd=tmp_path)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    a = pq.read_table(tmp_path / "a/blocks.2.parquet")
    b = pq.read_table(tmp_path / "b/blocks.2.parquet")
    assert a.column("image_id").to_pylist() == ids
    assert a.column("label").to_pylist() == ["2", "0", "1"]
    assert a.column("embedding").equals(b.column("embedding"))
    assert json.loads(a.schema.metadata[b"pipeline"])["pool"] == "max"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["layers=[blocks.99]"], "layer 'blocks.99' matches no module"),
        (["model.name=efficientnet_b99"], "unknown timm model 'efficientnet_b99'"),
        (["dataset=folder", "dataset.root=/no/such/folder"], "is not a folder"),
        (["pool=cls", "layers=[blocks.1]"], "pool=cls does not fit layer 'blocks.1'"),
    ],
)
def test_config_errors_are_one_line_exit_2_nothing_written(
    tmp_path: Path, args: list[str], message: str
) -> None:
    done = run_cli(*TINY_MODEL, *args, f"output_dir={tmp_path}/out", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and message in done.stderr
    assert not (tmp_path / "out").exists()


def test_layers_command_lists_shapes(tmp_path: Path) -> None:
    done = run_cli(*TINY_MODEL, module="pipeline.layers", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["layer", "type", "output", "dim", "bytes/image", "calls"]
    global_pool = next(line.split() for line in lines if line.startswith("global_pool "))
    assert global_pool[1] == "SelectAdaptivePool2d" and global_pool[3].isdigit()


def test_gray_and_alpha_images_in_a_folder(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    write_image(root / "grey.png", np.full((40, 50), 120, np.uint8))
    write_image(root / "rgba.png", np.full((40, 50, 4), 90, np.uint8))
    done = run_cli(
        *TINY_MODEL,
        "dataset=folder",
        f"dataset.root={root}",
        "model.input_size=[3,32,32]",
        f"output_dir={tmp_path}/out",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert pd.read_parquet(tmp_path / "out/global_pool.parquet")["image_id"].tolist() == [
        "grey.png",
        "rgba.png",
    ]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_autocast_matches_cpu(tmp_path: Path, photos: Path) -> None:
    """On a GPU, `device=auto` takes CUDA with autocast; the embeddings agree with the CPU's."""
    args = [*TINY_MODEL, "dataset=folder", f"dataset.root={photos}", "layers=[global_pool]"]
    gpu = run_cli(*args, f"output_dir={tmp_path}/gpu", cwd=tmp_path)
    cpu = run_cli(*args, f"output_dir={tmp_path}/cpu", "device=cpu", cwd=tmp_path)
    assert gpu.returncode == 0 and cpu.returncode == 0, gpu.stderr + cpu.stderr
    meta = read_metadata(tmp_path / "gpu/global_pool.parquet")
    assert meta["device"] == "cuda" and meta["precision"] in {"bf16", "fp16"}
    a = np.stack(pd.read_parquet(tmp_path / "gpu/global_pool.parquet")["embedding"].to_numpy())
    b = np.stack(pd.read_parquet(tmp_path / "cpu/global_pool.parquet")["embedding"].to_numpy())
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.99
