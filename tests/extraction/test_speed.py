"""The speed-ups keep the results: compile=true writes the embeddings eager mode writes, and the
throughput benchmark keeps running (its figures are not asserted: this machine may be shared)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import extract
from pipeline.storage.contract import read_metadata

from conftest import N_PHOTOS, REPO, TINY_MODEL, composed, run_cli


def _embeddings(folder: Path, layer: str) -> np.ndarray:
    return np.stack(pd.read_parquet(folder / f"{layer}.parquet")["embedding"].to_numpy())


@pytest.mark.slow
def test_compile_writes_what_eager_mode_writes(tmp_path: Path, photos: Path) -> None:
    """Two hooked layers, the early stop after the second, the photos in batches of 4 (the
    short last batch is padded); the metadata says the model was compiled."""
    assert N_PHOTOS % 4, "the photos fill their last batch of 4: no short batch to pad"
    args = [
        *TINY_MODEL,
        "dataset=folder",
        f"dataset.root={photos}",
        "layers=[blocks.1,blocks.3]",
        "model.input_size=[3,64,64]",
        "batch_size=4",
        "num_workers=0",
    ]
    extract.run(composed(*args, f"output_dir={tmp_path}/eager"))
    extract.run(composed(*args, "compile=true", f"output_dir={tmp_path}/compiled"))
    for layer in ("blocks.1", "blocks.3"):
        np.testing.assert_allclose(
            _embeddings(tmp_path / "compiled", layer),
            _embeddings(tmp_path / "eager", layer),
            rtol=1e-4,
            atol=1e-5,
        )
    assert read_metadata(tmp_path / "compiled/blocks.3.parquet")["compile"] is True
    assert read_metadata(tmp_path / "eager/blocks.3.parquet")["compile"] is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compile_on_cuda_writes_what_eager_mode_writes(tmp_path: Path, photos: Path) -> None:
    args = [
        *TINY_MODEL,
        "dataset=folder",
        f"dataset.root={photos}",
        "layers=[blocks.1,global_pool]",
        "device=cuda",
        "precision=fp32",
        "batch_size=4",
    ]
    for name, extra in {"eager": [], "compiled": ["compile=true"]}.items():
        done = run_cli(*args, *extra, f"output_dir={tmp_path}/{name}", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    for layer in ("blocks.1", "global_pool"):
        a, b = _embeddings(tmp_path / "compiled", layer), _embeddings(tmp_path / "eager", layer)
        cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cosine.min() >= 0.999


@pytest.mark.slow
def test_the_throughput_benchmark_runs(tmp_path: Path) -> None:
    """--quick: every part, both photo sizes, both layers; a row per (size, layer) with a
    bound, a ratio and the foreign load it saw."""
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/throughput_bench.py"), "--quick"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if re.match(r"\| \d+x\d+ \|", line)]
    assert [row.split("|")[1:3] for row in rows] == [
        [" 500x375 ", " global_pool "],
        [" 500x375 ", " layer1 "],
        [" 3000x4000 ", " global_pool "],
        [" 3000x4000 ", " layer1 "],
    ]
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        loader, model, bound, cli, ratio = map(float, cells[3:8])
        assert min(loader, model, bound, cli) > 0
        assert ratio == pytest.approx(cli / bound, rel=0.05)  # of figures rounded to 0.1
        assert bound <= model  # the model alone is the bound with free decoding
        assert cells[8] == f"{ratio:.2f}"  # --quick runs one round
        assert re.fullmatch(r"(\d+%, ){3}\d+%", cells[10])


def quotient_of(ratio: float, a: float, b: float) -> bool:
    """`ratio` (printed to 0.01) is a / b for some a and b that print as these (to 0.1 ms):
    of small times, as a batch of 2 gives, the printed ones alone are too coarse to divide."""
    low, high = (a - 0.05) / (b + 0.05), (a + 0.05) / max(b - 0.05, 1e-9)
    return low - 0.005 <= ratio <= high + 0.005


@pytest.mark.slow
def test_the_forward_benchmark_compares_layouts_and_memory_settings() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks/forward_bench.py"),
            "--models",
            "resnet18",
            "--batch",
            "2",
            "--repeats",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    row = next(line for line in done.stdout.splitlines() if line.startswith("| resnet18 |"))
    plain, last, ratio, kept, kept_ratio, overall, gap = (float(c) for c in row.split("|")[2:9])
    assert quotient_of(ratio, last, plain)
    assert quotient_of(kept_ratio, kept, last)
    assert quotient_of(overall, kept, plain)
    assert gap < 1e-4  # the same function in either layout, with either allocator setting
