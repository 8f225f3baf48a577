"""One batch through the model: the forward pass with the hooks on, in this process or in a
loader process, and what comes out of it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.config import Precision
from pipeline.extraction.devices import computing, model_input
from pipeline.extraction.hooks import LayerHooks
from pipeline.images.loader import Batch, collate


@dataclass
class Forwarded:
    """A batch after the model: its images' indices, its failures, and each layer's pooled rows
    (tensors being copied to the host until `copied`, a CUDA event, has happened; else on it)."""

    indices: list[int]
    failures: list[tuple[int, str, str]]
    outputs: dict[str, Any]
    copied: Any = None

    def on_host(self) -> dict[str, np.ndarray]:
        if self.copied is not None:
            self.copied.synchronize()
        return {name: np.asarray(rows) for name, rows in self.outputs.items()}


def forward(hooks: LayerHooks, batch: Batch, device: torch.device) -> Forwarded:
    """One forward pass; on a GPU the pooled rows are copied to the host without waiting."""
    if batch.images is None:
        empty = {name: torch.empty((0, info.dim)) for name, info in hooks.info.items()}
        return Forwarded(batch.indices, batch.failures, empty)
    outputs = {
        name: out.float().to("cpu", non_blocking=True)
        for name, out in hooks(model_input(batch.images, device)).items()
    }
    copied = None
    if device.type == "cuda":
        copied = torch.cuda.Event()
        copied.record()
    return Forwarded(batch.indices, batch.failures, outputs, copied)


class ForwardInWorker:
    """A loader's collate_fn that runs the model in the loader process on the batch it decoded
    (`LoaderPlan.model_in_workers`): the worker, forked after the hooks were put on the model,
    has its own copy of both, and only the pooled rows travel back."""

    def __init__(self, hooks: LayerHooks, precision: Precision) -> None:
        self.hooks = hooks
        self.precision = precision

    def __call__(self, samples: list) -> Forwarded:
        cpu = torch.device("cpu")
        with computing(cpu, self.precision):
            batch = collate(samples, shared=False)  # it stays in this process
            forwarded = forward(self.hooks, batch, cpu)
        forwarded.outputs = forwarded.on_host()
        return forwarded
