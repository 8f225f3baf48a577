"""Manifests, decoding and preprocessing, on real photos and files the tests make."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import skimage.data
import timm
import torch
from PIL import Image

from pipeline.errors import ConfigError
from pipeline.images import demo
from pipeline.images.decode import decode_image
from pipeline.images.formats import ImageError
from pipeline.images.manifest import (
    build_demo_if_missing,
    folder_manifest,
    load_manifest,
    table_manifest,
)
from pipeline.images.preprocess import build_transform, resolve_preprocess

from conftest import composed, encoded, write_image


@pytest.mark.parametrize(
    "image",
    [
        np.full((5, 7), 200, np.uint8),  # grey
        np.full((5, 7, 4), 200, np.uint8),  # alpha
        np.full((5, 7, 3), 200 * 257, np.uint16),  # 16-bit colour
        np.full((5, 7), 200 * 257, np.uint16),  # 16-bit grey
    ],
    ids=["grey", "alpha", "16-bit", "16-bit-grey"],
)
def test_every_png_kind_decodes_to_8bit_rgb(image: np.ndarray) -> None:
    rgb = decode_image(encoded(image, ".png"))
    assert rgb.shape == (5, 7, 3) and rgb.dtype == np.uint8
    assert abs(int(rgb[0, 0, 0]) - 200) <= 1


def test_palette_png_and_channel_order(tmp_path: Path) -> None:
    path = tmp_path / "p.png"
    Image.fromarray(np.array([[[255, 0, 0]]], np.uint8)).convert("P").save(path)
    assert decode_image(path.read_bytes())[0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", encoded(np.zeros((32, 32, 3), np.uint8), ".jpg")[:40]],
    ids=["empty", "text", "truncated"],
)
def test_unreadable_bytes_raise_image_error(data: bytes) -> None:
    with pytest.raises(ImageError):
        decode_image(data)


def test_transform_matches_timm_eval_transform() -> None:
    """Our OpenCV/albumentations preprocessing sees what timm's PIL transform sees."""
    model = timm.create_model("resnet18", pretrained=False)
    preprocess = resolve_preprocess(model, input_size=[3, 128, 128])
    photo = skimage.data.chelsea()
    ours = build_transform(preprocess)(image=photo)["image"]
    config = {k: v for k, v in preprocess.as_dict().items()}
    theirs = timm.data.create_transform(**config)(Image.fromarray(photo))
    assert ours.shape == theirs.shape == (3, 128, 128) and ours.dtype == torch.float32
    assert (ours - theirs).abs().mean() < 0.05  # resampling differs a little, content not


def test_preprocess_overrides_win_over_the_model_config() -> None:
    model = timm.create_model("test_efficientnet", pretrained=False)
    assert resolve_preprocess(model).input_size == (3, 160, 160)
    custom = resolve_preprocess(model, input_size=[3, 64, 96], crop_pct=1.0, mean=[0.5] * 3)
    assert custom.input_size == (3, 64, 96) and custom.mean == (0.5, 0.5, 0.5)
    assert build_transform(custom)(image=np.zeros((50, 200, 3), np.uint8))["image"].shape == (
        3,
        64,
        96,
    )
    with pytest.raises(ConfigError, match="interpolation"):
        resolve_preprocess(model, interpolation="cubic-ish")


def test_folder_manifest_sorted_recursive_with_folder_labels(photos: Path) -> None:
    manifest = folder_manifest(photos, [".png"], labels_from_folders=True)
    assert manifest["image_id"].tolist() == sorted(manifest["image_id"])
    assert manifest["image_id"].iloc[0] == "animals/astronaut.png"
    assert set(manifest["label"]) == {"animals", "scenes"}
    with pytest.raises(ConfigError, match="no images"):
        folder_manifest(photos, [".webp"], labels_from_folders=False)


def test_csv_manifest_checks_columns_ids_and_root(tmp_path: Path, photos: Path) -> None:
    csv = tmp_path / "train.csv"
    pd.DataFrame({"image_id": ["scenes/rocket.png", "animals/coffee.png"], "label": [1, 0]}).to_csv(
        csv, index=False
    )
    manifest = table_manifest(csv, photos, "image_id", "label")
    assert manifest["image_id"].tolist() == ["scenes/rocket.png", "animals/coffee.png"]
    assert manifest["label"].tolist() == ["1", "0"]
    assert Path(manifest["path"].iloc[0]).is_file()
    with pytest.raises(ConfigError, match=r"no column 'path'.*\['image_id', 'label'\]"):
        table_manifest(csv, photos, "path", None)

    pd.DataFrame({"p": ["../../etc/passwd"]}).to_csv(csv, index=False)
    with pytest.raises(ConfigError, match=r"outside dataset\.root"):
        table_manifest(csv, photos, "p", None)
    pd.DataFrame({"p": ["a.png", "./a.png"]}).to_csv(csv, index=False)
    with pytest.raises(ConfigError, match="more than once"):
        table_manifest(csv, photos, "p", None)


def test_demo_set_is_deterministic_with_planted_groups(tmp_path: Path) -> None:
    first, second = demo.build(tmp_path / "a"), demo.build(tmp_path / "b")
    pd.testing.assert_frame_equal(first, second)
    assert len(first) == (1 + len(demo.VARIANTS)) * len(demo.photos())
    assert first["group"].nunique() == len(demo.photos())
    for path in first["path"][:12]:
        assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes()
    image = decode_image((tmp_path / "a" / first["path"].iloc[1]).read_bytes())
    assert image.ndim == 3


def test_the_demo_set_is_built_by_its_own_call_and_reading_it_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = composed(f"paths.data={tmp_path}").dataset
    root = tmp_path / "demo"
    with pytest.raises(ConfigError, match=f"python -m pipeline.images.demo {root}"):
        load_manifest(dataset)
    assert not root.exists()
    built: list[Path] = []

    def build(folder: Path) -> None:  # one image, not the twenty photos
        built.append(folder)
        write_image(folder / "images" / "a.png", np.zeros((4, 4, 3), np.uint8))
        pd.DataFrame({"path": ["images/a.png"], "label": ["a"]}).to_csv(
            folder / "manifest.csv", index=False
        )

    monkeypatch.setattr(demo, "build", build)
    build_demo_if_missing(dataset)
    build_demo_if_missing(dataset)  # complete: left as it is
    assert built == [root]
    assert load_manifest(dataset)["image_id"].tolist() == ["images/a.png"]
    build_demo_if_missing(composed("dataset=folder", f"dataset.root={root}").dataset)
    assert built == [root]  # another kind of dataset: nothing built


def test_write_image_helper_roundtrip(tmp_path: Path) -> None:
    path = write_image(tmp_path / "x.png", np.full((4, 4, 3), (10, 20, 30), np.uint8))
    assert decode_image(path.read_bytes())[0, 0].tolist() == [10, 20, 30]
