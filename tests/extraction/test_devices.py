"""How the cores are shared (the loader plan), which decoder runs, and what the loader's processes
really run with."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import cv2
import pytest
import torch

from pipeline.config import Decode
from pipeline.errors import ConfigError
from pipeline.extraction import devices
from pipeline.extraction.devices import plan_loader, resolve_decode, torch_threads
from pipeline.images import gpu_decode
from pipeline.images.loader import balanced_batches, batch_loader

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


@pytest.mark.parametrize("cores", [2, 16, 64])
def test_on_the_cpu_every_core_decodes_and_runs_the_model(
    cores: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loader process per core runs the model on the batches it decodes, single-threaded;
    the main process only writes."""
    monkeypatch.setattr(devices, "available_cores", lambda: cores)
    plan = plan_loader(None, batches=1000, device=CPU)
    assert plan.workers == cores and plan.model_in_workers and plan.main_threads == 1
    assert plan.prefetch_factor and not plan.pin_memory
    assert "running the model" in plan.describe()


def test_where_the_model_stays_in_the_main_process_it_has_every_core(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fewer workers than cores, a model that must stay (compiled, or fed by the GPU's
    decoder), one core, or a share of the node set by
    OMP_NUM_THREADS: the model runs in the main process beside the decoding workers."""
    monkeypatch.setattr(devices, "available_cores", lambda: 4)
    for plan in (
        plan_loader(2, batches=1000, device=CPU),
        plan_loader(None, batches=1000, device=CPU, model_in_main=True),
        plan_loader(None, batches=3, device=CPU),
    ):
        assert not plan.model_in_workers and plan.main_threads == 4
        assert "running the model" not in plan.describe()
    monkeypatch.setattr(devices, "available_cores", lambda: 1)
    one = plan_loader(None, batches=1000, device=CPU)
    assert one.workers == 1 and not one.model_in_workers and one.main_threads == 1
    monkeypatch.setattr(devices, "available_cores", lambda: 4)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    shared = plan_loader(None, batches=1000, device=CPU)
    assert shared.workers == 4 and not shared.model_in_workers and shared.main_threads == 2


@pytest.mark.parametrize("cores", [1, 2, 16, 64])
def test_on_a_gpu_every_core_but_one_decodes(cores: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """No cap at 8 workers: a 64-core GPU box decodes on 63 of them."""
    monkeypatch.setattr(devices, "available_cores", lambda: cores)
    plan = plan_loader(None, batches=1000, device=CUDA)
    assert plan.workers == max(1, cores - 1) and not plan.model_in_workers
    assert plan.main_threads == max(1, cores - plan.workers)
    assert plan.pin_memory and plan.prefetch_factor


def test_few_batches_few_workers_and_one_batch_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "available_cores", lambda: 16)
    assert plan_loader(None, batches=3, device=CPU).workers == 3
    single = plan_loader(None, batches=1, device=CPU)
    assert single.workers == 0 and single.prefetch_factor is None
    assert "main process" in single.describe()


def test_asked_for_workers_are_kept_up_to_the_cores(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(devices, "available_cores", lambda: 4)
    assert plan_loader(1, batches=1000, device=CPU).workers == 1
    with caplog.at_level(logging.WARNING):
        assert plan_loader(9, batches=1000, device=CPU).workers == 4
    assert "num_workers=9 is more than the 4 cores" in caplog.text
    with pytest.raises(ConfigError, match="num_workers must be 0 or more"):
        plan_loader(-1, batches=1000, device=CPU)


def test_torch_threads_are_given_back() -> None:
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_decode_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_decode(Decode.cpu, CUDA) is Decode.cpu
    assert resolve_decode(Decode.auto, CPU) is Decode.cpu
    with pytest.raises(ConfigError, match="decode=gpu needs a CUDA device"):
        resolve_decode(Decode.gpu, CPU)
    monkeypatch.setattr(gpu_decode, "decoder_problem", lambda device: None)
    assert resolve_decode(Decode.auto, CUDA) is Decode.gpu
    assert resolve_decode(Decode.gpu, CUDA) is Decode.gpu
    monkeypatch.setattr(gpu_decode, "decoder_problem", lambda device: "no nvJPEG")
    assert resolve_decode(Decode.auto, CUDA) is Decode.cpu
    with pytest.raises(ConfigError, match=r"cannot decode JPEGs on cuda \(no nvJPEG\)"):
        resolve_decode(Decode.gpu, CUDA)


def test_the_decoder_probe_works_where_torchvision_decodes() -> None:
    assert gpu_decode.decoder_problem(CPU) is None


class _Settings(torch.utils.data.Dataset):
    """What a loader process runs with: OpenCV's and torch's threads."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> tuple[int, int, int]:
        return cv2.getNumThreads(), torch.get_num_threads()


def test_loader_processes_are_single_threaded() -> None:
    before = cv2.getNumThreads()
    cv2.setNumThreads(2)  # the parent's own setting is not what the workers run with
    try:
        loader = batch_loader(_Settings(), list, 1, 2, False, 2)
        seen = [sample for batch in loader for sample in batch]
    finally:
        cv2.setNumThreads(before)
    assert seen == [(1, 1)] * 2


def test_the_loader_gives_the_callers_opencv_threads_back() -> None:
    """One OpenCV thread while the loader processes are forked (no pool across the fork), then
    the caller's own setting again: a notebook keeps it."""
    cv2.setNumThreads(3)
    try:
        loader = batch_loader(_Settings(), list, 1, 2, False, 2)
        seen = [sample for batch in loader for sample in batch]
        assert cv2.getNumThreads() == 3
    finally:
        cv2.setNumThreads(1)
    assert seen == [(1, 1)] * 2


def test_omp_num_threads_set_by_the_user_is_torchs_thread_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A job given a share of a node keeps to it; the loader workers are still planned."""
    monkeypatch.setattr(devices, "available_cores", lambda: 16)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert plan_loader(None, batches=1000, device=CPU).main_threads == 3
    assert plan_loader(None, batches=1000, device=CPU).workers == 16
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
    assert plan_loader(None, batches=1000, device=CPU).main_threads == 1  # model in the workers


_FAULTS = """
import json, resource, torch
from pipeline.extraction import devices

def faults():  # minor page faults while a 64 MiB tensor is made, written and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(64 * 2**20 // 4)  # over any mmap threshold glibc sets itself
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

fresh = faults()
with devices.reusing_freed_memory():
    for _ in range(8):  # the heap grows until its free blocks fit an aligned request
        faults()
    kept = max(faults() for _ in range(3))
print(json.dumps({"fresh": fresh, "kept": kept, "after": faults()}))
"""


@pytest.mark.skipif(devices._glibc() is None, reason="a setting of glibc's malloc")
def test_freed_memory_is_reused_while_kept_and_given_back_after() -> None:
    """In a process of its own: how the heap was used before decides how soon it settles."""
    done = subprocess.run(
        [sys.executable, "-c", _FAULTS], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    faults = json.loads(done.stdout.splitlines()[-1])
    assert faults["fresh"] > 0 and faults["kept"] <= faults["fresh"] / 10  # no fresh pages
    assert faults["after"] >= faults["fresh"] / 2  # glibc's own behaviour again


@pytest.mark.parametrize(
    ("images", "batch_size", "workers"),
    [(1000, 32, 2), (400, 32, 2), (200, 32, 2), (65, 32, 2), (100, 10, 3), (5, 32, 2), (7, 2, 16)],
)
def test_balanced_batches_give_every_loader_process_the_same_share(
    images: int, batch_size: int, workers: int
) -> None:
    """Dealt in turn, as torch's DataLoader deals them, the batches leave no process more than
    one image ahead of another, keep the order, and are never larger than asked."""
    batches = balanced_batches(images, batch_size, workers)
    assert [i for batch in batches for i in batch] == list(range(images))
    assert all(0 < len(batch) <= batch_size for batch in batches)
    shares = [sum(len(b) for b in batches[w::workers]) for w in range(workers)]
    assert max(shares) - min(shares) <= 1
    assert sum(len(b) == batch_size for b in batches) >= images // batch_size - workers
