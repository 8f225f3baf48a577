"""Where and how fast to compute: the device, its precision and the loader's processes, chosen
from the machine when the config says `auto`."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from pipeline.config import Decode, Precision
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)
AUTOCAST_DTYPES = {Precision.fp16: torch.float16, Precision.bf16: torch.bfloat16}


@contextlib.contextmanager
def computing(device: torch.device, precision: Precision) -> Iterator[None]:
    """How the model runs wherever it runs: inference mode, under autocast where `precision`
    is fp16 or bf16."""
    dtype = AUTOCAST_DTYPES.get(precision)
    with (
        torch.inference_mode(),
        torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
    ):
        yield


def resolve_device(device: str) -> torch.device:
    """auto: CUDA when there is a GPU, else the CPU; a CUDA device that is not there is a
    config error, not a crash."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError(
            f"device={device!r} is not a device: use auto, cpu, cuda or cuda:N"
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but torch sees no CUDA GPU here: use device=auto")
    return resolved


def resolve_precision(precision: Precision, device: torch.device) -> Precision:
    """auto: bf16 autocast on GPUs that have it, else fp16 on CUDA; fp32 on the CPU."""
    if precision is not Precision.auto:
        return precision
    if device.type != "cuda":
        return Precision.fp32
    return Precision.bf16 if torch.cuda.is_bf16_supported() else Precision.fp16


def resolve_decode(decode: Decode, device: torch.device) -> Decode:
    """auto: gpu on CUDA when torchvision's GPU decoder works there, else cpu. gpu off CUDA,
    or where that decoder does not work, is a config error."""
    if decode is Decode.cpu:
        return decode
    if device.type != "cuda":
        if decode is Decode.gpu:
            raise ConfigError(f"decode=gpu needs a CUDA device, and this run is on {device}")
        return Decode.cpu
    from pipeline.images.gpu_decode import decoder_problem  # torchvision, only for this choice

    problem = decoder_problem(device)
    if problem is None:
        return Decode.gpu
    if decode is Decode.gpu:
        raise ConfigError(
            f"decode=gpu: torchvision cannot decode JPEGs on {device} ({problem}): use decode=cpu"
        )
    log.info("decode=auto: decoding on the CPU, as torchvision cannot on %s (%s)", device, problem)
    return Decode.cpu


def place_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model in inference mode on `device`, its 4-D weights channels-last. Convolutions
    run faster in that layout on a GPU (tensor cores) and on the CPU as well (oneDNN):
    benchmarks/forward_bench.py on 2 cores, batch 32: efficientnet_lite0 1.81x, resnet50 1.60x,
    efficientnet_b0 1.71x, resnet18 1.43x, convnext_tiny 1.01x, ViTs unchanged, the outputs
    equal to 1 - cosine < 3e-7."""
    return model.eval().to(device, memory_format=torch.channels_last)


def model_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on `device` in the layout `place_model` gives the model (a pinned batch is
    copied to a GPU without blocking)."""
    return images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


# glibc's malloc.h: mallopt's parameters and their defaults.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """This process's C library where it is glibc (the one with mallopt and malloc_trim)."""
    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):  # Windows: no process-wide C library to open
        return None
    has = all(hasattr(libc, name) for name in ("mallopt", "malloc_trim", "gnu_get_libc_version"))
    return libc if has else None


def keep_freed_memory() -> None:
    """glibc's malloc keeps what torch frees, for the next batch to reuse.

    glibc gives each block over 32 MiB a mapping of its own and unmaps it on free, so every
    batch's large activations (a resnet stem's output is 100 MB at batch 32) came from fresh
    pages, each one faulted in and zeroed by the kernel: a third to two thirds of the model's
    time on the CPU (2 cores, batch 32: efficientnet_lite0 76 -> 220 images/s, resnet18 87 ->
    128, peak memory unchanged). With no mappings and no trimming, freed blocks stay in the heap
    and the next batch takes them. (glibc reads no setting for this after start: MALLOC_MMAP_MAX_
    in the environment only works for processes started with it.) A no-op elsewhere than glibc.
    """
    if (libc := _glibc()) is not None:
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)


