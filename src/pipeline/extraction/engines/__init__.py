"""Where an extraction's batches are computed. Every engine yields `Forwarded` batches in
dataset order to the one loop (`extraction.loop`), so chunking, resume, the failure guard and
the publish are one code path whichever computes them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from pipeline.config import Engine as EngineName
from pipeline.config import PipelineConfig

if TYPE_CHECKING:
    from collections.abc import Iterator

    from pipeline.config import Decode, Precision
    from pipeline.extraction.forward import Forwarded
    from pipeline.extraction.hooks import HookPlan, LayerHooks
    from pipeline.images.loader import ImageDataset
    from pipeline.images.preprocess import Preprocess


class Engine(Protocol):
    name: str  # "local" or "ray": in the metadata and the staging key
    device: torch.device  # where this process describes the layers
    device_name: str  # where the model computes, for the metadata
    precision: Precision
    decode: Decode

    def batches(
        self, hooks: LayerHooks, hook_plan: HookPlan, dataset: ImageDataset, preprocess: Preprocess
    ) -> Iterator[Forwarded]: ...

    def tags(self) -> dict[str, str]: ...

    def close(self) -> None: ...


def start_engine(cfg: PipelineConfig, model: torch.nn.Module) -> Engine:
    """The config's engine, ready to compute batches of `model` (Ray loads only when asked)."""
    if cfg.engine.name is EngineName.ray:
        from pipeline.extraction.engines.ray import RayEngine

        return RayEngine(cfg, model)
    from pipeline.extraction.engines.local import LocalEngine

    return LocalEngine(cfg)
