"""Near-duplicate search on L2-normalised embeddings, the entry its callers use: `search` (each
row's k nearest neighbours and every pair at or above a cosine-similarity threshold, exact or
approximate, with the approximation's recall measured on a sample of queries and reported) and
`groups` (the connected components of those pairs).

`search(..., method="auto")` chooses (and says why, in `Neighbours.reason`):

- a CUDA device: exact, by faiss's GPU flat index where the faiss package has GPU support, else
  blocked torch matrix products in fp16 with an fp32 re-check;
- CPU and N <= EXACT_CPU_MAX_N (fewer above EXACT_CPU_DIM dimensions: `exact_cpu_max_n`):
  exact, faiss's blocked BLAS search;
- CPU and larger N: IVF (inverted lists from spherical k-means on the rows' leading principal
  axes), scanned list by list with BLAS in the full space, nprobe widened until recall@k on a
  sample of queries reaches `min_recall`.

The methods live beside this module: `exact` (faiss BLAS on the CPU, torch on a GPU, and the
blocked kernels all methods share), `approximate` (IVF and HNSW with their recall measurement)
and `found` (`Neighbours`, what a search returns); this module names them all.

Pairs come from a range search, not only from the top k: a row whose k-th neighbour is still at
or above the threshold may have more, so its whole neighbourhood above the threshold is searched
(exactly over all rows; by IVF over the lists the row probes, the pair recall on the sample
saying what that missed). A group of 60 copies of one image therefore yields all 60*59/2 pairs
even with k=10. Groups are connected components of those pairs (`groups`), never all pairs of
a component.

Memory: the embeddings are read in place (float32, C order) and never copied whole; similarities
are computed a block at a time. IVF copies its k-means training sample projected (40 rows per
list, IVF_PCA_DIM values each); HNSW and the faiss GPU index are the exceptions: faiss stores its
own copy of the vectors (the GPU's, in device memory).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.search import exact
from pipeline.search.approximate import hnsw, ivf
from pipeline.search.exact import exact_cpu, exact_torch
from pipeline.search.found import Neighbours, checked

__all__ = [
    "EXACT_CPU_DIM",
    "EXACT_CPU_MAX_N",
    "METHODS",
    "Neighbours",
    "exact_cpu",
    "exact_torch",
    "groups",
    "hnsw",
    "ivf",
    "resolve_device",
    "search",
]

METHODS = ("auto", "exact", "ivf", "hnsw")

# Switch point of method=auto on the CPU. Measured on the 2-core development machine, dim 256,
# k=10 (benchmarks/dedup_bench.py): exact (faiss BLAS) takes 6.3 s at N=50k with the machine to
# itself, 22-31 s with other processes busy on it (load ~4), 254 s at 200k (loaded), and grows
# as N^2 (~2 h at 1M); IVF at recall@10 >= 0.99 took 7 s at 50k, 28 s at 200k, 106 s at 1M
# (loaded). Up to 100k exact stays within ~2 minutes even on the loaded machine and loses
# nothing, so it is kept there; beyond, its cost runs away. Its cost grows as N^2 x dim: above
# EXACT_CPU_DIM dimensions the switch point falls as 1 / sqrt(dim) (44,721 rows at 1280), so the
# exact search stays within the same time (at 100k x 1280 it took 476 s on the loaded machine).
EXACT_CPU_MAX_N = 100_000
EXACT_CPU_DIM = 256


def search(
    unit: np.ndarray,
    k: int,
    threshold: float,
    method: str = "auto",
    device: str = "auto",
    min_recall: float = 0.99,
    sample: int = 1000,
    seed: int = 0,
) -> Neighbours:
    """Each row's k nearest neighbours and all pairs >= threshold, by cosine similarity.

    `unit` holds L2-normalised rows (float32 in C order is read in place; anything else is
    converted once). method: "auto", "exact", "ivf" or "hnsw"; device: "auto", "cpu" or a CUDA
    device ("cuda", "cuda:1"): only the exact method runs on CUDA. Approximate methods widen
    their search until recall@k on `sample` random queries reaches `min_recall` (or a cap, which
    `params["recall_reached"]` reports)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    unit = checked(unit, k, threshold)
    if not 0 < min_recall <= 1:
        raise ValueError(f"min_recall is a share in (0, 1], got {min_recall}")
    if sample < 1:
        raise ValueError(f"sample must be at least 1 query, got {sample}")
    device = resolve_device(device)
    method, reason = _choose(method, device, *unit.shape)
    if method != "exact" and device != "cpu":
        raise ValueError(f"method={method!r} runs on the CPU (faiss-cpu); got device={device!r}")
    if method == "exact" and device == "cpu":
        found = exact_cpu(unit, k, threshold)
    elif method == "exact" and exact.faiss_gpus() > 0:
        found = exact.exact_faiss_gpu(unit, k, threshold, device=device)
    elif method == "exact":
        found = exact_torch(unit, k, threshold, device=device)
    elif method == "ivf":
        found = ivf(unit, k, threshold, min_recall=min_recall, sample=sample, seed=seed)
    else:
        found = hnsw(unit, k, threshold, min_recall=min_recall, sample=sample, seed=seed)
    # On a GPU the kernel's own line says which (faiss GPU, or torch and its dtype).
    return replace(found, reason=reason if device == "cpu" else f"{reason}; {found.reason}")


