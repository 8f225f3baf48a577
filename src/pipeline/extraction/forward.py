"""One batch through the model: the forward pass with the hooks on, in this process or in a
loader process, and what comes out of it."""

from __future__ import annotations

import logging
import multiprocessing
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from pipeline.config import Precision
from pipeline.extraction.devices import (
    LoaderMemory,
    computing,
    keep_freed_memory,
    model_input,
    private_memory,
)
from pipeline.extraction.hooks import LayerHooks
from pipeline.images.decode import opencv_threads, single_threaded_opencv
from pipeline.images.loader import Batch, collate, interrupts_held

log = logging.getLogger(__name__)


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


def loader_memory(
    hooks: LayerHooks, dataset: torch.utils.data.Dataset, batch_size: int, precision: Precision
) -> LoaderMemory | None:
    """What a loader process running the model holds of its own, measured rather than
    estimated from the model: its activations are only part of it, beside the decoded photos,
    the heap that glibc keeps (`keep_freed_memory`) and the parent's pages it writes to. A
    process forked as the loader's are, one thread, decodes the first batch of `dataset` and
    runs the model on it; its private memory after decoding, and after the forward pass, is
    what it holds. (A full garbage collection would add the pages of every object shared with
    the main process, 0.16 GB under pytest, for 1.5 s; a loader process seldom meets one, as
    what it inherits counts as long-lived.) The cost is one batch on one core. None where it
    cannot be measured (no /proc, no image decoded, the process died)."""
    if private_memory() is None or "fork" not in multiprocessing.get_all_start_methods():
        return None
    started = time.perf_counter()
    receive, send = multiprocessing.Pipe(duplex=False)
    process = multiprocessing.get_context("fork").Process(
        target=_measure, args=(send, hooks, dataset, batch_size, precision), daemon=True
    )
    try:
        # As the loader's: no OpenCV pool across the fork, and a Ctrl-C while it forks raised
        # once it has (inside the fork, Python would only print it).
        with interrupts_held(), opencv_threads(1):
            process.start()
        send.close()
        found = receive.recv() if receive.poll(None) else None
    except EOFError:  # it died first (killed for memory, perhaps)
        found = None
    finally:
        if process.pid is not None:
            process.kill()
            process.join()
        send.close()
        receive.close()
    log.debug("loader memory measured in %.1f s: %s", time.perf_counter() - started, found)
    return LoaderMemory(*found) if found else None


def _measure(
    send: Connection,
    hooks: LayerHooks,
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    precision: Precision,
) -> None:
    """In the forked process: `loader_memory`'s one batch, its three sizes sent back."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    single_threaded_opencv()
    torch.set_num_threads(1)
    keep_freed_memory()
    samples = [dataset[i] for i in range(min(batch_size, len(dataset)))]
    batch = collate(samples, shared=False)
    if batch.images is None:
        send.send(None)
        return
    decoded = private_memory()
    cpu = torch.device("cpu")
    with computing(cpu, precision):
        forward(hooks, batch, cpu)
    send.send((private_memory(), decoded, batch.images.nbytes))
