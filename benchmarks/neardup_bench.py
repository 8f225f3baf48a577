"""Hard near-duplicate benchmark: does an embedding configuration find copies of a photo among
other crops of the same photo, better than perceptual hashing does?

    python benchmarks/neardup_bench.py [--quick] [--out DIR] [--flip] [--other] [--default]

The set, built deterministically from real photos that ship inside scikit-image, scikit-learn
and matplotlib: each photo gives several crops (half to two thirds of each side, at random
places, overlapping), the originals. The hard negatives are the other crops of the same photo
(same colours, texture and subject), and crops of the two views of a stereo pair (one
scene, two photos). No two crops of a scene overlap by more than MAX_IOU, so none is a
crop-copy of another. Some originals get copies made by `pipeline.images.augment`
(crop, straighten or screenshot border; brightness/contrast or blur; rescale 0.4-0.9; JPEG
quality 20-60; every other copy mirrored with --flip); an original and its copies are one true
group. `--other` builds the second set the same way from photos the first does not use (cell,
grass, page, text, the left view of the stereo pair).

Each configuration runs as a user would run it, in this process: `python -m pipeline` on the
set (the extraction, which also embeds its calibration copies), then `python -m pipeline.dedup`
with the default `dedup.threshold=auto`; the table has the dedup stage's average precision over
its candidate pairs (true pairs it never lists count as missed), and precision, recall and F1 at
the calibrated threshold, beside the precision the calibration predicted for itself
(`calibration_expected_precision`; `on copies`: its precision on the copies alone, presumed
duplicates left out, all it reported before) and whether it said it cannot tell. imagededup's
PHash and dHash run on the same images: similarity 1 - Hamming distance / 64 over all pairs,
their threshold calibrated the same way on the same kind of copies (`pipeline.search.calibration`
on the hashes as +-1 vectors, whose dot product is a monotone function of the Hamming
distance), and at imagededup's own default (distance <= 10).
`best F1` is the F1 at the best threshold in hindsight, for reference.
"""

from __future__ import annotations

import argparse
import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import matplotlib.cbook
import numpy as np
import pandas as pd
import skimage.data
from sklearn.datasets import load_sample_images

from pipeline import dedup, extract
from pipeline.app import compose_config
from pipeline.config import PipelineConfig
from pipeline.extraction.copies import calibration_sample
from pipeline.images.augment import copies_of, near_duplicate
from pipeline.images.decode import decode_image
from pipeline.report import pooling
from pipeline.search.calibration import average_precision, calibrate
from pipeline.storage.contract import read_metadata

SKIMAGE_PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "retina",
    "rocket",
)
QUICK_PHOTOS = ("astronaut", "coffee", "rocket", "china")
CROP_SIDE = (0.5, 0.67)  # of each side of the photo
MAX_IOU = 0.4  # between two crops of one scene
# The second set (--other): photos the first does not use, with the stereo pair's left view.
OTHER_PHOTOS = ("cell", "grass", "page", "text")


def photos(quick: bool) -> dict[str, list[np.ndarray]]:
    """Each scene's photos as uint8 RGB: one for most, the two views of a stereo pair for one."""
    images = {name: getattr(skimage.data, name)() for name in SKIMAGE_PHOTOS}
    images.update(zip(("china", "flower"), load_sample_images().images, strict=True))
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as file:
        images["grace_hopper"] = cv2.imdecode(np.frombuffer(file.read(), np.uint8), 1)[..., ::-1]
    if quick:
        images = {name: images[name] for name in QUICK_PHOTOS}
    scenes = {name: [image] for name, image in images.items()}
    if not quick:
        scenes["motorcycle"] = list(skimage.data.stereo_motorcycle()[:2])
    return {
        name: [cv2.cvtColor(v, cv2.COLOR_GRAY2RGB) if v.ndim == 2 else v for v in views]
        for name, views in scenes.items()
    }