def _choose(method: str, device: str, n: int, dim: int = EXACT_CPU_DIM) -> tuple[str, str]:
    """The method to run on `device` for n rows of `dim` values, and why: "auto" by the switch
    points."""
    if method != "auto":
        return method, f"{method} on {device}: method={method!r} requested"
    if device != "cpu":
        return "exact", f"exact on {device}: a CUDA device is available (used at any N)"
    most = exact_cpu_max_n(dim)
    switch = f"EXACT_CPU_MAX_N={EXACT_CPU_MAX_N:,}" + (
        f", {most:,} at dim {dim}" if most != EXACT_CPU_MAX_N else ""
    )
    if n <= most:
        return "exact", f"exact on CPU: N={n:,} <= {switch}"
    return "ivf", f"ivf on CPU: N={n:,} > {switch}, no CUDA device"


def chosen_method(method: str, device: str, n: int, dim: int) -> str:
    """The method `search` would run for n rows of `dim` values: "exact", "ivf" or "hnsw"."""
    return _choose(method, resolve_device(device), n, dim)[0]


def exact_cpu_max_n(dim: int) -> int:
    """The most rows method=auto searches exactly on the CPU at `dim` values a row: the exact
    search costs N^2 x dim, so above EXACT_CPU_DIM the switch point falls as 1 / sqrt(dim)."""
    if dim <= EXACT_CPU_DIM:
        return EXACT_CPU_MAX_N
    return int(EXACT_CPU_MAX_N * math.sqrt(EXACT_CPU_DIM / dim))


def resolve_device(device: str) -> str:
    """The device to run on: for "auto", "cuda" when torch sees a CUDA device, else "cpu"."""
    if device == "cpu":
        return device
    if device == "auto":
        return "cuda" if _cuda_available() else "cpu"
    if not device.startswith("cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or a CUDA device, got {device!r}")
    if not _cuda_available():
        raise ValueError(f"device={device!r} but torch sees no CUDA device")
    return device


def _cuda_available() -> bool:
    # Importing torch costs ~1 s and ~500 MB of memory: a CPU-only machine (no NVIDIA driver)
    # keeps the stage torch-free.
    if not (Path("/proc/driver/nvidia").exists() or shutil.which("nvidia-smi")):
        return False
    import torch

    return torch.cuda.is_available()


def groups(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of the pair graph over n rows (a sparse graph of the pairs' edges:
    a component's pairs are never listed), numbered 0.. in order of first row; -1 for rows in
    no pair."""
    labels = np.full(n, -1)
    if len(a) == 0:
        return labels
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    _, components = connected_components(graph, directed=False)
    in_pair = np.zeros(n, bool)
    in_pair[a] = in_pair[b] = True
    _, labels[in_pair] = np.unique(components[in_pair], return_inverse=True)
    return labels
