"""The loader: images read, decoded and transformed in parallel processes, in batches, in order.

This module owns `ImageDataset` (one image, its failure returned, never raised), `Batch` and
`collate`/`stack` (samples to a batch, in shared memory from a loader process), `image_loader`
and `batch_loader` (torch's DataLoader, its processes started by name and single-threaded),
`balanced_batches`, and the loader processes' start and Ctrl-C handling (`_Loader`). How many
processes and threads a run gets is planned elsewhere (`pipeline.extraction.devices`).
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.images.decode import (
    decode_image,
    failure,
    opencv_threads,
    single_threaded_opencv,
)
from pipeline.images.formats import (
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_PIXELS,
    ImageError,
    read_image_file,
)
from pipeline.images.preprocess import Transform


@dataclass
class Batch:
    """Images that decoded, by manifest index, and (index, error, reason) for those that did not."""

    indices: list[int]
    images: torch.Tensor | None
    failures: list[tuple[int, str, str]]

    def pin_memory(self) -> Batch:
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


class ImageDataset(torch.utils.data.Dataset):
    """Reads, decodes and transforms one image; a failure is returned, never raised.

    Args:
        paths: the files, in manifest order.
        transform: from `build_transform` (or one that makes several tensors of an image,
            as `augment.CopyTransform` does).
        max_pixels: see `decode_image`.
        errors: per path, a reason it fails without being opened (the manifest's `error`
            column, sliced like `paths`), or None.
        min_side: see `decode_image`; `Preprocess.min_side` lets large JPEGs decode faster.
        max_file_bytes: files larger than this are refused before they are read.
    """

    def __init__(
        self,
        paths: Sequence[str],
        transform: Transform,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        *,
        errors: Sequence[str | None] | None = None,
        min_side: int | None = None,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    ) -> None:
        self.paths = list(paths)
        self.errors = None if errors is None else list(errors)
        if self.errors is not None and len(self.errors) != len(self.paths):
            raise ValueError(f"{len(self.errors)} errors for {len(self.paths)} paths")
        self.transform = transform
        self.max_pixels = max_pixels
        self.min_side = min_side
        self.max_file_bytes = max_file_bytes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, tuple[str, str] | None]:
        try:
            return index, self.transformed(self.read(index)), None
        except Exception as err:
            return index, None, failure(err)

    def read(self, index: int) -> bytes:
        """The file's bytes, or the manifest's reason it cannot be used, raised."""
        # A string, not just truthy: a manifest read back may hold NaN for "no error".
        if self.errors is not None and isinstance(reason := self.errors[index], str):
            raise ImageError(reason)
        return read_image_file(self.paths[index], self.max_file_bytes)

    def transformed(self, data: bytes) -> torch.Tensor:
        """The model's input from a file's bytes, decoded with OpenCV."""
        image = decode_image(data, self.max_pixels, min_side=self.min_side)
        return self.transform(image=image)["image"]


def collate(
    samples: list[tuple[int, torch.Tensor | None, tuple[str, str] | None]],
    *,
    shared: bool = True,
) -> Batch:
    """The samples as a Batch; `shared`: see `stack`."""
    good = [(i, x) for i, x, _ in samples if x is not None]
    return Batch(
        indices=[i for i, _ in good],
        images=stack((x for _, x in good), shared=shared),
        failures=[(i, *err) for i, _, err in samples if err is not None],
    )


def stack(images: Iterable[torch.Tensor], *, shared: bool = True) -> torch.Tensor | None:
    """The images as one batch tensor (None for none). `shared`: torch's default_collate stacks
    them straight into shared memory in a loader process, so the batch reaches the main process
    without the copy that moving a stacked tensor there costs (py-spy: a sixth of a loader
    process's time on 500x375 photos); a batch that stays in its process (the model runs there)
    is stacked in its own memory, without a fresh shared segment to fault in."""
    images = list(images)
    if not images:
        return None
    return torch.utils.data.default_collate(images) if shared else torch.stack(images)


def image_loader(
    paths: Sequence[str],
    transform: Transform,
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    errors: Sequence[str | None] | None = None,
    min_side: int | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    prefetch_factor: int | None = None,
) -> torch.utils.data.DataLoader:
    """Batches in manifest order, decoded in `num_workers` processes (keywords: ImageDataset)."""
    dataset = ImageDataset(
        paths,
        transform,
        max_image_pixels,
        errors=errors,
        min_side=min_side,
        max_file_bytes=max_file_bytes,
    )
    return batch_loader(dataset, collate, batch_size, num_workers, pin_memory, prefetch_factor)


def balanced_batches(images: int, batch_size: int, workers: int) -> list[range]:
    """Batches of `batch_size` in order, but the last ones cut so that each of `workers` loader
    processes (dealt batches in turn, as torch's DataLoader does) gets the same number of
    images: where each process also runs the model, one left with a batch more than the others
    would keep the other cores idle at the end (a whole batch of 12 MP photos is a second)."""
    workers = max(1, workers)
    full = images // (workers * batch_size) * workers * batch_size
    rest, more = divmod(images - full, workers)
    sizes = [batch_size] * (full // batch_size) + [rest + (w < more) for w in range(workers)]
    cuts = np.cumsum([0, *sizes]).tolist()
    return [range(a, b) for a, b in itertools.pairwise(cuts) if b > a]


def batch_loader(
    dataset: torch.utils.data.Dataset,
    collate_fn: Callable[[list], object],
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    prefetch_factor: int | None = None,
    *,
    balanced: bool = False,
) -> torch.utils.data.DataLoader:
    """`dataset` in order, in batches, from `num_workers` single-threaded processes (see
    `pipeline.extraction.devices.plan_loader`); `balanced`: see `balanced_batches`."""
    batching: dict[str, Any] = (
        {"batch_sampler": balanced_batches(len(dataset), batch_size, num_workers)}
        if balanced
        else {"batch_size": batch_size, "shuffle": False}
    )
    return _Loader(
        dataset,
        **batching,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        prefetch_factor=(prefetch_factor or 2) if num_workers else None,
        multiprocessing_context=_worker_context() if num_workers else None,
        worker_init_fn=_start_worker if num_workers else None,
    )


class _Loader(torch.utils.data.DataLoader):
    """A DataLoader whose processes leave Ctrl-C to the main process, which ends them.

    A terminal's Ctrl-C reaches every process of the group. A loader process that took it as
    KeyboardInterrupt while half started printed a traceback, and so did the main process when
    it came in the middle of starting them (torch's iterator, half built, fails in `__del__`).
    So the loader processes ignore SIGINT, and while they are started the main process holds a
    Ctrl-C back and raises it once they all run: then the iterator is whole and ends them.
    """

    def __iter__(self) -> Iterator[Any]:
        if not self.num_workers:
            return super().__iter__()
        with interrupts_held(), opencv_threads(1):  # no OpenCV pool across the fork
            return super().__iter__()


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """A SIGINT arriving inside the block is raised when it ends. Processes forked inside it
    inherit the handler that holds it, so they cannot be interrupted before they ignore it."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield  # handlers can only be set from the main thread, or one set outside Python
        return
    held: list[int] = []
    signal.signal(signal.SIGINT, lambda number, _frame: held.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        signal.raise_signal(signal.SIGINT)  # as it would have been: KeyboardInterrupt, usually


def _start_worker(_worker: int) -> None:
    """One thread per loader process: the processes are the parallelism (torch already sets
    its own; OpenCV's is set here, for a spawned process imports cv2 afresh and a forked one
    keeps the setting its parent gives back after the fork). Ctrl-C is the main process's to
    handle (see `_Loader`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    single_threaded_opencv()
    torch.set_num_threads(1)


def _worker_context() -> multiprocessing.context.BaseContext:
    """The loader processes' start method, named rather than inherited: inside a joblib (loky)
    worker, as Hydra's joblib launcher runs jobs, the inherited default is loky's, which cannot
    start plain processes. fork where the platform has it (as torch's default on Linux), else
    spawn."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")
