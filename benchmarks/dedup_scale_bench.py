"""The whole near-duplicate command at scale: `python -m pipeline.dedup` with its defaults on a
synthetic layer of N embeddings (1M x 1280 float32: 5.1 GB), its wall time, peak resident
memory and the recall it reports, against the issue's bound (peak <= 1.5x the embeddings + 1 GB).

    python benchmarks/dedup_scale_bench.py --rows 1000000 --dim 1280 [--dir /big/disk]
    python benchmarks/dedup_scale_bench.py --rows 100000,1000000 --dim 1280   # growth exponent
    python benchmarks/dedup_scale_bench.py --quick          # 20,000 x 256: about a minute
    python benchmarks/dedup_scale_bench.py --src /old/checkout/src ...   # another version's code
    python benchmarks/dedup_scale_bench.py --keep /big/disk/layers ...   # layers written once

Data (`dedup_bench.EmbeddingLike`): rows like a CNN's pooled embeddings (positive mean, a
power-law spectrum, classes / subclasses / scenes), in parts of 2,048 rows as an extraction
writes them; 1% of the rows are planted near-duplicates (1-5 copies of 0.25% of the rows, in the
same part as their source), and `_calibration/` holds 2 copies of each of 200 rows, as
`calibration.images=200` makes them, so `dedup.threshold=auto` (the default) calibrates.

The command runs in a subprocess (`tracking=none`, TQDM_DISABLE=1, every `dedup.*` setting at its
default); its peak is the kernel's high-water mark of its resident memory (wait4's ru_maxrss),
and a watchdog stops it past --max-rss-gb (the machine is shared). Columns:
  wall s        the command, interpreter start to exit
  phases        seconds from the command's log: read, whiten, calibrate, search, write
  peak GB       resident-memory high-water mark; bound = 1.5 x embeddings + 1 GB
  recall@10     what the command reports in metrics.json (its own sample of 1,000 queries)
  planted       share of the planted pairs (source-copy and copy-copy) in pairs.parquet
  other pairs   pairs found that are not planted ones (scene-mates the threshold lets in)
With several --rows, the growth exponent of the wall time between the first and the last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
from dedup_bench import PLANTED_SHARE, EmbeddingLike  # beside this script

from pipeline.storage.contract import (
    calibration_path,
    embedding_schema,
    embedding_table,
    part_name,
    write_manifest,
    write_part,
)

PART_ROWS = 2048
CALIBRATION_IMAGES, CALIBRATION_COPIES = 200, 2  # the config's calibration.images and .copies
CONFIG_HASH = "dedup-scale-bench"
REPO = Path(__file__).resolve().parents[1]


def write_layer(folder: Path, n: int, dim: int, seed: int) -> tuple[int, list[list[str]]]:
    """A layer of n rows (base rows and their planted copies) with its `_calibration/` copies;
    its bytes on disk and the planted groups (ids: a source and its copies)."""
    data = EmbeddingLike(n, dim, seed)
    rng = np.random.default_rng([seed, 9])
    copies = rng.integers(1, 6, size=max(1, round(PLANTED_SHARE * n / 4)))
    copies = copies[np.cumsum(copies) < n // 2]
    n_base = n - int(copies.sum())
    sources = np.sort(rng.choice(n_base, len(copies), replace=False))
    calibrated = np.sort(rng.choice(n_base, min(CALIBRATION_IMAGES, n_base), replace=False))
    metadata = {"layer": "bench", "dim": dim, "config_hash": CONFIG_HASH}
    schema = embedding_schema(dim, False, metadata)
    parts, groups, calibration_rows = [], [], []
    for index, start in enumerate(range(0, n_base, PART_ROWS)):
        stop = min(n_base, start + PART_ROWS)
        x, _ = data.chunk(start, stop)
        ids = [f"{i:08d}.jpg" for i in range(start, stop)]
        mine = sources[(sources >= start) & (sources < stop)]
        made = copies[np.searchsorted(sources, mine)]
        extra = data.copies(x[np.repeat(mine, made) - start], rng)
        for source, count in zip(mine, made, strict=True):
            group = [f"{source:08d}.jpg"] + [f"{source:08d}-copy{j}.jpg" for j in range(count)]
            ids += group[1:]
            groups.append(group)
        calibration_rows.append(x[calibrated[(calibrated >= start) & (calibrated < stop)] - start])
        table = embedding_table(schema, ids, None, np.concatenate([x, extra]))
        parts.append(write_part(table, folder / part_name(index)))
    write_manifest(folder, parts)
    sourced = np.concatenate(calibration_rows)
    vectors = np.concatenate([data.copies(sourced, rng) for _ in range(CALIBRATION_COPIES)])
    names = [f"{i:08d}.jpg" for i in calibrated] * CALIBRATION_COPIES
    ids = [f"{name}#copy{j // len(calibrated)}" for j, name in enumerate(names)]
    schema = embedding_schema(dim, False, metadata, sourced=True)
    part = write_part(
        embedding_table(schema, ids, None, vectors, names),
        calibration_path(folder) / part_name(0),
    )
    write_manifest(calibration_path(folder), [part])
    return sum(p.bytes for p in parts), groups


def rss_gb(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(match.group(1)) / 2**20 if match else 0.0


def run_dedup(
    layer: Path, out: Path, src: Path, max_rss_gb: float, timeout: float, extra: list[str]
) -> dict:
    """`python -m pipeline.dedup` on the layer in a subprocess: wall seconds, peak GB, its log;
    stopped past `max_rss_gb` of resident memory or `timeout` seconds."""
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(src)}
    command = [
        sys.executable,
        "-m",
        "pipeline.dedup",
        f"embeddings={layer}",
        f"dedup.output_dir={out}",
        "tracking=none",
        *extra,
    ]
    start = time.perf_counter()
    log = out.parent / "dedup.log"
    with log.open("w") as sink:
        child = subprocess.Popen(command, cwd=out.parent, env=env, stdout=sink, stderr=sink)
        killed: list[str] = []
        done = threading.Event()

        highest = [0.0, 0.0]  # GB, seconds in

        def watch() -> None:  # never waits for the child: wait4 below reaps it, once
            while not done.wait(0.2):
                rss = rss_gb(child.pid)
                if rss > highest[0]:
                    highest[:] = [rss, time.perf_counter() - start]
                late = time.perf_counter() - start > timeout
                if rss > max_rss_gb or late:
                    why = "not done" if late else f"stopped at {rss:.1f} GB RSS"
                    killed.append(f"{why} after {time.perf_counter() - start:.0f} s")
                    os.kill(child.pid, signal.SIGKILL)
                    return

        watchdog = threading.Thread(target=watch, daemon=True)
        watchdog.start()
        _, status, usage = os.wait4(child.pid, 0)
        done.set()
        child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    text = log.read_text()
    row = {"seconds": seconds, "peak_gb": usage.ru_maxrss / 2**20, "returncode": child.returncode}
    row["peak_at_s"] = highest[1]  # when the sampled resident memory was highest
    if killed:
        row["killed"] = killed[0]
    elif child.returncode != 0:
        row["failed"] = text.strip().splitlines()[-1] if text.strip() else "no output"
    row["phases"] = phases(text)
    row["log"] = text[-4000:]
    return row


def phases(text: str) -> dict[str, float]:
    """Seconds between the command's log lines that mark its steps (`dedup: ... done`)."""
    found = {}
    for line in text.splitlines():
        match = re.search(r"dedup: (\w+) done in ([\d.]+) s", line)
        if match:
            found[match.group(1)] = float(match.group(2))
    return found


