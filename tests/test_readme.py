"""Every command in the README's code blocks, run as typed, in order, so the README cannot
drift from the code. What the README leaves to the user's machine is made here: `$HOME/photos`,
`train.csv`, `my_package.AutoEncoder`; models from the hub run with random weights (this
machine is offline), and untracked (tracking is tested on its own). Commands that need a
cluster, a server or DVC are covered by their own tests and named in SKIPPED."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO

pytestmark = pytest.mark.slow

HUB_PRESETS = ("efficientnet_b0", "resnet18", "resnet50", "convnext_tiny", "vit_small", "timm")
SKIPPED = {
    "hydra/launcher=submitit_slurm": "a SLURM cluster",
    "MLFLOW_TRACKING_URI=http": "a tracking server (tests/test_tracking.py runs one)",
    "python3 -m venv": "the set-up itself, which CI runs",
    "engine=ray": "a Ray cluster's start per command (tests/test_ray.py runs the engine's CLI)",
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


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", (REPO / "README.md").read_text(), re.DOTALL)


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


def test_every_readme_command_runs_as_typed(home: Path) -> None:
    env = {
        **os.environ,
        "HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        # `python` and the pipeline-* scripts are this environment's, as after `source activate`
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    ran, seen = 0, set()
    for command in commands():
        if any(marker in command for marker in SKIPPED):
            continue
        words = frozenset(as_run_here(command).split())
        if words in seen:  # the same command shown twice (`tracking=none` added here anyway)
            continue
        seen.add(words)
        done = subprocess.run(  # through a shell, as typed: $HOME and quotes as bash sees them
            ["bash", "-c", as_run_here(command)],
            cwd=home,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        ran += 1
    assert ran >= 15


def test_every_readme_python_block_runs(home: Path) -> None:
    """The notebook examples, after the commands above made the demo's files."""
    if not (home / "outputs/embeddings/demo/efficientnet_lite0").is_dir():
        pytest.fail("run with test_every_readme_command_runs_as_typed first")
    for block in blocks("python"):
        done = subprocess.run(
            [sys.executable, "-c", block], cwd=home, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"{block}\n{done.stderr[-3000:]}"
