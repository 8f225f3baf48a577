"""`embed()` called as a notebook calls it, again and again: the CLI's defaults, no work thrown
away (calibration copies, a model rebuilt, the config composed twice), plain progress bars in
Jupyter without a warning."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline.app
import pipeline.extraction.copies
from pipeline import api, embed
from pipeline.storage.contract import read_embeddings, read_metadata

from conftest import N_PHOTOS, REPO, TINY_MODEL, run_cli

# The suite's tiny timm model as `embed` names it: the same overrides as the command line's.
TINY = {"model": "timm", "overrides": ["model.name=test_efficientnet", "model.pretrained=false"]}


@pytest.fixture(autouse=True)
def fresh_cache() -> None:
    """Every test starts without a model kept by an earlier one."""
    api.clear_model_cache()


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[torch.nn.Module]:
    """The models `embed` builds, in order (the builder still builds them)."""
    built: list[torch.nn.Module] = []
    real = api.build_model

    def counted(*args: object, **kwargs: object) -> torch.nn.Module:
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(api, "build_model", counted)
    return built


@pytest.fixture
def copies_made(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many images' calibration copies each extraction embedded."""
    made: list[int] = []
    real = pipeline.extraction.copies.embed_copies

    def counted(hooks: object, picked: object, *args: object, **kwargs: object) -> int:
        made.append(len(picked))  # type: ignore[arg-type]
        return real(hooks, picked, *args, **kwargs)

    # extract imports it where the copies are made: patched at its home
    monkeypatch.setattr(pipeline.extraction.copies, "embed_copies", counted)
    return made


@pytest.mark.slow
def test_embed_gives_the_cli_s_layers_widths_and_rows(tmp_path: Path, photos: Path) -> None:
    """The same images through `python -m pipeline` and through `embed`, neither told how to
    pool: the same layers by default, the same widths (grid pooling: 16 cells x channels), the
    same ids and values (random weights alike: both seed them with `seed`)."""
    for layers, cli_layers in ((None, []), (["blocks.3"], ["layers=[blocks.3]"])):
        out = tmp_path / f"cli-{len(cli_layers)}"
        done = run_cli(
            *TINY_MODEL, "dataset=folder", f"dataset.root={photos}", f"output_dir={out}",
            *cli_layers, cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        frame = embed(photos, layers=layers, **TINY)
        written = sorted(p.name.removesuffix(".parquet") for p in out.glob("*.parquet"))
        written.remove("failures")
        assert sorted(c for c in frame.columns if c not in ("image_id", "label")) == written
        for layer in written:
            cli = read_embeddings(out / f"{layer}.parquet")
            assert frame["image_id"].tolist() == cli.ids
            np.testing.assert_allclose(
                np.stack(frame[layer]), cli.vectors, rtol=1e-5, atol=1e-6, err_msg=layer
            )
    metadata = read_metadata(out / "blocks.3.parquet")
    assert metadata["pool"] == "grid"  # 4 x 4 cells of the map's channels
    assert np.stack(frame["blocks.3"]).shape[1] == 16 * metadata["output_shape"][0]


def test_no_calibration_copies_unless_output_dir_keeps_them(
    tmp_path: Path, photos: Path, copies_made: list[int]
) -> None:
    frame = embed(photos, layers=["blocks.1"], **TINY)
    assert len(frame) == N_PHOTOS
    assert copies_made == []  # in a temporary folder: nothing would read them
    embed(photos, layers=["blocks.1"], output_dir=tmp_path / "out", **TINY)
    assert copies_made == [N_PHOTOS]  # the config's sample, for dedup threshold=auto to read
    assert (tmp_path / "out/blocks.1.parquet/_calibration").is_dir()
    none = [*TINY["overrides"], "calibration.images=0"]
    embed(photos, model="timm", output_dir=tmp_path / "none", overrides=none)
    assert copies_made == [N_PHOTOS]
    assert not (tmp_path / "none/global_pool.parquet/_calibration").exists()


def test_the_model_is_built_once_for_calls_with_the_same_model(
    photos: Path, builds: list[torch.nn.Module]
) -> None:
    first = embed(photos, layers=["blocks.1"], **TINY)
    again = embed(sorted(photos.rglob("*.png")), layers=["blocks.2", "global_pool"], **TINY)
    smaller = [*TINY["overrides"], "model.input_size=[3,32,32]"]  # preprocessing, not the model
    embed(torch.randn(2, 3, 32, 32), model="timm", overrides=smaller)
    assert len(builds) == 1
    assert len(first) == len(again) == N_PHOTOS
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in builds[0].modules())
    other = ["model.name=test_vit", "model.pretrained=false"]  # other settings: another model
    embed(torch.randn(2, 3, 160, 160), model="timm", layers=["blocks.0"], overrides=other)
    assert len(builds) == 2
    api.clear_model_cache()
    embed(torch.randn(2, 3, 160, 160), model="timm", layers=["blocks.0"], overrides=other)
    assert len(builds) == 3


