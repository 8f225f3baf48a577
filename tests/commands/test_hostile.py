"""Hostile input through the user's door: every case is built here and run through the CLI,
checking the exit code, the summary line, the failures table, that earlier results are intact
and that nothing hangs (each run under a timeout)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import extract
from pipeline.errors import ConfigError
from pipeline.storage import contract as store
from pipeline.storage.staging import staging_root

from conftest import (
    BROKEN_LAYERS,
    N_PHOTOS,
    SMALL,
    TINY_MODEL,
    broken_layer,
    composed,
    flip_a_bit,
    one_line_error,
    photos_in,
    run_cli,
    start_until_chunks,
    write_image,
    write_layer,
)

pytestmark = pytest.mark.slow
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def layer_rows(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "global_pool.parquet")


def test_a_hostile_folder_gives_each_bad_entry_its_row(tmp_path: Path) -> None:
    root, outside = tmp_path / "scraped", tmp_path / "elsewhere"
    good = photos_in(root, 6)
    jpeg = (root / good[0]).read_bytes()
    (root / "trailing.jpg").write_bytes(jpeg + os.urandom(100_000))  # a phone's motion photo
    (root / "dir.jpg").mkdir()
    os.mkfifo(root / "fifo.jpg")
    (root / "loop.jpg").symlink_to(root / "loop.jpg")
    hdr = cv2.imencode(".hdr", np.ones((4, 4, 3), np.float32))[1].tobytes()
    (root / "radiance.png").write_bytes(hdr)  # not a PNG at all: sized by nobody
    with (root / "sparse.jpg").open("wb") as f:
        f.truncate(3 * 2**30)
    write_image(outside / "x.jpg", np.zeros((8, 8, 3), np.uint8))
    (root / "outside.jpg").symlink_to(outside / "x.jpg")
    with open(os.path.join(os.fsencode(root), b"bad\xff.jpg"), "wb") as f:
        f.write(jpeg)
    (root / "anim.gif").write_bytes(b"GIF89a")
    (root / "notes.txt").write_text("not an image")
    expected = {
        "dir.jpg": "not a regular file",
        "fifo.jpg": "not a regular file",
        "loop.jpg": "symbolic links",
        "radiance.png": "size cannot be checked",
        "sparse.jpg": "over max_file_bytes",
        "outside.jpg": "outside dataset.root",
        "bad\\xff.jpg": "not valid UTF-8",
    }
    out = tmp_path / "out"
    done = run_cli(
        *SMALL,
        "dataset=folder",
        f"dataset.root={root}",
        f"output_dir={out}",
        cwd=tmp_path,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    log = done.stdout + done.stderr
    assert f"{len(good) + 1} embedded, {len(expected)} failed, see" in log
    assert "skipped 2 files (.gif: 1, .txt: 1)" in log
    failures = pd.read_parquet(out / "failures.parquet").set_index("image_id")["reason"]
    assert sorted(failures.index) == sorted(expected)
    for name, reason in expected.items():
        assert reason in failures[name], (name, failures[name])
    rows = layer_rows(out)
    assert rows["image_id"].tolist() == sorted([*good, "trailing.jpg"])
    trailing = np.stack(rows.set_index("image_id").loc[["trailing.jpg", good[0]], "embedding"])
    np.testing.assert_allclose(trailing[0], trailing[1], atol=1e-6)  # trailing bytes ignored


def test_two_runs_into_one_output_the_second_refuses_the_first_completes(tmp_path: Path) -> None:
    root = tmp_path / "images"
    names = photos_in(root, 1000)  # enough that the first run is still going when it is paused
    out = tmp_path / "out"
    args = [
        *SMALL,
        "dataset=folder",
        f"dataset.root={root}",
        f"output_dir={out}",
        "save_every=16",
        "num_workers=0",
    ]
    first = start_until_chunks(args, tmp_path, out, chunks=1)
    first.send_signal(signal.SIGSTOP)  # paused mid-run, so the second surely meets it running
    second = run_cli(*args, cwd=tmp_path, timeout=120)
    one_line_error(second, 2, f"another run (pid {first.pid} on {socket.gethostname()}")
    first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0
    rows = layer_rows(out)
    assert rows["image_id"].tolist() == names and rows["image_id"].is_unique


def test_a_resume_after_the_folder_changed_has_every_image_once(tmp_path: Path) -> None:
    root = tmp_path / "images"
    names = photos_in(root, 200)
    out = tmp_path / "out"
    args = [
        *SMALL,
        "dataset=folder",
        f"dataset.root={root}",
        f"output_dir={out}",
        "save_every=16",
        "num_workers=0",
    ]
    victim = start_until_chunks(args, tmp_path, out, chunks=3)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    added = photos_in(root, 1, start=5000)  # sorts after the others: 5000.jpg
    names = sorted([*names, *added, "0079b.jpg"])
    write_image(root / "0079b.jpg", np.zeros((20, 20, 3), np.uint8))  # and one in the middle
    done = run_cli(*args, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = layer_rows(out)
    assert rows["image_id"].tolist() == names and rows["image_id"].is_unique


def test_a_manifest_with_no_images_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "images"
    photos_in(root, 5)
    out = tmp_path / "out"
    good = run_cli(
        *SMALL, "dataset=folder", f"dataset.root={root}", f"output_dir={out}", cwd=tmp_path
    )
    assert good.returncode == 0, good.stderr
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    (tmp_path / "h.csv").write_text("path\n")
    done = run_cli(
        *SMALL,
        "dataset=csv",
        f"dataset.path={tmp_path}/h.csv",
        f"dataset.root={root}",
        f"output_dir={out}",
        cwd=tmp_path,
    )
    one_line_error(done, 2, "lists no images")
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


USER_ERRORS = [
    (["output_dir={tmp}/afile"], "is a file"),
    (["num_workers=-1"], "num_workers must be 0 or more"),
    (["decode=gpu", "device=cpu"], "decode=gpu needs a CUDA device"),
    (["engine=ray", "compile=true"], "compile=true are the local engine's"),
    (["model=resnet5"], "no model preset 'resnet5'"),
    (["model.checkpoint={tmp}/cut.safetensors"], "not a readable .safetensors file"),
    (["batch_size=x"], "batch_size"),
]
if not torch.cuda.is_available():
    USER_ERRORS.append((["device=cuda"], "torch sees no CUDA GPU"))


@pytest.mark.parametrize(("overrides", "message"), USER_ERRORS)
def test_user_errors_are_one_line_and_exit_2(
    tmp_path: Path, photos: Path, overrides: list[str], message: str
) -> None:
    (tmp_path / "afile").write_text("a file, not a folder")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    args = [o.format(tmp=tmp_path) for o in overrides]
    done = run_cli(*SMALL, "dataset=folder", f"dataset.root={photos}", *args, cwd=tmp_path)
    one_line_error(done, 2, message)


def test_more_workers_than_cores_are_capped(tmp_path: Path, photos: Path) -> None:
    done = run_cli(
        *SMALL,
        "dataset=folder",
        f"dataset.root={photos}",
        "num_workers=1000",
        f"output_dir={tmp_path}/out",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    cores = len(os.sched_getaffinity(0))
    assert f"num_workers=1000 is more than the {cores} cores" in done.stdout + done.stderr


def test_ctrl_c_is_one_line_exit_130_and_the_rerun_resumes(tmp_path: Path) -> None:
    root = tmp_path / "images"
    names = photos_in(root, 200)
    out = tmp_path / "out"
    args = [
        *SMALL,
        "dataset=folder",
        f"dataset.root={root}",
        f"output_dir={out}",
        "save_every=16",
        "num_workers=1",
        "tracking=none",
    ]
    run = start_until_chunks(
        args,
        tmp_path,
        out,
        chunks=2,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # Ctrl-C reaches the whole group: the loader's worker too
        preexec_fn=as_a_terminal_job,
    )
    os.killpg(run.pid, signal.SIGINT)  # as Ctrl-C does: the whole foreground group
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130, stderr
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith("extract:")]  # progress bar
    assert errors == ["interrupted; rerun the same command to resume"], stderr
    done = run_cli(*args, cwd=tmp_path, timeout=300)
    assert done.returncode == 0 and "resuming" in done.stdout + done.stderr
    assert layer_rows(out)["image_id"].tolist() == names


def as_a_terminal_job() -> None:
    """Ctrl-C's default action in the child, as a terminal's foreground job has it: a shell
    that started the tests in the background (`pytest &`) leaves SIGINT ignored, and Python
    then never turns it into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _forked_children(pid: int) -> list[int]:
    """Processes `pid` forked that still run its own program (loader processes), not ones that
    went on to run another (a subprocess torch starts while it loads)."""
    try:
        own = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # it has ended
        return []
    children = []
    for listing in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            listed = listing.read_text().split()
        except OSError:  # the thread has ended
            continue
        for child in listed:
            try:
                if Path(f"/proc/{child}/cmdline").read_bytes() == own:
                    children.append(int(child))
            except OSError:  # it has ended already
                pass
    return children


