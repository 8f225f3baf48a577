"""Images per second of engine=local and engine=ray (1 and 2 decode workers), side by side in
one run on the same JPEG files, with the per-image costs the README's scaling model uses.

    python benchmarks/ray_bench.py [--images 1000] [--quick] [overrides...]

Overrides are the CLI's (without a model=..., the tiny test_efficientnet at 32x32, as the tests
run; model=resnet18 model.pretrained=false for a forward pass that costs something). Each
engine runs the CLI's own `extract.run` in this process, into a fresh folder, on all the images
(`images/s` is the extraction's own metric: staging to publish, ray.init not in it) and on one
batch alone (`fixed s`: workers started, the model shipped, one batch decoded and written).

Measured once, single-threaded, on the same files:
  decode    read + decode + transform, per image: what one decode worker (core) pays
  forward   the hooked forward pass and pooling, per image, at `batch_size`, on this device
  write     the driver's part write per image (Arrow table, zstd, SHA-256, fsync): the one
            serial stage of both engines

Ray is started with one logical CPU more than the cores, for the model actor: at this scale
it mostly waits on decode, and decode_workers=2 could not run beside it otherwise.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import ray
import skimage.data
import torch
from sklearn.datasets import load_sample_images

from pipeline.app import compose_config
from pipeline.config import DatasetKind, Engine, EngineConfig, PipelineConfig
from pipeline.extract import run
from pipeline.extraction.devices import available_cores, resolve_device, reusing_freed_memory
from pipeline.extraction.hooks import LayerHooks
from pipeline.extraction.models import build_model
from pipeline.images.loader import ImageDataset
from pipeline.images.preprocess import build_transform, resolve_preprocess
from pipeline.storage.contract import embedding_schema, embedding_table, write_part

TINY_MODEL = [  # unless the overrides name a model
    "model=timm",
    "model.name=test_efficientnet",
    "model.pretrained=false",
    "model.input_size=[3,32,32]",
]


def write_photos(root: Path, count: int) -> None:
    """`count` JPEGs at 500x375, quality 90, from six real photos shifted so each differs."""
    own = [getattr(skimage.data, n)() for n in ("astronaut", "chelsea", "coffee", "rocket")]
    photos = [cv2.resize(p, (500, 375)) for p in own + list(load_sample_images().images)]
    root.mkdir(parents=True)
    for i in range(count):
        image = np.roll(photos[i % len(photos)], i, axis=1)
        ok, data = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        (root / f"{i:05d}.jpg").write_bytes(data.tobytes())


def per_image_costs(cfg: PipelineConfig, paths: list[Path]) -> dict[str, float]:
    """Seconds per image of decode, forward and write, each alone, single-threaded."""
    torch.set_num_threads(1)
    model = build_model(cfg.model).eval()
    m = cfg.model
    preprocess = resolve_preprocess(model, m.input_size, m.crop_pct, m.interpolation, m.mean, m.std)
    dataset = ImageDataset(
        [str(p) for p in paths], build_transform(preprocess), min_side=preprocess.min_side
    )
    started = time.perf_counter()
    images = [dataset[i][1] for i in range(len(dataset))]
    decode = (time.perf_counter() - started) / len(images)
    device = resolve_device(cfg.device)
    model.to(device)
    batches = [
        torch.stack(images[i : i + cfg.batch_size]).to(device)
        for i in range(0, len(images), cfg.batch_size)
    ]
    with (
        LayerHooks(model, cfg.layers, cfg.pool) as hooks,
        torch.inference_mode(),
        reusing_freed_memory(),  # as both engines run their batches
    ):
        hooks.describe(batches[0][:1])
        hooks(batches[0])  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        pooled = [hooks(x) for x in batches]
        if device.type == "cuda":
            torch.cuda.synchronize()
        forward = (time.perf_counter() - started) / len(images)
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        for name in cfg.layers:
            vectors = torch.cat([p[name] for p in pooled]).float().cpu().numpy()
            schema = embedding_schema(vectors.shape[1], False, {})
            ids = [str(i) for i in range(len(vectors))]
            write_part(
                embedding_table(schema, ids, None, vectors), Path(folder) / f"{name}.parquet"
            )
        write = (time.perf_counter() - started) / len(images)
    torch.set_num_threads(available_cores())
    return {"decode": decode, "forward": forward, "write": write}


def extract(
    cfg: PipelineConfig, engine: EngineConfig, root: Path, output_dir: Path
) -> dict[str, float]:
    """The CLI's extraction of the JPEGs under `root`: its metrics."""
    dataset = replace(cfg.dataset, kind=DatasetKind.folder, root=str(root))
    return run(replace(cfg, dataset=dataset, engine=engine, output_dir=str(output_dir))).metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="200 images: a smoke run")
    args, overrides = parser.parse_known_args()
    count = 200 if args.quick else args.images
    own_model = any(o.startswith("model") for o in overrides)
    base = ["tracking=none", *([] if own_model else TINY_MODEL)]
    cfg = compose_config([*base, *overrides])
    work = Path(tempfile.mkdtemp(prefix="ray_bench-"))
    try:
        root = work / "images"
        write_photos(root, count)
        one_batch = work / "one_batch"
        one_batch.mkdir()
        for path in sorted(root.glob("*.jpg"))[: cfg.batch_size]:
            shutil.copy(path, one_batch)
        costs = per_image_costs(cfg, sorted(root.glob("*.jpg"))[: min(count, 200)])
        ray.init(num_cpus=available_cores() + 1, log_to_driver=False)
        runs = [
            ("local", replace(cfg.engine, name=Engine.local)),
            ("ray, 1 decode worker", replace(cfg.engine, name=Engine.ray, decode_workers=1)),
            ("ray, 2 decode workers", replace(cfg.engine, name=Engine.ray, decode_workers=2)),
        ]
        size = cfg.model.input_size or "its own input size"
        print(
            f"\n{count} JPEGs 500x375, model {cfg.model.name} at {size}, "
            f"batch_size {cfg.batch_size}, {available_cores()} cores, layers {cfg.layers}"
        )
        print(f"{'engine':<24}{'images/s':>10}{'seconds':>10}{'fixed s':>10}")
        for name, engine in runs:
            folder = work / name.replace(" ", "_").replace(",", "")
            full = extract(cfg, engine, root, folder / "all")
            one = extract(cfg, engine, one_batch, folder / "one")
            print(
                f"{name:<24}{full['images_per_s']:>10.1f}{full['seconds']:>10.2f}"
                f"{one['seconds']:>10.2f}"
            )
        print(
            "\nper image, single-threaded: "
            + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in costs.items())
        )
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