def test_a_hook_left_on_the_kept_model_makes_a_new_one(
    photos: Path, builds: list[torch.nn.Module]
) -> None:
    embed(photos, layers=["blocks.1"], **TINY)
    ran: list[str] = []
    builds[0].blocks[1].register_forward_hook(lambda *_: ran.append("left over"))
    frame = embed(photos, layers=["blocks.1"], **TINY)
    assert len(builds) == 2 and ran == [] and len(frame) == N_PHOTOS


def test_a_failed_call_leaves_no_hook_on_the_kept_model(
    photos: Path, builds: list[torch.nn.Module]
) -> None:
    """pool=cls does not fit a conv map: the call fails in the forward pass, hooks on."""
    with pytest.raises(ValueError, match="pool=cls does not fit"):
        embed(photos, layers=["blocks.1"], pool="cls", **TINY)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in builds[0].modules())
    assert len(embed(photos, layers=["blocks.1"], **TINY)) == N_PHOTOS and len(builds) == 1


def test_each_call_composes_the_config_once(
    tmp_path: Path, photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    composed: list[list[str]] = []
    real = pipeline.app.compose

    def counted(config: str, overrides: list[str]) -> object:
        composed.append(overrides)
        return real(config, overrides=overrides)

    monkeypatch.setattr(pipeline.app, "compose", counted)
    embed(photos, **TINY)
    embed(photos, output_dir=tmp_path / "out", **TINY)
    smaller = [*TINY["overrides"], "model.input_size=[3,32,32]"]
    embed(torch.randn(1, 3, 32, 32), model="timm", overrides=smaller)
    assert len(composed) == 3


def test_no_module_makes_notebook_progress_bars() -> None:
    """tqdm.auto's bars turn into widgets in Jupyter, and it warns where ipywidgets is missing:
    the pipeline's bars are tqdm's plain ones (tqdm.std) everywhere. (The package's __init__
    imports tqdm.auto only to silence that warning for huggingface_hub's bars.)"""
    notebook = ("tqdm.auto", "tqdm.autonotebook", "tqdm.notebook")
    for path in sorted((REPO / "src").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(notebook), f"{path.relative_to(REPO)}"


# A Jupyter kernel as tqdm recognises one, where ipywidgets is not installed. Every TqdmWarning
# is shown ("error" would not do: tqdm.autonotebook catches the exception and falls back).
IN_A_KERNEL = """
import sys, types, warnings
from tqdm.std import TqdmWarning
warnings.simplefilter("always", TqdmWarning)
sys.modules["ipykernel.zmqshell"] = types.ModuleType("ipykernel.zmqshell")
ipython = types.ModuleType("IPython")
ipython.get_ipython = lambda: types.SimpleNamespace(config={"IPKernelApp": {}})
sys.modules["IPython"] = ipython
sys.modules["ipywidgets"] = None  # not installed
from pipeline import embed
frame = embed(sys.argv[1], model="timm", output_dir=sys.argv[2],
              overrides=["model.name=test_efficientnet", "model.pretrained=false"])
print(len(frame), "rows")
"""


@pytest.mark.slow
def test_no_tqdm_warning_in_a_notebook_without_ipywidgets(tmp_path: Path, photos: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(IN_A_KERNEL), str(photos), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert f"{N_PHOTOS} rows" in done.stdout
    assert "IProgress" not in done.stderr and "TqdmWarning" not in done.stderr
