"""engine=local: batches computed on this machine, by a DataLoader's processes and the model in
this process (or in the loader processes, where the plan puts it there)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import torch

from pipeline.config import Decode, PipelineConfig
from pipeline.extraction.devices import (
    LoaderMemory,
    LoaderPlan,
    plan_loader,
    resolve_decode,
    resolve_device,
    resolve_precision,
    torch_threads,
)
from pipeline.extraction.forward import Forwarded, ForwardInWorker, forward, loader_memory
from pipeline.extraction.hooks import HookPlan, LayerHooks
from pipeline.images.gpu_decode import DeviceDecoder, JpegDataset, collate_jpegs
from pipeline.images.loader import Batch, ImageDataset, batch_loader, collate
from pipeline.images.preprocess import Preprocess

log = logging.getLogger(__name__)


class LocalEngine:
    """The device, precision and decoder this machine offers for the config, and its batches."""

    name = "local"

    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.decode = resolve_decode(cfg.decode, self.device)
        self.device_name = self.device.type

    def batches(
        self,
        hooks: LayerHooks,
        hook_plan: HookPlan,
        dataset: ImageDataset,
        preprocess: Preprocess,
    ) -> Iterator[Forwarded]:
        """Every batch of `dataset` through the model, in order. The loader is planned (and its
        settings checked) here, before the loop's progress bar starts."""
        del hook_plan  # the hooks are on this process's model already
        plan = extraction_plan(
            self.cfg,
            len(dataset),
            self.device,
            self.decode,
            lambda: loader_memory(hooks, dataset, self.cfg.batch_size, self.precision),
        )
        log.info("loader: %s", plan.describe())
        return self._forwarded(plan, hooks, dataset, preprocess)

    def _forwarded(
        self, plan: LoaderPlan, hooks: LayerHooks, dataset: ImageDataset, preprocess: Preprocess
    ) -> Iterator[Forwarded]:
        batch_size = self.cfg.batch_size
        with torch_threads(plan.main_threads):
            if plan.model_in_workers:
                yield from batch_loader(
                    dataset,
                    ForwardInWorker(hooks, self.precision),
                    batch_size,
                    plan.workers,
                    plan.pin_memory,
                    plan.prefetch_factor,
                    balanced=True,
                )
                return
            for batch in loader_batches(dataset, batch_size, plan, preprocess, self.device):
                yield forward(hooks, batch, self.device)

    def tags(self) -> dict[str, str]:
        return {}

    def close(self) -> None:
        pass


def extraction_plan(
    cfg: PipelineConfig,
    images: int,
    device: torch.device,
    decode: Decode,
    memory: Callable[[], LoaderMemory | None] | None = None,
) -> LoaderPlan:
    """The loader plan for extracting `images` images (`devices.plan_loader`): the model stays
    in the main process when it is compiled there, or fed batches that the GPU's decoder makes
    there; `memory` measures what a loader process running the model holds, for the plan to
    fit in the memory available."""
    return plan_loader(
        cfg.num_workers,
        -(-images // cfg.batch_size),
        device,
        model_in_main=cfg.compile or decode is Decode.gpu,
        memory=memory,
    )


def loader_batches(
    dataset: ImageDataset,
    batch_size: int,
    plan: LoaderPlan,
    preprocess: Preprocess,
    device: torch.device,
) -> Iterable[Batch]:
    """The loader's batches; a JpegDataset's JPEGs decoded on `device` as they arrive."""
    gpu = isinstance(dataset, JpegDataset)
    loader = batch_loader(
        dataset,
        collate_jpegs if gpu else collate,
        batch_size,
        plan.workers,
        plan.pin_memory,
        plan.prefetch_factor,
    )
    return map(DeviceDecoder(dataset, preprocess, device), loader) if gpu else loader
