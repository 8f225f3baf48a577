"""Building the model: a timm model by name, any `torch.nn.Module` by Hydra `_target_`, weights
from the Hugging Face hub (or its local cache) or from a local state dict.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.resources
import logging
import pickle
import socket
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from hydra.utils import instantiate
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors

from pipeline.config import KeyMatch, ModelConfig
from pipeline.errors import ConfigError
from pipeline.extraction.provenance import checkpoint_path

# Which weights a run used is its provenance, and lives there; pipeline.api finds it here too.
from pipeline.extraction.provenance import weights_provenance as weights_provenance

log = logging.getLogger(__name__)
HUB_TIMEOUT_S = 3.0
# Files timm looks for in a hub repo, in its order of preference.
HUB_WEIGHT_FILES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin")


def build_model(model: ModelConfig) -> torch.nn.Module:
    """The configured model in eval mode, on the CPU, with its weights loaded."""
    if model.module is not None:
        if isinstance(target := model.module.get("_target_"), str):
            check_importable(target)
        net = instantiate(model.module, _convert_="all")
        if not isinstance(net, torch.nn.Module):
            raise ConfigError(f"model.module built a {type(net).__name__}, not a torch.nn.Module")
    else:
        net = create_timm_model(model.name, model.pretrained, model.num_classes)
    if model.checkpoint is not None:
        load_checkpoint(net, checkpoint_path(model.checkpoint), model.checkpoint_keys)
    return net.eval()


def check_importable(target: str) -> None:
    """What a `_target_` names can be imported, else one line saying what is missing (Hydra's
    own error is a page). Errors inside the code that is found are left to raise as they are."""
    parts = target.split(".")
    if not all(parts):
        raise ConfigError(f"model.module._target_ {target!r} is not a name like pkg.module.Class")
    try:
        found = importlib.import_module(parts[0])
        for depth, part in enumerate(parts[1:], start=2):
            if hasattr(found, part):
                found = getattr(found, part)
                continue
            name = ".".join(parts[:depth])
            try:
                found = importlib.import_module(name)
            except ModuleNotFoundError as err:
                if not f"{name}.".startswith(f"{err.name}."):  # a module it imports is missing
                    raise
                raise ConfigError(
                    f"cannot import {target}: {'.'.join(parts[: depth - 1])} has no {part}"
                ) from None
    except ModuleNotFoundError as err:  # the package, or a package it needs
        raise ConfigError(
            f"cannot import {target}: is {err.name} installed or on PYTHONPATH?"
        ) from None


def create_timm_model(name: str, pretrained: bool, num_classes: int | None) -> torch.nn.Module:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"unknown timm model {name!r}{hint} (list them with "
            "timm.list_models('*pattern*'), or set model.module._target_)"
        )
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    if _hub_reachable():
        return timm.create_model(name, pretrained=True, **kwargs)
    # Offline: timm would retry the hub for about a minute before failing, so look in the
    # Hugging Face cache ourselves and hand timm the file.
    cached = _cached_weights(name)
    if cached is None:
        raise ConfigError(
            f"no pretrained weights for {name!r}: the Hugging Face hub cannot be reached and they "
            "are not in its local cache. Connect once to cache them, or pass "
            "model.checkpoint=PATH, or use model=efficientnet_lite0 (weights ship with pip), "
            "or model.pretrained=false for random weights"
        )
    log.info("hub unreachable: loading %s weights from the local cache %s", name, cached)
    return timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay={"file": cached}, **kwargs
    )


def _hub_reachable() -> bool:
    if hf_constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(hf_constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=HUB_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def _cached_weights(name: str) -> str | None:
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    repo = pretrained_cfg.hf_hub_id if pretrained_cfg is not None else None
    if not repo:
        return None
    repo, _, revision = repo.partition("@")
    files = [pretrained_cfg.hf_hub_filename] if pretrained_cfg.hf_hub_filename else HUB_WEIGHT_FILES
    for filename in files:
        found = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(found, str):
            return found
    return None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors only: safetensors, or a `.pth` read with `weights_only=True` (no code runs)."""
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist: check model.checkpoint")
    if path.suffix == ".safetensors":
        try:
            return load_safetensors(path)
        except SafetensorError as err:
            raise ConfigError(
                f"checkpoint {path} is not a readable .safetensors file: {err}"
            ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (EOFError, RuntimeError) as err:  # cut short, or not a torch file at all
        raise ConfigError(f"checkpoint {path} cannot be read ({err}): is it complete?") from None
    except pickle.UnpicklingError as err:
        raise ConfigError(
            f"refusing checkpoint {path}: it holds Python objects, not only tensors "
            "(save model.state_dict(), or convert it to .safetensors)"
        ) from err
    # Training scripts often wrap the weights: {"state_dict": ...}, {"model": ...}.
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping):
        raise ConfigError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_checkpoint(model: torch.nn.Module, path: Path, keys: KeyMatch) -> None:
    """Load a local state dict strictly; a mismatch is one readable error, never a partial load."""
    state = read_state_dict(path)
    expected = model.state_dict()
    if keys is KeyMatch.position:
        if len(state) != len(expected):
            raise ConfigError(
                f"checkpoint {path} has {len(state)} tensors, the model "
                f"{len(expected)}: it cannot be matched by position"
            )
        state = dict(zip(expected, state.values(), strict=True))
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
        for label, items in (("missing", missing), ("unexpected", extra), ("shape mismatch", wrong))
        if items
    ]
    if problems:
        raise ConfigError(f"checkpoint {path} does not fit the model ({'; '.join(problems)})")
    model.load_state_dict(state, strict=True)
