"""What the stages' input check costs (`storage.inputs.read_layer`): the manifest check with and
without the SHA-256 of every part (`verify=false`), beside the read itself.

    python benchmarks/verify_bench.py [--rows 1000000] [--dim 1280] [--dir /big/disk]
    python benchmarks/verify_bench.py --quick          # a few seconds: 20,000 x 128

A synthetic layer (random float32 vectors) is written by the project's own writer
(`store.write_part`, parts of 2,048 rows as an extraction with save_every=2048 makes them, then
`write_manifest`) into a temporary folder under --dir, removed at the end. Columns: wall seconds
and MB/s over the layer's bytes on disk. "cold" evicts each part from the page cache first
(posix_fadvise, this process's files only), so the digest reads the disk; "warm" hashes what
writing left in memory.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.storage.contract import (
    embedding_schema,
    embedding_table,
    part_name,
    write_manifest,
    write_part,
)
from pipeline.storage.inputs import check_parts, read_layer

PART_ROWS = 2048


def write_layer(folder: Path, rows: int, dim: int) -> int:
    """A layer of `rows` random vectors in parts of PART_ROWS; returns its bytes on disk."""
    rng = np.random.default_rng(0)
    schema = embedding_schema(dim, False, {"layer": "bench", "dim": dim})
    parts = []
    for index, start in enumerate(range(0, rows, PART_ROWS)):
        n = min(rows, start + PART_ROWS) - start
        ids = [f"{i:08d}.jpg" for i in range(start, start + n)]
        vectors = rng.standard_normal((n, dim), dtype=np.float32)
        parts.append(
            write_part(embedding_table(schema, ids, None, vectors), folder / part_name(index))
        )
    write_manifest(folder, parts)
    return sum(p.bytes for p in parts)


def evict(folder: Path) -> None:
    """Drop the parts from the page cache, so the next read comes from the disk."""
    for part in folder.glob("part-*.parquet"):
        fd = os.open(part, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(step: Callable[[], object]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--dir", type=Path, default=None, help="where the layer is written")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rows, dim = (20_000, 128) if args.quick else (args.rows, args.dim)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        layer = Path(tmp) / "bench.parquet"
        seconds = time.perf_counter()
        size = write_layer(layer, rows, dim)
        seconds = time.perf_counter() - seconds
        print(f"layer: {rows:,} x {dim} float32, {size / 1e6:,.0f} MB, written in {seconds:.0f} s")
        results = {
            "names and sizes (verify=false)": timed(lambda: check_parts(layer, verify=False)),
            "SHA-256 of every part, warm": timed(lambda: check_parts(layer, verify=True)),
        }
        evict(layer)
        results["SHA-256 of every part, cold"] = timed(lambda: check_parts(layer, verify=True))
        evict(layer)
        results["read_layer(verify=false), cold"] = timed(lambda: read_layer(layer, verify=False))
        print(f"{'step':34s} {'seconds':>8s} {'MB/s':>8s}")
        for step, took in results.items():
            print(f"{step:34s} {took:8.2f} {size / 1e6 / took:8.0f}")


if __name__ == "__main__":
    main()