def planted_scores(out: Path, groups: list[list[str]]) -> dict:
    """Planted pairs found, and found pairs that are not planted ones."""
    pairs = pd.read_parquet(out / "pairs.parquet", columns=["image_a", "image_b"])
    found = set(zip(pairs["image_a"], pairs["image_b"], strict=True))
    found |= {(b, a) for a, b in found}
    planted = [(a, b) for g in groups for i, a in enumerate(g) for b in g[i + 1 :]]
    hits = sum((a, b) in found for a, b in planted)
    return {"planted": hits / max(1, len(planted)), "other_pairs": len(pairs) - hits}


def kept_layer(n: int, dim: int, args: argparse.Namespace, tmp: Path) -> tuple[Path, list, dict]:
    """The layer to run on: written into `tmp`, or (--keep) reused from the folder of layers
    kept from an earlier run with the same size and seed, written there the first time."""
    name = f"bench-{n}x{dim}-seed{args.seed}"
    folder = args.keep or tmp
    layer, groups_file = folder / f"{name}.parquet", folder / f"{name}.groups.json"
    if args.keep and groups_file.is_file():
        return layer, json.loads(groups_file.read_text()), {"written_s": 0.0}
    made = time.perf_counter()
    size, groups = write_layer(layer, n, dim, args.seed)
    groups_file.write_text(json.dumps(groups))
    return layer, groups, {"layer_mb": size / 1e6, "written_s": time.perf_counter() - made}


