"""Throughput and memory of extraction, measured side by side in one process on the same
pre-decoded batches:

  (a) bare      model(x), nothing captured
  (b) ours      the CLI's own loop and write path (pipeline.extract's batch loop, ChunkWriter,
                Staging and its publish): hooks, pooling on the device, part files written
                once with their digests, the checked publish
  (c) early     ours on an early layer: the forward pass stops right after it
  (w) write     the bare forward pass, the same pooled rows kept in memory, then one
                pyarrow.parquet.write_table: the least any writer can do
  (d) tutorial  the seed tutorials' loop: a hook keeps output.detach() in a dict, .cpu().numpy()
                per batch into lists, one np.concatenate at the end

    python benchmarks/extract_bench.py [--images 128] [--early-layer blocks.1] [overrides...]

Overrides are the CLI's (model=resnet50 device=cuda batch_size=64 ...). Peak host memory is
tracemalloc's (it sees numpy's buffers and pyarrow's are outside both); on CUDA, peak device
memory too. Both are measured at 1x and 4x the images: a streaming loop stays flat.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from pipeline.app import compose_config
from pipeline.extraction.devices import (
    computing,
    model_input,
    place_model,
    resolve_device,
    resolve_precision,
    reusing_freed_memory,
)
from pipeline.extraction.forward import forward
from pipeline.extraction.hooks import LayerHooks
from pipeline.extraction.loop import embed_batches
from pipeline.extraction.models import build_model
from pipeline.extraction.writer import ChunkWriter, chunk_rows, layer_schemas
from pipeline.images.decode import decode_image
from pipeline.images.loader import Batch
from pipeline.images.manifest import build_demo_if_missing, load_manifest
from pipeline.images.preprocess import build_transform, resolve_preprocess
from pipeline.storage.contract import embedding_schema, embedding_table
from pipeline.storage.staging import Staging
from pipeline.storage.update import Plan, publish_changes


def batches_of(cfg, model, images: int) -> list[torch.Tensor]:
    """The demo photos decoded and transformed once, repeated to `images`, in batches."""
    m = cfg.model
    transform = build_transform(
        resolve_preprocess(model, m.input_size, m.crop_pct, m.interpolation, m.mean, m.std)
    )
    build_demo_if_missing(cfg.dataset)
    paths = load_manifest(cfg.dataset)["path"].tolist()
    decoded = [transform(image=decode_image(Path(p).read_bytes()))["image"] for p in paths]
    tensors = [decoded[i % len(decoded)] for i in range(images)]
    # Channels-last, as the CLI gives them to the model; .to() keeps the layout, so every
    # variant runs the same convolutions.
    return [
        model_input(torch.stack(tensors[i : i + cfg.batch_size]), torch.device("cpu"))
        for i in range(0, images, cfg.batch_size)
    ]


def bare(model, batches, device, **_) -> None:
    for x in batches:
        model(x.to(device, non_blocking=True))


def ours(model, batches, device, layer, out_dir, cfg, **_) -> None:
    """The CLI's loop and write path on pre-decoded batches (no loader: that is not timed)."""
    ids = [str(i) for i in range(sum(len(x) for x in batches))]
    manifest = pd.DataFrame({"image_id": ids, "path": ids})
    with LayerHooks(model, [layer], cfg.pool) as hooks:
        info = hooks.describe(batches[0][:1].to(device))
        schemas = layer_schemas(info, False, {})
        rows = chunk_rows(cfg.save_every, cfg.batch_size, info[layer].dim)
        out = out_dir / uuid.uuid4().hex
        with Staging(out, "bench", [layer]) as staging:
            plan = Plan.make(manifest, out, [layer], "bench", staging, [], reuse=False)
            writer = ChunkWriter(staging, schemas, plan, rows, [], 1.0, (0, 0))
            starts = np.cumsum([0] + [len(x) for x in batches])
            loader = [
                Batch(list(range(start, start + len(x))), x, [])
                for start, x in zip(starts, batches, strict=False)
            ]
            embed_batches((forward(hooks, batch, device) for batch in loader), writer)
            publish_changes(
                plan, staging, writer.chunks, schemas, rows, "bench", {"images": 0}, print
            )


