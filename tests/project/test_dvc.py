"""DVC as the one orchestrator: `dvc repro` in a fresh clone, offline; nothing re-runs the
second time; experiments (`dvc exp run -S`) that `dvc exp show` compares; params.yaml is
DVC's Hydra composition of the package's config; every stage depends on the code it imports."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.results import write_headline

from conftest import REPO

SRC = REPO / "src"
# What `dvc exp show` compares for each layer: the figures of report.md.
HEADLINE = ("cluster_nmi", "dedup_ap", "dedup_f1", "probe_accuracy")


def dvc_env(cwd: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(cwd / "src"),  # the clone's code, not this checkout's
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def dvc(*args: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=cwd,
        env=dvc_env(cwd),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def git(*args: str, cwd: Path) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, env=dvc_env(cwd), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def ran(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


@pytest.mark.slow
def test_repro_and_two_experiments_that_compare_from_a_fresh_clone(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)

    first = ran(dvc("repro", cwd=clone))
    assert first[:2] == ["prepare", "extract"] and first[-1] == "report" and len(first) == 9

    out = clone / "outputs/dvc"
    assert (
        len(pd.read_parquet(out / "embeddings/demo/efficientnet_lite0/global_pool.parquet")) == 120
    )
    dedup = json.loads((out / "dedup/demo/efficientnet_lite0/global_pool/metrics.json").read_text())
    cluster = json.loads(
        (out / "cluster/demo/efficientnet_lite0/global_pool/metrics.json").read_text()
    )
    # The planted near-duplicates, at the calibrated threshold; their mirrored copies are not of
    # the calibration's family unless calibration.flip=true.
    assert dedup["threshold_auto"] and dedup["recall"] > 0.8 and dedup["precision"] > 0.9
    assert cluster["nmi"] > 0.9
    report = pd.read_parquet(out / "report/demo/efficientnet_lite0/report.parquet")
    assert report["layer"].tolist() == ["blocks.4", "global_pool"]
    assert report["probe_accuracy"].min() > 0.9
    assert ran(dvc("repro", cwd=clone)) == []
    # The demo typed by hand writes its own folders: what DVC tracks stays up to date.
    by_hand = subprocess.run(
        [sys.executable, "-m", "pipeline", "tracking=none"],
        cwd=clone,
        env={**os.environ, "PYTHONPATH": str(clone / "src"), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
    )
    assert by_hand.returncode == 0 and (clone / "outputs/embeddings/demo").is_dir()
    assert "up to date" in dvc("status", cwd=clone)

    # The baseline the experiments compare with: DVC's results committed, as a user would.
    git("add", "-A", cwd=clone)
    git("commit", "-q", "-m", "dvc repro", cwd=clone)

    # Two experiments, a setting more each (the second keeps the first's threshold, so that it
    # reruns only what its own setting feeds): DVC composes params.yaml with the overrides.
    threshold = ["-S", "dedup.threshold=0.99"]
    stages = ran(dvc("exp", "run", "-n", "strict", *threshold, cwd=clone))
    assert sorted(stages) == ["dedup@blocks.4", "dedup@global_pool", "report"]
    assert "dedup.threshold" in dvc("params", "diff", cwd=clone)  # the workspace vs HEAD
    stages = ran(dvc("exp", "run", "-n", "strict-k10", *threshold, "-S", "cluster.k=10", cwd=clone))
    assert sorted(stages) == ["cluster@blocks.4", "cluster@global_pool", "report"]

    # `dvc exp show` tables the headline figures of the commit and of both experiments.
    layers = ("blocks.4", "global_pool")
    names = {f"{layer}.{name}" for layer in layers for name in HEADLINE}
    rows = {}
    for row in rows_of(json.loads(dvc("exp", "show", "--json", cwd=clone))):
        found = row_metrics(row)
        assert set(found) == names, f"{row.get('name') or row['rev']}: {sorted(found)}"
        rows[row["rev"]] = rows[row.get("name")] = found
    # The commit by its hash: a clone of a detached checkout (CI) has no branch to name it.
    main = rows[git("rev-parse", "HEAD", cwd=clone).strip()]
    strict, k10 = rows["strict"], rows["strict-k10"]
    assert main["global_pool.dedup_f1"] > 0.8 and main["global_pool.cluster_nmi"] > 0.9
    for layer in layers:
        # A stricter threshold finds fewer of the planted pairs; the clusters stay.
        assert strict[f"{layer}.dedup_f1"] < main[f"{layer}.dedup_f1"]
        assert strict[f"{layer}.cluster_nmi"] == main[f"{layer}.cluster_nmi"]
        # Ten clusters for the demo's 20 labels: the clustering changes, the pairs stay.
        assert k10[f"{layer}.cluster_nmi"] < strict[f"{layer}.cluster_nmi"]
        assert k10[f"{layer}.dedup_f1"] == strict[f"{layer}.dedup_f1"]
        assert main[f"{layer}.probe_accuracy"] == strict[f"{layer}.probe_accuracy"]
    # The table's columns are those short names (a name that repeats gets its file's path).
    header = dvc("exp", "show", "--csv", cwd=clone).splitlines()[0].split(",")
    assert names <= set(header), header

    # The comparisons name the figures that moved, and only those.
    changed = dvc("exp", "diff", "strict", "strict-k10", cwd=clone)
    assert all(f"{layer}.cluster_nmi" in changed for layer in layers), changed
    assert "dedup_f1" not in changed and "cluster.k" in changed
    moved = json.loads(dvc("metrics", "diff", "--json", cwd=clone))  # HEAD vs the workspace
    assert {name for diffs in moved.values() for name in diffs} == {
        f"{layer}.{name}" for layer in layers for name in ("cluster_nmi", "dedup_f1")
    }, moved


def rows_of(table: list[dict]) -> list[dict]:
    """Every row of `dvc exp show --json`: the commits and the experiments under them."""
    rows = []
    for row in table:
        rows.append(row)
        for experiment in row.get("experiments") or []:
            rows += rows_of(experiment.get("revs") or [])
    return rows


def row_metrics(row: dict) -> dict[str, float]:
    """A row's metrics under the names `dvc exp show` gives its columns (nested keys joined
    by dots), all files together; a file DVC could not read (`!` in the table) adds none."""
    found: dict[str, float] = {}
    for result in row["data"]["metrics"].values():
        found.update(flat(result.get("data") or {}))
    return found


def flat(tree: dict, prefix: str = "") -> dict:
    leaves = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            leaves.update(flat(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def test_headline_figures_are_the_reports(tmp_path: Path) -> None:
    """Dedup's figures are against the true groups when known, else on the calibration copies
    (report.md's rule); a figure the stage lacks is left out; no file is asked, none written."""
    path = tmp_path / "metrics/dedup/blocks.4.json"
    dedup = {"ap": 0.9, "f1": 0.8, "calibration_ap": 0.7, "calibration_f1": 0.6, "recall": 1.0}
    write_headline(str(path), "blocks.4", dedup, ["dedup_ap", "dedup_f1"])
    assert json.loads(path.read_text()) == {"blocks.4": {"dedup_ap": 0.9, "dedup_f1": 0.8}}
    copies = {"calibration_ap": 0.7, "calibration_f1": 0.6}
    write_headline(str(path), "blocks.4", copies, ["dedup_ap", "dedup_f1"])
    assert json.loads(path.read_text()) == {"blocks.4": {"dedup_ap": 0.7, "dedup_f1": 0.6}}
    unlabelled = {"silhouette": 0.2}
    write_headline(str(path), "global_pool", unlabelled, ["cluster_nmi"])
    assert json.loads(path.read_text()) == {"global_pool": {}}
    assert write_headline(None, "blocks.4", dedup, ["dedup_ap"]) is None


def test_params_yaml_is_dvcs_composition_of_the_config(tmp_path: Path) -> None:
    """The committed params.yaml is what `dvc exp run` would compose: it cannot drift."""
    from dvc.utils.hydra import compose_and_dump

    composed = tmp_path / "params.yaml"
    compose_and_dump(composed, str(REPO / "conf"), None, "dvc_params", "", [])
    assert yaml.safe_load(composed.read_text()) == yaml.safe_load(
        (REPO / "params.yaml").read_text()
    ), "params.yaml is stale: regenerate it with `dvc exp run` or as the README says"


def imports(module: Path, seen: set[Path] | None = None) -> set[Path]:
    """The package's modules a module imports at its top level, transitively (imports inside
    functions, such as the app layer's tracking, load only for commands and record only)."""
    seen = set() if seen is None else seen
    for node in ast.parse(module.read_text()).body:
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("pipeline")]
        for name in names:
            path = SRC / (name.replace(".", "/") + ".py")
            if path.is_file() and path not in seen:
                seen.add(path)
                imports(path, seen)
    return seen


def test_each_stage_depends_on_the_code_it_runs() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    entries = {
        "extract": SRC / "pipeline/__main__.py",
        "cluster": SRC / "pipeline/cluster.py",
        "dedup": SRC / "pipeline/dedup.py",
        "probe": SRC / "pipeline/probe.py",
        "report": SRC / "pipeline/report.py",
    }
    for stage, entry in entries.items():
        needed = (
            {entry, SRC / "pipeline/app.py"} | imports(entry) | imports(SRC / "pipeline/app.py")
        )
        needed -= {SRC / "pipeline/__init__.py"}
        declared = {REPO / d for d in stages[stage]["deps"]}
        missing = sorted(str(p.relative_to(REPO)) for p in needed - declared)
        assert not missing, f"dvc.yaml stage {stage} lacks deps {missing}"