def give_back_freed_memory() -> None:
    """glibc's defaults again (its self-tuning thresholds stay off), and the free memory
    returned to the system."""
    if (libc := _glibc()) is not None:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)


@contextlib.contextmanager
def reusing_freed_memory() -> Iterator[None]:
    """`keep_freed_memory` for the block; a notebook gets its memory back after."""
    keep_freed_memory()
    try:
        yield
    finally:
        give_back_freed_memory()


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class LoaderPlan:
    """How the cores are shared between the loader's processes and the model.

    Attributes:
        workers: loader processes (0: decode in the main process).
        main_threads: torch's intra-op threads in the main process, where the model runs.
        prefetch_factor: batches each worker prepares ahead (None without workers).
        pin_memory: page-locked batches, for asynchronous copies to a GPU.
        model_in_workers: each loader process also runs the model on the batches it decodes,
            one torch thread each, and hands on only the pooled rows (the CPU's plan).
    """

    workers: int
    main_threads: int
    prefetch_factor: int | None
    pin_memory: bool
    model_in_workers: bool = False

    def describe(self) -> str:
        if not self.workers:
            return f"decoding in the main process, {self.main_threads} torch threads"
        if self.model_in_workers:
            return (
                f"{self.workers} loader processes, each decoding its batches and running the "
                f"model on them (1 thread each, {self.prefetch_factor} batches ahead)"
            )
        return (
            f"{self.workers} loader processes (1 thread each, {self.prefetch_factor} "
            f"batches ahead), {self.main_threads} torch threads in the main process"
        )


def plan_loader(
    num_workers: int | None, batches: int, device: torch.device, *, model_in_main: bool = False
) -> LoaderPlan:
    """Workers and threads from the cores and the device.

    On the CPU, where there is a worker for every core, each worker decodes a batch and runs
    the model on it, single-threaded, and hands on the pooled rows: the cores are never shared
    between the decoding and torch's threads, whose operators wait for a preempted thread at
    their end (benchmarks/throughput_bench.py, 2 cores, 500x375 photos: 0.98-1.00 of the bound
    for the embedding layer and 0.95-1.01 for an early one, against 0.87-0.91 and 0.67-0.77
    with the model on every core in the main process beside the workers). That second plan is kept
    where the model must stay in the main process (`model_in_main`: compile=true, decode=gpu;
    fewer workers than cores; no fork) or where OMP_NUM_THREADS gives this job a share of the
    node. On a GPU the model needs little CPU and decoding is what keeps it fed: a worker for
    every core but one, which is left to the main process (batches in, copies out, writing).
    `num_workers` (null: automatic) sets the workers; more than the cores is capped, with a
    warning. A single batch is decoded in the main process: starting workers costs more.
    OMP_NUM_THREADS, where set, is torch's thread count.
    """
    if num_workers is not None and num_workers < 0:
        raise ConfigError(f"num_workers must be 0 or more (or null: automatic), got {num_workers}")
    cores = available_cores()
    gpu = device.type == "cuda"
    if num_workers is None:
        workers = 0 if batches <= 1 else min(max(1, cores - 1) if gpu else cores, batches)
    elif num_workers > cores:
        log.warning(
            "num_workers=%d is more than the %d cores here: using %d", num_workers, cores, cores
        )
        workers = cores
    else:
        workers = num_workers
    user_threads = _threads_set_by_user()
    model_in_workers = (
        not gpu
        and not model_in_main
        and workers == cores > 1
        and user_threads is None
        and "fork" in multiprocessing.get_all_start_methods()  # the hooked model, not pickled
    )
    return LoaderPlan(
        workers=workers,
        main_threads=user_threads
        or (max(1, cores - workers) if gpu or model_in_workers else cores),
        prefetch_factor=(4 if gpu else 2) if workers else None,
        pin_memory=gpu,
        model_in_workers=model_in_workers,
    )


def _threads_set_by_user() -> int | None:
    """OMP_NUM_THREADS, where it is set to a number: a share of a node given to this job, or
    one thread for results that must not depend on the machine (sums split over threads add
    in another order)."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set for the block, and given back after (a notebook keeps its
    own setting)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
