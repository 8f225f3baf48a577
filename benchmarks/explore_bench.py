"""The explorer at scale: `python -m pipeline.explore` on a synthetic layer of N images with an
image file each, its wall time and peak resident memory, for each of the three ways it runs.

    python benchmarks/explore_bench.py --rows 100000 --dim 1280 --dir /big/disk
    python benchmarks/explore_bench.py --quick        # 5,000 x 256: about a minute

Data: a layer written by `dedup_scale_bench.write_layer` (rows like a CNN's pooled embeddings,
1% planted near-duplicates) and, for each of its image ids, a 128 x 128 JPEG of smooth random
colours (about 3 KB as a 96-pixel thumbnail, as a photo's is), so the thumbnails are made from
real files. The runs, each a fresh `python -m pipeline.explore embeddings=<layer>
images_root=<images> tracking=none` in a subprocess, one at a time:

  first export   nothing kept yet: neighbours, UMAP, every thumbnail, then the static site
  second export  the map, neighbours and thumbnails read from explore.output_dir
  serve          the same, then Embedding Atlas served; timed to its URL, its peak taken after
                 the page's first queries (metadata, the row count, the points) answered

Peak memory is the kernel's high-water mark of the process's resident set (wait4's ru_maxrss;
for the server, VmHWM from /proc before it is stopped).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pyarrow.dataset as ds
from dedup_scale_bench import write_layer  # beside this script

REPO = Path(__file__).resolve().parents[1]
SIDE = 128  # the images' side, pixels


def write_images(layer: Path, root: Path, seed: int) -> int:
    """A JPEG for every image id of the layer (smooth random colours): their bytes."""
    ids = ds.dataset(layer, format="parquet").to_table(columns=["image_id"])["image_id"]
    rng = np.random.default_rng(seed)
    total = 0
    root.mkdir(parents=True, exist_ok=True)
    for image_id in ids.to_pylist():
        small = rng.integers(0, 255, (8, 8, 3), np.uint8)
        image = cv2.resize(small, (SIDE, SIDE), interpolation=cv2.INTER_CUBIC)
        _, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        (root / image_id).write_bytes(data.tobytes())
        total += len(data)
    return total


def run(args: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """A command to its end: wall seconds, peak resident GB, its output."""
    start = time.perf_counter()
    process = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    _, status, usage = os.wait4(process.pid, 0)
    output = process.stdout.read() if process.stdout else ""
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.returncode == 0, output[-3000:]
    return time.perf_counter() - start, usage.ru_maxrss / 2**20, output


def serve(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """The server until its URL and the page's first queries answer: seconds to the URL, the
    peak resident GB by then."""
    start = time.perf_counter()
    process = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    url = None
    assert process.stdout is not None
    for line in process.stdout:
        found = re.search(rb"(http://\S+/) \(Ctrl-C", line)
        if found:
            url = found.group(1).decode()
            break
    assert url, "the server printed no URL"
    seconds = time.perf_counter() - start
    try:
        urllib.request.urlopen(url + "data/metadata.json").read()
        for sql in (
            "SELECT COUNT(*) FROM dataset",
            "SELECT x, y FROM dataset",
            "SELECT thumbnail FROM dataset LIMIT 200",
        ):
            query = urllib.parse.quote(json.dumps({"sql": sql, "type": "arrow"}))
            urllib.request.urlopen(f"{url}data/query?query={query}").read()
        status = Path(f"/proc/{process.pid}/status").read_text()
        peak = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 2**20
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(60)
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--dir", type=Path, default=REPO / "outputs/bench/explore")
    parser.add_argument("--quick", action="store_true", help="5,000 x 256")
    parser.add_argument("--projection", default="auto", help="explore.projection")
    options = parser.parse_args()
    rows, dim = (5000, 256) if options.quick else (options.rows, options.dim)
    work = options.dir / f"{rows}x{dim}"
    layer, images = work / "bench.parquet", work / "images"
    if not (layer / "_manifest.json").is_file():
        print(f"writing a layer of {rows:,} x {dim} ...", flush=True)
        write_layer(layer, rows, dim, seed=0)
    if not images.is_dir():
        print(f"writing {rows:,} images ...", flush=True)
        print(f"  {write_images(layer, images, 0) / 2**20:.0f} MiB", flush=True)
    out, site = work / "explore", work / "site"
    env = {**os.environ, "TQDM_DISABLE": "1", "XDG_CACHE_HOME": str(work / "cache")}
    command = [
        sys.executable,
        "-m",
        "pipeline.explore",
        f"embeddings={layer}",
        f"images_root={images}",
        "tracking=none",
        f"explore.output_dir={out}",
        f"explore.projection={options.projection}",
    ]
    embeddings_gb = rows * dim * 4 / 2**30
    print(f"\n{rows:,} x {dim}: embeddings {embeddings_gb:.2f} GB")
    print(f"{'run':<15}{'wall s':>9}{'peak GB':>9}")
    for name in ("first export", "second export"):
        if name == "first export":
            for kept in out.glob("*.parquet"):
                kept.unlink()
        seconds, peak, output = run([*command, f"explore.export={site}"], env)
        print(f"{name:<15}{seconds:>9.1f}{peak:>9.2f}", flush=True)
        for line in output.splitlines():
            if "done in" in line or "ivf" in line or "exact" in line:
                print("   ", line.split(" - ", 1)[-1])
    seconds, peak = serve([*command, "explore.port=0"], env)
    print(f"{'serve':<15}{seconds:>9.1f}{peak:>9.2f}")
    site_mb = sum(f.stat().st_size for f in site.rglob("*") if f.is_file()) / 2**20
    data_mb = (site / "data/dataset.parquet").stat().st_size / 2**20
    print(f"static site: {site_mb:.0f} MiB, of which the table {data_mb:.0f} MiB")


if __name__ == "__main__":
    main()
