"""Start-up: what short commands cost, side by side in one run against `python -c "import torch"`.

    python benchmarks/startup_bench.py                        # this checkout, best of 3 rounds
    python benchmarks/startup_bench.py --src /tmp/base/src --src src   # two checkouts, alternated

Every command runs as a user types it, in a subprocess (PYTHONPATH=--src; this checkout's src/
by default), in a scratch folder; each row is the best wall time of --rounds, and its ratio to
`import torch`. With two --src, each command runs for both in turn (so both see the same load)
and a last table compares them. The commands: every `--help`; two config errors that need no
model (a missing dataset.root, a stage's missing embeddings; tracking on, as by default); a
small extraction (the first --images photos of the demo data set as a CSV manifest, the
default model, calibration.images=0) with tracking=none and with MLflow (a local SQLite store
made beforehand), each into a new folder, then rerun with nothing new (all of it overhead);
`pipeline.cluster` on those embeddings; and a sweep of --jobs small extractions (20 photos
each, seed=0,1,...), per job (between job starts). For an extraction, `model s` is the loop's
time from its summary line (images decoded, through the model and written), `overhead` the rest.

Then tracking's own cost per run, in one process: `tracking.tracked` opened, a small stage
result recorded (10 metrics, 6 tags, 3 files, 2 documents, a figure, an embeddings input) and
closed, on a local SQLite store: the import, the first run on a new store and on an existing one
(each in a fresh process), and the median of the next runs.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ["cluster", "dedup", "probe", "report", "visualize", "layers"]
SWEEP_IMAGES = 20


def env(src: Path) -> dict[str, str]:
    found = {**os.environ, "PYTHONPATH": str(src), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    found.pop("MLFLOW_TRACKING_URI", None)
    return found


def timed(argv: list[str], src: Path, cwd: Path, code: int = 0) -> tuple[float, str]:
    """(wall seconds, stdout then stderr) of one command, which must exit with `code`."""
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=env(src), capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != code:
        sys.exit(f"{' '.join(argv)} exited {done.returncode}, not {code}:\n{done.stderr}")
    return seconds, done.stdout + "\n" + done.stderr


def model_seconds(log: str) -> float:
    """The extraction loop's time from its summary line; 0 when there was nothing to embed."""
    found = re.search(r"images run through the model in ([\d.]+) s", log)
    return float(found.group(1)) if found else 0.0


def seconds_per_job(log: str) -> float:
    """A sweep's time from its first job's start to its last's, per job in between."""
    starts = [
        datetime.datetime.strptime(m, "%Y-%m-%d %H:%M:%S,%f")
        for m in re.findall(r"^\[([\d-]+ [\d:,]+)\]\[HYDRA\]\s+#\d+ : ", log, re.MULTILINE)
    ]
    return (starts[-1] - starts[0]).total_seconds() / (len(starts) - 1)


def demo_subsets(work: Path, src: Path, sizes: list[int]) -> dict[int, list[str]]:
    """The demo data set built in `work`, and a CSV of its first n photos for each n: the
    overrides that read it."""
    root = work / "demo"
    timed([sys.executable, "-m", "pipeline.images.demo", str(root)], src, work)
    with (root / "manifest.csv").open() as file:
        rows = list(csv.DictReader(file))
    found = {}
    for n in sizes:
        with (work / f"first{n}.csv").open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows[:n])
        found[n] = [
            "dataset=csv",
            f"dataset.path={work / f'first{n}.csv'}",
            f"dataset.root={root}",
            "dataset.label_column=label",
            f"dataset.name=demo{n}",
            "calibration.images=0",
        ]
    return found


