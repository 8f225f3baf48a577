"""Labels from sub-folders by default: `dataset.labels_from_folders: auto` labels a folder's
images by their folders when every image sits in one, and records the decision; with images at
the top of the root there are none, and the stages that need labels name the keys to set."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import ConfigError
from pipeline.images.manifest import folder_manifest
from pipeline.storage.contract import read_metadata

from conftest import (
    N_PHOTOS,
    PHOTOS_BY_LABEL,
    SMALL,
    composed,
    one_line_error,
    run_cli,
    write_image,
)

NO_LABELS = "no labels: set dataset.labels_from_folders=true or dataset.label_column=<column>"


def test_auto_labels_by_folder_only_when_every_image_sits_in_one(
    photos: Path, tmp_path: Path
) -> None:
    labelled = folder_manifest(photos, [".png"], "auto")
    assert sorted(set(labelled["label"])) == sorted(PHOTOS_BY_LABEL)
    mixed = tmp_path / "mixed"
    shutil.copytree(photos, mixed)
    write_image(mixed / "loose.png", np.zeros((8, 8, 3), np.uint8))
    assert "label" not in folder_manifest(mixed, [".png"], "auto")
    assert "label" not in folder_manifest(photos, [".png"], False)
    forced = folder_manifest(mixed, [".png"], True).set_index("image_id")["label"]
    assert forced["animals/chelsea.png"] == "animals" and forced["loose.png"] == ""


def test_labels_from_folders_is_true_false_or_auto() -> None:
    assert composed("dataset=folder", "dataset.root=x").dataset.labels_from_folders == "auto"
    with pytest.raises(ConfigError, match=r"dataset\.labels_from_folders is true, false or auto"):
        composed("dataset=folder", "dataset.root=x", "dataset.labels_from_folders=maybe")


@pytest.mark.slow
def test_a_folder_of_sub_folders_is_labelled_and_says_so(photos: Path, tmp_path: Path) -> None:
    done = run_cli(
        *SMALL, "dataset=folder", f"dataset.root={photos}", "output_dir=out", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert (
        "labels: each image's folder name (dataset.labels_from_folders=auto)"
        in done.stdout + done.stderr
    )
    layer = tmp_path / "out" / "global_pool.parquet"
    frame = pd.read_parquet(layer)
    assert (frame["label"] == frame["image_id"].str.split("/").str[0]).all()
    assert len(frame) == N_PHOTOS
    assert read_metadata(layer)["dataset"]["labels_from_folders"] is True


@pytest.mark.slow
def test_images_at_the_top_mean_no_labels_and_the_stages_name_the_keys(
    photos: Path, tmp_path: Path
) -> None:
    root = tmp_path / "mixed"
    shutil.copytree(photos, root)
    write_image(root / "loose.png", np.full((40, 40, 3), 90, np.uint8))
    args = [*SMALL, "dataset=folder", f"dataset.root={root}", "output_dir=out"]
    done = run_cli(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (
        f"no labels: 1 of {N_PHOTOS + 1} images sit at the top of dataset.root"
        in done.stdout + done.stderr
    )
    layer = tmp_path / "out" / "global_pool.parquet"
    assert "label" not in pd.read_parquet(layer)
    assert read_metadata(layer)["dataset"]["labels_from_folders"] is False
    # auto decided false: the config hash is that of false, so the layer is up to date for it.
    again = run_cli(*args, "dataset.labels_from_folders=false", cwd=tmp_path)
    assert again.returncode == 0 and "up to date" in again.stdout, again.stderr

    for stage in ("probe", "cluster"):
        done = run_cli(
            f"embeddings={layer}", "tracking=none", module=f"pipeline.{stage}", cwd=tmp_path
        )
        one_line_error(done, 2, NO_LABELS)
