"""Near-duplicate search on L2-normalised embeddings: each row's k nearest neighbours and every
pair at or above a cosine-similarity threshold, exact or approximate, with the approximation's
recall measured on a sample of queries and reported.

`search(..., method="auto")` chooses (and says why, in `Neighbours.reason`):

- a CUDA device: exact, blocked torch matrix products in fp16 with an fp32 re-check;
- CPU and N <= EXACT_CPU_MAX_N: exact, faiss's blocked BLAS search;
- CPU and larger N: IVF (inverted lists from spherical k-means), searched list by list with BLAS,
  nprobe widened until recall@k on a sample of queries reaches `min_recall`.

Pairs come from a range search, not only from the top k: a row whose k-th neighbour is still at
or above the threshold may have more, so its whole neighbourhood above the threshold is searched
(exactly). A group of 60 copies of one image therefore yields all 60*59/2 pairs even with k=10.
Groups are connected components of those pairs (`groups`), never all pairs of a component.

Memory: the embeddings are read in place (float32, C order) and never copied whole; similarities
are computed a block at a time. IVF copies its k-means training sample (40 rows per list: 16% of
the rows at N=1M); HNSW is the exception: faiss stores its own copy of the vectors.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

if TYPE_CHECKING:
    import torch

METHODS = ("auto", "exact", "ivf", "hnsw")
IP = faiss.METRIC_INNER_PRODUCT

# Switch point of method=auto on the CPU. Measured on the 2-core development machine, dim 256,
# k=10 (benchmarks/dedup_bench.py): exact (faiss BLAS) takes 6.3 s at N=50k with the machine to
# itself, 22-31 s with other processes busy on it (load ~4), 254 s at 200k (loaded), and grows
# as N^2 (~2 h at 1M); IVF at recall@10 >= 0.99 took 7 s at 50k, 28 s at 200k, 106 s at 1M
# (loaded). Up to 100k exact stays within ~2 minutes even on the loaded machine and loses
# nothing, so it is kept there; beyond, its cost runs away.
EXACT_CPU_MAX_N = 100_000

# Similarities computed at once by the torch path (rows x N of them): bounds device memory.
TORCH_BLOCK_BYTES = 1 << 30
# Query rows searched at once (their results, and a copy of them when they are not consecutive
# rows), and probe-list entries at once (IVF): bound host memory.
QUERY_ROWS = 1 << 16
QUERY_PROBES = 1 << 24
# Exact search hands faiss this many query rows per thread at once.
EXACT_ROWS = 4096

# IVF parameters from N: nlist ~ 4 sqrt(N) lists of ~sqrt(N)/4 vectors; k-means trained on 40
# points per list (faiss warns below 39) for 10 iterations (more moved recall@10 by < 0.001 on
# the benchmark data). nprobe starts at 8 and doubles until the sampled recall holds, up to
# nlist/8: beyond that the scan costs more than an eighth of the exact search.
IVF_LISTS_PER_SQRT_N = 4
IVF_TRAIN_PER_LIST = 40
IVF_KMEANS_ITER = 10
IVF_NPROBE_START = 8
IVF_MAX_SCAN = 8

# HNSW (method="hnsw" only). On the benchmark's clustered vectors it reached recall@10 0.9896 at
# 50k in 80 s and 0.972 at 200k in 325 s (efSearch at its cap, 1024; it also missed 0.3% of the
# planted copies there), where IVF reached 0.99 in 7 s and 1.0 in 28 s. efSearch doubles from 32
# (at least k + 1) until the sampled recall holds, up to 1024.
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
HNSW_EF_START = 32
HNSW_EF_MAX = 1024

# Two fp32 computations of one dot product (GEMM vs per-pair) differ by ~1e-7: a neighbour within
# this of the exact k-th similarity is a tie, and counts as found in recall@k.
SIM_TOL = 1e-6


@dataclass(frozen=True)
class Neighbours:
    """What a search found.

    pairs_a, pairs_b, similarity: every pair with similarity >= threshold, a < b, each once,
        most similar first (found by range search: not capped at k).
    knn_indices, knn_similarities: each row's k most similar other rows, best first; -1 and
        -inf where the data has fewer than k other rows.
    recall_at_k: share of the exact k nearest neighbours found, measured on `params["sample"]`
        random queries against brute force; None for exact methods.
    pair_recall: on the same queries, share of their exact pairs >= threshold that are in
        `pairs_*`; None for exact methods, or when the sampled queries have no such pair.
    params: what was used (nlist, nprobe, efSearch, calibration history, ...).
    reason: one line saying why this method ran, with the switch points.
    """

    pairs_a: np.ndarray
    pairs_b: np.ndarray
    similarity: np.ndarray
    knn_indices: np.ndarray
    knn_similarities: np.ndarray
    threshold: float
    method_used: str
    device: str
    reason: str
    params: dict[str, object] = field(default_factory=dict)
    recall_at_k: float | None = None
    pair_recall: float | None = None

    @classmethod
    def none(
        cls, n: int, k: int, threshold: float, method: str, device: str, reason: str
    ) -> Neighbours:
        """No neighbours and no pairs for n rows: what fewer than two rows have."""
        knn_d, knn_i = _no_knn(n, k)
        return cls(
            pairs_a=np.empty(0, np.int64),
            pairs_b=np.empty(0, np.int64),
            similarity=np.empty(0, np.float32),
            knn_indices=knn_i,
            knn_similarities=knn_d,
            threshold=threshold,
            method_used=method,
            device=device,
            reason=reason,
        )

    def summary(self) -> str:
        """One line for a run's log: method, why, pairs found, and what the approximation cost."""
        k = self.knn_indices.shape[1]
        line = f"{self.reason}; {len(self.pairs_a):,} pairs >= {self.threshold}"
        if self.recall_at_k is not None:
            line += f"; recall@{k} {self.recall_at_k:.4f} on {self.params['sample']:,} queries"
            if self.pair_recall is not None:
                line += (
                    f", pairs >= threshold {self.pair_recall:.4f} of "
                    f"{self.params['sample_pairs']:,}"
                )
            if not self.params["recall_reached"]:
                line += f" (min_recall {self.params['min_recall']} NOT reached at the cap)"
        settings = {
            key: value
            for key, value in self.params.items()
            if key in ("nlist", "nprobe", "ef_search", "dtype")
        }
        if settings:
            line += " [" + ", ".join(f"{key}={value}" for key, value in settings.items()) + "]"
        return line

    def candidates(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All pairs the search looked at closely, for precision/recall over thresholds: the
        union of the k-nearest lists and the range pairs; (a, b, similarity), a < b, each once,
        most similar first."""
        n, k = self.knn_indices.shape
        a = np.repeat(np.arange(n), k)
        b = self.knn_indices.reshape(-1)
        found = b >= 0
        return _unique_pairs(
            np.concatenate([a[found], self.pairs_a]),
            np.concatenate([b[found], self.pairs_b]),
            np.concatenate([self.knn_similarities.reshape(-1)[found], self.similarity]),
            n,
        )


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
    unit = _checked(unit, k, threshold)
    if not 0 < min_recall <= 1:
        raise ValueError(f"min_recall is a share in (0, 1], got {min_recall}")
    if sample < 1:
        raise ValueError(f"sample must be at least 1 query, got {sample}")
    device = resolve_device(device)
    n = len(unit)
    if method == "auto":
        if device != "cpu":
            method = "exact"
            reason = f"exact on {device}: a CUDA device is available (used at any N)"
        elif n <= EXACT_CPU_MAX_N:
            method = "exact"
            reason = f"exact on CPU: N={n:,} <= EXACT_CPU_MAX_N={EXACT_CPU_MAX_N:,}"
        else:
            method = "ivf"
            reason = f"ivf on CPU: N={n:,} > EXACT_CPU_MAX_N={EXACT_CPU_MAX_N:,}, no CUDA device"
    else:
        reason = f"{method} on {device}: method={method!r} requested"
    if method != "exact" and device != "cpu":
        raise ValueError(f"method={method!r} runs on the CPU (faiss-cpu); got device={device!r}")
    if method == "exact":
        found = (
            exact_cpu(unit, k, threshold)
            if device == "cpu"
            else exact_torch(unit, k, threshold, device=device)
        )
    elif method == "ivf":
        found = ivf(unit, k, threshold, min_recall=min_recall, sample=sample, seed=seed)
    else:
        found = hnsw(unit, k, threshold, min_recall=min_recall, sample=sample, seed=seed)
    return replace(found, reason=reason)


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


def exact_cpu(unit: np.ndarray, k: int, threshold: float) -> Neighbours:
    """Exact search on the CPU with faiss's blocked BLAS kernel (multithreaded, memory bounded by
    its 4096 x 1024 tiles). Measured against a blocked numpy product on 50k x 256: the product
    alone takes 5.5 s, faiss's whole k-NN 6.3 s; numpy's top-k selection (argpartition) adds
    ~50 s, so numpy loses."""
    unit = _checked(unit, k, threshold)
    found = Neighbours.none(len(unit), k, threshold, "exact", "cpu", "exact on cpu (faiss BLAS)")
    if len(unit) < 2:
        return found
    rows = np.arange(len(unit))
    knn_d, knn_i = _exact_rows(unit, rows, k)
    return _with(found, knn_i, knn_d, *_list_and_range_pairs(unit, rows, knn_i, knn_d, threshold))


def exact_torch(
    unit: np.ndarray,
    k: int,
    threshold: float,
    device: str = "cuda",
    dtype: torch.dtype | None = None,
    block_bytes: int = TORCH_BLOCK_BYTES,
) -> Neighbours:
    """Exact search with torch: blocks of rows against all rows, products in `dtype` (fp16 on
    CUDA, float32 on the CPU by default), top-k and the threshold test on the device, then the
    kept neighbours and pairs recomputed in fp32 so their similarities are exact.

    Products of unit vectors rounded to `dtype` and summed in fp32 are off by at most twice its
    unit roundoff (eps), plus the fp32 sum's error; `margin` is twice that again, so every pair
    >= threshold is among those >= threshold - margin (the threshold rounded to `dtype`
    included), which are re-checked. The top k are re-ranked in fp32 from the 2k best
    low-precision candidates. The device holds the vectors in fp32 and in `dtype` (N * dim * 6
    bytes in fp16) and one block of similarities."""
    import torch

    unit = _checked(unit, k, threshold)
    n, dim = unit.shape
    dev = torch.device(device)
    low = dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
    found = Neighbours.none(n, k, threshold, "exact", str(dev), "exact on torch")
    found = replace(found, params={"dtype": str(low)})
    if n < 2:
        return found
    x32 = torch.from_numpy(unit).to(dev)  # on the CPU: the same memory, not a copy
    x = x32 if low == torch.float32 else x32.to(low)
    margin = 4 * torch.finfo(low).eps + dim * torch.finfo(torch.float32).eps
    kk = min(k, n - 1)
    # Per row of a block: its similarities, their threshold mask, its 2k candidates' vectors.
    per_row = n * (x.element_size() + 1) + 2 * kk * dim * 4
    rows = max(1, block_bytes // per_row)
    knn_d, knn_i = _no_knn(n, k)
    candidates = min(n - 1, 2 * kk)
    pairs = []
    with torch.inference_mode(), _fp32_sums():
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            block = torch.arange(r0, r1, device=dev)
            sims = x[r0:r1] @ x.T
            sims[block - r0, block] = -torch.inf  # a row is not its own neighbour
            cand = sims.topk(candidates, dim=1).indices
            exact = torch.einsum("rd,rcd->rc", x32[r0:r1], x32[cand])
            top, order = exact.topk(kk, dim=1)
            knn_d[r0:r1, :kk] = top.cpu().numpy()
            knn_i[r0:r1, :kk] = cand.gather(1, order).cpu().numpy()
            r, c = (sims >= threshold - margin).nonzero(as_tuple=True)
            later = c > r + r0  # each pair once, from its smaller index
            pairs.append(
                _recheck(x32, r[later] + r0, c[later], threshold, block_bytes // (8 * dim))
            )
    a, b, s = (np.concatenate(part) for part in zip(*pairs, strict=True))
    return _with(found, knn_i, knn_d, *_unique_pairs(a, b, s, n))


@contextmanager
def _fp32_sums() -> Iterator[None]:
    """cuBLAS sums fp16 products in fp16 where torch allows it (its default), which the margin
    of exact_torch does not cover: not allowed meanwhile."""
    import torch

    allowed = torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = allowed


def _recheck(
    x32: torch.Tensor, a: torch.Tensor, b: torch.Tensor, threshold: float, chunk: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Of the candidate pairs (a, b), those whose fp32 similarity is >= threshold, with it;
    `chunk` pairs at a time (a big group has many; each takes 8 * dim bytes here)."""
    keep_a, keep_b, keep_s = [], [], []
    for start in range(0, len(a), max(1, chunk)):
        ca, cb = a[start : start + chunk], b[start : start + chunk]
        s = (x32[ca] * x32[cb]).sum(dim=1)
        above = s >= threshold
        keep_a.append(ca[above].cpu().numpy())
        keep_b.append(cb[above].cpu().numpy())
        keep_s.append(s[above].cpu().numpy())
    return (
        np.concatenate([np.empty(0, np.int64), *keep_a]),
        np.concatenate([np.empty(0, np.int64), *keep_b]),
        np.concatenate([np.empty(0, np.float32), *keep_s]),
    )


