"""What each layer learned: feature-map pictures, linear probes and the per-layer report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.models.feature_extraction import create_feature_extractor

from pipeline.data import Preprocess, build_transform, decode_image
from pipeline.probe import probe_scores
from pipeline.visualize import as_maps, strongest_channels

from conftest import TINY_MODEL, run_cli


def test_probe_scores_separable_labels_high_and_shuffled_near_chance() -> None:
    rng = np.random.default_rng(0)
    labels = [f"class{i % 4}" for i in range(200)]
    centres = rng.standard_normal((4, 32)) * 4
    vectors = np.stack([centres[i % 4] for i in range(200)]) + rng.standard_normal((200, 32))
    separable = probe_scores(vectors, labels)
    assert separable["accuracy"] > 0.97 and separable["f1_macro"] > 0.97
    assert separable["folds"] == 5 and separable["chance"] == 0.25
    shuffled = probe_scores(vectors, list(rng.permutation(labels)))
    assert abs(shuffled["accuracy"] - 0.25) < 0.12


def test_token_outputs_become_patch_grid_maps() -> None:
    tokens = torch.arange(5 * 3, dtype=torch.float32).reshape(5, 3)  # class token + 2x2 patches
    maps = as_maps(tokens.flatten(), (5, 3), prefix_tokens=1)
    assert maps.shape == (3, 2, 2)
    torch.testing.assert_close(maps[:, 0, 1], tokens[2])
    assert strongest_channels(maps, 2) == [2, 1]


@pytest.mark.slow
def test_feature_maps_show_the_strongest_channels(tmp_path: Path, photos: Path) -> None:
    """The picture's channels are those an independent extractor ranks highest."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    torch.save(model.state_dict(), tmp_path / "resnet18.pth")
    image = photos / "animals" / "chelsea.png"
    done = run_cli(
        "model=module",
        f"model.checkpoint={tmp_path}/resnet18.pth",
        f"image={image}",
        "layers=[layer1,layer3]",
        "channels=6",
        f"output_dir={tmp_path}/maps",
        "tracking=none",
        module="pipeline.visualize",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    transform = build_transform(
        Preprocess((3, 224, 224), 0.875, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    )
    x = transform(image=decode_image(image.read_bytes()))["image"][None]
    with torch.inference_mode():
        oracle = create_feature_extractor(model, ["layer1", "layer3"])(x)
    for layer in ("layer1", "layer3"):
        shown = json.loads((tmp_path / f"maps/chelsea/{layer}.json").read_text())["channels"]
        expected = oracle[layer][0].mean(dim=(1, 2)).argsort(descending=True)[:6].tolist()
        assert shown == expected
        with Image.open(tmp_path / f"maps/chelsea/{layer}.png") as picture:
            assert picture.width > 300


@pytest.mark.slow
def test_feature_maps_of_a_vit(tmp_path: Path, photos: Path) -> None:
    done = run_cli(
        *TINY_MODEL,
        "model.name=test_vit",
        "image=null",
        f"images=[{photos}/scenes/rocket.png]",
        "layers=[blocks.0]",
        f"output_dir={tmp_path}/maps",
        module="pipeline.visualize",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert len(json.loads((tmp_path / "maps/rocket/blocks.0.json").read_text())["channels"]) == 16


@pytest.mark.slow
def test_probe_cli_writes_probe_json(tmp_path: Path, photos: Path) -> None:
    extract = run_cli(
        *TINY_MODEL,
        "dataset=folder",
        f"dataset.root={photos}",
        "dataset.labels_from_folders=true",
        "dataset.name=photos",
        cwd=tmp_path,
    )
    assert extract.returncode == 0, extract.stderr
    layer = tmp_path / "outputs/embeddings/photos/test_efficientnet/global_pool.parquet"
    done = run_cli(f"embeddings={layer}", "tracking=none", module="pipeline.probe", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    scores = json.loads(
        (tmp_path / "outputs/probe/photos/test_efficientnet/global_pool/probe.json").read_text()
    )
    assert scores["folds"] == 3 and scores["n_classes"] == 2 and 0 <= scores["accuracy"] <= 1


@pytest.mark.slow
def test_report_on_a_two_layer_sweep(tmp_path: Path, photos: Path) -> None:
    same = [*TINY_MODEL, "dataset=folder", f"dataset.root={photos}", "dataset.name=photos"]
    sweep = run_cli(
        "-m",
        *same,
        "dataset.labels_from_folders=true",
        "layers=[global_pool],[blocks.2]",
        cwd=tmp_path,
    )
    assert sweep.returncode == 0, sweep.stderr
    done = run_cli(*same, module="pipeline.report", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "outputs/report/photos/test_efficientnet"
    table = pd.read_parquet(out / "report.parquet")
    assert table["layer"].tolist() == ["blocks.2", "global_pool"]  # model order, not names
    assert table["dim"].gt(0).all() and table["depth"].is_monotonic_increasing
    assert table["cluster_nmi"].between(0, 1).all() and table["probe_accuracy"].notna().all()
    assert table["dedup_f1"].isna().all()  # a plain folder knows no true duplicate groups
    assert "| blocks.2 |" in (out / "report.md").read_text()
    assert (out / "report.png").stat().st_size > 0
