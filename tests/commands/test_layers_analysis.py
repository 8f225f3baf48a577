"""What each layer learned: feature-map pictures, linear probes and the per-layer report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import torchvision
from PIL import Image
from torchvision.models.feature_extraction import create_feature_extractor

from pipeline import probe
from pipeline.images.decode import decode_image
from pipeline.images.preprocess import Preprocess, build_transform
from pipeline.probe import holdout_scores, probe_scores
from pipeline.storage.contract import read_embeddings
from pipeline.visualize import as_maps, strongest_channels

from conftest import PHOTOS_BY_LABEL, TINY_MODEL, composed, run_cli, write_layer


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


def separable(n: int, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Four well-separated classes, as codes 0-3, in turn."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((4, dim)) * 4
    codes = np.arange(n) % 4
    return (centres[codes] + rng.standard_normal((n, dim))).astype(np.float32), codes


def test_probe_beyond_its_sample_is_trained_on_it_and_scored_on_the_rest() -> None:
    vectors, codes = separable(2000)
    codes[1::5] = -1  # no label (as many of each class): left out of both parts
    scores = holdout_scores(vectors, codes, train_size=400, folds=5)
    assert scores["train_images"] == 400 and scores["test_images"] == 1200
    assert scores["n_images"] == 1600 and scores["n_classes"] == 4 and scores["chance"] == 0.25
    assert scores["accuracy"] > 0.97 and scores["f1_macro"] > 0.97 and scores["folds"] == 5
    assert 0 <= scores["accuracy_std"] < 0.05
    shuffled = holdout_scores(vectors, np.random.default_rng(1).permutation(codes), 400)
    assert abs(shuffled["accuracy"] - 0.25) < 0.08


def test_held_out_probe_copies_its_sample_and_a_chunk_not_the_layer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The held-out images are standardised and predicted a chunk at a time: numpy's peak is
    the training sample (float64 in the solver) and a chunk, not a copy of the layer."""
    import tracemalloc

    vectors, codes = separable(40_000, dim=64)  # 10 MiB
    monkeypatch.setattr(probe, "CHUNK_VALUES", 64 * 500)
    holdout_scores(vectors[:200], codes[:200], train_size=100)  # the libraries' imports
    tracemalloc.start()
    holdout_scores(vectors, codes, train_size=1000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    labels = len(vectors) * 8 * 4  # codes, split rows, predictions: 8 bytes a row each
    assert peak - labels < vectors.nbytes / 4, peak


def test_probe_run_holds_out_beyond_probe_sample(tmp_path: Path) -> None:
    vectors, codes = separable(300)
    ids = [f"{i}.png" for i in range(300)]
    layer = write_layer(tmp_path / "l.parquet", vectors, ids, [f"c{c}" for c in codes])
    settings = ["tracking=none", f"embeddings={layer}", f"probe.output_dir={tmp_path / 'out'}"]
    result = probe.run(composed(*settings, "probe.sample=100"))
    assert result.metrics["train_images"] == 100 and result.metrics["test_images"] == 200
    assert json.loads((tmp_path / "out/probe.json").read_text()) == result.metrics
    # Up to probe.sample, cross-validation over all of them, as before.
    result = probe.run(composed(*settings))
    assert result.metrics == probe_scores(vectors, [f"c{c}" for c in codes])


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
        f"visualize.image={image}",
        "visualize.layers=[layer1,layer3]",
        "visualize.channels=6",
        f"visualize.output_dir={tmp_path}/maps",
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
            # The input and its overlay in a column, the six maps and their colour scale.
            assert picture.width > 900 and 1.0 < picture.width / picture.height < 2.5


@pytest.mark.slow
def test_feature_maps_of_a_vit(tmp_path: Path, photos: Path) -> None:
    """Tokens on the patch grid: the channels shown are the token dims an independent hook
    on the same weights ranks highest over the patches."""
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False).eval()
    torch.save(model.state_dict(), tmp_path / "vit.pth")
    image = photos / "scenes" / "rocket.png"
    done = run_cli(
        *TINY_MODEL,
        "model.name=test_vit",
        f"model.checkpoint={tmp_path}/vit.pth",
        "visualize.image=null",
        f"visualize.images=[{image}]",
        "visualize.layers=[blocks.0]",
        "visualize.channels=5",
        f"visualize.output_dir={tmp_path}/maps",
        module="pipeline.visualize",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    config = timm.data.resolve_model_data_config(model)
    transform = build_transform(
        Preprocess(
            tuple(config["input_size"]),
            config["crop_pct"],
            config["interpolation"],
            tuple(config["mean"]),
            tuple(config["std"]),
        )
    )
    x = transform(image=decode_image(image.read_bytes()))["image"][None]
    captured = {}
    model.blocks[0].register_forward_hook(lambda _m, _i, out: captured.update(out=out))
    with torch.inference_mode():
        model(x)
    patches = captured["out"][0, model.num_prefix_tokens :]
    expected = patches.mean(dim=0).argsort(descending=True)[:5].tolist()
    assert json.loads((tmp_path / "maps/rocket/blocks.0.json").read_text())["channels"] == expected


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
    layer = tmp_path / "outputs/embeddings/photos/test_efficientnet-random/global_pool.parquet"
    done = run_cli(f"embeddings={layer}", "tracking=none", module="pipeline.probe", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "outputs/probe/photos/test_efficientnet-random/global_pool/probe.json"
    scores = json.loads(out.read_text())
    embeddings = read_embeddings(layer)
    assert scores == pytest.approx(probe_scores(embeddings.vectors, embeddings.labels, folds=5))
    per_label = [len(names) for names in PHOTOS_BY_LABEL.values()]  # 3 and 3
    assert scores["folds"] == min(5, *per_label) and scores["n_classes"] == len(per_label)
    assert scores["chance"] == max(per_label) / sum(per_label)


@pytest.mark.slow
def test_report_reads_what_the_stages_wrote_and_names_what_is_missing(
    tmp_path: Path, photos: Path
) -> None:
    same = [*TINY_MODEL, "dataset=folder", f"dataset.root={photos}", "dataset.name=photos"]
    sweep = run_cli(
        "-m",
        *same,
        "dataset.labels_from_folders=true",
        "layers=[global_pool],[blocks.2]",
        cwd=tmp_path,
    )
    assert sweep.returncode == 0, sweep.stderr
    embeddings = tmp_path / "outputs/embeddings/photos/test_efficientnet-random"
    cluster = run_cli(*same, "layer=blocks.2", module="pipeline.cluster", cwd=tmp_path)
    assert cluster.returncode == 0, cluster.stderr
    # The images are found where the extraction recorded them: no images_root= needed.
    assert "no contact sheet" not in cluster.stdout + cluster.stderr
    sheet = tmp_path / "outputs/cluster/photos/test_efficientnet-random/blocks.2/contact_sheet.png"
    assert sheet.stat().st_size > 0
    done = run_cli(*same, module="pipeline.report", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "outputs/report/photos/test_efficientnet-random"
    table = pd.read_parquet(out / "report.parquet").set_index("layer")
    assert table.index.tolist() == ["blocks.2", "global_pool"]  # model order, not names
    assert table["depth"].is_monotonic_increasing
    nmi = json.loads(
        (
            tmp_path / "outputs/cluster/photos/test_efficientnet-random/blocks.2/metrics.json"
        ).read_text()
    )["nmi"]
    assert table.loc["blocks.2", "cluster_nmi"] == nmi
    assert table[["dedup_f1", "probe_accuracy"]].isna().all().all()  # never computed here
    assert pd.isna(table.loc["global_pool", "cluster_nmi"])
    text = (out / "report.md").read_text()
    assert "| blocks.2 |" in text
    folder = embeddings.relative_to(tmp_path)  # as the user gave it: relative to where they are
    assert f"python -m pipeline.probe embeddings={folder}/global_pool.parquet" in text
    assert f"python -m pipeline.cluster embeddings={folder}/blocks.2.parquet" not in text
    assert (out / "report.png").stat().st_size > 0