def ivf(
    unit: np.ndarray,
    k: int,
    threshold: float,
    *,
    nlist: int | None = None,
    nprobe: int | None = None,
    min_recall: float = 0.99,
    sample: int = 1000,
    seed: int = 0,
) -> Neighbours:
    """Approximate search over inverted lists: spherical k-means (faiss) splits the rows into
    `nlist` lists (default ~4 sqrt(N)); each row is compared with the members of the `nprobe`
    lists whose centroids are nearest to it. The comparison runs list by list (the rows probing
    a list against its members, one BLAS product each) and reads the embeddings in place, where
    a faiss IndexIVFFlat would hold a second copy of them and scan them query by query (10 s vs
    6 s on 200k x 256). nprobe (default IVF_NPROBE_START) doubles until recall@k on `sample`
    random queries reaches `min_recall`, or until it reaches nlist / IVF_MAX_SCAN."""
    unit = _checked(unit, k, threshold)
    n = len(unit)
    if n < 2:
        return Neighbours.none(n, k, threshold, "ivf", "cpu", "ivf on cpu")
    # faiss needs 39 training points per centroid; a tiny N gets fewer, bigger lists.
    nlist = nlist or max(1, min(round(IVF_LISTS_PER_SQRT_N * math.sqrt(n)), n // 39))
    lists = _InvertedLists.build(unit, nlist, seed)
    start = min(nlist, nprobe or IVF_NPROBE_START)
    cap = max(start, nlist // IVF_MAX_SCAN)
    return _approximate(
        unit,
        k,
        threshold,
        Neighbours.none(n, k, threshold, "ivf", "cpu", "ivf on cpu"),
        lambda rows, probes: lists.knn(unit, rows, probes, k),
        _Widening("nprobe", start, cap, {"nlist": nlist}),
        min_recall,
        sample,
        seed,
    )


def hnsw(
    unit: np.ndarray,
    k: int,
    threshold: float,
    *,
    ef_search: int | None = None,
    min_recall: float = 0.99,
    sample: int = 1000,
    seed: int = 0,
) -> Neighbours:
    """Approximate search on a faiss HNSW graph (M=HNSW_M). faiss keeps its own copy of the
    vectors (N * dim * 4 bytes more). efSearch (default HNSW_EF_START) doubles until recall@k on
    `sample` random queries reaches `min_recall`, or until HNSW_EF_MAX."""
    unit = _checked(unit, k, threshold)
    n, dim = unit.shape
    if n < 2:
        return Neighbours.none(n, k, threshold, "hnsw", "cpu", "hnsw on cpu")
    index = faiss.IndexHNSWFlat(dim, HNSW_M, IP)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(unit)

    def knn(rows: np.ndarray, ef: int) -> tuple[np.ndarray, np.ndarray]:
        index.hnsw.efSearch = ef
        return _knn_chunked(rows, k, lambda q: index.search(_take(unit, q), min(k + 1, n)))

    start = max(k + 1, ef_search or HNSW_EF_START)  # faiss HNSW returns at most efSearch
    return _approximate(
        unit,
        k,
        threshold,
        Neighbours.none(n, k, threshold, "hnsw", "cpu", "hnsw on cpu"),
        knn,
        _Widening("ef_search", start, max(start, HNSW_EF_MAX), {"M": HNSW_M}),
        min_recall,
        sample,
        seed,
    )


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


@dataclass(frozen=True)
class _InvertedLists:
    """Rows grouped by nearest centroid: list l holds rows members[lims[l]:lims[l + 1]]."""

    centroids: np.ndarray
    members: np.ndarray
    lims: np.ndarray

    @classmethod
    def build(cls, unit: np.ndarray, nlist: int, seed: int) -> _InvertedLists:
        n, dim = unit.shape
        rng = np.random.default_rng(seed)
        size = IVF_TRAIN_PER_LIST * nlist
        train = unit if size >= n else unit[np.sort(rng.choice(n, size, replace=False))]
        kmeans = faiss.Kmeans(
            dim,
            nlist,
            niter=IVF_KMEANS_ITER,
            spherical=True,
            seed=seed,
            max_points_per_centroid=IVF_TRAIN_PER_LIST,
        )
        kmeans.train(train)
        assign = _blas_knn(unit, kmeans.centroids, 1)[1][:, 0]
        lims = np.concatenate([[0], np.cumsum(np.bincount(assign, minlength=nlist))])
        return cls(kmeans.centroids, np.argsort(assign, kind="stable"), lims)

    def knn(
        self, unit: np.ndarray, rows: np.ndarray, nprobe: int, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each of `rows`' k nearest other rows among the members of its nprobe nearest lists:
        list by list, the rows probing it against its members, one BLAS product each."""
        nlist = len(self.centroids)
        k1 = min(k + 1, len(unit))  # one more: a row finds itself in its own list
        workers = faiss.omp_get_max_threads()

        def search(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            xq = _take(unit, q)
            probes = _blas_knn(xq, self.centroids, nprobe)[1].reshape(-1)
            by_list = np.argsort(probes, kind="stable")
            starts = np.concatenate([[0], np.cumsum(np.bincount(probes, minlength=nlist))])
            probed = np.flatnonzero(np.diff(starts))
            heaps = [faiss.ResultHeap(len(q), k1, keep_max=True) for _ in range(workers)]

            def scan(worker: int) -> None:
                for lst in probed[worker::workers]:
                    members = self.members[self.lims[lst] : self.lims[lst + 1]]
                    if len(members) == 0:
                        continue
                    probing = by_list[starts[lst] : starts[lst + 1]] // nprobe
                    sims, idx = faiss.knn(xq[probing], unit[members], min(k1, len(members)), IP)
                    heaps[worker].add_result_subset(probing, sims, members[idx])

            _in_threads(scan, range(workers))
            for other in heaps[1:]:
                heaps[0].add_result(other.D, other.I)
            heaps[0].finalize()
            return heaps[0].D, heaps[0].I

        # The rows' probe lists and their argsort stay within QUERY_PROBES entries.
        return _knn_chunked(rows, k, search, max(1, QUERY_PROBES // nprobe))


@dataclass(frozen=True)
class _Widening:
    """The knob an approximate search widens (nprobe, ef_search): from start, doubling, at most
    cap; `fixed` holds its other parameters, for the report."""

    knob: str
    start: int
    cap: int
    fixed: dict[str, object]


def _approximate(
    unit: np.ndarray,
    k: int,
    threshold: float,
    found: Neighbours,
    knn: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    widening: _Widening,
    min_recall: float,
    sample: int,
    seed: int,
) -> Neighbours:
    """Run `knn(rows, effort)` at the least effort whose recall@k on a random sample of queries
    reaches min_recall, then on all rows; report the recall measured on that output. Widening is
    tried on the sample only: it is cheap there, and a query's results do not depend on the
    other queries."""
    n = len(unit)
    rng = np.random.default_rng(seed)
    queries = np.sort(rng.choice(n, min(sample, n), replace=False))
    exact_d, exact_i = _exact_rows(unit, queries, k)
    effort, history = widening.start, []
    while True:
        recall = _recall_at_k(*knn(queries, effort), exact_d)
        history.append((effort, round(recall, 5)))
        if recall >= min_recall or effort >= widening.cap:
            break
        effort = min(widening.cap, 2 * effort)
    rows = np.arange(n)
    knn_d, knn_i = knn(rows, effort)
    a, b, s = _list_and_range_pairs(unit, rows, knn_i, knn_d, threshold)
    recall = _recall_at_k(knn_d[queries], knn_i[queries], exact_d)
    true_a, true_b, _ = _list_and_range_pairs(unit, queries, exact_i, exact_d, threshold)
    true_keys = true_a * n + true_b
    found = _with(found, knn_i, knn_d, a, b, s)
    return replace(
        found,
        recall_at_k=recall,
        pair_recall=float(np.isin(true_keys, a * n + b).mean()) if len(true_keys) else None,
        params={
            **widening.fixed,
            widening.knob: effort,
            "calibration": history,
            "sample": len(queries),
            "sample_pairs": len(true_keys),
            "min_recall": min_recall,
            "recall_reached": recall >= min_recall,
            **found.params,
        },
    )


def _recall_at_k(found_d: np.ndarray, found_i: np.ndarray, exact_d: np.ndarray) -> float:
    """Share of the exact k nearest neighbours found. Ties count: a found neighbour whose
    similarity reaches the exact k-th is one of the k best (several rows can share it)."""
    valid = np.isfinite(exact_d)
    if not valid.any():
        return 1.0
    kth = np.where(valid, exact_d, np.inf).min(axis=1, keepdims=True)
    hits = ((found_d >= kth - SIM_TOL) & (found_i >= 0)).sum(axis=1)
    return float(np.minimum(hits, valid.sum(axis=1)).sum() / valid.sum())


def _exact_rows(unit: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`rows`' exact k nearest other rows (similarities, indices), best first."""
    return _knn_chunked(rows, k, lambda q: _blas_knn(_take(unit, q), unit, min(k + 1, len(unit))))


def _blas_knn(xq: np.ndarray, xb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss.knn by inner product (similarities, indices), EXACT_ROWS query rows per thread."""
    sims = np.empty((len(xq), k), np.float32)
    idx = np.empty((len(xq), k), np.int64)

    def block(start: int) -> None:
        end = start + EXACT_ROWS
        sims[start:end], idx[start:end] = faiss.knn(xq[start:end], xb, k, IP)

    _in_threads(block, range(0, len(xq), EXACT_ROWS))
    return sims, idx


def _in_threads(work: Callable[[int], None], items: range | np.ndarray) -> None:
    """work(item) for each item, on as many threads as faiss would use, each running faiss
    single-threaded. faiss's own OpenMP loops wait at barriers: on a shared machine one
    descheduled thread stalls the rest for a time slice. Measured on 2 cores with another
    process busy: exact k-NN of 50k rows 20 s with faiss's threads, 11 s this way; the IVF scan
    of 200k rows 18-39 s vs 9-12 s."""

    def run(item: int) -> None:
        faiss.omp_set_num_threads(1)  # this thread's own setting: the caller's is unchanged
        work(item)

    with ThreadPoolExecutor(faiss.omp_get_max_threads()) as pool:
        for done in [pool.submit(run, item) for item in items]:
            done.result()  # re-raises a worker's exception


def _knn_chunked(
    rows: np.ndarray,
    k: int,
    knn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    chunk: int = QUERY_ROWS,
) -> tuple[np.ndarray, np.ndarray]:
    """`knn(q)` (k + 1 results, a row's own among them) over chunks of `rows`, each row's own
    entry removed, padded to k columns with -inf / -1 where the data has fewer rows."""
    out_d, out_i = _no_knn(len(rows), k)
    for start in range(0, len(rows), chunk):
        q = rows[start : start + chunk]
        d, i = knn(q)
        own = i == q[:, None]
        # Drop the row itself; if ties pushed it out of the results, drop the weakest instead.
        drop = np.where(own.any(axis=1), own.argmax(axis=1), i.shape[1] - 1)
        keep = np.ones(i.shape, bool)
        keep[np.arange(len(q)), drop] = False
        m = i.shape[1] - 1
        out_i[start : start + len(q), :m] = i[keep].reshape(len(q), m)
        out_d[start : start + len(q), :m] = d[keep].reshape(len(q), m)
    out_d[out_i < 0] = -np.inf  # faiss pads missing results with -1 and -FLT_MAX
    return out_d, out_i


def _list_and_range_pairs(
    unit: np.ndarray, rows: np.ndarray, knn_i: np.ndarray, knn_d: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs >= threshold of `rows` (a < b, each once, most similar first): from their k-nearest
    lists, except for rows whose k-th neighbour is still >= threshold: those may have
    more, so an exact range search lists all of theirs."""
    more = knn_d[:, -1] >= threshold
    hit = (knn_d >= threshold) & ~more[:, None]
    a = np.repeat(rows, knn_i.shape[1]).reshape(knn_i.shape)[hit]
    ra, rb, rs = _range_rows(unit, rows[more], threshold)
    return _unique_pairs(
        np.concatenate([a, ra]),
        np.concatenate([knn_i[hit], rb]),
        np.concatenate([knn_d[hit], rs]),
        len(unit),
    )


def _range_rows(
    unit: np.ndarray, rows: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (row, other, similarity) with similarity >= threshold, exactly, for `rows`."""
    n, dim = unit.shape
    # faiss keeps inner products strictly above its radius: one float32 step below the
    # threshold keeps those equal to it.
    radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))
    parts = [(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))]
    for start in range(0, len(rows), QUERY_ROWS):
        q = rows[start : start + QUERY_ROWS]
        xq = np.ascontiguousarray(_take(unit, q))
        result = faiss.RangeSearchResult(len(q))
        faiss.range_search_inner_product(
            faiss.swig_ptr(xq), faiss.swig_ptr(unit), dim, len(q), n, radius, result
        )
        lims = faiss.rev_swig_ptr(result.lims, len(q) + 1).astype(np.int64)  # size_t in faiss
        sims = faiss.rev_swig_ptr(result.distances, int(lims[-1])).copy()
        others = faiss.rev_swig_ptr(result.labels, int(lims[-1])).copy()
        a = np.repeat(q, np.diff(lims))
        keep = (others != a) & (sims >= threshold)
        parts.append((a[keep], others[keep], sims[keep]))
    a, b, s = (np.concatenate(part) for part in zip(*parts, strict=True))
    return a, b, s


def _unique_pairs(
    a: np.ndarray, b: np.ndarray, s: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unordered pairs as a < b, each once, most similar first."""
    lo, hi = np.minimum(a, b).astype(np.int64), np.maximum(a, b).astype(np.int64)
    keys = lo * n + hi
    by_key = np.argsort(keys, kind="stable")  # np.unique(return_index) was 5x slower here
    first = by_key[np.r_[True, np.diff(keys[by_key]) != 0]] if len(keys) else by_key
    order = first[np.argsort(-s[first], kind="stable")]
    return lo[order], hi[order], s[order].astype(np.float32)


def _with(
    found: Neighbours,
    knn_i: np.ndarray,
    knn_d: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    s: np.ndarray,
) -> Neighbours:
    """`found` with these neighbours and pairs (a < b, each once, most similar first)."""
    return replace(
        found,
        pairs_a=a,
        pairs_b=b,
        similarity=s,
        knn_indices=knn_i,
        knn_similarities=knn_d,
        # Rows in groups larger than k + 1: their pairs came from a range search.
        params={
            **found.params,
            "rows_range_searched": int((knn_d[:, -1] >= found.threshold).sum()),
        },
    )


def _no_knn(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, indices) of n rows with no neighbours found yet: -inf, -1."""
    return np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)


def _take(unit: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """unit[rows]; a view, not a copy, when the sorted rows are consecutive."""
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
        return unit[rows[0] : rows[-1] + 1]
    return unit[rows]


def _checked(unit: np.ndarray, k: int, threshold: float) -> np.ndarray:
    """The embeddings as float32 in C order (no copy when they already are), arguments checked."""
    if unit.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array (rows x dim), got shape {unit.shape}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if not -1 < threshold <= 1:
        raise ValueError(f"threshold is a cosine similarity in (-1, 1], got {threshold}")
    return np.ascontiguousarray(unit, dtype=np.float32)
