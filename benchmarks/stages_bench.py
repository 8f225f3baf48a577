"""Each downstream stage at scale, side by side with the scikit-learn / faiss call a user would
write by hand on the same layer: wall time, peak memory and a quality figure.

    python benchmarks/stages_bench.py [--sizes 100000,300000,1000000] [--dims 256,1280]
    python benchmarks/stages_bench.py --quick          # CI-sized: N=3,000 x 64, under a minute

Data: a synthetic layer per (N, dim), written with the contract's writers
(`storage.contract`: parts of 2,048 rows as an extraction with save_every=2048 makes them, the
manifest, calibration copies in `_calibration/`), so `read_layer` takes it as it takes an
extraction's. The rows are a mixture of Gaussians with labels: `--classes` classes (100) in
groups of 10 siblings; a class centre is a unit vector, its group's direction plus a sibling
offset of norm 4/sqrt(dim), and a row is its centre plus Gaussian noise of norm ~1 (the same
difficulty at every dim: siblings are 4 noise standard deviations apart along the line that
separates them). 1% of the rows are planted near-copies: a row and 1-5 copies of it (cosine
0.94-0.995 to it), appended at the end with its label; the calibration copies (200 rows, 2 copies
each) are made the same way.

Near-duplicate search is measured on a layer of its own, `dedup_layer.parquet` beside the first,
written by `dedup_scale_bench.write_layer`: rows like a CNN's pooled embeddings
(`dedup_bench.EmbeddingLike`: a positive mean, a power-law spectrum, classes, subclasses and
scenes), 1% planted near-duplicates, and calibration copies, so dedup's threshold=auto
calibrates on what it then searches for. A row's nearest neighbours there are its scene's, as in
real embeddings; in the Gaussian mixture above, whose noise is isotropic in all `dim` axes, a
row's 10 nearest neighbours are a near-tie among thousands of class-mates, which no index finds
short of reading every row (recall@10 0.75 at 100,000 x 1280 with the IVF at its widest).

Every run is a fresh subprocess, one at a time. The stages run through their real entry,
`python -m pipeline.<stage> embeddings=<layer> tracking=none ...` with their defaults; the
baselines (`--worker`) read the layer with `read_embeddings` (docs/outputs.md) and call the
library. Columns:
  time s    wall seconds of the whole process: start-up, reading, computing, writing (the
            baselines' recall check against brute force excluded)
  peak GB   the process's peak resident memory (getrusage ru_maxrss, from wait4); a process
            over --max-rss-gb is killed (the machine is shared) and reported so
  budget    the issue's goal for a stage: 1.5 x the embeddings + 1 GB
  quality   cluster: NMI against the labels; dedup: the planted copy pairs found (recall) at the
            calibrated threshold, and recall@10 of the search (the stage's own measurement,
            against exact search on a sample of queries; the baseline's: against brute force
            on 1,000 queries); probe: held-out accuracy
Growth exponents (time ~ N^b) are fitted from the smallest to the largest N of each row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from dedup_scale_bench import write_layer as write_embedding_like  # beside this script

from pipeline.storage.contract import (
    CALIBRATION_DIR,
    embedding_schema,
    embedding_table,
    part_name,
    write_manifest,
    write_part,
)

REPO = Path(__file__).resolve().parents[1]
PART_ROWS = 2048  # an extraction's parts with save_every=2048
SIBLING_SEPARATION = 4.0  # class centres of a group: this many noise sds apart
GROUP_SIZE = 10  # classes per group of siblings
PLANTED_SHARE = 0.01  # of the rows: planted copies and their sources
COPY_NOISE = (0.1, 0.35)  # a copy: its row plus noise of this share of its norm
CALIBRATION_IMAGES, CALIBRATION_COPIES = 200, 2  # the extraction's defaults
DATA_VERSION = 1  # bump when the data changes: cached layers are written again
# sklearn's HDBSCAN on the whole set is timed at this size and extrapolated as N^2 above
# --hdbscan-max: in hundreds of dimensions its trees do not prune, and every pair is visited.
HDBSCAN_REFERENCE_N = 5000
CHECK_QUERIES = 1000

# What each stage runs as, its overrides, and the baselines beside it.
STAGES = {
    "read": {"label": "read_layer (the floor)", "baselines": []},
    "cluster": {
        "module": "pipeline.cluster",
        "label": "pipeline.cluster (k-means)",
        "baselines": ["faiss.Kmeans", "MiniBatchKMeans"],
    },
    "hdbscan": {
        "module": "pipeline.cluster",
        "overrides": ["cluster.method=hdbscan"],
        "label": "pipeline.cluster method=hdbscan",
        "baselines": ["HDBSCAN"],
    },
    "dedup": {
        "module": "pipeline.dedup",
        "label": "pipeline.dedup",
        "baselines": ["faiss IVF"],
        "layer": "dedup_layer.parquet",  # embedding-like rows (`write_dedup_data`)
    },
    "probe": {
        "module": "pipeline.probe",
        "label": "pipeline.probe",
        "baselines": ["LogisticRegression"],
    },
}


# --- data ------------------------------------------------------------------------------------


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def copies_of(rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A near-copy of each row: noise of COPY_NOISE of its norm (cosine 0.94-0.995 to it)."""
    dim = rows.shape[1]
    share = rng.uniform(*COPY_NOISE, (len(rows), 1)).astype(np.float32)
    scale = share * np.linalg.norm(rows, axis=1, keepdims=True) / np.sqrt(dim)
    return rows + rng.standard_normal(rows.shape, dtype=np.float32) * scale


