"""What a stage shows while it runs: each long step's start and end in the log, a bar with a rate
and an estimate over each loop that knows its total (on stderr, tqdm's settings from the
environment), a line every HEARTBEAT_S where nothing else moves; and every stage's CLI showing
them on a layer of 20k rows."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold, cross_validate

from pipeline import progress
from pipeline.search import neighbours

from conftest import run_cli, write_layer


def test_a_step_logs_its_start_and_its_seconds(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "pipeline.progress"), progress.step("fitting") as shown:
        assert shown is None
    assert caplog.records[0].message == "fitting ..."
    assert re.fullmatch(r"fitting: done in \d+\.\d s", caplog.records[-1].message)


def test_a_failed_step_leaves_the_error_to_say_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO), pytest.raises(KeyError), progress.step("fitting"):
        raise KeyError("x")
    assert [r.message for r in caplog.records] == ["fitting ..."]


def test_while_nothing_moves_a_step_says_it_is_still_running(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.05)
    with caplog.at_level(logging.INFO), progress.step("fitting"):
        time.sleep(0.5)
    beats = [r.message for r in caplog.records if "still running" in r.message]
    assert len(beats) >= 3 and re.fullmatch(r"fitting: still running, 0\.\d s so far", beats[0])


def test_a_bar_that_moves_stands_for_the_heartbeat(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Rows counted on the step's bar, drawn as they go: no heartbeat lines between them."""
    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.2)
    monkeypatch.setenv("TQDM_MININTERVAL", "0")
    monkeypatch.setenv("TQDM_DELAY", "0")
    with caplog.at_level(logging.INFO), progress.step("searching", 10, "row") as rows:
        for _ in range(10):
            time.sleep(0.06)
            rows.update()
    assert not [r for r in caplog.records if "still running" in r.message]
    drawn = capsys.readouterr().err
    assert "searching: 100%|" in drawn and "10/10 [" in drawn and "row/s]" in drawn


