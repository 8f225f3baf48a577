"""Decoding time per image: full decode against reduced-scale JPEG decode, same images.

    python benchmarks/decode_bench.py [--rounds 7] [--quick]

Real photos (scikit-image, scikit-learn) saved as JPEG quality 90 at 500x375 and upscaled to
4000x3000, as cameras write them. Each image is decoded by `decode_image` in full, or with
`min_side` from an ImageNet 224 preprocess (256: a 4000x3000 JPEG decodes at 1/8 in the DCT
domain, a 500x375 one cannot shrink), then resized, cropped and normalised by `build_transform`.
Rounds alternate which way goes first, and the table shows each way's median over rounds,
in ms per image, single-threaded as the loader workers run. `header` is the cost of reading
the header (size, and the walk to the end-of-image marker that refuses truncated files),
which both ways pay.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import cv2
import numpy as np
import skimage.data
from sklearn.datasets import load_sample_images

from pipeline.images.decode import decode_image
from pipeline.images.formats import read_header
from pipeline.images.preprocess import Preprocess, build_transform

PREPROCESS = Preprocess(
    (3, 224, 224), 0.875, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
)


def photos() -> list[np.ndarray]:
    """Six RGB photos: astronaut, chelsea, coffee, rocket, china, flower."""
    own = [getattr(skimage.data, n)() for n in ("astronaut", "chelsea", "coffee", "rocket")]
    return own + list(load_sample_images().images)


def jpeg(rgb: np.ndarray, width: int, height: int) -> bytes:
    resized = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_CUBIC)
    bgr = cv2.cvtColor(resized, cv2.COLOR_RGB2BGR)
    return cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def ms_per_image(work: Callable[[bytes], object], images: list[bytes]) -> float:
    started = time.perf_counter()
    for data in images:
        work(data)
    return (time.perf_counter() - started) / len(images) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="2 photos, 2 rounds: seconds")
    args = parser.parse_args()
    sources = photos()[:2] if args.quick else photos()
    rounds = 2 if args.quick else args.rounds
    sets = {
        "500x375": [jpeg(p, 500, 375) for p in sources],
        "4000x3000": [jpeg(p, 4000, 3000) for p in sources],
    }
    transform = build_transform(PREPROCESS)
    ways = {
        "full": lambda data: decode_image(data),
        "reduced": lambda data: decode_image(data, min_side=PREPROCESS.min_side),
    }
    timings: dict[tuple[str, str, str], list[float]] = {}
    for round_ in range(rounds):
        order = list(ways) if round_ % 2 == 0 else list(reversed(ways))
        for name, images in sets.items():
            timings.setdefault((name, "header", ""), []).append(ms_per_image(read_header, images))
            for way in order:
                decode = ways[way]
                timings.setdefault((name, way, "decode"), []).append(ms_per_image(decode, images))
                timings.setdefault((name, way, "total"), []).append(
                    ms_per_image(lambda data, decode=decode: transform(image=decode(data)), images)
                )
    median = {key: statistics.median(values) for key, values in timings.items()}

    print(f"{len(sources)} photos, {rounds} rounds, OpenCV {cv2.__version__}, ms per image\n")
    print(f"{'image':>10} {'header':>7} {'way':>8} {'decode':>8} {'+transform':>11}")
    for name in sets:
        for way in ways:
            print(
                f"{name:>10} {median[name, 'header', ''] * 1e3:6.0f}us {way:>8} "
                f"{median[name, way, 'decode']:8.2f} {median[name, way, 'total']:11.2f}"
            )
        decode = median[name, "full", "decode"] / median[name, "reduced", "decode"]
        total = median[name, "full", "total"] / median[name, "reduced", "total"]
        print(f"{name:>10} {'':>7} {'speedup':>8} {decode:7.2f}x {total:10.2f}x")


if __name__ == "__main__":
    main()