@pytest.mark.skipif(
    not Path(f"/proc/self/task/{os.getpid()}/children").exists(), reason="needs Linux's /proc"
)
def test_ctrl_c_as_the_loader_starts_is_one_line_and_exit_130(tmp_path: Path) -> None:
    """Ctrl-C the moment the first loader process is forked, while the others are still being
    started: the worst moment, when each process is half set up. Three tries, as it is a race."""
    root = tmp_path / "images"
    photos_in(root, 200)
    args = [*SMALL, "dataset=folder", f"dataset.root={root}", "num_workers=2"]
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        run = subprocess.Popen(
            [sys.executable, "-m", "pipeline", *args, f"output_dir={out}"],
            cwd=tmp_path,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # Ctrl-C reaches the whole group: the loader's workers too
            preexec_fn=as_a_terminal_job,
        )
        deadline = time.monotonic() + 120
        while not staging_root(out).exists():  # the model is described; the loader comes next
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()
            time.sleep(0.01)
        while not _forked_children(run.pid):  # no sleep: the first fork is the moment
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()
        os.killpg(run.pid, signal.SIGINT)
        _, stderr = run.communicate(timeout=120)
        lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
        errors = [line for line in lines if not line.startswith("extract:")]  # progress bar
        assert run.returncode == 130, (attempt, stderr)
        assert errors == ["interrupted; rerun the same command to resume"], (attempt, stderr)


