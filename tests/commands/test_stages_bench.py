"""The stages at scale: benchmarks/stages_bench.py's CI-sized run, every stage through its real
entry beside the library call a user would write, measured and within the memory goal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


@pytest.mark.slow
def test_benchmark_quick_runs_every_stage_beside_its_baseline(tmp_path: Path) -> None:
    results = tmp_path / "rows.json"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks/stages_bench.py"),
            "--quick",
            "--dir",
            str(tmp_path / "data"),
            "--json",
            str(results),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr
    rows = {(r["stage"], r["name"]): r for r in json.loads(results.read_text())}
    assert {stage for stage, _ in rows} == {"read", "cluster", "hdbscan", "dedup", "probe"}
    assert ("cluster", "faiss.Kmeans by hand") in rows and (
        "probe",
        "LogisticRegression by hand",
    ) in rows
    for (stage, name), row in rows.items():
        assert "stopped" not in row, (stage, name, row["stopped"])
        assert row["seconds"] > 0 and row["peak_gb"] > 0
        if not name.endswith("by hand"):  # the goal: 1.5 x the embeddings + 1 GB
            assert row["peak_gb"] < 1.5 * row["n"] * row["dim"] * 4 / 2**30 + 1, (stage, row)
    # The planted structure is found: the clusters, the copies, the labels.
    assert rows["cluster", "pipeline.cluster (k-means)"]["nmi"] > 0.6
    assert rows["dedup", "pipeline.dedup"]["planted_recall"] > 0.9
    assert rows["probe", "pipeline.probe"]["accuracy"] > 0.8
    assert "pipeline.probe" in done.stdout and "LogisticRegression by hand" in done.stdout
