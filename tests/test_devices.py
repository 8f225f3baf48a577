"""How the cores are shared (the loader plan), which decoder runs, and what the loader's processes
really run with."""

from __future__ import annotations

import logging
import resource

import cv2
import pytest
import torch

from pipeline import devices, gpu_decode
from pipeline.config import Decode
from pipeline.data import batch_loader
from pipeline.devices import plan_loader, resolve_decode, torch_threads
from pipeline.errors import ConfigError

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


@pytest.mark.parametrize("cores", [1, 2, 16, 64])
def test_on_the_cpu_every_core_serves_both_the_model_and_the_loader(
    cores: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(devices, "available_cores", lambda: cores)
    plan = plan_loader(None, batches=1000, device=CPU)
    assert plan.workers == cores and plan.main_threads == cores
    assert plan.prefetch_factor and not plan.pin_memory


@pytest.mark.parametrize("cores", [1, 2, 16, 64])
def test_on_a_gpu_every_core_but_one_decodes(cores: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """No cap at 8 workers: a 64-core GPU box decodes on 63 of them."""
    monkeypatch.setattr(devices, "available_cores", lambda: cores)
    plan = plan_loader(None, batches=1000, device=CUDA)
    assert plan.workers == max(1, cores - 1)
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
    cv2.setNumThreads(2)  # the parent's own setting is not what the workers run with
    try:
        loader = batch_loader(_Settings(), list, 1, 2, False, 2)
        seen = [sample for batch in loader for sample in batch]
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
    assert plan_loader(None, batches=1000, device=CPU).main_threads == 16


def _page_faults_of_a_large_tensor() -> int:
    """Minor page faults while a 64 MiB tensor (over any mmap threshold glibc sets itself) is
    made, written and freed."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(64 * 2**20 // 4)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(devices._glibc() is None, reason="a setting of glibc's malloc")
def test_freed_memory_is_reused_while_kept_and_given_back_after() -> None:
    fresh = _page_faults_of_a_large_tensor()  # a mapping of its own, zeroed page by page
    with devices.reusing_freed_memory():
        for _ in range(8):  # the heap grows until its free blocks fit an aligned request
            _page_faults_of_a_large_tensor()
        kept = max(_page_faults_of_a_large_tensor() for _ in range(3))
    after = _page_faults_of_a_large_tensor()
    assert fresh > 0 and kept <= fresh / 10
    assert after > kept and after >= fresh / 2  # glibc's own behaviour again