def commands(
    work: Path, images: int, data: dict[int, list[str]], jobs: int
) -> list[tuple[str, list[str], int, str]]:
    """(row, argv, exit code, kind) in the order measured; kind: once (one wall time), run (an
    extraction: the loop's time too), sweep (per job). `{out}` in argv: a folder of the
    round's, the checkout's and the tracking's own; `{store}`: the checkout's MLflow store."""
    python = sys.executable
    store = "tracking.uri=sqlite:///{store}"
    missing = str(work / "missing")
    rows = [
        ("python -c 'import torch'", [python, "-c", "import torch"], 0, "once"),
        ("python -m pipeline --help", [python, "-m", "pipeline", "--help"], 0, "once"),
        *(
            (f"python -m pipeline.{s} --help", [python, "-m", f"pipeline.{s}", "--help"], 0, "once")
            for s in STAGES
        ),
        (
            "config error: dataset.root missing",
            [python, "-m", "pipeline", "dataset=folder", f"dataset.root={missing}", store],
            2,
            "once",
        ),
        (
            "config error: cluster's embeddings missing",
            [python, "-m", "pipeline.cluster", f"embeddings={missing}.parquet", store],
            2,
            "once",
        ),
    ]
    seeds = "seed=" + ",".join(str(i) for i in range(jobs))
    for name, tracking in (("tracking=none", "tracking=none"), ("MLflow", store)):
        extract = [python, "-m", "pipeline", *data[images], tracking, "output_dir={out}"]
        cluster = [
            *(python, "-m", "pipeline.cluster", *data[images], tracking),
            "embeddings={out}/global_pool.parquet",
            "cluster.output_dir={out}/cluster",
        ]
        sweep = [python, "-m", "pipeline", "-m", *data[SWEEP_IMAGES], tracking, seeds]
        rows += [
            (f"extract {images} images, {name}", extract, 0, "run"),
            (f"extract {images} images, {name}, rerun: nothing new", extract, 0, "run"),
            (f"pipeline.cluster, {name}", cluster, 0, "once"),
            (f"sweep of {jobs} x {SWEEP_IMAGES} images, {name}: per job", sweep, 0, "sweep"),
        ]
    return rows


def measure(srcs: list[Path], rounds: int, images: int, jobs: int) -> dict[Path, dict]:
    """Every command `rounds` times, round by round, each for every checkout in turn; a table
    per checkout of the best of each. Returns the best times."""
    work = Path(tempfile.mkdtemp(prefix="startup-bench-"))
    data = demo_subsets(work, srcs[0], sorted({images, SWEEP_IMAGES}))
    # Each checkout's MLflow store made beforehand: a store's first run makes its tables too.
    make = "from mlflow import MlflowClient; MlflowClient('sqlite:///{}').search_experiments()"
    for i, src in enumerate(srcs):
        timed([sys.executable, "-c", make.format(work / f"mlflow-{i}.db")], src, work)
    rows = commands(work, images, data, jobs)
    times = {src: {name: [] for name, *_ in rows} for src in srcs}
    loops = {src: {name: [] for name, *_ in rows} for src in srcs}
    for round_ in range(rounds):
        for name, argv, code, kind in rows:
            for i, src in enumerate(srcs):
                mode = "none" if "none" in name else "mlflow"
                out = str(work / f"out-{round_}-{i}-{mode}{'-sweep' if kind == 'sweep' else ''}")
                filled = [
                    a.replace("{out}", out).replace("{store}", str(work / f"mlflow-{i}.db"))
                    for a in argv
                ]
                if kind == "sweep":
                    filled.append(f"paths.root={out}")
                seconds, log = timed(filled, src, work, code)
                if kind == "sweep":
                    seconds = seconds_per_job(log)
                times[src][name].append(seconds)
                loops[src][name].append(model_seconds(log) if kind == "run" else 0.0)
    best = {}
    for src in srcs:
        torch_s = min(times[src][rows[0][0]])
        print(f"\n{src}:\n")
        print(
            f"| command | best of {rounds}, s | x import torch | model s | overhead s | rounds, s |"
        )
        print("|---|---:|---:|---:|---:|---|")
        best[src] = {}
        for name, _, _, kind in rows:
            i = min(range(rounds), key=lambda r: times[src][name][r])
            wall, loop = times[src][name][i], loops[src][name][i]
            best[src][name] = (wall, loop)
            cells = f"{loop:.1f} | {wall - loop:.1f}" if kind == "run" else " | "
            every = ", ".join(f"{t:.2f}" for t in times[src][name])
            print(f"| {name} | {wall:.2f} | {wall / torch_s:.2f} | {cells} | {every} |")
    return best


