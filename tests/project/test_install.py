"""Installed as a user installs it, in a fresh virtual environment run from a folder that is not
the clone. A wheel: the configs must come from inside the package (`pipeline.conf`, which
pyproject.toml maps to the top-level conf/), and the console scripts must be there. An editable
install: the code and the configs are the clone's, edits included, and DVC's composition still
finds the config's resolvers. (Each environment borrows this one's dependencies through a .pth
file, so the tests build and install only the project itself.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pandas as pd
import pytest
import yaml
from packaging.requirements import Requirement
from setuptools import find_namespace_packages
from setuptools.config.pyprojecttoml import read_configuration

from conftest import N_PHOTOS, REPO, TINY_MODEL, run_cli

# A preset of a tiny timm model with random weights (fast, offline), as a user would write one.
TINY_PRESET = "defaults:\n  - timm\n  - _self_\nname: test_efficientnet\npretrained: false\n"


def fresh_venv(path: Path) -> tuple[Path, str]:
    """A virtual environment without the project, borrowing this one's dependencies: its
    python and its site-packages folder."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin/python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python, site


def pip_install(python: Path, *args: str) -> None:
    """Into the environment of `python`. Without PYTHONPATH: a checkout's src/ there holds the
    egg-info its wheel build leaves, which pip would take for the project already installed."""
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", *args],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": ""},
    )


def test_the_listed_packages_are_those_of_the_tree() -> None:
    """pyproject.toml lists the packages (find cannot name conf/ `pipeline.conf`): a package
    added under src/ or a config group added to conf/ must be listed, or the wheel lacks it."""
    listed = read_configuration(REPO / "pyproject.toml")["tool"]["setuptools"]["packages"]
    in_tree = [
        *find_namespace_packages(REPO / "src"),
        "pipeline.conf",
        *(f"pipeline.conf.{group}" for group in find_namespace_packages(REPO / "conf")),
    ]
    assert sorted(listed) == sorted(in_tree)


@pytest.mark.slow
def test_a_wheel_runs_from_anywhere(tmp_path: Path, photos: Path) -> None:
    wheels = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    [wheel] = wheels.glob("pipeline-*.whl")
    venv = tmp_path / "venv"
    python, site = fresh_venv(venv)
    pip_install(python, str(wheel))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    where = subprocess.run(
        [str(python), "-c", "import pipeline; print(pipeline.__file__)"],
        cwd=elsewhere,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert where.startswith(site), where  # the installed copy, not the clone's src/
    done = subprocess.run(
        [
            str(venv / "bin/pipeline-extract"),
            "model=timm",
            "model.name=test_efficientnet",
            "model.pretrained=false",
            "dataset=folder",
            f"dataset.root={photos}",
            "tracking=none",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    frame = pd.read_parquet(
        elsewhere / f"outputs/embeddings/{photos.name}/test_efficientnet-random/global_pool.parquet"
    )
    assert len(frame) == N_PHOTOS
    listed = subprocess.run(
        [str(python), "-m", "pipeline.layers", "model=resnet18"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert listed.returncode == 0 and "layer4" in listed.stdout, listed.stderr


@pytest.mark.slow
def test_an_editable_install_runs_the_clones_code_and_configs(tmp_path: Path) -> None:
    """With package-dir mapping `pipeline.conf` to conf/, setuptools makes `pip install -e` an
    import hook instead of a path on sys.path; what a hook cannot do (be listed, as Hydra lists
    its plugins: Hydra issue #2359, pypa/setuptools#3548) is checked here."""
    clone = tmp_path / "clone"  # a copy, so the install's build files stay out of this checkout
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for folder in ("src", "conf"):
        shutil.copytree(REPO / folder, clone / folder, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, clone / name)
    python, _ = fresh_venv(tmp_path / "venv")
    pip_install(python, "--no-build-isolation", "-e", str(clone))
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "my_conf/tracking").mkdir(parents=True)
    (elsewhere / "my_conf/tracking/quiet.yaml").write_text("backend: none\n")
    (clone / "conf/model/mine.yaml").write_text(TINY_PRESET)  # an edit after the install
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            args, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600
        )

    imported = "import pipeline, pipeline.conf; print(pipeline.__file__, pipeline.conf.__file__)"
    where = run(str(python), "-c", imported)
    assert where.stdout.split() == [
        str(clone / "src/pipeline/__init__.py"),
        str(clone / "conf/__init__.py"),
    ], where.stderr
    # The clone's new preset and the user's own --config-dir, in one command.
    listed = run(
        str(tmp_path / "venv/bin/pipeline-layers"),
        "--config-dir",
        "my_conf",
        "model=mine",
        "tracking=quiet",
    )
    assert listed.returncode == 0 and "global_pool" in listed.stdout, listed.stderr
    # DVC's composition of params.yaml resolves the config's own interpolations only where
    # Hydra's plugin scan lists hydra_plugins/pipeline_resolvers (pyproject.toml's note).
    composed = tmp_path / "params.yaml"
    dumped = run(
        str(python),
        "-c",
        "import sys; from dvc.utils.hydra import compose_and_dump; "
        "compose_and_dump(sys.argv[1], sys.argv[2], None, 'dvc_params', '', [])",
        str(composed),
        str(clone / "conf"),
    )
    assert dumped.returncode == 0, dumped.stderr
    assert yaml.safe_load(composed.read_text()) == yaml.safe_load(
        (REPO / "params.yaml").read_text()
    )


# What `pip install pipeline` leaves out, each for one use (pyproject.toml's extras).
EXTRAS_ONLY = {"dvc", "ray", "hydra-joblib-launcher", "imagededup", "mkdocs", "pytest"}


@pytest.mark.slow
def test_extraction_and_the_stages_need_none_of_the_extras(tmp_path: Path, photos: Path) -> None:
    """The default install (no extras) has no DVC or Ray, and needs neither: an extraction and a
    stage run with both unimportable (a `sitecustomize` that blocks them, as if they were not
    installed)."""
    config = read_configuration(REPO / "pyproject.toml")["project"]
    core = {Requirement(r).name for r in config["dependencies"]}
    assert not core & EXTRAS_ONLY, core & EXTRAS_ONLY
    assert {Requirement(r).name for r in config["optional-dependencies"]["dvc"]} == {"dvc"}
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "for name in ('dvc', 'ray'):\n"
        "    sys.modules[name] = None  # import name: ModuleNotFoundError, as if not installed\n"
    )
    env = {"PYTHONPATH": str(blocker)}
    for name in ("dvc", "ray"):
        tried = subprocess.run(
            [sys.executable, "-c", f"import {name}"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
        )
        assert tried.returncode == 1 and "halted" in tried.stderr, tried.stderr
    out = tmp_path / "out"
    done = run_cli(
        *TINY_MODEL, "dataset=folder", f"dataset.root={photos}", f"output_dir={out}",
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    clustered = run_cli(
        *TINY_MODEL, f"embeddings={out}/global_pool.parquet", f"cluster.output_dir={tmp_path}/c",
        cwd=tmp_path, module="pipeline.cluster", env=env,
    )  # fmt: skip
    assert clustered.returncode == 0, clustered.stderr
    assert (tmp_path / "c/assignments.parquet").is_file()
