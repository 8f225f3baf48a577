"""Exact search: each row against every row, by blocked matrix products. On the CPU, faiss's
BLAS kernel (`exact_cpu`); on a CUDA device, faiss's GPU flat index where the faiss package has
GPU support (`exact_faiss_gpu`, through `exact_index`, which the tests run on the CPU with a CPU
flat index), else torch in fp16 with an fp32 re-check (`exact_torch`).

Also the blocked faiss kernels the approximate methods share: the exact k nearest neighbours of
some rows (their recall's reference), k-NN over chunks of query rows, the exact range search that
lists all pairs of a row whose k-th neighbour is still above the threshold, and the thread pool
that runs faiss one thread per worker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import TYPE_CHECKING

import faiss
import numpy as np

from pipeline.progress import bar, tick
from pipeline.search.found import Neighbours, checked, no_knn, take, unique_pairs

if TYPE_CHECKING:
    import torch
    from tqdm.std import tqdm

IP = faiss.METRIC_INNER_PRODUCT

# Similarities computed at once by the torch path (rows x N of them): bounds device memory.
TORCH_BLOCK_BYTES = 1 << 30
# Query rows searched at once (their results, and a copy of them when they are not consecutive
# rows): bounds host memory.
QUERY_ROWS = 1 << 16
# Exact search hands faiss this many query rows per thread at once.
EXACT_ROWS = 4096


def exact_cpu(unit: np.ndarray, k: int, threshold: float) -> Neighbours:
    """Exact search on the CPU with faiss's blocked BLAS kernel (multithreaded, memory bounded by
    its 4096 x 1024 tiles). Measured against a blocked numpy product on 50k x 256: the product
    alone takes 5.5 s, faiss's whole k-NN 6.3 s; numpy's top-k selection (argpartition) adds
    ~50 s, so numpy loses."""
    unit = checked(unit, k, threshold)
    found = Neighbours.none(len(unit), k, threshold, "exact", "cpu", "exact on cpu (faiss BLAS)")
    if len(unit) < 2:
        return found
    rows = np.arange(len(unit))
    knn_d, knn_i = exact_rows(unit, rows, k)
    return found.with_results(
        knn_i, knn_d, *list_and_range_pairs(unit, rows, knn_i, knn_d, threshold)
    )


def exact_index(
    unit: np.ndarray, k: int, threshold: float, index: faiss.Index, device: str, reason: str
) -> Neighbours:
    """Exact search through an empty faiss flat inner-product index: the rows added to it, each
    row's k + 1 best searched a chunk of QUERY_ROWS at a time, the pairs listed as the other
    methods list them (a row with k neighbours above the threshold is range-searched on the CPU,
    exactly). On a GPU the index is faiss's GpuIndexFlatIP (`exact_faiss_gpu`); the tests pass
    a CPU IndexFlatIP, so this code runs on every machine. The index holds its own copy of the
    rows (on the GPU, its memory)."""
    unit = checked(unit, k, threshold)
    found = Neighbours.none(len(unit), k, threshold, "exact", device, reason)
    if len(unit) < 2:
        return found
    index.add(unit)
    rows = np.arange(len(unit))
    knn_d, knn_i = knn_chunked(
        rows, k, lambda q: index.search(take(unit, q), min(k + 1, len(unit)))
    )
    index.reset()
    return found.with_results(
        knn_i, knn_d, *list_and_range_pairs(unit, rows, knn_i, knn_d, threshold)
    )


def faiss_gpus() -> int:
    """How many GPUs the installed faiss can use: 0 for faiss-cpu."""
    return faiss.get_num_gpus() if hasattr(faiss, "GpuIndexFlatIP") else 0


def gpu_flat_index(dim: int, device: str) -> faiss.Index:
    """faiss's flat inner-product index on CUDA device `device` ("cuda", "cuda:N"), fp32."""
    config = faiss.GpuIndexFlatConfig()
    config.device = int(device.partition(":")[2] or 0)
    return faiss.GpuIndexFlatIP(faiss.StandardGpuResources(), dim, config)


