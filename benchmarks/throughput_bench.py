"""End-to-end throughput of `python -m pipeline` beside the bound it cannot beat, measured in one
run on the same images, for each photo size and layer:

  decode    ImageDataset and collate with no workers: one core decoding, resizing, normalising
            (reduced-scale JPEG decode, as the CLI does; and a full-size decode, for comparison)
  loader    the CLI's loader alone, its processes and threads as the CLI plans them, no model
  model     the model alone on pre-decoded batches: LayerHooks with the early stop, run as the
            CLI runs it: on the CPU in a process per core, single-threaded, each stacking its
            batches (or, where the CLI keeps the model in the main process, on every core there)
  cli       the real command, `python -m pipeline ...`, in a subprocess: its own images/s (the
            figure it prints: first batch request to publish) and the whole command's wall time
            (interpreter start, imports, model build and the first pass included)

The bound. On the CPU the model and the decoding share the C cores, so the least time an image
can take is the work it needs over the cores: the model's core-seconds (C / model images/s, the
model alone keeping every core busy, as the CLI runs it) plus one core's decode time
(1 / decode images/s), over C:

    bound = 1 / (1 / model + 1 / (C x decode))        images/s

On a GPU the model and the decoding run on different hardware: bound = min(model, loader).

Foreign load: during each part, the CPU time of every other process on the machine (/proc/stat's
busy time, less this process tree's own CPU time, as psutil reads it), as a share of all cores.
The machine this runs on may be shared, and the figures mean most where that share is low: with
--rounds N every part runs N times in turn, and the figures compared are one round's, the round
whose parts saw the least foreign load. torch runs as the command runs it, its OpenMP threads
sleeping when idle (pipeline.app.sleeping_openmp).

    python benchmarks/throughput_bench.py [--images 2000] [--large-images 600] [--quick]
        [--layers global_pool layer1] [--sizes 500x375 3000x4000] [--photos DIR] [--rounds N]
        [overrides...]

Overrides go to the CLI and to the in-process parts alike (device=cuda decode=gpu
batch_size=128 ...); the defaults are model=resnet18 model.pretrained=false. Images are made in
a temporary folder: real photos (scikit-image, scikit-learn) cropped and saved as JPEG quality 90
at 500x375, and at 3000x4000 with a little sensor-like grain, as phones write them.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import psutil
import skimage.data
import torch
from sklearn.datasets import load_sample_images

from pipeline.app import compose_config, sleeping_openmp
from pipeline.config import Decode, PipelineConfig
from pipeline.extraction.devices import (
    available_cores,
    computing,
    model_input,
    place_model,
    resolve_decode,
    resolve_device,
    resolve_precision,
    reusing_freed_memory,
    torch_threads,
)
from pipeline.extraction.engines.local import extraction_plan, loader_batches
from pipeline.extraction.forward import ForwardInWorker
from pipeline.extraction.hooks import LayerHooks
from pipeline.extraction.models import build_model
from pipeline.images.gpu_decode import JpegDataset
from pipeline.images.loader import ImageDataset, _start_worker, collate
from pipeline.images.preprocess import Preprocess, build_transform, resolve_preprocess

DEFAULTS = ["model=resnet18", "model.pretrained=false"]
SIZES = {"500x375": (500, 375, 0.0), "3000x4000": (3000, 4000, 3.0)}  # width, height, grain
DISTINCT_LARGE = 24  # encoded large photos; the rest are hard links to them (bytes on disk)
CLI_RATE = re.compile(r"\((\d+) images run through the model in [\d.]+ s, ([\d.]+) images/s[;)]")


# --- images --------------------------------------------------------------------------------------


def photos() -> list[np.ndarray]:
    """Six RGB photos: astronaut, chelsea, coffee, rocket, china, flower."""
    own = [getattr(skimage.data, n)() for n in ("astronaut", "chelsea", "coffee", "rocket")]
    return own + list(load_sample_images().images)


def make_jpegs(folder: Path, count: int, width: int, height: int, grain: float) -> None:
    """`count` JPEGs (quality 90) of `width` x `height`: random crops of the photos with that
    aspect ratio, every other one mirrored, with Gaussian grain of `grain` levels. Past
    DISTINCT_LARGE large images, the files are hard links to the first ones."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    sources = photos()
    distinct = count if width * height <= 2**20 else min(count, DISTINCT_LARGE)
    for i in range(distinct):
        image = sources[i % len(sources)]
        h, w = image.shape[:2]
        crop_h = int(min(h, w * height / width) * rng.uniform(0.6, 1.0))
        crop_w = int(crop_h * width / height)
        top, left = rng.integers(0, h - crop_h + 1), rng.integers(0, w - crop_w + 1)
        crop = image[top : top + crop_h, left : left + crop_w, ::-1]  # RGB -> BGR
        if i % 2:
            crop = crop[:, ::-1]
        up = width > crop_w
        out = cv2.resize(
            np.ascontiguousarray(crop),
            (width, height),
            interpolation=cv2.INTER_CUBIC if up else cv2.INTER_AREA,
        )
        if grain:
            noise = rng.standard_normal(out.shape, dtype=np.float32) * grain
            out = np.clip(out + noise, 0, 255).astype(np.uint8)
        ok, encoded = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        (folder / f"{i:05d}.jpg").write_bytes(encoded.tobytes())
    for i in range(distinct, count):
        os.link(folder / f"{i % distinct:05d}.jpg", folder / f"{i:05d}.jpg")