def test_bars_show_after_a_delay_unless_the_environment_says_otherwise(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A loop shorter than DELAY_S draws nothing; TQDM_DELAY=0 draws every bar, with large
    counts scaled; TQDM_DISABLE=1 none."""
    assert list(progress.tick(range(20_000), "rows")) == list(range(20_000))
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("TQDM_DELAY", "0")
    list(progress.tick(iter(range(20_000)), "rows", 20_000, "row"))
    assert "rows: 100%|██████████| 20.0k/20.0k" in capsys.readouterr().err
    monkeypatch.setenv("TQDM_DISABLE", "1")
    list(progress.tick(range(3), "rows"))
    assert capsys.readouterr().err == ""


def test_folds_are_counted_as_a_cross_validation_fits_them(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TQDM_DELAY", "0")
    x = np.random.default_rng(0).normal(size=(60, 3))
    y = (x[:, 0] > 0).astype(int)
    scores = cross_validate(LogisticRegression(), x, y, cv=progress.Folds(KFold(4), "probe"))
    assert len(scores["test_score"]) == 4
    assert "probe: 100%|██████████| 4/4 [" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["ivf", "hnsw"])
def test_the_approximate_searches_show_their_steps_and_bars(
    method: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TQDM_DELAY", "0")
    unit = np.random.default_rng(0).normal(size=(4000, 16)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    with caplog.at_level(logging.INFO):
        neighbours.search(unit, 5, 0.95, method, "cpu", sample=100)
    drawn = capsys.readouterr().err
    if method == "ivf":
        assert "ivf: k-means of 4,000 rows into 102 lists: done in" in caplog.text
        assert "ivf: rows to their lists: 100%|██████████| 4000/4000 [" in drawn
        assert re.search(r"ivf search \(nprobe \d+\): 100%\|██████████\| \d+/\d+ \[", drawn)
    else:
        assert "hnsw: building the graph of 4,000 rows: done in" in caplog.text
        assert re.search(r"hnsw search \(efSearch \d+\): 100%\|██████████\| 4000/4000 \[", drawn)
    assert "exact nearest neighbours: 100%|██████████| 100/100 [" in drawn  # the recall's truth


ROWS = 20_000


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A layer of 20k rows of 64 values in 10 labelled clusters, in an extraction's folder."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, ROWS)
    vectors = rng.normal(size=(10, 64))[labels] + rng.normal(scale=0.5, size=(ROWS, 64))
    path = tmp_path_factory.mktemp("extraction") / "blocks.6.parquet"
    return write_layer(
        path, vectors, [f"{i:06d}.jpg" for i in range(ROWS)], [f"c{c}" for c in labels]
    )


READ = [
    "reading {layer} ...",
    "checking blocks.6.parquet: 100%|██████████|",
    "reading blocks.6.parquet: 100%|██████████| 20.0k/20.0k [",
    "reading {layer}: done in ",
]
# stage -> (overrides, what its log (stdout) and its bars (stderr) show, in order)
STAGES = {
    "cluster": (
        ["cluster.method=kmeans"],
        [
            *READ,
            "clustering 20,000 images (kmeans) ...",
            "clustering 20,000 images (kmeans): done in ",
            "scoring the clusters: done in ",
            "writing {out}: done in ",
            "drawing the pictures: done in ",
        ],
    ),
    "dedup": (
        ["dedup.threshold=0.95"],
        [
            *READ,
            "whitening and normalising: done in ",
            "searching 20,000 images ...",
            "exact nearest neighbours: 100%|██████████| 20.0k/20.0k [",
            "searching 20,000 images: done in ",
            "grouping the pairs: done in ",
            "writing {out}: done in ",
        ],
    ),
    "probe": (
        [],
        [
            *READ,
            "cross-validating a linear probe on 20,000 images ...",
            "probe: 100%|██████████| 5/5 [",
            "cross-validating a linear probe on 20,000 images: done in ",
            "writing {out}: done in ",
        ],
    ),
    "report": (
        # This model's layers only: the layer's folder sits in pytest's temporary root, whose
        # other folders (other tests') are no models to compare with.
        ["report.cka_models=[]"],
        [
            "reading the layers under {folder} and their results ...",
            "layers: 100%|██████████| 1/1 [",
            "writing {out}: done in ",
        ],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_shows_its_steps_and_bars(stage: str, layer: Path, tmp_path: Path) -> None:
    """`python -m pipeline.<stage>` on 20k rows, with TQDM_DELAY=0 so that every bar shows
    however short its loop on this machine: each step's start and end in the log (stdout), in
    the order they ran, and the bars (on stderr), each with its rate."""
    overrides, expected = STAGES[stage]
    out = tmp_path / stage
    args = [
        *overrides,
        f"embeddings={layer}",
        f"output_dir={layer.parent}",
        f"{stage}.output_dir={out}",
        "tracking=none",
    ]
    done = run_cli(*args, cwd=tmp_path, module=f"pipeline.{stage}", env={"TQDM_DELAY": "0"})
    assert done.returncode == 0, done.stderr
    log = [line.split("] - ", 1)[-1] for line in done.stdout.splitlines()]
    # Every drawing of a bar (tqdm redraws one after a carriage return); each, once full, with
    # its rate.
    bars = [line for line in done.stderr.splitlines() if "%|" in line]
    full = [line for line in bars if "100%|" in line]
    assert all(re.search(r"(\d[kMG]?(row|B|fold|layer)/s|s/fold)]$", line) for line in full), full
    texts = [line.format(layer=layer, out=out, folder=layer.parent) for line in expected]
    _in_order([t for t in texts if "%|" not in t], log)
    _in_order([t for t in texts if "%|" in t], bars)


def _in_order(expected: list[str], lines: list[str]) -> None:
    """Each of `expected` begins a line of `lines`, in this order."""
    found = iter(lines)
    for text in expected:
        assert any(line.startswith(text) for line in found), (text, lines)
