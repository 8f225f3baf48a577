"""Where and how fast to compute: the device, its precision and the loader's processes, chosen
from the machine when the config says `auto`."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

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


# A cgroup limit at or above this is no limit (cgroup v1 writes "unlimited" as ~2^63).
_NO_LIMIT = 2**60


def available_memory(
    proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")
) -> int | None:
    """Bytes this process can still take: the smaller of the kernel's MemAvailable and the room
    its cgroup leaves (cgroup v2 `memory.max`, v1 `memory.limit_in_bytes`, at its own level and
    at every level above, less what the group holds but the page cache it can drop, its
    inactive files). None where none of them can be read (not Linux)."""
    found = [_meminfo_available(proc / "meminfo"), *_cgroup_rooms(proc / "self/cgroup", cgroups)]
    known = [bytes_ for bytes_ in found if bytes_ is not None]
    return max(0, min(known)) if known else None


def _meminfo_available(meminfo: Path) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_rooms(listing: Path, root: Path) -> list[int | None]:
    """The room left at each level of this process's cgroups, v2 and v1 (memory controller)."""
    try:
        lines = listing.read_text().splitlines()
    except OSError:
        return []
    rooms: list[int | None] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: /sys/fs/cgroup itself, or its unified/ beside v1's
            base = root if (root / "cgroup.controllers").is_file() else root / "unified"
            files = ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            base, files = root / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                            "total_inactive_file")  # fmt: skip
        else:
            continue
        # In a container the group is often mounted as the root, under a path that is not there.
        level = base / path.lstrip("/")
        level = level if level.is_dir() else base
        while True:
            rooms.append(_cgroup_room(level, *files))
            if level == base or base not in level.parents:
                break
            level = level.parent
    return rooms


def _cgroup_room(level: Path, limit_file: str, usage_file: str, inactive: str) -> int | None:
    """A cgroup's limit less what it holds beyond its inactive page cache; None for no limit."""
    try:
        limit_text = (level / limit_file).read_text().strip()
        if limit_text == "max" or int(limit_text) >= _NO_LIMIT:
            return None
        usage = int((level / usage_file).read_text())
        stat = dict(line.split() for line in (level / "memory.stat").read_text().splitlines())
        return int(limit_text) - (usage - int(stat.get(inactive, 0)))
    except (OSError, ValueError):
        return None


def private_memory() -> int | None:
    """Bytes of this process's memory that no other process shares (its private pages, from
    /proc/self/smaps_rollup): in a forked process, what it holds beyond its parent's pages.
    None where the kernel does not say."""
    try:
        lines = Path("/proc/self/smaps_rollup").read_text().splitlines()
    except OSError:
        return None
    kb = [
        int(line.split()[1])
        for line in lines
        if line.startswith(("Private_Clean:", "Private_Dirty:"))
    ]
    return sum(kb) * 1024 if kb else None


@dataclass(frozen=True)
class LoaderMemory:
    """What a loader process holds of its own (beyond what it shares with the main process),
    measured on one batch (`pipeline.extraction.forward.loader_memory`), in bytes.

    Attributes:
        model: decoding a batch and running the model on it.
        decode: decoding a batch, without the model.
        batch: the decoded batch tensor, which a decoding process hands on in shared memory.
    """

    model: int
    decode: int
    batch: int


# What the plan counts for a loader process: twice what it held after one batch. Over a run its
# heap grows, as batches of other photos leave it in pieces that glibc keeps (`keep_freed_memory`)
# and as the main process writes to pages they shared: with resnet50 (random weights) at batch
# 32 on the demo photos, 2 cores, one batch measured 0.48 GB where the run's two processes reached
# 0.84 and 1.03 GB (another run: 0.59 and 0.81; four batches in one process: 0.64 to 0.84 GB).
MEMORY_HEADROOM = 2.0
# Fewer loader processes running the model, while they keep this share of the cores busy; below
# it, the model in the main process on every core beside processes that only decode, which
# reached 0.67-0.91 of the bound in benchmarks/throughput_bench.py.
MODEL_PROCESS_SHARE = 0.75


def _gb(size: float) -> str:
    return f"{size / 2**30:.1f} GB" if size >= 0.1 * 2**30 else f"{size / 2**20:.0f} MB"


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
        memory: why the plan is not the usual one, where the memory decided it.
    """

    workers: int
    main_threads: int
    prefetch_factor: int | None
    pin_memory: bool
    model_in_workers: bool = False
    memory: str = ""

    def describe(self) -> str:
        if not self.workers:
            plan = f"decoding in the main process, {self.main_threads} torch threads"
        elif self.model_in_workers:
            plan = (
                f"{self.workers} loader processes, each decoding its batches and running the "
                f"model on them (1 thread each, {self.prefetch_factor} batches ahead)"
            )
        else:
            plan = (
                f"{self.workers} loader processes (1 thread each, {self.prefetch_factor} "
                f"batches ahead), {self.main_threads} torch threads in the main process"
            )
        return f"{plan}; {self.memory}" if self.memory else plan


def plan_loader(
    num_workers: int | None,
    batches: int,
    device: torch.device,
    *,
    model_in_main: bool = False,
    memory: Callable[[], LoaderMemory | None] | None = None,
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

    Where the model would run in a loader process per core, `memory` (which measures what such
    a process holds) and `available_memory` decide whether they all fit: see `fit_memory`.
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
    plan = LoaderPlan(
        workers=workers,
        main_threads=user_threads
        or (max(1, cores - workers) if gpu or model_in_workers else cores),
        prefetch_factor=(4 if gpu else 2) if workers else None,
        pin_memory=gpu,
        model_in_workers=model_in_workers,
    )
    return fit_memory(plan, cores, memory) if model_in_workers and memory else plan


def fit_memory(
    plan: LoaderPlan, cores: int, measure: Callable[[], LoaderMemory | None]
) -> LoaderPlan:
    """`plan` (a loader process per core, each running the model) where they all fit in the
    memory available; else fewer of them, while they keep MODEL_PROCESS_SHARE of the cores
    busy; else the model in the main process on every core, beside as many processes that
    only decode as the memory left holds (none: decoding in the main process too). Each
    process counts as its measured memory times MEMORY_HEADROOM. The plan says why in its
    description. Unchanged where the memory available or the need cannot be known."""
    available = available_memory()
    if available is None:
        return plan
    need = measure()
    if need is None:
        return plan
    log.debug("loader: one batch measured %s", need)
    per_model = need.model * MEMORY_HEADROOM
    if plan.workers * per_model <= available:
        return plan
    fit = int(available // per_model)
    each = f"each needs ~{_gb(per_model)} and {_gb(available)} is available"
    if fit >= max(1, MODEL_PROCESS_SHARE * cores):
        return replace(
            plan, workers=fit, main_threads=max(1, cores - fit),
            memory=f"not one per core ({cores}): {each}",
        )  # fmt: skip
    per_decoder = (need.decode + 2 * need.batch) * MEMORY_HEADROOM  # 2 batches ahead, shared
    decoders = min(plan.workers, int(max(0.0, available - per_model) // max(1.0, per_decoder)))
    why = (
        f"the model in the main process, as {fit} loader processes running it would keep "
        f"fewer than {MODEL_PROCESS_SHARE:.0%} of the {cores} cores busy: {each}"
    )
    if per_model > available:
        log.warning(
            "one batch through the model needs ~%s and %s is available: a smaller batch_size "
            "needs less",
            _gb(per_model),
            _gb(available),
        )
    return LoaderPlan(
        workers=decoders,
        main_threads=cores,
        prefetch_factor=2 if decoders else None,
        pin_memory=False,
        memory=why,
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