# --- measuring -----------------------------------------------------------------------------------


def _tree_cpu() -> float:
    """CPU seconds of this process, its waited-for children, and its live descendants."""
    me = psutil.Process()
    times = me.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system
    for child in me.children(recursive=True):
        try:
            child_times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += child_times.user + child_times.system
    return total


def _busy_cpu() -> float:
    """CPU seconds every process on the machine has used since boot (/proc/stat)."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


@dataclass
class Part:
    """One timed part: images/s, and the other processes' share of all cores meanwhile."""

    rate: float
    foreign: float  # 0..1
    seconds: float


def timed(images: int, work: Callable[[], object]) -> Part:
    started, ours, busy = time.perf_counter(), _tree_cpu(), _busy_cpu()
    work()
    seconds = time.perf_counter() - started
    foreign = (_busy_cpu() - busy) - (_tree_cpu() - ours)
    return Part(images / seconds, max(0.0, foreign) / (seconds * available_cores()), seconds)


def combined(a: Part, b: Part) -> Part:
    """Two timings of the same work as one."""
    seconds = a.seconds + b.seconds
    images = a.rate * a.seconds + b.rate * b.seconds
    foreign = (a.foreign * a.seconds + b.foreign * b.seconds) / seconds
    return Part(images / seconds, foreign, seconds)


# --- the parts -----------------------------------------------------------------------------------


def drain(batches: Iterator) -> None:
    for _ in batches:
        pass


