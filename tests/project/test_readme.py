"""Every command in the code blocks of the README and of the docs pages, run as typed, in order
(the README, then the pages as mkdocs.yml's nav lists them), so neither can drift from the code.
What the pages leave to the user's machine is made here: `$HOME/photos`, `train.csv`,
`my_package.AutoEncoder`; models from the hub run with random weights (this machine is offline),
and untracked (tracking is tested on its own). Commands that need a cluster, a server or DVC are
covered by their own tests and named in SKIPPED."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO

HUB_PRESETS = ("efficientnet_b0", "resnet18", "resnet50", "convnext_tiny", "vit_small", "timm")
SKIPPED = {
    "hydra/launcher=submitit_slurm": "a SLURM cluster",
    "MLFLOW_TRACKING_URI=http": "a tracking server (tests/commands/test_tracking.py runs one)",
    "python3 -m venv": "the set-up itself, which CI runs",
    "engine=ray": (
        "a Ray cluster's start per command (tests/extraction/test_ray.py runs the engine's CLI)"
    ),
    "pipeline.explore": (
        "a server until Ctrl-C, or a static site of 110 MB (tests/commands/test_explore.py "
        "serves and exports the explorer and opens both in Chromium)"
    ),
    "python -m http.server": "a static file server until Ctrl-C (test_explore.py runs one)",
    "dedup.reviewed=": (
        "the review.csv a person saves from review.html (tests/commands/test_review.py marks "
        "pairs in Chromium, saves it and runs this)"
    ),
}
AUTOENCODER = """
import torch


class AutoEncoder(torch.nn.Module):
    def __init__(self, latent_dim: int = 32) -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(), torch.nn.Linear(8, latent_dim),
        )
        self.decoder = torch.nn.Linear(latent_dim, 3 * 8 * 8)

    def forward(self, x):
        return self.decoder(self.encoder(x))
"""


class _NavLoader(yaml.SafeLoader):
    """mkdocs.yml as data: tags such as `!ENV` or `!!python/name:` (MkDocs' own) read as None."""


_NavLoader.add_multi_constructor("", lambda loader, suffix, node: None)


def nav_pages() -> list[Path]:
    """The docs pages in the order of mkdocs.yml's nav: the order a reader (and this test) takes."""

    def walk(items: list) -> list[str]:
        found = []
        for item in items:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            found += walk(value) if isinstance(value, list) else [value]
        return found

    config = yaml.load((REPO / "mkdocs.yml").read_text(), Loader=_NavLoader)
    return [REPO / "docs" / page for page in walk(config["nav"]) if page.endswith(".md")]


def pages() -> list[Path]:
    return [REPO / "README.md", *nav_pages()]


def blocks(kind: str) -> list[str]:
    """Every `kind` block of every page, in page order; a block shown twice is listed once."""
    found = [
        block
        for page in pages()
        for block in re.findall(rf"^```{kind}\n(.*?)^```", page.read_text(), re.DOTALL | re.M)
    ]
    return list(dict.fromkeys(found))


def commands() -> list[str]:
    lines = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(("python -m pipeline", "pipeline-", "python3 -m venv")) or (
                "python -m pipeline" in line and "=" in line.split()[0]
            ):
                lines.append(line)
    return lines


def as_run_here(command: str) -> str:
    """The command, with the offline and untracked overrides this machine needs."""
    words = command.split()
    if any(w.startswith("model=") and w[6:].startswith(HUB_PRESETS) for w in words):
        command += " model.pretrained=false"
    if "--help" not in words:
        command += " tracking=none"
    return command


@pytest.fixture(scope="module")
def env(home: Path) -> dict[str, str]:
    """The user's environment: their home, offline, `python` and the pipeline-* scripts of this
    environment on the PATH (as after `source .venv/bin/activate`), no tracking server."""
    env = {
        **os.environ,
        "HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run_as_typed(command: str, home: Path, env: dict[str, str]) -> None:
    done = subprocess.run(  # through a shell, as typed: $HOME and quotes as bash sees them
        ["bash", "-c", as_run_here(command)],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, photos: Path) -> Path:
    """A user's home: photos (one of them painting.jpg), a CSV manifest, their own model."""
    home = tmp_path_factory.mktemp("home")
    shutil.copytree(photos, home / "photos")
    shutil.copy(photos / "animals/chelsea.png", home / "photos/painting.jpg")
    shutil.copytree(photos / "animals", home / "train_images")
    names = sorted(p.name for p in (home / "train_images").iterdir())
    (home / "train.csv").write_text("image_id,label\n" + "".join(f"{n},{n[0]}\n" for n in names))
    (home / "my_package").mkdir()
    (home / "my_package/__init__.py").write_text(AUTOENCODER)
    sys.path.insert(0, str(home))
    try:
        from my_package import AutoEncoder

        torch.save(AutoEncoder(latent_dim=64).state_dict(), home / "ae.pth")
    finally:
        sys.path.remove(str(home))
        sys.modules.pop("my_package", None)
    return home


def test_every_docs_page_is_in_the_nav() -> None:
    """The runner below finds pages through the nav: a page left out of it would go untested."""
    listed = {page.relative_to(REPO / "docs") for page in nav_pages()}
    on_disk = {page.relative_to(REPO / "docs") for page in (REPO / "docs").rglob("*.md")}
    assert on_disk == listed, f"in docs/ but not in mkdocs.yml's nav: {on_disk - listed}"
    assert len(set(nav_pages())) == len(nav_pages()), "a page listed twice in the nav"


@pytest.mark.slow
def test_every_readme_command_runs_as_typed(home: Path, env: dict[str, str]) -> None:
    ran, seen = 0, set()
    for command in commands():
        if any(marker in command for marker in SKIPPED):
            continue
        words = frozenset(as_run_here(command).split())
        if words in seen:  # the same command shown twice (`tracking=none` added here anyway)
            continue
        seen.add(words)
        run_as_typed(command, home, env)
        ran += 1
    assert ran >= 15


@pytest.mark.slow
def test_every_readme_python_block_runs(home: Path, env: dict[str, str]) -> None:
    """The notebook examples, on the demo's files: the commands above made them when they ran
    first; alone, this test makes them with the README's first command."""
    if not (home / "outputs/embeddings/demo/efficientnet_lite0/global_pool.parquet").is_dir():
        run_as_typed("python -m pipeline", home, env)
    for block in blocks("python"):
        done = subprocess.run(
            [sys.executable, "-c", block], cwd=home, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"{block}\n{done.stderr[-3000:]}"
