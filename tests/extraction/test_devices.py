"""How the cores are shared (the loader plan), which decoder runs, and what the loader's processes
really run with."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import timm
import torch

from pipeline.config import Decode, Pool, Precision
from pipeline.errors import ConfigError
from pipeline.extraction import devices
from pipeline.extraction.devices import (
    LoaderMemory,
    available_memory,
    place_model,
    plan_loader,
    resolve_decode,
    torch_threads,
)
from pipeline.extraction.forward import loader_memory
from pipeline.extraction.hooks import LayerHooks
from pipeline.images import gpu_decode
from pipeline.images.loader import ImageDataset, balanced_batches, batch_loader
from pipeline.images.preprocess import build_transform, resolve_preprocess

from conftest import N_PHOTOS, SMALL, run_cli
from patched import patched_env

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


GB = 2**30
# resnet50 at batch 32: a loader process running it counts as ~0.8 GB (0.4 measured, x2).
RESNET50 = LoaderMemory(model=int(0.4 * GB), decode=int(0.08 * GB), batch=int(0.02 * GB))


def _memory(monkeypatch: pytest.MonkeyPatch, cores: int, available: float) -> list[int]:
    """`cores` cores and `available` GB of memory; the measurements of the need, counted."""
    monkeypatch.setattr(devices, "available_cores", lambda: cores)
    monkeypatch.setattr(devices, "available_memory", lambda: int(available * GB))
    return []


def _measured(calls: list[int]) -> LoaderMemory:
    calls.append(1)
    return RESNET50


@pytest.mark.parametrize("cores", [2, 16, 64])
def test_where_memory_suffices_the_plan_is_unchanged(
    cores: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _memory(monkeypatch, cores, available=cores * 0.8 + 0.1)
    plan = plan_loader(None, 1000, CPU, memory=lambda: _measured(calls))
    assert plan == plan_loader(None, 1000, CPU) and calls == [1]
    assert plan.workers == cores and plan.model_in_workers and not plan.memory


def test_fewer_loader_processes_run_the_model_where_not_all_fit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """64 cores at the defaults want 51 GB: with 45 GB, 56 processes run the model (each
    counted at ~0.8 GB), and the plan says why."""
    calls = _memory(monkeypatch, 64, available=45)
    plan = plan_loader(None, 1000, CPU, memory=lambda: _measured(calls))
    assert plan.workers == 56 and plan.model_in_workers and plan.main_threads == 8
    assert plan.describe().endswith(
        "; not one per core (64): each needs ~0.8 GB and 45.0 GB is available"
    )


def test_where_few_would_fit_the_model_runs_in_the_main_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """16 cores, 5.2 GB: 6 processes running the model would leave 10 cores idle; the model
    runs in the main process on all 16 instead, beside 16 processes that only decode (~0.24 GB
    each with their batches ahead)."""
    calls = _memory(monkeypatch, 16, available=5.2)
    plan = plan_loader(None, 1000, CPU, memory=lambda: _measured(calls))
    assert not plan.model_in_workers and plan.workers == 16 and plan.main_threads == 16
    assert plan.describe().endswith(
        "; the model in the main process, as 6 loader processes running it would keep fewer "
        "than 75% of the 16 cores busy: each needs ~0.8 GB and 5.2 GB is available"
    )
    calls = _memory(monkeypatch, 16, available=2)  # room for 5 that decode, beside the model
    plan = plan_loader(None, 1000, CPU, memory=lambda: _measured(calls))
    assert not plan.model_in_workers and plan.workers == 5 and plan.main_threads == 16


def test_where_not_even_one_batch_fits_the_main_process_does_it_all_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = _memory(monkeypatch, 8, available=0.5)
    with caplog.at_level(logging.WARNING):
        plan = plan_loader(None, 1000, CPU, memory=lambda: _measured(calls))
    assert plan.workers == 0 and plan.main_threads == 8 and not plan.model_in_workers
    assert plan.describe().startswith("decoding in the main process, 8 torch threads; the model")
    assert "one batch through the model needs ~0.8 GB and 0.5 GB is available" in caplog.text


def test_memory_is_measured_only_where_the_model_would_run_in_every_core(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A GPU, fewer workers than cores, a model that must stay in the main process, OMP_NUM_
    THREADS: no process runs the model, nothing is measured. Where the memory available or the
    need cannot be known (not Linux), the plan is today's."""
    calls = _memory(monkeypatch, 4, available=0.1)
    measure = lambda: _measured(calls)  # noqa: E731
    assert plan_loader(None, 1000, CUDA, memory=measure).workers == 3
    assert plan_loader(2, 1000, CPU, memory=measure).workers == 2
    assert plan_loader(None, 1000, CPU, model_in_main=True, memory=measure).workers == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert plan_loader(None, 1000, CPU, memory=measure).workers == 4
    assert calls == []
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert plan_loader(None, 1000, CPU, memory=lambda: None).model_in_workers
    monkeypatch.setattr(devices, "available_memory", lambda: None)
    assert plan_loader(None, 1000, CPU, memory=measure).model_in_workers and calls == []