def decode_part(paths: list[str], preprocess: Preprocess, batch_size: int, full: bool) -> Part:
    """One core: the CLI's dataset and collate in this process, with no workers."""
    dataset = ImageDataset(
        paths, build_transform(preprocess), min_side=None if full else preprocess.min_side
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    with torch_threads(1):
        return timed(len(paths), lambda: drain(iter(loader)))


def loader_part(
    paths: list[str], cfg: PipelineConfig, preprocess: Preprocess, device: torch.device
) -> tuple[Part, str]:
    """The CLI's loader as the CLI builds it (`loader_batches`), with the CLI's plan."""
    decode = resolve_decode(cfg.decode, device)
    plan = extraction_plan(cfg, len(paths), device, decode)
    gpu = decode is Decode.gpu
    dataset = (JpegDataset if gpu else ImageDataset)(
        paths, build_transform(preprocess), min_side=preprocess.min_side
    )
    with torch_threads(plan.main_threads):
        part = timed(
            len(paths),
            lambda: drain(iter(loader_batches(dataset, cfg.batch_size, plan, preprocess, device))),
        )
    return part, plan.describe()


def model_part(
    model: torch.nn.Module,
    layer: str,
    cfg: PipelineConfig,
    batches: list[torch.Tensor],
    device: torch.device,
) -> Part:
    """The model alone on pre-decoded batches, with the CLI's threads, precision and hooks:
    in this process on every core, or where the CLI's plan runs the model in its loader
    processes, in as many processes each stacking pre-decoded images and running the model on
    them, single-threaded (timed on a second pass, after each process's first batch)."""
    precision = resolve_precision(cfg.precision, device)
    images = sum(len(x) for x in batches)
    plan = extraction_plan(cfg, images, device, resolve_decode(cfg.decode, device))

    def forward_all() -> None:
        for x in batches:
            hooks(model_input(x, device))
        if device.type == "cuda":
            torch.cuda.synchronize()

    def in_workers() -> Part:
        loader = torch.utils.data.DataLoader(
            _Decoded(batches),
            batch_size=cfg.batch_size,
            num_workers=plan.workers,
            collate_fn=ForwardInWorker(hooks, precision),
            prefetch_factor=plan.prefetch_factor,
            persistent_workers=True,
            multiprocessing_context="fork",
            worker_init_fn=_start_worker,
        )
        drain(iter(loader))  # warm-up: each process's allocator and kernels
        return timed(images, lambda: drain(iter(loader)))

    with (
        torch_threads(plan.main_threads),
        reusing_freed_memory(),
        LayerHooks(model, [layer], cfg.pool, cfg.output_key) as hooks,
        computing(device, precision),
    ):
        hooks.describe(model_input(batches[0][:1], device))
        if plan.model_in_workers:
            return in_workers()
        if cfg.compile:
            hooks.compile(cfg.batch_size)
        hooks(model_input(batches[0], device))  # warm-up: allocator, kernels, a compiled graph
        return timed(images, forward_all)


class _Decoded(torch.utils.data.Dataset):
    """Pre-decoded images as the CLI's dataset hands them on: (index, image, no failure)."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.images = [image for batch in batches for image in batch]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, None]:
        return index, self.images[index], None


def cli_part(root: Path, layer: str, out: Path, overrides: list[str]) -> tuple[Part, Part]:
    """`python -m pipeline` on the folder: (its own figure, the whole command)."""
    command = [
        sys.executable,
        "-m",
        "pipeline",
        *overrides,
        "dataset=folder",
        f"dataset.root={root}",
        f"layers=[{layer}]",
        "tracking=none",
        "calibration.images=0",  # dedup's calibration copies: more images than the bound's
        f"output_dir={out}",
        "resume=false",
        f"hydra.run.dir={out.parent / 'hydra'}",
        "hydra.output_subdir=null",
    ]
    started, ours, busy = time.perf_counter(), _tree_cpu(), _busy_cpu()
    done = subprocess.run(command, capture_output=True, text=True, env=_offline())
    seconds = time.perf_counter() - started
    foreign = max(0.0, (_busy_cpu() - busy) - (_tree_cpu() - ours))
    share = foreign / (seconds * available_cores())
    match = CLI_RATE.search(done.stdout + done.stderr)
    if done.returncode or match is None:
        raise SystemExit(f"the CLI failed ({done.returncode}):\n{done.stderr[-3000:]}")
    images, rate = int(match[1]), float(match[2])
    return Part(rate, share, images / rate), Part(images / seconds, share, seconds)


def _offline() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


# --- the run -------------------------------------------------------------------------------------


@dataclass
class Row:
    size: str
    layer: str
    images: int
    decode_full: Part
    decode: Part
    loader: Part
    plan: str
    model: Part
    cli: Part
    command: Part
    taken: str  # which round's figures: "2 of 3"
    every_round: str = ""  # CLI / bound in each round: how far the machine's noise reaches

    @property
    def foreign(self) -> float:
        """The most foreign load any of the row's parts saw."""
        parts = (self.decode_full, self.decode, self.loader, self.model, self.cli)
        return max(p.foreign for p in parts)

    def bound(self, device: torch.device) -> float:
        if device.type == "cuda":
            return min(self.model.rate, self.loader.rate)
        return 1 / (1 / self.model.rate + 1 / (available_cores() * self.decode.rate))


def measure(
    size: str,
    folder: Path,
    layer: str,
    cfg: PipelineConfig,
    overrides: list[str],
    model: torch.nn.Module,
    preprocess: Preprocess,
    device: torch.device,
    args: argparse.Namespace,
    scratch: Path,
) -> Row:
    paths = sorted(str(p) for p in folder.iterdir())
    sample = paths[: args.decode_images]
    dataset = ImageDataset(paths[: 2 * cfg.batch_size], build_transform(preprocess))
    decoded = torch.stack([dataset[i][1] for i in range(len(dataset))])
    model_images = min(len(paths), args.model_images)
    # Repeated once: a slice keeps its whole tensor alive (a repeat per batch held 8 GB, and a
    # process this large slowed the command beside it by 15% on this VM).
    repeated = decoded.repeat(-(-model_images // len(decoded)), 1, 1, 1)[:model_images]
    batches = list(repeated.split(cfg.batch_size))
    rows = []
    for round_ in range(args.rounds):
        # Each round runs every part, one after the other; the figures compared are one
        # round's, the round that saw the least load from other processes.
        decode_full = decode_part(sample, preprocess, cfg.batch_size, full=True)
        decode = decode_part(sample, preprocess, cfg.batch_size, full=False)
        loader, plan = loader_part(paths, cfg, preprocess, device)
        # The model alone just before and just after the command, their images over their
        # time: a shared machine's speed drifts, and this brackets the command in time.
        before = model_part(model, layer, cfg, batches, device)
        cli, command = cli_part(folder, layer, scratch / f"out-{size}-{layer}-{round_}", overrides)
        alone = combined(before, model_part(model, layer, cfg, batches, device))
        row = Row(
            size,
            layer,
            len(paths),
            decode_full,
            decode,
            loader,
            plan,
            alone,
            cli,
            command,
            f"{round_ + 1} of {args.rounds}",
        )
        print(
            f"  round {round_ + 1}: {size} {layer}: cli {cli.rate:.1f} images/s, "
            f"{cli.rate / row.bound(device):.2f} of the bound, foreign load up to "
            f"{row.foreign:.0%}",
            flush=True,
        )
        rows.append(row)
    taken = min(rows, key=lambda r: r.foreign)
    taken.every_round = ", ".join(f"{r.cli.rate / r.bound(device):.2f}" for r in rows)
    return taken


def report(row: Row, device: torch.device) -> None:
    bound = row.bound(device)
    cores = available_cores()
    how = (
        f"1 / (1/model + 1/({cores} x decode))"
        if device.type != "cuda"
        else "min(model, loader): separate hardware"
    )
    lines = [
        ("decode, 1 core, full size", row.decode_full, ""),
        ("decode, 1 core, reduced", row.decode, ""),
        ("loader", row.loader, row.plan),
        ("model alone", row.model, ""),
        ("cli (its own figure)", row.cli, f"{row.cli.rate / bound:.2f} of the bound"),
        (
            "cli (whole command)",
            row.command,
            f"{row.command.rate / bound:.2f} of the bound, {row.command.seconds:.1f} s in all",
        ),
    ]
    print(f"\n{row.size} JPEGs x {row.images}, layer {row.layer}: round {row.taken}")
    print(f"  {'part':28} {'images/s':>9} {'foreign load':>13}")
    for name, part, note in lines:
        print(f"  {name:28} {part.rate:9.1f} {part.foreign:12.0%}  {note}")
    print(f"  {'bound':28} {bound:9.1f} {'':13}  {how}")


def summary(rows: list[Row], device: torch.device) -> None:
    print(
        "\n| photos | layer | decode+resize ms, full -> reduced | loader | model | bound "
        "| CLI | CLI / bound | every round | whole command / bound "
        "| foreign load (decode, loader, model, CLI) |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---|---:|---|")
    for row in rows:
        bound = row.bound(device)
        loads = ", ".join(f"{p.foreign:.0%}" for p in (row.decode, row.loader, row.model, row.cli))
        print(
            f"| {row.size} | {row.layer} | {1e3 / row.decode_full.rate:.1f} -> "
            f"{1e3 / row.decode.rate:.1f} ({row.decode.rate / row.decode_full.rate:.1f}x) "
            f"| {row.loader.rate:.1f} | {row.model.rate:.1f} | {bound:.1f} | {row.cli.rate:.1f} "
            f"| {row.cli.rate / bound:.2f} | {row.every_round} | {row.command.rate / bound:.2f} "
            f"| {loads} |"
        )


def main() -> None:
    if "OMP_WAIT_POLICY" not in os.environ:
        # The in-process parts run torch as the CLI does (pipeline.app.sleeping_openmp), and
        # OpenMP reads this only when torch loads: start again with it set.
        sleeping_openmp()
        os.execv(sys.executable, [sys.executable, *sys.argv])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Enough images that each command runs about 10 s on 2 cores: each loader process's start
    # (its fork, its first forward pass growing the heap: 0.1-0.2 s) is then a small share of
    # the command's own figure, as on a real dataset; the whole command's figure keeps it all.
    parser.add_argument("--images", type=int, default=2000, help="500x375 photos")
    parser.add_argument("--large-images", type=int, default=600, help="3000x4000 photos")
    parser.add_argument("--layers", nargs="+", default=["global_pool", "layer1"])
    parser.add_argument(
        "--model-images", type=int, default=640, help="for the model alone, before and after"
    )
    parser.add_argument("--decode-images", type=int, default=200, help="for the decode parts")
    parser.add_argument(
        "--rounds", type=int, default=1, help="of which the least loaded is reported"
    )
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument(
        "--photos", type=Path, help="where the JPEGs are made, or taken from if already there"
    )
    parser.add_argument("--quick", action="store_true", help="a CI-sized run: seconds, not minutes")
    args, overrides = parser.parse_known_args()
    if args.quick:
        args.images, args.large_images = 64, 16
        args.model_images, args.decode_images = 64, 16
    overrides = DEFAULTS + overrides
    cfg = compose_config(overrides)
    device = resolve_device(cfg.device)
    model = place_model(build_model(cfg.model), device)
    m = cfg.model
    preprocess = resolve_preprocess(model, m.input_size, m.crop_pct, m.interpolation, m.mean, m.std)
    print(
        f"{' '.join(overrides)}: device {device}, "
        f"precision {resolve_precision(cfg.precision, device).value}, "
        f"decode {resolve_decode(cfg.decode, device).value}, batch {cfg.batch_size}, "
        f"{available_cores()} cores, torch {torch.__version__}, OpenCV {cv2.__version__}, "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    )
    print(f"load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        photos_dir = args.photos or scratch
        counts = {"500x375": args.images, "3000x4000": args.large_images}
        for size in args.sizes:
            folder = photos_dir / f"{size}-{counts[size]}"
            if not folder.exists():  # several runs (other overrides) measure the same files
                started = time.perf_counter()
                partial = folder.with_name(folder.name + ".partial")
                shutil.rmtree(partial, ignore_errors=True)
                make_jpegs(partial, counts[size], *SIZES[size])
                partial.rename(folder)  # whole, or not there
                print(f"made {counts[size]} {size} JPEGs in {time.perf_counter() - started:.0f} s")
            for layer in args.layers:
                row = measure(
                    size,
                    folder,
                    layer,
                    cfg,
                    overrides,
                    model,
                    preprocess,
                    device,
                    args,
                    scratch,
                )
                report(row, device)
                rows.append(row)
    summary(rows, device)
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