Box = tuple[int, int, int, int]  # y, x, height, width


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes."""
    dy = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    dx = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = dy * dx
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def crop_box(shape: tuple[int, ...], taken: list[Box], rng: np.random.Generator) -> Box:
    """A box of 50-67% of each side at a random place, overlapping every box already `taken`
    from the same scene by an IoU below MAX_IOU: the crops overlap, as tiles cut from one photo
    do, but never so much that one is a crop-copy of another (a copy keeps 80-95% per side)."""
    h, w = shape[:2]
    for _ in range(10_000):
        ch, cw = (int(s * rng.uniform(*CROP_SIDE)) for s in (h, w))
        box = (int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw)
        if all(iou(box, other) < MAX_IOU for other in taken):
            return box
    raise RuntimeError(f"no room for another crop beside {len(taken)}: fewer crops per scene")


def other_photos() -> dict[str, list[np.ndarray]]:
    """The photos of the second set, none of them in the first: uint8 RGB."""
    images = {name: getattr(skimage.data, name)() for name in OTHER_PHOTOS}
    images["motorcycle"] = skimage.data.stereo_motorcycle()[0]
    return {
        name: [cv2.cvtColor(v, cv2.COLOR_GRAY2RGB) if v.ndim == 2 else v]
        for name, v in images.items()
    }


def build(root: Path, quick: bool, flip: bool, other: bool = False) -> pd.DataFrame:
    """Write the set's images under `root/images` and return its manifest: `path` (relative to
    root), `group` (the true near-duplicate group), `scene` and `variant`. `other`: the second
    set, from photos the first does not use."""
    per_scene, with_copies, copies = (3, 2, 2) if quick else (5, 3, 3)
    scenes = other_photos() if other else photos(quick)
    rows = []
    for scene, views in scenes.items():
        rng = np.random.default_rng(zlib.crc32(scene.encode()))
        folder = root / "images" / scene
        folder.mkdir(parents=True, exist_ok=True)
        taken: list[Box] = []
        for index in range(per_scene):
            view = index % len(views)  # a stereo pair's views take turns: one scene, two photos
            y, x, h, w = box = crop_box(views[view].shape, taken, rng)
            taken.append(box)
            original = views[view][y : y + h, x : x + w]
            group = f"{scene}/{index}"
            path = folder / f"{index}.png"
            cv2.imwrite(str(path), cv2.cvtColor(original, cv2.COLOR_RGB2BGR))
            rows.append((path, group, scene, f"view {view}"))
            if index >= with_copies:
                continue
            made = np.random.default_rng([zlib.crc32(scene.encode()), index])
            for copy in range(copies):
                path = folder / f"{index}-copy{copy}.jpg"
                path.write_bytes(near_duplicate(original, made, flip and copy % 2 == 1))
                rows.append((path, group, scene, "copy"))
    manifest = pd.DataFrame(rows, columns=["path", "group", "scene", "variant"])
    manifest["path"] = [p.relative_to(root).as_posix() for p in manifest["path"]]
    manifest.to_csv(root / "manifest.csv", index=False)
    return manifest


# name -> overrides of `python -m pipeline`; several layers share one forward pass.
EXTRACTIONS: dict[str, tuple[str, ...]] = {
    "default": (),
    "avg": ("layers=[blocks.4]", "pool=avg"),
    "gem": ("layers=[blocks.5,bn2]", "pool=gem"),
    "grid4": ("layers=[blocks.3,blocks.5,bn2]", "pool=grid", "pool_grid=4"),
    "grid7": ("layers=[blocks.2,blocks.3,blocks.4]", "pool=grid", "pool_grid=7"),
    "multiscale": ("layers=[blocks.4]", "pool=grid", "pool_grid=4", "scales=[1.0,0.7]"),
}


@dataclass(frozen=True)
class Setup:
    """One row of the table: a layer of an extraction, deduplicated with some overrides."""

    extraction: str
    layer: str | None  # None: the dedup stage's default layer
    dedup: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        overrides = " ".join((*EXTRACTIONS[self.extraction], *self.dedup))
        if self.layer is None:
            return f"default ({overrides})" if overrides else "default (no overrides)"
        layer_free = [o for o in EXTRACTIONS[self.extraction] if not o.startswith("layers=")]
        return " ".join([f"layer={self.layer}", *layer_free, *self.dedup])


NO_WHITENING = ("dedup.whiten=false",)
SETUPS = (
    Setup("default", None),
    Setup("default", None, NO_WHITENING),
    Setup("default", "global_pool", NO_WHITENING),
    Setup("default", "global_pool"),
    Setup("avg", "blocks.4"),
    Setup("gem", "bn2"),
    Setup("gem", "blocks.5"),
    Setup("grid4", "bn2"),
    Setup("grid4", "blocks.5"),
    Setup("grid4", "blocks.3"),
    Setup("multiscale", "blocks.4"),
    Setup("grid7", "blocks.4"),
    Setup("grid7", "blocks.3"),
    Setup("grid7", "blocks.2"),
)
QUICK_SETUPS = (Setup("default", None), Setup("default", "global_pool", NO_WHITENING))


def config(*overrides: str, app: str = "config") -> PipelineConfig:
    """The typed config `python -m pipeline[.<stage>] overrides...` runs with."""
    return compose_config(overrides, app)


def set_overrides(root: Path, out: Path) -> tuple[str, ...]:
    """The benchmark set as a CSV dataset, its truth recorded, everything written under out."""
    return (
        "dataset=csv",
        f"dataset.path={root / 'manifest.csv'}",
        f"dataset.root={root}",
        f"dataset.truth={root / 'manifest.csv'}",
        "dataset.name=neardup",
        "tracking=none",
        f"paths.root={out}",
    )


def run_setups(root: Path, out: Path, setups: tuple[Setup, ...]) -> list[dict[str, Any]]:
    """Extract each needed configuration once, deduplicate each setup, read its metrics."""
    common = set_overrides(root, out)
    rows = []
    for name in dict.fromkeys(s.extraction for s in setups):
        folder = out / "embeddings" / name
        extract.run(config(*common, *EXTRACTIONS[name], f"output_dir={folder}"))
        for setup in (s for s in setups if s.extraction == name):
            where = [f"output_dir={folder}", *EXTRACTIONS[name]]
            if setup.layer is not None:
                where.append(f"layer={setup.layer}")
            cfg = config(*common, *where, *setup.dedup, app=dedup.APP_CONFIG)
            cfg.dedup.output_dir = str(out / "dedup" / name / f"{cfg.layer}-{len(rows)}")
            dedup.run(cfg)
            metrics = json.loads((Path(cfg.dedup.output_dir) / "metrics.json").read_text())
            curve = pd.read_csv(Path(cfg.dedup.output_dir) / "pr_curve.csv")
            metadata = read_metadata(cfg.embeddings)
            rows.append(
                {
                    "configuration": setup.label,
                    "layer": cfg.layer,
                    "pooling": pooling(metadata),
                    "dim": metadata["dim"],
                    "AP": metrics["ap"],
                    "F1": metrics["f1"],
                    "on copies": metrics["calibration_precision"],
                    "predicted precision": metrics["calibration_expected_precision"],
                    "precision": metrics["precision"],
                    "cannot tell": metrics["calibration_uncertain"],
                    "recall": metrics["recall"],
                    "threshold": metrics["threshold"],
                    "best F1": curve["f1"].max(),
                }
            )
    return rows


def hash_vectors(method: Any, images: list[np.ndarray]) -> np.ndarray:
    """64-bit hashes as +-1/8 vectors: unit length, dot product 1 - 2 * Hamming / 64."""
    bits = np.array(
        [
            [
                (int(digit, 16) >> shift) & 1
                for digit in method.encode_image(image_array=image)
                for shift in (3, 2, 1, 0)
            ]
            for image in images
        ]
    )
    return (2 * bits - 1).astype(np.float32) / 8


def hash_rows(root: Path, manifest: pd.DataFrame) -> list[dict[str, Any]]:
    """PHash and dHash on all pairs of the set, calibrated like the pipeline's default."""
    from imagededup.methods import DHash, PHash  # a benchmark-only dependency

    defaults = config("tracking=none")
    images = [decode_image((root / p).read_bytes()) for p in manifest["path"]]
    sample = calibration_sample(len(images), defaults.calibration.images, defaults.seed)
    made = [
        copies_of(images[i], defaults.calibration.copies, defaults.seed, defaults.calibration.flip)
        for i in sample
    ]
    sources = np.repeat(sample, defaults.calibration.copies)
    copies = [c for group in made for c in group]
    codes = pd.factorize(manifest["group"])[0]
    a, b = np.triu_indices(len(images), 1)
    truth = codes[a] == codes[b]
    rows = []
    for method in (PHash(verbose=False), DHash(verbose=False)):
        base = hash_vectors(method, images)
        similarity = 1 - (1 - np.sum(base[a] * base[b], axis=1)) / 2  # 1 - Hamming / 64
        copied = hash_vectors(method, copies)
        found = calibrate(base, copied, sources, defaults.dedup.k, defaults.dedup.target_precision)
        ap = average_precision(similarity, truth)
        for label, threshold in (
            ("calibrated", (1 + found.threshold) / 2),
            ("imagededup default, distance <= 10", 1 - 10 / 64),
        ):
            scores = scores_at(similarity >= threshold - 1e-9, truth)
            rows.append(
                {
                    "configuration": f"{type(method).__name__} ({label})",
                    "layer": "-",
                    "pooling": "-",
                    "dim": 64,
                    "AP": ap,
                    "F1": scores["F1"],
                    "on copies": found.precision if label == "calibrated" else np.nan,
                    "predicted precision": found.expected_precision
                    if label == "calibrated"
                    else np.nan,
                    "precision": scores["precision"],
                    "cannot tell": bool(found.doubts) if label == "calibrated" else np.nan,
                    "recall": scores["recall"],
                    "threshold": threshold,
                    "best F1": best_f1(similarity, truth),
                }
            )
    return rows


