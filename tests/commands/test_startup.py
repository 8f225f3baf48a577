"""Start-up: every command's `--help`, a config error that needs no model and an extraction
with nothing new to embed answer without loading torch, timm, MLflow, scikit-learn or faiss
(each command runs in a subprocess under `python -X importtime`, which names every module it
imports); `--help` is made from the schema and the presets, so it lists every value and preset
there is and marks the one in effect."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from enum import Enum
from pathlib import Path

import pytest
import yaml

from pipeline.app import CHOSEN, GROUPS
from pipeline.config import RECORDED_ONLY, key_type

from conftest import REPO, TINY_MODEL, composed, run_cli

STAGES = ["cluster", "dedup", "probe", "report", "visualize", "explore", "layers"]
COMMANDS = ["pipeline", *(f"pipeline.{stage}" for stage in STAGES)]
# What no --help and no config error may load: seconds each (torch with timm about 4, MLflow 3).
MODEL_AND_TRACKING = {
    "torch",
    "timm",
    "torchvision",
    "mlflow",
    "sklearn",
    "faiss",
    "albumentations",
}
# --help needs none of the data libraries either.
HELP_LEAVES = MODEL_AND_TRACKING | {"matplotlib", "cv2", "pandas", "pyarrow", "scipy"}


def run_timed(module: str, *args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, set[str]]:
    """`python -X importtime -m module args...` in `cwd`: the run (its stderr without the
    import lines) and the top-level packages it imported."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    imported, rest = set(), []
    for line in done.stderr.splitlines():
        if line.startswith("import time:"):
            name = line.split("|")[-1].strip()
            if name != "imported package":  # the header
                imported.add(name.split(".")[0])
        else:
            rest.append(line)
    done.stderr = "\n".join(rest)
    return done, imported


@pytest.mark.parametrize("module", COMMANDS)
def test_help_loads_no_model_tracking_or_data_library(module: str, tmp_path: Path) -> None:
    done, imported = run_timed(module, "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "== Key options" in done.stdout
    assert not imported & HELP_LEAVES, sorted(imported & HELP_LEAVES)


# (command, overrides, what the one line says); tracking is on (the default), so a check that
# came after the tracking run opened would load MLflow.
CONFIG_ERRORS = [
    ("pipeline", ["dataset=folder", "dataset.root={tmp}/missing"], "is not a folder"),
    (
        "pipeline",
        ["dataset=csv", "dataset.path={tmp}/missing.csv", "dataset.root={tmp}"],
        "manifest {tmp}/missing.csv does not exist",
    ),
    ("pipeline", ["batch_szie=4"], "did you mean batch_size?"),
    ("pipeline", ["model=resnet5"], "no model preset 'resnet5'"),
    ("pipeline", ["pool=bogus"], "Invalid value 'bogus'"),
    ("pipeline", ["batch_size=0"], "batch_size must be at least 1"),
    ("pipeline.cluster", ["embeddings={tmp}/none.parquet"], "do not exist"),
    ("pipeline.cluster", ["embeddings={tmp}", "cluster.pca_dim=0"], "cluster.pca_dim"),
    ("pipeline.dedup", ["embeddings={tmp}/none.parquet"], "do not exist"),
    ("pipeline.dedup", ["embeddings={tmp}", "dedup.threshold=1.5"], "dedup.threshold is a"),
    ("pipeline.dedup", ["dedup.reviewed={tmp}/review.csv"], "dedup.reviewed {tmp}/review.csv"),
    ("pipeline.probe", ["embeddings={tmp}/none.parquet"], "do not exist"),
    ("pipeline.report", ["output_dir={tmp}/empty"], "no layer embeddings in"),
    ("pipeline.visualize", ["visualize.image={tmp}/none.png"], "image {tmp}/none.png does not"),
    ("pipeline.explore", ["embeddings={tmp}/none.parquet"], "do not exist"),
    ("pipeline.explore", ["explore.thumbnail=4"], "explore.thumbnail must be at least 8"),
    ("pipeline.explore", ["embeddings={tmp}", "explore.export={tmp}"], "holds other files"),
    ("pipeline.layers", ["poool=avg"], "did you mean pool?"),
]


@pytest.mark.parametrize(
    ("module", "args", "message"),
    CONFIG_ERRORS,
    ids=[f"{m} {' '.join(a)}" for m, a, _ in CONFIG_ERRORS],
)
def test_a_config_error_loads_no_model_or_tracking(
    module: str, args: list[str], message: str, tmp_path: Path
) -> None:
    done, imported = run_timed(module, *(a.format(tmp=tmp_path) for a in args), cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and message.format(tmp=tmp_path) in lines[0], done.stderr
    assert not imported & MODEL_AND_TRACKING, sorted(imported & MODEL_AND_TRACKING)
    assert not (tmp_path / "outputs/mlflow.db").exists()  # no run was opened for it


@pytest.mark.slow
def test_a_rerun_with_nothing_new_loads_no_model_library(tmp_path: Path, photos: Path) -> None:
    """A finished extraction run again finds every layer published, without torch or timm."""
    args = [
        *TINY_MODEL,
        "dataset=folder",
        f"dataset.root={photos}",
        "model.input_size=[3,32,32]",
        f"output_dir={tmp_path}/out",
    ]
    first = run_cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    done, imported = run_timed("pipeline", *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "nothing new to embed" in done.stdout + done.stderr
    assert not imported & MODEL_AND_TRACKING, sorted(imported & MODEL_AND_TRACKING)


# --- --help from the schema --------------------------------------------------------------------

ENUM_KEYS = [
    "pool",
    "precision",
    "decode",
    "cluster.method",
    "dedup.method",
    "explore.projection",
]


def listed(text: str, key: str) -> list[str]:
    """The values `key=a|b|c` lists in the help."""
    found = re.search(rf"(?:^|\s){re.escape(key)}=(\S+)", text, re.MULTILINE)
    assert found, f"{key}= is not in --help"
    return found.group(1).split("|")


def presets_listed(text: str, group: str) -> list[str]:
    found = re.search(rf"^\s+{group}: (.+)$", text, re.MULTILINE)
    assert found, f"no {group} presets in --help"
    return found.group(1).split(", ")


def default_presets() -> dict[str, str]:
    defaults = yaml.safe_load((REPO / "conf/config.yaml").read_text())["defaults"]
    return {k: v for d in defaults if isinstance(d, dict) for k, v in d.items()}


@pytest.mark.parametrize("overrides", [[], ["model=resnet18", "pool=gem", "engine=ray"]])
def test_help_lists_every_choice_and_preset_and_marks_the_one_in_effect(
    overrides: list[str], tmp_path: Path
) -> None:
    done, _ = run_timed("pipeline", "--help", *overrides, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    config = composed(*overrides)
    for key in ENUM_KEYS:
        kind = key_type(key)
        assert issubclass(kind, Enum)
        current = config
        for part in key.split("."):
            current = getattr(current, part)
        expected = [
            m.value + (CHOSEN if m is current else "") for m in kind if m not in RECORDED_ONLY
        ]
        assert listed(text, key) == expected, key
    chosen = {**default_presets(), **dict(o.split("=") for o in overrides if "." not in o)}
    chosen.pop("pool", None)
    for group in GROUPS:
        names = sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))
        marked = [n + (CHOSEN if n == chosen[group] else "") for n in names]
        assert presets_listed(text, group) == marked, group