def _files(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


MEMINFO = "MemTotal:       32000000 kB\nMemAvailable:   20000000 kB\n"


def test_available_memory_is_the_least_of_meminfo_and_every_cgroup_level(tmp_path: Path) -> None:
    """cgroup v2: the job's group (memory.max 4 GiB, 1 GiB held of which 0.25 GiB is inactive
    page cache) under a parent with less room; v1 beside it, and MemAvailable."""
    proc, cgroups = tmp_path / "proc", tmp_path / "cgroup"
    _files(proc, {"meminfo": MEMINFO, "self/cgroup": "0::/jobs/one\n"})
    _files(
        cgroups,
        {
            "cgroup.controllers": "cpu memory\n",
            "jobs/one/memory.max": f"{4 * GB}\n",
            "jobs/one/memory.current": f"{GB}\n",
            "jobs/one/memory.stat": f"anon 1\ninactive_file {GB // 4}\n",
            "jobs/memory.max": "max\n",
            "memory.max": f"{3 * GB}\n",  # the root's: no limit in practice, but read as one
            "memory.current": f"{GB}\n",
            "memory.stat": "inactive_file 0\n",
        },
    )
    assert available_memory(proc, cgroups) == 2 * GB
    (cgroups / "jobs/one/memory.max").write_text(f"{int(1.5 * GB)}\n")
    assert available_memory(proc, cgroups) == int(0.75 * GB)
    # v1 (with v2's unified/ beside it, as here), in a container whose group is its root.
    v1 = tmp_path / "v1"
    _files(proc, {"self/cgroup": "4:memory:/docker/abc\n0::/\n"})
    _files(
        v1,
        {
            "memory/memory.limit_in_bytes": f"{2 * GB}\n",
            "memory/memory.usage_in_bytes": f"{GB}\n",
            "memory/memory.stat": f"cache 5\ntotal_inactive_file {GB // 2}\n",
            "unified/memory.stat": "",
        },
    )
    assert available_memory(proc, v1) == int(1.5 * GB)
    (v1 / "memory/memory.limit_in_bytes").write_text("9223372036854771712\n")  # unlimited
    assert available_memory(proc, v1) == 20000000 * 1024
    assert available_memory(tmp_path / "none", tmp_path / "none") is None


def test_the_memory_available_here_is_known_on_linux() -> None:
    if not Path("/proc/meminfo").is_file():
        pytest.skip("Linux's /proc")
    assert 0 < available_memory() < 2**50


@pytest.mark.skipif(devices.private_memory() is None, reason="Linux's /proc/self/smaps_rollup")
def test_what_a_loader_process_running_the_model_holds_is_measured_in_a_fork(
    photos: Path,
) -> None:
    """One batch in a forked process: it holds the batch it decoded, and more once the model
    ran on it; the main process keeps its own threads. A process that dies measures nothing."""
    model = place_model(timm.create_model("test_efficientnet", pretrained=False), CPU)
    preprocess = resolve_preprocess(model, input_size=(3, 224, 224))
    dataset = ImageDataset(sorted(map(str, photos.rglob("*.png"))), build_transform(preprocess))
    threads = torch.get_num_threads()
    with LayerHooks(model, ["global_pool"], Pool.auto) as hooks:
        need = loader_memory(hooks, dataset, 4, Precision.fp32)
        assert need is not None and need.batch == 4 * 3 * 224 * 224 * 4
        assert need.model > need.decode >= need.batch
        assert torch.get_num_threads() == threads
        assert loader_memory(hooks, _Dies(), 4, Precision.fp32) is None


class _Dies(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> None:
        os._exit(9)  # as the kernel's OOM killer would end it


@pytest.mark.slow
@pytest.mark.skipif(devices.available_cores() < 2, reason="one core: the model is in the main")
def test_with_little_memory_an_extraction_keeps_the_model_in_the_main_process_and_says_why(
    tmp_path: Path, photos: Path
) -> None:
    """`python -m pipeline` where the memory available is 1 MB (as under a cgroup): a loader
    process running the model would not fit, so the model runs in the main process, decoding
    there too, and the loader's line says why; every image is embedded all the same."""
    env = patched_env(LOW_MEMORY_BYTES=str(2**20))
    args = [*SMALL, "dataset=folder", f"dataset.root={photos}", "batch_size=2"]
    args += ["calibration.images=0", f"output_dir={tmp_path}/out"]
    done = run_cli(*args, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    [line] = [line for line in done.stdout.splitlines() if "][INFO] - loader: " in line]
    cores = devices.available_cores()
    assert (
        f"loader: decoding in the main process, {cores} torch threads; the model in the main "
        f"process, as 0 loader processes running it would keep fewer than 75% of the {cores} "
        "cores busy: each needs ~"
    ) in line, line
    assert re.search(r"each needs ~[\d.]+ [MG]B and 1 MB is available$", line), line
    assert "a smaller batch_size needs less" in done.stdout
    assert f"{N_PHOTOS} embedded, 0 failed" in done.stdout


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
