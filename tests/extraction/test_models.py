"""Building models and loading weights: local checkpoints, the hub cache, weights from pip."""

from __future__ import annotations

import dataclasses
import os
import pickle
import socket
from pathlib import Path

import pytest
import skimage.data
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from pipeline.config import KeyMatch, ModelConfig
from pipeline.errors import ConfigError
from pipeline.extraction.models import build_model, load_checkpoint

from conftest import composed

TINY = "test_efficientnet"


def model_config(**overrides: object) -> ModelConfig:
    """The `model=timm model.name=test_efficientnet` preset, random init, with overrides."""
    preset = composed("model=timm", f"model.name={TINY}", "model.pretrained=false").model
    return dataclasses.replace(preset, **overrides)


def _equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    torch.manual_seed(3)
    return timm.create_model(TINY, pretrained=False, num_classes=7)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_checkpoint_loads_exactly(
    tmp_path: Path, trained: torch.nn.Module, suffix: str
) -> None:
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in trained.state_dict().items()}
    if suffix == ".pth":
        torch.save({"state_dict": state, "epoch": 3}, path)  # a training script's wrapper
    else:
        save_file(state, path)
    model = build_model(model_config(checkpoint=str(path), num_classes=7))
    assert _equal(model, trained) and not model.training


def test_mismatched_checkpoint_names_the_keys(tmp_path: Path, trained: torch.nn.Module) -> None:
    path = tmp_path / "w.pth"
    torch.save(trained.state_dict(), path)
    with pytest.raises(
        ConfigError,
        match=r"does not fit the model \(shape mismatch: "
        r"classifier.weight \(7, \d+\) vs \(1000, \d+\)",
    ):
        build_model(model_config(checkpoint=str(path)))
    state = trained.state_dict()
    state["extra.weight"] = state.pop("conv_stem.weight")
    torch.save(state, path)
    with pytest.raises(ConfigError, match=r"missing: conv_stem\.weight; unexpected: extra\.weight"):
        build_model(model_config(checkpoint=str(path), num_classes=7))


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    with path.open("wb") as f:
        pickle.dump({"w": os.system}, f, protocol=2)
    with pytest.raises(ConfigError, match=r"refusing checkpoint .* Python objects"):
        build_model(model_config(checkpoint=str(path)))


def test_position_matching_checks_every_shape(tmp_path: Path, trained: torch.nn.Module) -> None:
    renamed = {f"t{i}": v for i, v in enumerate(trained.state_dict().values())}
    path = tmp_path / "other_codebase.pth"
    torch.save(renamed, path)
    model = timm.create_model(TINY, num_classes=7)
    load_checkpoint(model, path, KeyMatch.position)
    assert _equal(model, trained)
    with pytest.raises(ConfigError, match="shape mismatch"):
        load_checkpoint(timm.create_model(TINY), path, KeyMatch.position)


def test_pretrained_from_the_offline_hub_cache(
    tmp_path: Path, trained: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the hub unreachable, weights come from the Hugging Face cache layout."""
    import huggingface_hub.constants as hf

    reference = timm.create_model(TINY, pretrained=False)
    repo = timm.models.get_pretrained_cfg(TINY).hf_hub_id
    snapshot = tmp_path / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file(reference.state_dict(), snapshot / "model.safetensors")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    assert _equal(build_model(model_config(pretrained=True)), reference)


def test_pretrained_offline_and_uncached_fails_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants as hf

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"tried the network: {args}")

    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket, "create_connection", no_network)  # no retries, no waiting
    with pytest.raises(ConfigError, match=r"no pretrained weights .* model.checkpoint=PATH"):
        build_model(model_config(pretrained=True))


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(
        ConfigError,
        match=r"unknown timm model 'resnet51'; did you mean .*"
        r"resnet50",
    ):
        build_model(model_config(name="resnet51"))


def test_any_module_by_target() -> None:
    model = build_model(
        model_config(name="tv", module={"_target_": "torchvision.models.resnet18", "weights": None})
    )
    assert type(model).__name__ == "ResNet" and not model.training


def test_default_model_has_real_imagenet_weights_offline() -> None:
    """The efficientnet_lite0 preset loads the weights shipped on PyPI; they know a cat."""
    cfg = composed()
    model = build_model(cfg.model)
    config = timm.data.resolve_model_data_config(model)
    config.update(mean=cfg.model.mean, std=cfg.model.std)
    x = timm.data.create_transform(**config)(Image.fromarray(skimage.data.chelsea()))
    with torch.inference_mode():
        top = model(x[None]).softmax(-1).topk(3).indices[0].tolist()
    assert set(top) & {281, 282, 285}  # tabby, tiger cat, Egyptian cat
