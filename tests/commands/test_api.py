"""The Python API a notebook uses (`from pipeline import embed`), the public LayerHooks, and
what the files record about the weights that made them."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import timm
import torch

from pipeline import LayerHooks, embed
from pipeline.errors import ConfigError
from pipeline.extraction import devices
from pipeline.storage.contract import read_metadata

from conftest import N_PHOTOS, run_cli


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_efficientnet", pretrained=False).eval()


def test_a_folder_a_list_and_a_frame_give_the_same_rows(
    photos: Path, tiny: torch.nn.Module
) -> None:
    paths = sorted(str(p) for p in photos.rglob("*.png"))
    by_list = embed(
        [*paths, str(photos / "missing.png")], model=tiny, layers=["blocks.1", "global_pool"]
    )
    assert by_list["image_id"].tolist() == paths
    assert by_list.attrs["failures"]["image_id"].tolist() == [str(photos / "missing.png")]
    by_frame = embed(
        pd.DataFrame({"path": paths, "label": [Path(p).parent.name for p in paths]}),
        model=tiny,
        layers="global_pool",
    )
    assert by_frame["label"].tolist() == [Path(p).parent.name for p in paths]
    np.testing.assert_array_equal(
        np.stack(by_frame["global_pool"]), np.stack(by_list["global_pool"])
    )
    by_folder = embed(photos, model=tiny)  # global_pool by default
    assert sorted(by_folder.columns) == ["global_pool", "image_id"]
    assert len(by_folder) == N_PHOTOS


def test_the_model_in_the_loader_processes_gives_the_main_process_rows(
    photos: Path,
    tiny: torch.nn.Module,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The CPU's plan (a loader process per core decoding and running the model) against the
    model in this process: the same rows in the same order, the same failures, in batches of
    two over two processes, the last batch all failures."""
    monkeypatch.setattr(devices, "available_cores", lambda: 2)
    paths = sorted(str(p) for p in photos.rglob("*.png"))
    images = [*paths, str(photos / "missing-1.png"), str(photos / "missing-2.png")]
    layers = ["blocks.1", "global_pool"]
    with caplog.at_level(logging.INFO, logger="pipeline"):
        in_workers = embed(images, model=tiny, layers=layers, batch_size=2, num_workers=None)
    assert "each decoding its batches and running the model" in caplog.text
    here = embed(images, model=tiny, layers=layers, batch_size=2, num_workers=0)
    assert in_workers["image_id"].tolist() == here["image_id"].tolist() == paths
    pd.testing.assert_frame_equal(in_workers.attrs["failures"], here.attrs["failures"])
    assert len(here.attrs["failures"]) == 2
    for layer in layers:
        np.testing.assert_allclose(
            np.stack(in_workers[layer]), np.stack(here[layer]), rtol=1e-4, atol=1e-5
        )


SIZE_32 = ["model.input_size=[3,32,32]"]  # the preprocessing a tensor batch was given


def test_a_tensor_batch_needs_no_files(tiny: torch.nn.Module) -> None:
    batch = torch.randn(3, 3, 32, 32)
    frame = embed(
        batch, model=tiny, layers=["blocks.2"], pool="max", device="cpu", overrides=SIZE_32
    )
    with torch.inference_mode():
        expected = tiny.blocks[2](tiny.blocks[1](tiny.blocks[0](tiny.bn1(tiny.conv_stem(batch)))))
    np.testing.assert_allclose(np.stack(frame["blocks.2"]), expected.amax(dim=(2, 3)), rtol=1e-5)


def test_a_tensor_batch_returns_non_finite_rows_as_failures(tiny: torch.nn.Module) -> None:
    batch = torch.randn(3, 3, 32, 32)
    batch[1] = float("nan")
    frame = embed(batch, model=tiny, layers=["blocks.1", "global_pool"], overrides=SIZE_32)
    assert frame["image_id"].tolist() == ["0", "2"]
    failures = frame.attrs["failures"]
    assert failures["image_id"].tolist() == ["1"]
    assert failures["error"].tolist() == ["NonFiniteEmbedding"]
    assert failures["reason"].iloc[0].startswith("NaN or Inf in layer blocks.1")


def test_a_tensor_batch_honours_overrides(tiny: torch.nn.Module) -> None:
    """The same overrides as for files: here the grid's cells (3 x 3, not the default 4 x 4)."""
    batch = torch.randn(2, 3, 32, 32)
    frame = embed(
        batch,
        model=tiny,
        layers=["blocks.2"],
        pool="grid",
        device="cpu",
        overrides=[*SIZE_32, "pool_grid=3"],
    )
    with torch.inference_mode(), LayerHooks(tiny, ["blocks.2"], "grid", grid=3) as hooks:
        expected = hooks(batch)["blocks.2"].numpy()
    np.testing.assert_allclose(np.stack(frame["blocks.2"]), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 3, 32), (2, 1, 32, 32), (2, 3, 48, 48)])
