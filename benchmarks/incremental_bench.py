"""What a rerun costs: the first run over a folder, a rerun of the finished command, and a rerun
after 1% new images were added, side by side in one run on the same folder, through the CLI.

    python benchmarks/incremental_bench.py                 # 5,000 images, the default model
    python benchmarks/incremental_bench.py --images 20000 --size 64

Each row: the images the run put through the model (from its summary line) and the whole
command's wall time. The finished rerun's time is the command's fixed cost (interpreter,
imports, listing and stat-ing the folder); the update's cost beyond it, as a share of the first
run's cost beyond it, is what the 1% costs.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np


def make_images(root: Path, start: int, count: int) -> None:
    rng = np.random.default_rng(start)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        image = rng.integers(0, 255, (120, 160, 3), np.uint8)
        cv2.imwrite(str(root / f"{i:06d}.jpg"), image)


def run(args: list[str], cwd: Path) -> tuple[float, int, str]:
    """(seconds, images through the model, the summary line) of one command."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"},
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(done.stderr)
    log = done.stdout + done.stderr
    line = next(x for x in log.splitlines() if " embedded, " in x)
    embedded = re.search(r"\((\d+) images run through the model", line)
    return seconds, int(embedded.group(1)) if embedded else 0, line.split(" - ", 1)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--size", type=int, default=96, help="the model's input side")
    parser.add_argument("--added", type=float, default=0.01, help="share of images added")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        root = work / "images"
        make_images(root, 0, options.images)
        args = [
            "dataset=folder",
            f"dataset.root={root}",
            f"model.input_size=[3,{options.size},{options.size}]",
            "tracking=none",
            f"output_dir={work / 'out'}",
        ]
        rows = [("first run", *run(args, work)), ("finished rerun", *run(args, work))]
        added = max(1, round(options.images * options.added))
        make_images(root, options.images, added)
        rows.append((f"+{added} images ({options.added:.0%})", *run(args, work)))
    first, fixed, update = (r[1] for r in rows)
    print(f"{options.images} images at {options.size}px:")
    print("| run | images through the model | wall s |")
    print("|---|---:|---:|")
    for name, seconds, embedded, _ in rows:
        print(f"| {name} | {embedded} | {seconds:.1f} |")
    share = (update - fixed) / (first - fixed) if first > fixed else float("nan")
    print(
        f"\nfixed cost (the finished rerun): {fixed:.1f} s; the update beyond it: "
        f"{update - fixed:.1f} s = {share:.1%} of the first run's {first - fixed:.1f} s beyond it"
    )


if __name__ == "__main__":
    main()
