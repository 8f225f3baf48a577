"""Where and how fast to compute: the device, its precision and the loader's processes, chosen
from the machine when the config says `auto`."""

from __future__ import annotations

import os

import torch

from pipeline.config import Precision
from pipeline.errors import ConfigError

AUTOCAST_DTYPES = {Precision.fp16: torch.float16, Precision.bf16: torch.bfloat16}


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


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_workers(num_workers: int | None, batches: int) -> int:
    """null: one loader process per core (at most 8), and none for a single batch. More than
    the cores only slows decoding down, so larger requests are capped, with a warning."""
    if num_workers is not None and num_workers < 0:
        raise ConfigError(f"num_workers must be 0 or more (or null: automatic), got {num_workers}")
    cores = available_cores()
    if num_workers is None:
        return 0 if batches <= 1 else min(8, cores, batches)
    if num_workers > cores:
        import logging

        logging.getLogger(__name__).warning(
            "num_workers=%d is more than the %d cores here: using %d", num_workers, cores, cores
        )
        return cores
    return num_workers