def write_once(model, batches, device, layer, out_dir, cfg, **_) -> None:
    """The bare forward pass with the rows pooled and kept, then one write_table."""
    with LayerHooks(model, [layer], cfg.pool) as hooks:
        dim = hooks.describe(batches[0][:1].to(device))[layer].dim
        kept = [
            hooks(x.to(device, non_blocking=True))[layer].float().cpu().numpy() for x in batches
        ]
    vectors = np.concatenate(kept)
    ids = [str(i) for i in range(len(vectors))]
    table = embedding_table(embedding_schema(dim, False, {}), ids, None, vectors)
    pq.write_table(table, out_dir / f"{uuid.uuid4().hex}.parquet", compression="zstd")


def tutorial(model, batches, device, layer, **_) -> np.ndarray:
    features: dict[str, torch.Tensor] = {}
    handle = model.get_submodule(layer).register_forward_hook(
        lambda _m, _i, output: features.__setitem__(layer, output.detach())
    )
    kept = []
    try:
        for x in batches:
            model(x.to(device))
            kept.append(features[layer].cpu().numpy())
    finally:
        handle.remove()
    return np.concatenate(kept)


def measure(
    fn: Callable, device: torch.device, images: int, **kwargs
) -> tuple[float, float, float]:
    """(images/s, peak host MiB by tracemalloc, peak device MiB)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    tracemalloc.start()
    started = time.perf_counter()
    fn(device=device, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    host = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0
    return images / seconds, host, gpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--early-layer", default="blocks.1")
    parser.add_argument("--repeats", type=int, default=3, help="best of N timed rounds")
    args, overrides = parser.parse_known_args()
    cfg = compose_config(overrides)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    model = place_model(build_model(cfg.model), device)
    layer = cfg.layers[-1]
    print(
        f"model={cfg.model.name} device={device} precision={precision.value} "
        f"batch_size={cfg.batch_size} torch threads={torch.get_num_threads()}"
    )
    variants = {
        "(a) bare": (bare, {}),
        "(b) ours": (ours, {"layer": layer}),
        "(c) early": (ours, {"layer": args.early_layer}),
        "(w) write_table": (write_once, {"layer": layer}),
        "(d) tutorial": (tutorial, {"layer": layer}),
        "(d') tutorial early": (tutorial, {"layer": args.early_layer}),
    }
    results: dict[str, dict[int, tuple[float, float, float]]] = {}
    with (
        tempfile.TemporaryDirectory() as tmp,
        computing(device, precision),
        reusing_freed_memory(),  # as the command runs its batches
    ):
        for scale in (1, 4):
            images = args.images * scale
            batches = batches_of(cfg, model, images)
            bare(model, batches[:2], device)  # warm-up: allocator, kernels, caches
            # Rounds interleave the variants, so drift in the machine's speed hits all alike.
            for _ in range(args.repeats if scale == 1 else 1):
                for name, (fn, extra) in variants.items():
                    run = measure(
                        fn,
                        device,
                        images,
                        model=model,
                        batches=batches,
                        out_dir=Path(tmp),
                        cfg=cfg,
                        **extra,
                    )
                    best = results.setdefault(name, {}).get(scale)
                    results[name][scale] = max(run, best) if best else run
    print(
        f"\n{'variant':22} {'layer':14} {'images/s':>9} {'host MiB 1x':>12} "
        f"{'host MiB 4x':>12} {'GPU MiB 1x':>11} {'GPU MiB 4x':>11}"
    )
    for name, (_, extra) in variants.items():
        one, four = results[name][1], results[name][4]
        print(
            f"{name:22} {extra.get('layer', '-'):14} {one[0]:9.1f} {one[1]:12.1f} "
            f"{four[1]:12.1f} {one[2]:11.1f} {four[2]:11.1f}"
        )
    speed = {name.split()[0]: r[1][0] for name, r in results.items()}
    for label, num, den in [
        ("ours vs bare forward", "(b)", "(a)"),
        ("ours vs forward + write_table", "(b)", "(w)"),
        ("early stop vs bare forward", "(c)", "(a)"),
        ("ours vs tutorial loop", "(b)", "(d)"),
        ("early layer, ours vs tutorial", "(c)", "(d')"),
    ]:
        print(f"{num}/{den} {label:32} {speed[num] / speed[den]:.2f}")


if __name__ == "__main__":
    main()