def exact_faiss_gpu(unit: np.ndarray, k: int, threshold: float, device: str = "cuda") -> Neighbours:
    """Exact search on a CUDA device with faiss's GPU flat index (fp32 products: similarities
    as exact as the CPU's), where the faiss package has GPU support."""
    unit = checked(unit, k, threshold)
    index = gpu_flat_index(unit.shape[1], device)
    return exact_index(unit, k, threshold, index, device, f"exact on {device} (faiss GPU)")


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

    unit = checked(unit, k, threshold)
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
    knn_d, knn_i = no_knn(n, k)
    candidates = min(n - 1, 2 * kk)
    pairs = []
    with torch.inference_mode(), _fp32_sums():
        size = lambda r0: min(rows, n - r0)  # noqa: E731
        for r0 in tick(range(0, n, rows), f"exact search on {dev}", n, "row", size):
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
    return found.with_results(knn_i, knn_d, *unique_pairs(a, b, s, n))


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


# --- blocked faiss kernels, shared with the approximate methods ---------------------------------


def exact_rows(unit: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`rows`' exact k nearest other rows (similarities, indices), best first."""
    with bar("exact nearest neighbours", len(rows), "row") as done:
        kk = min(k + 1, len(unit))
        return knn_chunked(rows, k, lambda q: blas_knn(take(unit, q), unit, kk, done))


def blas_knn(
    xq: np.ndarray, xb: np.ndarray, k: int, progress: str | tqdm = "exact nearest neighbours"
) -> tuple[np.ndarray, np.ndarray]:
    """faiss.knn by inner product (similarities, indices), EXACT_ROWS query rows per thread;
    the rows done counted on a bar of their own named `progress`, or on `progress`."""
    sims = np.empty((len(xq), k), np.float32)
    idx = np.empty((len(xq), k), np.int64)

    # A few queries (a recall sample) are still split across the threads.
    per_block = max(1, min(EXACT_ROWS, -(-len(xq) // faiss.omp_get_max_threads())))

    def block(start: int) -> None:
        end = start + per_block
        sims[start:end], idx[start:end] = faiss.knn(xq[start:end], xb, k, IP)
        done.update(len(sims[start:end]))

    shown = bar(progress, len(xq), "row") if isinstance(progress, str) else nullcontext(progress)
    with shown as done:
        in_threads(block, range(0, len(xq), per_block))
    return sims, idx


def in_threads(work: Callable[[int], None], items: range | np.ndarray) -> None:
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


def knn_chunked(
    rows: np.ndarray,
    k: int,
    knn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    chunk: int = QUERY_ROWS,
) -> tuple[np.ndarray, np.ndarray]:
    """`knn(q)` (k + 1 results, a row's own among them) over chunks of `rows`, each row's own
    entry removed, padded to k columns with -inf / -1 where the data has fewer rows."""
    out_d, out_i = no_knn(len(rows), k)
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


def list_and_range_pairs(
    unit: np.ndarray,
    rows: np.ndarray,
    knn_i: np.ndarray,
    knn_d: np.ndarray,
    threshold: float,
    range_rows: Callable[[np.ndarray], tuple[np.ndarray, ...]] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs >= threshold of `rows` (a < b, each once, most similar first): from their k-nearest
    lists, except for rows whose k-th neighbour is still >= threshold: those may have
    more, so a range search lists all of theirs (exact, over all rows, unless `range_rows`
    (rows -> (rows, others, similarities)) searches otherwise: IVF, in the lists it probes)."""
    more = knn_d[:, -1] >= threshold
    hit = (knn_d >= threshold) & ~more[:, None]
    a = np.repeat(rows, knn_i.shape[1]).reshape(knn_i.shape)[hit]
    ra, rb, rs = (range_rows or (lambda r: _range_rows(unit, r, threshold)))(rows[more])
    return unique_pairs(
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
    starts = range(0, len(rows), QUERY_ROWS)
    size = lambda start: min(QUERY_ROWS, len(rows) - start)  # noqa: E731
    for start in tick(starts, "range search", len(rows), "row", size):
        q = rows[start : start + QUERY_ROWS]
        xq = np.ascontiguousarray(take(unit, q))
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