def write_data(folder: Path, n: int, dim: int, classes: int, seed: int) -> Path:
    """The labelled synthetic layer `folder/layer.parquet`, with its calibration copies;
    written once per parameters, then reused."""
    layer = folder / "layer.parquet"
    about = {"version": DATA_VERSION, "n": n, "dim": dim, "classes": classes, "seed": seed}
    stamp = folder / "bench.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == about:
        return layer
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    groups = unit(rng.standard_normal((max(1, classes // GROUP_SIZE), dim)))
    offsets = unit(rng.standard_normal((classes, dim))) * SIBLING_SEPARATION / np.sqrt(dim)
    centres = unit(groups[np.arange(classes) % len(groups)] + offsets).astype(np.float32)
    # Planted groups: a source row and 1-5 copies, the copies after every other row.
    copies = rng.integers(1, 6, size=max(1, round(PLANTED_SHARE * n / 4)))
    copies = copies[np.cumsum(copies) < n // 4]  # tiny n: copies never crowd out the rest
    n_base = n - int(copies.sum())
    picked = rng.choice(n_base, len(copies) + CALIBRATION_IMAGES, replace=False)
    sources, calibration = np.sort(picked[: len(copies)]), np.sort(picked[len(copies) :])
    kept = np.sort(np.concatenate([sources, calibration]))
    kept_rows = np.empty((len(kept), dim), np.float32)
    kept_labels = np.empty(len(kept), np.int64)
    source_of_copy = np.repeat(sources, copies)
    metadata = {
        "layer": "layer",
        "model": "synthetic",
        "dim": dim,
        "config_hash": f"stages-bench-{n}-{dim}-{seed}",
        "dataset": {"name": f"synthetic-{n}x{dim}", "root": None},
    }
    schema = embedding_schema(dim, True, metadata)
    parts = []
    for index, start in enumerate(range(0, n, PART_ROWS)):
        stop = min(n, start + PART_ROWS)
        part_rng = np.random.default_rng([seed, index])
        base = np.arange(start, min(stop, n_base))
        labels = part_rng.integers(0, classes, len(base))
        noise = part_rng.standard_normal((len(base), dim), dtype=np.float32) / np.sqrt(dim)
        x = centres[labels] + noise
        here = (kept >= start) & (kept < start + len(base))
        kept_rows[here], kept_labels[here] = x[kept[here] - start], labels[kept[here] - start]
        if stop > n_base:  # the copies: their sources' rows, made again with noise
            of = source_of_copy[max(start, n_base) - n_base : stop - n_base]
            at = np.searchsorted(kept, of)
            x = np.concatenate([x, copies_of(kept_rows[at], part_rng)])
            labels = np.concatenate([labels, kept_labels[at]])
        ids = [f"{i:08d}.jpg" for i in range(start, stop)]
        table = embedding_table(schema, ids, [f"class{c:03d}" for c in labels], x)
        parts.append(write_part(table, layer / part_name(index)))
    write_manifest(layer, parts)
    # The calibration copies, as the extraction writes them beside the layer.
    at = np.searchsorted(kept, calibration)
    made = np.concatenate([copies_of(kept_rows[at], rng) for _ in range(CALIBRATION_COPIES)])
    of = np.tile(calibration, CALIBRATION_COPIES)
    copy_number = np.repeat(np.arange(CALIBRATION_COPIES), len(calibration))
    calibration_metadata = {
        **metadata,
        "calibration": {"images": CALIBRATION_IMAGES, "copies": CALIBRATION_COPIES, "seed": seed},
    }
    copy_schema = embedding_schema(dim, False, calibration_metadata, sourced=True)
    copy_ids = [f"{s:08d}.jpg#copy{c}" for s, c in zip(of, copy_number, strict=True)]
    copy_table = embedding_table(
        copy_schema, copy_ids, None, made, sources=[f"{s:08d}.jpg" for s in of]
    )
    copy_folder = layer / CALIBRATION_DIR
    write_manifest(copy_folder, [write_part(copy_table, copy_folder / part_name(0))])
    stamp.write_text(json.dumps(about))
    return layer


def write_dedup_data(folder: Path, n: int, dim: int, seed: int) -> Path:
    """`folder/dedup_layer.parquet`: embedding-like rows with planted near-duplicates and
    calibration copies, and `dedup_planted.json` (each planted group's ids); written once."""
    layer = folder / STAGES["dedup"]["layer"]
    about = {"version": DATA_VERSION, "n": n, "dim": dim, "seed": seed}
    stamp = folder / "dedup_bench.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == about:
        return layer
    shutil.rmtree(layer, ignore_errors=True)
    _, groups = write_embedding_like(layer, n, dim, seed)
    (folder / "dedup_planted.json").write_text(json.dumps(groups))
    stamp.write_text(json.dumps(about))
    return layer


def planted_id_pairs(folder: Path) -> set[tuple[str, str]]:
    """Every pair (a < b) of ids in one planted group of the dedup layer."""
    groups = json.loads((folder / "dedup_planted.json").read_text())
    return {
        (min(a, b), max(a, b))
        for group in groups
        for i, a in enumerate(group)
        for b in group[i + 1 :]
    }


# --- running one measurement -------------------------------------------------------------------


def measured(command: list[str], cwd: Path, timeout: float, max_rss_gb: float) -> dict:
    """Run `command` to its end; its wall time, peak RSS (ru_maxrss from wait4), exit status,
    and why it was stopped (over `max_rss_gb`, or past `timeout`)."""
    cwd.mkdir(parents=True, exist_ok=True)
    # The children import the same `pipeline` as this process (a relative PYTHONPATH would not
    # survive their working directory; an installed copy elsewhere would be taken instead).
    import pipeline

    here = str(Path(pipeline.__file__).resolve().parents[1])
    paths = [
        here,
        *(str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(":") if p),
    ]
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": os.pathsep.join(paths)}
    with (cwd / "stdout.txt").open("wb") as out, (cwd / "stderr.txt").open("wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=err, env=env)
        stopped: list[str] = []
        done = threading.Event()

        def watch() -> None:
            status = Path(f"/proc/{proc.pid}/status")
            while not done.wait(0.2):
                try:
                    rss = next(
                        int(line.split()[1]) * 1024
                        for line in status.read_text().splitlines()
                        if line.startswith("VmRSS:")
                    )
                except (OSError, StopIteration):
                    return
                elapsed = time.perf_counter() - start
                if rss > max_rss_gb * 2**30 or elapsed > timeout:
                    stopped.append(
                        f"killed over {max_rss_gb:g} GB after {elapsed:.0f} s"
                        if rss > max_rss_gb * 2**30
                        else f"not done in {timeout:.0f} s"
                    )
                    proc.send_signal(signal.SIGKILL)
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        done.set()
        watcher.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    result = {"seconds": seconds, "peak_gb": usage.ru_maxrss / 2**20, "rc": proc.returncode}
    if stopped:
        result["stopped"] = stopped[0]
    elif proc.returncode != 0:
        lines = (cwd / "stderr.txt").read_text(errors="replace").strip().splitlines()
        result["stopped"] = f"failed (exit {proc.returncode}): {(lines or ['?'])[-1][:200]}"
    return result


def run_stage(stage: str, layer: Path, out: Path, args: argparse.Namespace) -> dict:
    """One stage through its real entry, and its quality figures from what it wrote."""
    spec = STAGES[stage]
    if stage == "read":
        return run_worker({"kind": "read", "layer": str(layer)}, out, args)
    module = spec["module"]
    command = [
        sys.executable,
        "-m",
        module,
        f"embeddings={layer}",
        "tracking=none",
        f"{module.split('.')[-1]}.output_dir={out / 'result'}",
        f"hydra.run.dir={out / 'hydra'}",
        *spec.get("overrides", []),
    ]
    row = measured(command, out, args.timeout, args.max_rss_gb)
    if "stopped" in row:
        return row
    result = out / "result"
    if module == "pipeline.cluster":
        metrics = json.loads((result / "metrics.json").read_text())
        row["quality"] = f"NMI {metrics['nmi']:.3f}, {metrics['n_clusters']} clusters"
        row["nmi"] = metrics["nmi"]
    elif module == "pipeline.probe":
        scores = json.loads((result / "probe.json").read_text())
        row["accuracy"] = scores["accuracy"]
        row["quality"] = f"accuracy {scores['accuracy']:.3f}" + (
            f" (trained on {scores['train_images']:,})" if "train_images" in scores else ""
        )
    else:
        import pandas as pd

        metrics = json.loads((result / "metrics.json").read_text())
        pairs = pd.read_parquet(result / "pairs.parquet", columns=["image_a", "image_b"])
        found = {
            (min(a, b), max(a, b)) for a, b in zip(pairs["image_a"], pairs["image_b"], strict=True)
        }
        planted = planted_id_pairs(layer.parent)
        hits = len(planted & found)
        row["planted_recall"] = hits / len(planted)
        row["recall_at_10"] = metrics.get("recall_at_k")
        row["quality"] = (
            f"planted {row['planted_recall']:.3f} of {len(planted):,}, "
            f"precision {hits / max(1, len(pairs)):.3f}, recall@10 "
            + ("exact" if row["recall_at_10"] is None else f"{row['recall_at_10']:.3f}")
        )
    return row


def run_worker(spec: dict, out: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", json.dumps(spec)]
    row = measured(command, out, args.timeout, args.max_rss_gb)
    if "stopped" not in row:
        row.update(json.loads((out / "stdout.txt").read_text().strip().splitlines()[-1]))
        row["seconds"] -= row.get("check_seconds", 0.0)  # the benchmark's, not the user's
    return row


# --- the baselines: what a user writes by hand --------------------------------------------------


def worker(spec: dict) -> dict:
    """One baseline in this process: read the layer as docs/outputs.md shows, call the library."""
    from pipeline.storage.contract import read_embeddings

    kind, layer = spec["kind"], Path(spec["layer"])
    if kind == "read":
        from pipeline.storage.inputs import read_layer

        embeddings = read_layer(layer)
        return {"quality": f"{len(embeddings.ids):,} rows of {embeddings.vectors.shape[1]}"}
    rows = range(spec["rows"]) if "rows" in spec else None
    e = read_embeddings(layer, rows)
    x = e.vectors
    import pandas as pd

    if kind == "faiss IVF":  # on the dedup layer, which has no labels
        return faiss_ivf(x, e.ids, layer)
    y = pd.factorize(pd.Series(e.labels))[0]
    k = int(y.max()) + 1
    if kind == "faiss.Kmeans":
        import faiss
        from sklearn.metrics import normalized_mutual_info_score

        faiss.normalize_L2(x)
        kmeans = faiss.Kmeans(x.shape[1], k, seed=0)
        kmeans.train(x)
        _, assigned = kmeans.index.search(x, 1)
        nmi = normalized_mutual_info_score(y, assigned[:, 0])
        return {"nmi": nmi, "quality": f"NMI {nmi:.3f} (trained on {min(len(x), 256 * k):,})"}
    if kind == "MiniBatchKMeans":
        from sklearn.cluster import MiniBatchKMeans
        from sklearn.metrics import normalized_mutual_info_score
        from sklearn.preprocessing import normalize

        assigned = MiniBatchKMeans(n_clusters=k, random_state=0).fit_predict(
            normalize(x, copy=False)
        )
        nmi = normalized_mutual_info_score(y, assigned)
        return {"nmi": nmi, "quality": f"NMI {nmi:.3f}"}
    if kind == "HDBSCAN":
        from sklearn.cluster import HDBSCAN
        from sklearn.metrics import normalized_mutual_info_score
        from sklearn.preprocessing import normalize

        assigned = HDBSCAN(min_cluster_size=5).fit_predict(normalize(x, copy=False))
        nmi = normalized_mutual_info_score(y, assigned)
        return {"nmi": nmi, "quality": f"NMI {nmi:.3f}, {assigned.max() + 1} clusters"}
    if kind == "LogisticRegression":
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import train_test_split
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=0.2, stratify=y, random_state=0
        )
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        accuracy = model.fit(x_train, y_train).score(x_test, y_test)
        return {"accuracy": accuracy, "quality": f"accuracy {accuracy:.3f} (80/20 split)"}
    raise ValueError(f"unknown baseline {kind}")


def faiss_ivf(x: np.ndarray, ids: list[str], layer: Path) -> dict:
    """The faiss recipe for every row's k nearest neighbours at this size: inverted lists
    (nlist = sqrt(N)) trained on 40 rows a list, nprobe 8, every row a query. The check of its
    recall (brute force on CHECK_QUERIES rows) is timed apart, and left out of its time."""
    import faiss

    n, dim, k = len(x), x.shape[1], 10
    faiss.normalize_L2(x)
    nlist = max(1, int(math.sqrt(n)))
    index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(0)
    index.train(x[np.sort(rng.choice(n, min(n, 40 * nlist), replace=False))])
    index.add(x)
    index.nprobe = 8
    _, neighbours = index.search(x, k + 1)
    start = time.perf_counter()
    queries = np.sort(rng.choice(n, min(n, CHECK_QUERIES), replace=False))
    _, truth = faiss.knn(x[queries], x, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    hits = sum(
        len(set(t[t != q][:k]) & set(f[f != q][:k]))
        for q, t, f in zip(queries, truth, neighbours[queries], strict=True)
    )
    recall = hits / (k * len(queries))
    position = {image: row for row, image in enumerate(ids)}
    planted = np.array(
        [(position[a], position[b]) for a, b in sorted(planted_id_pairs(layer.parent))]
    )
    keys_a, keys_b = planted[:, 0], planted[:, 1]
    listed = (neighbours[keys_a] == keys_b[:, None]).any(axis=1) | (
        neighbours[keys_b] == keys_a[:, None]
    ).any(axis=1)
    return {
        "recall_at_10": recall,
        "planted_recall": float(listed.mean()),
        "check_seconds": time.perf_counter() - start,
        "quality": f"planted {listed.mean():.3f} in the 10-NN lists, recall@10 {recall:.3f}",
    }


def hdbscan_reference(folder: Path, layer: Path, args: argparse.Namespace, cache: dict) -> dict:
    """sklearn's HDBSCAN on the first HDBSCAN_REFERENCE_N rows of this dim, once."""
    dim = json.loads((folder / "bench.json").read_text())["dim"]
    if dim not in cache:
        spec = {"kind": "HDBSCAN", "layer": str(layer), "rows": HDBSCAN_REFERENCE_N}
        cache[dim] = run_worker(spec, folder / "runs" / "hdbscan-reference", args)
    return cache[dim]


def run_baseline(
    name: str, folder: Path, layer: Path, n: int, args: argparse.Namespace, cache: dict
) -> dict:
    out = folder / "runs" / f"baseline-{name.replace(' ', '-').replace('.', '-')}"
    if name == "HDBSCAN" and n > args.hdbscan_max:
        reference = hdbscan_reference(folder, layer, args, cache)
        if "stopped" in reference:
            return {"stopped": f"not run (at {HDBSCAN_REFERENCE_N:,}: {reference['stopped']})"}
        guess = reference["seconds"] * (n / HDBSCAN_REFERENCE_N) ** 2
        return {
            "stopped": f"not run: ~{guess / 3600:,.1f} h, extrapolated as N^2 from "
            f"{reference['seconds']:.0f} s at {HDBSCAN_REFERENCE_N:,} "
            f"({reference['quality']})"
        }
    return run_worker({"kind": name, "layer": str(layer)}, out, args)


# --- the table ---------------------------------------------------------------------------------


def fmt_row(n: int, dim: int, stage: str, name: str, row: dict, budget: float | None) -> str:
    head = f"{n:>9,} {dim:>5} {stage:<8} {name:<34}"
    time_s = f"{row['seconds']:>8.1f}" if "seconds" in row else f"{'-':>8}"
    peak = f"{row['peak_gb']:>8.2f}" if "peak_gb" in row else f"{'-':>8}"
    budget_s = f"{budget:>7.2f}" if budget is not None else f"{'':>7}"
    return f"{head} {time_s} {peak} {budget_s}  {row.get('quality') or row.get('stopped', '')}"


def growth(rows: list[dict]) -> list[str]:
    """time ~ N^b from the smallest to the largest N of each (dim, stage, run)."""
    lines = []
    keys = sorted({(r["dim"], r["stage"], r["name"]) for r in rows})
    for dim, stage, name in keys:
        done = sorted(
            (r["n"], r["seconds"])
            for r in rows
            if (r["dim"], r["stage"], r["name"]) == (dim, stage, name) and "quality" in r
        )
        if len(done) >= 2 and done[-1][0] > done[0][0]:
            (n0, t0), (n1, t1) = done[0], done[-1]
            b = math.log(t1 / t0) / math.log(n1 / n0)
            lines.append(f"{dim:>5} {stage:<8} {name:<34} N {n0:,} -> {n1:,}: b = {b:.2f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,300000,1000000")
    parser.add_argument("--dims", default="256,1280")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=REPO / "outputs/bench/stages")
    parser.add_argument("--keep", action="store_true", help="keep the layers for the next run")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds a run may take")
    parser.add_argument("--max-rss-gb", type=float, default=12.0, help="a run over it is killed")
    parser.add_argument(
        "--hdbscan-max",
        type=int,
        default=20_000,
        help="sklearn's HDBSCAN runs up to this N, and is extrapolated above it",
    )
    parser.add_argument("--json", type=Path, help="write the rows here too")
    parser.add_argument("--quick", action="store_true", help="N=3,000 x 64, 10 classes")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.quick:
        args.sizes, args.dims, args.classes = "3000", "64", 10
    sizes = [int(s) for s in args.sizes.split(",")]
    dims = [int(d) for d in args.dims.split(",")]
    stages = args.stages.split(",")
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    load_start = os.getloadavg()[0]
    print(
        f"{os.cpu_count()} CPU cores, {args.classes} classes, {PLANTED_SHARE:.0%} of rows in "
        f"planted groups; each run a fresh process, killed over {args.max_rss_gb:g} GB or past "
        f"{args.timeout:.0f} s; load average {load_start:.1f} at the start",
        flush=True,
    )
    header = (
        f"{'N':>9} {'dim':>5} {'stage':<8} {'run':<34} {'time s':>8} {'peak GB':>8} "
        f"{'budget':>7}  quality"
    )
    rows: list[dict] = []
    cache: dict = {}
    lines = [header, "-" * len(header)]
    print(header, flush=True)
    for dim in dims:
        cache.clear()
        for n in sizes:
            folder = args.dir / f"n{n}_d{dim}"
            start = time.perf_counter()
            layers = {"labelled": write_data(folder, n, dim, args.classes, args.seed)}
            if "dedup" in stages:
                layers["dedup"] = write_dedup_data(folder, n, dim, args.seed)
            print(f"# data {n:,} x {dim}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
            budget = 1.5 * n * dim * 4 / 2**30 + 1
            for stage in stages:
                runs = [(STAGES[stage]["label"], None)]
                if not args.no_baselines:
                    runs += [(f"{b} by hand", b) for b in STAGES[stage]["baselines"]]
                layer = layers["dedup" if stage == "dedup" else "labelled"]
                for name, baseline in runs:
                    out = folder / "runs" / stage
                    if baseline is None:
                        row = run_stage(stage, layer, out, args)
                    else:
                        row = run_baseline(baseline, folder, layer, n, args, cache)
                    row.update(n=n, dim=dim, stage=stage, name=name)
                    rows.append(row)
                    line = fmt_row(n, dim, stage, name, row, budget if baseline is None else None)
                    lines.append(line)
                    print(line, flush=True)
            if not args.keep:
                shutil.rmtree(folder)
    print("\n" + "\n".join(lines))
    exponents = growth(rows)
    if exponents:
        print("\ngrowth of time with N (time ~ N^b):\n" + "\n".join(exponents))
    print(
        f"load average (1 min): {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