def test_an_empty_label_cell_is_a_null_label(tmp_path: Path, photos: Path) -> None:
    """A CSV manifest with an empty label cell: that image is a row with a null label, the
    others keep theirs as strings; tracked, so the run's picture of the embeddings is drawn
    with the unlabelled image in it too."""
    manifest = tmp_path / "labels.csv"
    manifest.write_text(
        "path,label\nanimals/chelsea.png,cat\nscenes/rocket.png,\nanimals/coffee.png,7\n"
    )
    done = run_cli(
        *TINY_MODEL[:-1],  # tracked
        "model.input_size=[3,32,32]",
        "dataset=csv",
        f"dataset.path={manifest}",
        f"dataset.root={photos}",
        "dataset.label_column=label",
        "calibration.images=0",
        f"output_dir={tmp_path}/out",
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "tracking failed" not in done.stdout + done.stderr
    table = pq.read_table(tmp_path / "out/global_pool.parquet")
    assert table.column("image_id").to_pylist() == [
        "animals/chelsea.png",
        "scenes/rocket.png",
        "animals/coffee.png",
    ]
    assert table.column("label").to_pylist() == ["cat", None, "7"]
    assert str(table.schema.field("label").type) == "string"


def test_a_tracking_server_that_never_answers_costs_a_warning(tmp_path: Path, photos: Path) -> None:
    with socket.socket() as silent:  # accepts connections into its backlog, answers nothing
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        done = run_cli(
            *TINY_MODEL[:-1],
            "model.input_size=[3,32,32]",
            "dataset=folder",
            f"dataset.root={photos}",
            f"tracking.uri={uri}",
            f"output_dir={tmp_path}/out",
            cwd=tmp_path,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr
    assert "tracking failed" in done.stdout + done.stderr
    assert len(layer_rows(tmp_path / "out")) == N_PHOTOS


def _layer_file(tmp_path: Path, name: str) -> Path:
    if name == "one row":
        return write_layer(tmp_path / "one.parquet", np.ones((1, 4)), ["a"], None)
    if name == "not Parquet":
        (tmp_path / "text.parquet").write_text("hello")
        return tmp_path / "text.parquet"
    if name == "foreign":
        pd.DataFrame({"x": [1, 2]}).to_parquet(tmp_path / "foreign.parquet")
        return tmp_path / "foreign.parquet"
    if name in ("calibration copies altered", "truth missing"):  # the layer itself is good
        layer = broken_layer(tmp_path / "layer.parquet", "good")
        if name == "calibration copies altered":  # dedup.threshold=auto reads them too
            ids = [f"{i:02d}.jpg" for i in range(12)]
            copies = write_layer(
                store.calibration_path(layer),
                np.random.default_rng(1).normal(size=(12, 4)),
                [f"{i}#copy0" for i in ids],
                None,
                sources=ids,
            )
            flip_a_bit(copies / "part-000000.parquet")
        return layer
    return broken_layer(tmp_path / "layer.parquet", name)


# Reading checks what writing promised, in every stage (`pipeline.storage.inputs.read_layer`, whose
# own tests take every case): the cases the issues found, each through the stage it was found in
# (tracebacks, or exit 0).
DOWNSTREAM = [
    ("cluster", "one row", "clustering needs 2 or more"),
    ("cluster", "NaN", "NaN or Inf"),
    ("cluster", "not Parquet", "is not a Parquet file"),
    ("cluster", "foreign", "was not written by this pipeline"),
    # The other broken layers go through dedup and probe below: every stage reads its layer
    # through one check, which test_read_layer.py tries on every case.
    *[("cluster", case, BROKEN_LAYERS[case]) for case in ("part missing", "repeated ids")],
    *[
        ("dedup", case, BROKEN_LAYERS[case])
        for case in (
            "part altered",
            "null ids",
            "null vectors",
            "parts of different dims",
            "metadata not an object",  # dedup wrote its files, then crashed
        )
    ],
    ("dedup", "calibration copies altered", BROKEN_LAYERS["part altered"]),
    ("dedup", "truth missing", "dedup.truth"),  # it wrote its files first
    *[
        ("probe", case, BROKEN_LAYERS[case])
        for case in (
            "NaN",  # exit 0 with an accuracy of NaN
            "repeated ids",  # exit 0
            "non-string ids",
            "rows of mixed length",
            "parts of different dims",
            "metadata not an object",  # probe wrote probe.json, then crashed
        )
    ],
    ("probe", "no rows", "hold no images"),
    ("probe", "labels all null", "no labels: set dataset.labels_from_folders=true or"),
    ("probe", "labels of one class, the rest null", "dataset.labels_from_folders=true or"),
]


@pytest.mark.parametrize(("stage", "case", "message"), DOWNSTREAM)
def test_downstream_bad_embeddings_are_one_line_exit_2(
    tmp_path: Path, stage: str, case: str, message: str
) -> None:
    layer = _layer_file(tmp_path, case)
    overrides = {
        "dedup": ["dedup.threshold=0.9"],
        "calibration copies altered": ["dedup.threshold=auto"],
        "truth missing": ["dedup.threshold=0.9", f"dedup.truth={tmp_path}/missing.csv"],
    }
    done = run_cli(
        f"embeddings={layer}",
        "tracking=none",
        f"{stage}.output_dir={tmp_path / 'result'}",
        *overrides.get(case, overrides.get(stage, [])),
        module=f"pipeline.{stage}",
        cwd=tmp_path,
    )
    one_line_error(done, 2, message)
    assert not (tmp_path / "result").exists()  # checked before anything is written


def test_verify_false_reads_a_changed_part_of_the_same_size(tmp_path: Path) -> None:
    layer = broken_layer(tmp_path / "layer.parquet", "part altered")
    args = [f"embeddings={layer}", "tracking=none", f"cluster.output_dir={tmp_path / 'out'}"]
    done = run_cli(*args, "verify=false", module="pipeline.cluster", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out/metrics.json").read_text())["n_images"] == 12


def test_images_without_a_label_are_left_out_of_probe_and_cluster_scores(tmp_path: Path) -> None:
    layer = broken_layer(tmp_path / "layer.parquet", "labels partly null")
    args = [f"embeddings={layer}", "tracking=none"]
    done = run_cli(
        *args, f"probe.output_dir={tmp_path / 'probe'}", module="pipeline.probe", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "left out 4 of 12 images: they have no label" in done.stdout + done.stderr
    scores = json.loads((tmp_path / "probe/probe.json").read_text())
    assert scores["n_images"] == 8 and scores["n_classes"] == 2
    done = run_cli(
        *args, f"cluster.output_dir={tmp_path / 'cluster'}", module="pipeline.cluster", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "cluster/metrics.json").read_text())
    assert metrics["n_images"] == 12 and metrics["n_clusters"] == 2 and "nmi" in metrics


def test_report_takes_partial_metadata_and_refuses_metadata_that_is_not_an_object(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    broken_layer(out / "blocks.1.parquet", "good")  # metadata without pool, depth, ...
    args = [f"output_dir={out}", "tracking=none", f"report.output_dir={tmp_path / 'report'}"]
    done = run_cli(*args, module="pipeline.report", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "| blocks.1 | - | 4 | - |" in (tmp_path / "report/report.md").read_text()
    shutil.rmtree(tmp_path / "report")
    broken_layer(out / "blocks.2.parquet", "metadata not an object")
    done = run_cli(*args, module="pipeline.report", cwd=tmp_path)
    one_line_error(done, 2, BROKEN_LAYERS["metadata not an object"])
    assert not (tmp_path / "report").exists()


def test_a_full_disk_is_one_line_and_the_old_outputs_stay(
    tmp_path: Path, photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = [
        *SMALL,
        "dataset=folder",
        f"dataset.root={photos}",
        "num_workers=0",
        f"output_dir={tmp_path / 'out'}",
    ]
    extract.run(composed(*overrides))
    before = {p: p.read_bytes() for p in sorted((tmp_path / "out").rglob("*")) if p.is_file()}

    def full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.os, "fsync", full)
    with pytest.raises(ConfigError, match=r"^disk full writing .* MiB needed, .* MiB free"):
        extract.run(composed(*overrides, "pool=max"))
    after = {p: p.read_bytes() for p in sorted((tmp_path / "out").rglob("*")) if p.is_file()}
    assert after == before
