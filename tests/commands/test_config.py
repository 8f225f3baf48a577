"""Config errors through the user's door: `python -m pipeline` with a misspelled key, a value
out of range, a manifest that is not a table or a model class that cannot be imported stops
before any model runs, with one line naming what to fix and exit code 2, and writes nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.app import check_overrides
from pipeline.errors import ConfigError

from conftest import composed, run_cli, write_image

FOLDER = ["dataset=folder", "dataset.root={tmp}/images"]  # a folder of one image

CONFIG_ERRORS = [
    (["batch_szie=4"], "no key 'batch_szie' in the config: did you mean batch_size?"),
    (["+batch_szie=4"], "no key 'batch_szie' in the config: did you mean batch_size?"),
    (["calibration.imagse=3"], "did you mean calibration.images?"),
    (["model.input_size=[3,0,0]"], "model.input_size is [3, height, width]"),
    (["model.input_size=[3,64]"], "model.input_size is [3, height, width]"),
    (["model.mean=[0.5,0.5]"], "model.mean is 3 numbers, one per RGB channel"),
    (["model.std=[0.5,0.5,0]"], "model.std is 3 positive numbers"),
    (["model.crop_pct=0"], "model.crop_pct is a fraction in (0, 1], got 0.0"),
    (["max_image_pixels=-1"], "max_image_pixels must be at least 1, got -1"),
    (["max_file_bytes=0"], "max_file_bytes must be at least 1, got 0"),
    (["batch_size=0"], "batch_size must be at least 1, got 0"),
    (["save_every=0"], "save_every must be at least 1, got 0"),
    (["max_failure_rate=1.5"], "max_failure_rate is a fraction in [0, 1], got 1.5"),
    (["calibration.copies=0"], "calibration.copies must be at least 1, got 0"),
    (["report.cka_sample=-1"], "report.cka_sample is 0 (no CKA) or 4 images or more, got -1"),
    (["report.cka_sample=3"], "report.cka_sample is 0 (no CKA) or 4 images or more, got 3"),
    (
        ["model=module", "model.module._target_=my_package.AutoEncoder"],
        "cannot import my_package.AutoEncoder: is my_package installed or on PYTHONPATH?",
    ),
    (
        ["model=module", "model.module._target_=torch.nn.NoSuchLayer"],
        "cannot import torch.nn.NoSuchLayer: torch.nn has no NoSuchLayer",
    ),
    (
        ["dataset=csv", "dataset.path={tmp}/images/photo.jpg", "dataset.root={tmp}/images"],
        "cannot be read as CSV or Parquet",
    ),
    (
        ["dataset=csv", "dataset.path={tmp}/broken.parquet", "dataset.root={tmp}/images"],
        "is not a readable Parquet file",
    ),
]


@pytest.mark.parametrize(
    ("overrides", "message"), CONFIG_ERRORS, ids=[" ".join(o) for o, _ in CONFIG_ERRORS]
)
def test_config_errors_are_one_line_exit_2_nothing_written(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    write_image(tmp_path / "images/photo.jpg", np.zeros((40, 40, 3), np.uint8))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 cut short")
    dataset = [] if any(o.startswith("dataset=") for o in overrides) else FOLDER
    args = [o.format(tmp=tmp_path) for o in [*dataset, *overrides]]
    done = run_cli(
        "tracking=none",
        *args,
        f"output_dir={tmp_path}/out",
        cwd=tmp_path,
        timeout=120,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr
    assert not (tmp_path / "out").exists()


def test_a_key_the_schema_lacks_is_named_with_the_closest_when_typed() -> None:
    """A key that reaches the schema without the command line's check (Hydra's `+key` from
    the Python side, a key written into a YAML file): the same one line, in-process."""
    with pytest.raises(ConfigError, match=r"^no key 'model.nmae' in the config: did you mean"):
        composed("+model.nmae=resnet")


def test_each_default_layer_is_hooked_once() -> None:
    """The default names the embedding layer and the dedup layer; on a preset with no dedup
    layer of its own they are one, hooked and named once (`layers` as the run records it)."""
    assert composed("model=resnet18").layers == ["global_pool"]
    assert composed("model=efficientnet_lite0").layers == ["global_pool", "blocks.4"]
    assert composed("layers=[layer2,layer3,layer2]").layers == ["layer2", "layer3"]


def test_a_users_config_dir_adds_presets(tmp_path: Path) -> None:
    """`--config-dir my_conf` (README): `my_conf/model/mine.yaml` is `model=mine`, for the
    check before Hydra as for Hydra, written in each of Hydra's spellings of the flag."""
    mine = tmp_path / "my_conf/model/mine.yaml"
    mine.parent.mkdir(parents=True)
    mine.write_text("defaults:\n  - timm\n  - _self_\nname: test_efficientnet\npretrained: false\n")
    my_conf = str(mine.parents[1])
    for flag in (["--config-dir", my_conf], ["-cd", my_conf], [f"--config-dir={my_conf}"]):
        check_overrides([*flag, "model=mine", "dataset=demo"])
    with pytest.raises(ConfigError, match=r"^no model preset 'mine': use one of convnext_tiny"):
        check_overrides(["model=mine"])
    shown = run_cli("--config-dir", "my_conf", "model=mine", "--cfg", "job", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert (
        "name: test_efficientnet" in shown.stdout and "embedding_layer: global_pool" in shown.stdout
    )