def scores_at(found: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    hits = int((found & truth).sum())
    precision = hits / found.sum() if found.sum() else 1.0
    recall = hits / truth.sum()
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return {"F1": f1, "precision": precision, "recall": recall}


def best_f1(similarity: np.ndarray, truth: np.ndarray) -> float:
    """The F1 of the best threshold in hindsight."""
    levels = np.unique(similarity)
    return max(scores_at(similarity >= t, truth)["F1"] for t in levels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 photos, 2 setups: a CI-sized run")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/neardup"))
    parser.add_argument("--flip", action="store_true", help="every other copy mirrored")
    parser.add_argument(
        "--other", action="store_true", help="the second set: photos the first does not use"
    )
    parser.add_argument("--default", action="store_true", help="the default configuration only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = args.out / "set"
    manifest = build(root, args.quick, args.flip, args.other)
    print(f"{len(manifest)} images, {manifest['group'].nunique()} groups -> {root}")
    setups = QUICK_SETUPS if args.quick else SETUPS
    rows = run_setups(root, args.out, setups[:1] if args.default else setups)
    rows += hash_rows(root, manifest)
    table = pd.DataFrame(rows)
    table.to_csv(args.out / "results.csv", index=False)
    print(markdown(table))


def markdown(table: pd.DataFrame) -> str:
    shown = table.drop(columns=["layer"])
    lines = ["| " + " | ".join(shown.columns) + " |", "|---|" + "---:|" * (len(shown.columns) - 1)]
    for row in shown.itertuples(index=False):
        cells = [
            "-" if v is None or v != v else f"{v:.3f}" if isinstance(v, float) else str(v)
            for v in row
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
