"""`embed()` called twice on the same folder, as a notebook calls it: the seconds of each call,
the models built, the calibration copies embedded and the width of the layer, in one process.

    python benchmarks/api_bench.py [--images 312] [--layer blocks.3] [--num-workers N]

The images are scikit-image's photos at 300 px, written once to outputs/bench/api/<images>/;
the model is the default (efficientnet_lite0, its weights shipped with pip), on the CPU
unless `device=` is given after the options (any override, as on the command line).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
import skimage.data

import pipeline.extract
from pipeline import api

PHOTOS = ["chelsea", "astronaut", "coffee", "rocket", "camera", "coins", "moon", "horse"]


def photos(root: Path, n: int) -> Path:
    """n JPEGs of scikit-image's photos, 300 px high, each a little wider than the last."""
    if root.is_dir() and len(list(root.glob("*.jpg"))) == n:
        return root
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = np.asarray(getattr(skimage.data, PHOTOS[i % len(PHOTOS)])(), np.uint8)
        rgb = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image[..., :3]
        small = cv2.resize(rgb, (300 + i % 50, 300), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(root / f"{i:04d}.jpg"), cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=312)
    parser.add_argument("--layer", default="blocks.3")
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--calls", type=int, default=2)
    args, overrides = parser.parse_known_args()
    folder = photos(Path("outputs/bench/api") / str(args.images), args.images)

    counts = {"builds": 0, "copies": 0}
    build, copies = api.build_model, pipeline.extract.embed_copies

    def counted_build(*a: object, **k: object) -> object:
        counts["builds"] += 1
        return build(*a, **k)

    def counted_copies(hooks: object, picked: object, *a: object, **k: object) -> None:
        counts["copies"] += len(picked)  # type: ignore[arg-type]
        copies(hooks, picked, *a, **k)

    api.build_model, pipeline.extract.embed_copies = counted_build, counted_copies
    print("| call | s | models built | images given calibration copies | width |")
    print("|---|---:|---:|---:|---:|")
    for call in range(1, args.calls + 1):
        started = time.perf_counter()
        frame = api.embed(
            folder, layers=[args.layer], num_workers=args.num_workers, overrides=overrides
        )
        seconds = time.perf_counter() - started
        width = len(frame[args.layer].iloc[0])
        print(f"| {call} | {seconds:.1f} | {counts['builds']} | {counts['copies']} | {width} |")
        counts = {"builds": 0, "copies": 0}


if __name__ == "__main__":
    main()