def measure(n: int, dim: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        layer, groups, row = kept_layer(n, dim, args, Path(tmp))
        out = Path(tmp) / "out"
        out.mkdir()
        row |= {"n": n, "dim": dim, "load_start": os.getloadavg()[0]}
        row |= run_dedup(layer, out, args.src, args.max_rss_gb, args.timeout, args.override)
        row["load_end"] = os.getloadavg()[0]
        row["bound_gb"] = 1.5 * n * dim * 4 / 2**30 + 1
        if "killed" not in row and "failed" not in row:
            metrics = json.loads((out / "metrics.json").read_text())
            keys = ("threshold", "recall_at_k", "pair_recall", "n_pairs", "whiten_dim")
            row |= {key: metrics.get(key) for key in keys}
            row |= planted_scores(out, groups)
            match = re.findall(r"\] - (.* pairs >= .*)", row["log"])
            row["search"] = match[-1] if match else ""
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1000000", help="comma-separated sizes")
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=None, help="where the layer is written")
    parser.add_argument("--src", type=Path, default=REPO / "src", help="the code to run")
    parser.add_argument("--max-rss-gb", type=float, default=9.0)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds, then stopped")
    parser.add_argument("--keep", type=Path, default=None, help="keep and reuse layers here")
    parser.add_argument("--override", action="append", default=[], help="a dedup override")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sizes = [20_000] if args.quick else [int(s) for s in args.rows.split(",")]
    dim = 256 if args.quick else args.dim
    print(f"{datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} CPU cores, code: {args.src}")
    rows = []
    for n in sizes:
        row = measure(n, dim, args)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    header = (
        f"{'N':>9} {'dim':>5} {'wall s':>7} {'peak GB':>8} {'bound':>6} {'recall@10':>9} "
        f"{'planted':>8} {'other':>6}  phases / notes"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        lead = f"{row['n']:>9,} {row['dim']:>5} {row['seconds']:>7.0f} {row['peak_gb']:>8.2f}"
        lead += f" {row['bound_gb']:>6.2f}"
        if "killed" in row or "failed" in row:
            print(f"{lead}  {row.get('killed') or row.get('failed')}")
            continue
        recall = row["recall_at_k"]
        steps = ", ".join(f"{k} {v:.0f}" for k, v in row["phases"].items())
        print(
            f"{lead} {'exact' if recall is None else f'{recall:.4f}':>9} {row['planted']:>8.4f} "
            f"{row['other_pairs']:>6}  {steps} {row['search']} (load {row['load_start']:.1f}"
            f"-{row['load_end']:.1f})"
        )
    done = [r for r in rows if "recall_at_k" in r]
    if len(done) > 1 and done[-1]["n"] > done[0]["n"]:
        growth = math.log(done[-1]["seconds"] / done[0]["seconds"]) / math.log(
            done[-1]["n"] / done[0]["n"]
        )
        sizes = f"N={done[0]['n']:,} -> {done[-1]['n']:,}"
        print(f"growth exponent of the wall time, {sizes}: {growth:.2f}")


if __name__ == "__main__":
    main()