def test_a_tensor_of_the_wrong_shape_is_refused_naming_the_expected_one(
    tiny: torch.nn.Module, shape: tuple[int, ...]
) -> None:
    with pytest.raises(ValueError, match=re.escape("(N, 3, 32, 32)")):
        embed(torch.randn(shape), model=tiny, overrides=SIZE_32)
    # Without overrides, the shape the model's own preprocessing makes: timm's data config.
    with pytest.raises(ValueError, match=re.escape("(N, 3, 160, 160)")):
        embed(torch.randn(shape), model=tiny)


def test_repeated_paths_are_refused_before_any_work(
    tmp_path: Path, photos: Path, tiny: torch.nn.Module
) -> None:
    paths = sorted(str(p) for p in photos.rglob("*.png"))
    with pytest.raises(ValueError, match=re.escape(f"{paths[1]!r} more than once")):
        embed([*paths, paths[1]], model=tiny, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    frame = pd.DataFrame({"path": [paths[0], paths[2], paths[0]], "label": ["a", "b", "a"]})
    with pytest.raises(ValueError, match=re.escape(f"{paths[0]!r} more than once")):
        embed(frame, model=tiny, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_frame_with_missing_labels_gives_null_labels(
    tmp_path: Path, photos: Path, tiny: torch.nn.Module
) -> None:
    """None or NaN as a label: the image is a row, its label null in the file (pandas' own
    missing value in the frame), the other labels strings."""
    paths = sorted(str(p) for p in photos.rglob("*.png"))[:3]
    given = pd.DataFrame({"path": paths, "label": ["cat", None, np.nan]}, index=[7, 8, 9])
    frame = embed(given, model=tiny, output_dir=tmp_path / "out")
    assert frame["image_id"].tolist() == paths
    assert frame["label"].iloc[0] == "cat" and frame["label"].isna().tolist() == [False, True, True]
    stored = pq.read_table(tmp_path / "out/global_pool.parquet").column("label")
    assert stored.type == pa.string() and stored.to_pylist() == ["cat", None, None]


def test_output_dir_keeps_the_parquet_contract(tmp_path: Path, photos: Path) -> None:
    frame = embed(photos, model="efficientnet_lite0", output_dir=tmp_path / "out")
    metadata = read_metadata(tmp_path / "out/global_pool.parquet")
    assert metadata["weights"]["init"] == "checkpoint" and metadata["dim"] == 1280
    assert len(pd.read_parquet(tmp_path / "out/global_pool.parquet")) == len(frame) == N_PHOTOS


def test_layer_hooks_take_pool_names_and_refuse_others(tiny: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode(), LayerHooks(tiny, ["blocks.1"], "auto") as hooks:
        assert hooks(x)["blocks.1"].shape == (2, hooks.describe(x[:1])["blocks.1"].shape[0])
    with pytest.raises(ConfigError, match="pool='average' is not one of auto, avg"):
        LayerHooks(tiny, ["blocks.1"], "average")
    assert not any(m._forward_hooks for m in tiny.modules())  # every handle removed


@pytest.mark.slow
def test_weights_are_recorded_and_runs_of_other_weights_kept_apart(
    tmp_path: Path, photos: Path, tiny: torch.nn.Module
) -> None:
    torch.save(tiny.state_dict(), tmp_path / "mine.pth")
    common = [
        "model=timm",
        "model.name=test_efficientnet",
        "model.pretrained=false",
        "tracking=none",
        "dataset=folder",
        f"dataset.root={photos}",
        "dataset.name=photos",
        "model.input_size=[3,32,32]",
    ]
    for weights in ([], [f"model.checkpoint={tmp_path}/mine.pth"]):
        done = run_cli(*common, *weights, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    random = read_metadata(
        tmp_path / "outputs/embeddings/photos/test_efficientnet-random/global_pool.parquet"
    )
    assert random["weights"] == {"init": "random"} and random["pool"] == "none"
    mine = read_metadata(
        tmp_path / "outputs/embeddings/photos/test_efficientnet-mine/global_pool.parquet"
    )
    digest = hashlib.sha256((tmp_path / "mine.pth").read_bytes()).hexdigest()
    assert mine["weights"] == {
        "init": "checkpoint",
        "checkpoint": f"{tmp_path}/mine.pth",
        "sha256": digest,
    }
    assert mine["dataset"]["root"] == str(photos.resolve())


@pytest.mark.slow
def test_help_lists_the_presets_and_layers_lists_logits(tmp_path: Path) -> None:
    helped = run_cli("--help", cwd=tmp_path)
    assert helped.returncode == 0
    assert "model: convnext_tiny, efficientnet_b0, efficientnet_lite0" in helped.stdout
    assert "python -m pipeline.dedup" in helped.stdout
    listed = run_cli(
        "model=timm",
        "model.name=test_efficientnet",
        "model.pretrained=false",
        module="pipeline.layers",
        cwd=tmp_path,
    )
    assert listed.returncode == 0, listed.stderr
    last = listed.stdout.strip().splitlines()[-1].split()
    assert last[:3] == ["logits", "model", "output"] and last[3] == "1000"