def compare(best: dict[Path, dict]) -> None:
    """Two checkouts' best times side by side; for an extraction, its overhead's."""
    (a, first), (b, second) = best.items()
    print(f"\n| command | {a.parent.name} s | {b.parent.name} s | ratio |")
    print("|---|---:|---:|---:|")
    for name, (wall, loop) in first.items():
        other, other_loop = second[name]
        print(f"| {name} | {wall:.2f} | {other:.2f} | {other / wall:.2f} |")
        if loop:
            before, after = wall - loop, other - other_loop
            print(f"| ... its overhead | {before:.2f} | {after:.2f} | {after / before:.2f} |")


# --- tracking's own cost, in one process --------------------------------------------------------


def tracking_cost(runs: int) -> None:
    """In this process (`--tracking`): the import of tracking (and MLflow), then `runs` runs of
    tracking.tracked on a local store in the current folder; prints JSON."""
    started = time.perf_counter()
    from omegaconf import OmegaConf

    from pipeline import tracking
    from pipeline.app import compose_config
    from pipeline.config import TrackingConfig
    from pipeline.results import DatasetRef, StageResult

    imported = time.perf_counter() - started
    import matplotlib.pyplot as plt  # the figure's own import is not tracking's cost

    config = OmegaConf.structured(compose_config())  # the real config: ~150 params
    settings = TrackingConfig("mlflow", f"sqlite:///{Path.cwd()}/mlflow.db", "bench", False)
    files = []
    for name in ("metrics.json", "sizes.json", "report.md"):
        files.append(Path(name))
        files[-1].write_text(json.dumps({"name": name}))

    def figure() -> object:
        drawn, axes = plt.subplots()
        axes.plot([1, 3, 2])
        return drawn

    seconds = []
    for i in range(runs):
        result = StageResult(
            output_dir=Path.cwd(),
            metrics={f"metric{j}": j / 10 for j in range(10)},
            artifacts=files,
            documents={"layers.json": {"run": i}, "outputs.json": {"files": 3}},
            figures={"projection.png": figure},
            tags={f"tag{j}": str(j) for j in range(6)},
            inputs=[DatasetRef("demo", f"{i:064d}", str(Path.cwd()), "embeddings")],
        )
        started = time.perf_counter()
        with tracking.tracked(settings, "cluster", f"cluster {i}", config) as record:
            record(result)
        seconds.append(time.perf_counter() - started)
    print(json.dumps({"import": imported, "runs": seconds}))


def measure_tracking(src: Path, runs: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="tracking-bench-"))
    argv = [sys.executable, __file__, "--tracking", str(runs)]
    new, existing = (
        json.loads(timed(argv, src, work)[1].strip().splitlines()[0]) for _ in range(2)
    )
    later = new["runs"][1:] + existing["runs"][1:]
    print(
        f"\ntracking per run, one process ({src}): import {existing['import']:.2f} s; first run "
        f"{new['runs'][0]:.2f} s on a new store, {existing['runs'][0]:.2f} s on an existing "
        f"one; each further run {statistics.median(later) * 1000:.0f} ms (median of "
        f"{len(later)}: {', '.join(f'{s * 1000:.0f}' for s in later)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=6, help="jobs of the sweep")
    parser.add_argument(
        "--src", type=Path, action="append", help="a pipeline's src/ (this checkout's by default)"
    )
    parser.add_argument("--tracking-runs", type=int, default=6)
    parser.add_argument("--tracking", type=int, help=argparse.SUPPRESS)  # the in-process part
    options = parser.parse_args()
    if options.tracking is not None:
        tracking_cost(options.tracking)
        return
    srcs = [s.resolve() for s in options.src or [REPO / "src"]]
    print(
        f"{datetime.date.today()}, {platform.node()}: {os.cpu_count()} cores, load "
        f"{os.getloadavg()[0]:.1f}; python {platform.python_version()}"
    )
    for src in srcs:
        commit = subprocess.run(
            ["git", "-C", str(src), "log", "-1", "--format=%h"], capture_output=True, text=True
        ).stdout.strip()
        print(f"  {src}: commit {commit or '?'}")
    best = measure(srcs, options.rounds, options.images, options.jobs)
    if len(srcs) == 2:
        compare(best)
    for src in srcs:
        measure_tracking(src, options.tracking_runs)
    print(f"\nload at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
