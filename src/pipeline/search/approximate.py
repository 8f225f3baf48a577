"""Approximate search on the CPU: inverted lists from spherical k-means searched list by list
with BLAS (`ivf`), or a faiss HNSW graph (`hnsw`). Each widens its search (nprobe, efSearch) until
recall@k, measured on a random sample of queries against the exact search, reaches `min_recall`,
and reports that recall and the share of the sample's pairs above the threshold it found. A row
with k neighbours above the threshold has its pairs listed by a range search: HNSW's the exact
methods' (all rows), IVF's over the lists the row probes (an exact one reads all N rows for each:
at 1M x 1280, 1,677 such rows cost as much as the whole scan). `ivf_pairs_above` lists only the
pairs above a high threshold (dedup's near-identical images), its probes widened on pairs known
to be near-duplicates rather than on recall@k.

IVF's coarse quantizer (the k-means centroids, each row's list and each query's probes) works on
the rows projected onto their IVF_PCA_DIM leading principal axes when they have more dimensions
than that: training and assignment cost a fraction of what they cost in the full space (1280
dimensions: k-means alone took minutes at 1M rows), and the lists follow the directions the data
varies most along. The lists are then scanned in the full space, so every similarity is exact
and recall is lost only to the probes.

Memory: IVF reads the embeddings in place; its training sample is copied projected (40 rows per
list: 16% of the rows at N=1M, IVF_PCA_DIM values each), and nothing of size N x dim is
allocated. HNSW is the exception: faiss stores its own copy of the vectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import faiss
import numpy as np

from pipeline.progress import bar, step
from pipeline.search.exact import (
    IP,
    blas_knn,
    exact_rows,
    in_threads,
    knn_chunked,
    list_and_range_pairs,
)
from pipeline.search.found import Neighbours, checked, take, unique_pairs
from pipeline.search.vectors import normalise

# Probe-list entries searched at once (their argsort, the rows probing them, the rows' result
# heaps: 8 bytes an entry, 12 x (k + 1) / nprobe a row per thread): bound host memory.
QUERY_PROBES = 1 << 22

# IVF parameters from N: nlist ~ 4 sqrt(N) lists of ~sqrt(N)/4 vectors; k-means trained on 40
# points per list (faiss warns below 39) for 10 iterations (more moved recall@10 by < 0.001 on
# the benchmark data). nprobe starts at 8 and doubles until the sampled recall holds, up to
# nlist/8: beyond that the scan costs more than an eighth of the exact search.
IVF_LISTS_PER_SQRT_N = 4
IVF_TRAIN_PER_LIST = 40
IVF_KMEANS_ITER = 10
IVF_NPROBE_START = 8
IVF_MAX_SCAN = 8
# The quantizer's space: rows of more dimensions are projected onto this many principal axes
# (uncentred: inner products are what they keep), fitted on IVF_PCA_SAMPLE of the rows.
IVF_PCA_DIM = 128
IVF_PCA_SAMPLE = 20_000
# Values projected at once (a chunk of rows gathered for it: 64 MiB).
PROJECT_VALUES = 1 << 24
# Slack on the squared distance of the principal-axis filter of `ivf_pairs_above`: its float32
# sums of squares lose ~1e-7 of the rows' unit norms; the pairs it passes are checked in full.
CLOSE_TOL = 1e-5

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


def ivf(
    unit: np.ndarray,
    k: int,
    threshold: float,
    *,
    nlist: int | None = None,
    nprobe: int | None = None,
    pca_dim: int | None = None,
    min_recall: float = 0.99,
    sample: int = 1000,
    seed: int = 0,
) -> Neighbours:
    """Approximate search over inverted lists: spherical k-means (faiss) splits the rows into
    `nlist` lists (default ~4 sqrt(N)); each row is compared with the members of the `nprobe`
    lists whose centroids are nearest to it. The comparison runs list by list (the rows probing
    a list against its members, one BLAS product each) and reads the embeddings in place, where
    a faiss IndexIVFFlat would hold a second copy of them and scan them query by query (10 s vs
    6 s on 200k x 256). The quantizer works on the rows projected onto `pca_dim` principal axes
    (default IVF_PCA_DIM) when they have more dimensions; the scan, in the full space. nprobe
    (default IVF_NPROBE_START) doubles until recall@k on `sample` random queries reaches
    `min_recall`, or until it reaches nlist / IVF_MAX_SCAN."""
    unit = checked(unit, k, threshold)
    n = len(unit)
    if n < 2:
        return Neighbours.none(n, k, threshold, "ivf", "cpu", "ivf on cpu")
    nlist = nlist or _nlist(n)
    lists = _InvertedLists.build(unit, nlist, seed, pca_dim or IVF_PCA_DIM)
    start = min(nlist, nprobe or IVF_NPROBE_START)
    cap = max(start, nlist // IVF_MAX_SCAN)
    return _approximate(
        unit,
        k,
        threshold,
        Neighbours.none(n, k, threshold, "ivf", "cpu", "ivf on cpu"),
        lambda rows, probes: lists.knn(unit, rows, probes, k),
        _Widening("nprobe", start, cap, {"nlist": nlist, "quantizer_dim": lists.dim}),
        min_recall,
        sample,
        seed,
        lambda rows, probes: lists.range(unit, rows, probes, threshold),
    )


def ivf_pairs_above(
    unit: np.ndarray,
    threshold: float,
    known: tuple[np.ndarray, np.ndarray],
    *,
    min_recall: float = 0.99,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, dict[str, object]]:
    """Every pair of rows of `unit` with similarity >= threshold (a < b, each once, most
    similar first) over inverted lists, each row against the members of the nprobe lists
    nearest it, and the search's parameters. A pair is missed only when neither row probes the
    other's list, which the more alike two rows are the rarer it is: so nprobe doubles from
    IVF_NPROBE_START until at least `min_recall` of the `known` pairs (vectors, and the row each
    is a near-duplicate of, less alike than the threshold asks) probe their row's list, up to
    nlist / IVF_MAX_SCAN. No k-nearest lists and no exact recall sample, which `ivf` widens on:
    for the few pairs above a high threshold they cost more than the scan (1M x 1280 plain
    embeddings: 4.6 minutes). Rows with more values than the quantizer's axes are compared on
    those first (never farther apart there, so nothing is lost), and in full only where near
    enough there: 42 s against 70 at 1M x 1280, for 0.3 GB more at the peak."""
    unit = checked(unit, 1, threshold)
    n = len(unit)
    if n < 2:
        empty = np.empty(0, np.int64)
        return empty, empty, {}
    nlist = _nlist(n)
    lists = _InvertedLists.build(unit, nlist, seed, IVF_PCA_DIM)
    nprobe = min(nlist, IVF_NPROBE_START)
    cap, history = max(nprobe, nlist // IVF_MAX_SCAN), []
    while True:
        share = lists.probing_home(*known, nprobe)
        history.append((nprobe, round(share, 5)))
        if share >= min_recall or nprobe >= cap:
            break
        nprobe = min(cap, 2 * nprobe)
    if lists.projection is None:
        a, b, s = lists.range(unit, np.arange(n), nprobe, threshold)
    else:  # filtered on the principal axes, where rows are no farther apart than in full
        coords = np.concatenate([take(unit, c) @ lists.projection for c in _chunks(unit, n)])
        a, b = lists.close(coords, nprobe, 2 * (1 - threshold) + CLOSE_TOL)
        del coords
        s = np.concatenate(
            [np.einsum("ij,ij->i", unit[a[c]], unit[b[c]]) for c in _chunks(unit, len(a))]
        )
        a, b, s = a[s >= threshold], b[s >= threshold], s[s >= threshold]
    a, b, _ = unique_pairs(a, b, s, n)
    return a, b, {"nlist": nlist, "nprobe": nprobe, "known_pairs_probed": history}


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
    unit = checked(unit, k, threshold)
    n, dim = unit.shape
    if n < 2:
        return Neighbours.none(n, k, threshold, "hnsw", "cpu", "hnsw on cpu")
    index = faiss.IndexHNSWFlat(dim, HNSW_M, IP)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    with step(f"hnsw: building the graph of {n:,} rows"):
        index.add(unit)

    def knn(rows: np.ndarray, ef: int) -> tuple[np.ndarray, np.ndarray]:
        index.hnsw.efSearch = ef
        with bar(f"hnsw search (efSearch {ef})", len(rows), "row") as done:

            def search(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                found = index.search(take(unit, q), min(k + 1, n))
                done.update(len(q))
                return found

            return knn_chunked(rows, k, search)

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


@dataclass(frozen=True)
class _InvertedLists:
    """Rows grouped by nearest centroid: list l holds rows members[lims[l]:lims[l + 1]]. The
    centroids live in the quantizer's space: the rows' own, or (`projection`, D x d) their
    leading principal axes, where rows are projected and L2-normalised."""

    centroids: np.ndarray
    members: np.ndarray
    lims: np.ndarray
    projection: np.ndarray | None = None

    @property
    def dim(self) -> int:
        """The quantizer's dimensions."""
        return self.centroids.shape[1]

    def quantized(self, x: np.ndarray) -> np.ndarray:
        """Rows in the quantizer's space (themselves when it is theirs)."""
        return _projected(x, self.projection)

    @classmethod
    def build(cls, unit: np.ndarray, nlist: int, seed: int, pca_dim: int) -> _InvertedLists:
        n, dim = unit.shape
        # A stream of its own: the recall sample, drawn with `seed`, must not be the rows the
        # k-means starts from (they would sit on centroids, and their recall flatter the rest).
        rng = np.random.default_rng([seed, 1])
        projection = _principal_axes(unit, pca_dim, rng) if pca_dim < dim else None
        size = IVF_TRAIN_PER_LIST * nlist
        rows = np.arange(n) if size >= n else np.sort(rng.choice(n, size, replace=False))
        if projection is None:  # the sample itself: a copy of 40 rows per list at most
            train = unit if size >= n else unit[rows]
        else:
            train = np.concatenate(list(_projected_chunks(unit, rows, projection)))
        with step(f"ivf: k-means of {len(train):,} rows into {nlist:,} lists"):
            centroids = spherical_kmeans(train, nlist, IVF_KMEANS_ITER, rng)
        del train
        with bar("ivf: rows to their lists", n, "row") as placed:
            assign = np.concatenate(
                [
                    blas_knn(chunk, centroids, 1, placed)[1][:, 0]
                    for chunk in _projected_chunks(unit, np.arange(n), projection)
                ]
            )
        lims = np.concatenate([[0], np.cumsum(np.bincount(assign, minlength=nlist))])
        return cls(centroids, np.argsort(assign, kind="stable"), lims, projection)

    def knn(
        self, unit: np.ndarray, rows: np.ndarray, nprobe: int, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each of `rows`' k nearest other rows among the members of its nprobe nearest lists:
        list by list, the rows probing it against its members, one BLAS product each."""
        k1 = min(k + 1, len(unit))  # one more: a row finds itself in its own list
        workers = faiss.omp_get_max_threads()

        def search(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            xq = take(unit, q)
            probed = self._probed(xq, nprobe)
            heaps = [faiss.ResultHeap(len(q), k1, keep_max=True) for _ in range(workers)]

            def scan(worker: int) -> None:
                for probing, members in probed[worker::workers]:
                    sims, idx = faiss.knn(xq[probing], unit[members], min(k1, len(members)), IP)
                    heaps[worker].add_result_subset(probing, sims, members[idx])
                    scanned.update(len(probing))

            probes = sum(len(probing) for probing, _ in probed)
            with bar(f"ivf search (nprobe {nprobe})", probes, "probe") as scanned:
                in_threads(scan, range(workers))
            for other in heaps[1:]:
                heaps[0].add_result(other.D, other.I)
            heaps[0].finalize()
            return heaps[0].D, heaps[0].I

        # The rows' probe lists and their argsort stay within QUERY_PROBES entries.
        return knn_chunked(rows, k, search, max(1, QUERY_PROBES // nprobe))

    def range(
        self, unit: np.ndarray, rows: np.ndarray, nprobe: int, threshold: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every (row, other, similarity) with similarity >= threshold and `other` in one of the
        row's nprobe lists: the range search of rows with k neighbours above the threshold,
        where the exact one would read all N rows for each (1,677 rows of 1M x 1280: 2e12
        multiply-adds, as much as the whole scan)."""
        parts = [(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))]
        for start in range(0, len(rows), max(1, QUERY_PROBES // nprobe)):
            q = rows[start : start + max(1, QUERY_PROBES // nprobe)]
            xq = take(unit, q)
            for probing, members in self._probed(xq, nprobe):
                sims = xq[probing] @ unit[members].T
                r, c = np.nonzero(sims >= threshold)
                parts.append((q[probing[r]], members[c], sims[r, c]))
        a, b, sims = (np.concatenate(part) for part in zip(*parts, strict=True))
        return a[a != b], b[a != b], sims[a != b]

    def close(
        self, coords: np.ndarray, nprobe: int, radius: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every (row, other) with `other` in one of the row's nprobe lists and a squared
        distance of at most `radius` between their `coords` (the rows on the quantizer's
        principal axes, not normalised: never farther apart than the rows themselves)."""
        norms = np.einsum("ij,ij->i", coords, coords)
        parts = [(np.empty(0, np.int64), np.empty(0, np.int64))]
        step = max(1, QUERY_PROBES // nprobe)
        for start in range(0, len(coords), step):
            xq = coords[start : start + step]
            for probing, members in self._probed(normalise(xq.copy()), nprobe, quantized=True):
                near = xq[probing] @ coords[members].T
                near *= -2
                near += norms[members]
                near += norms[start + probing][:, None]
                r, c = np.nonzero(near <= radius)
                parts.append((start + probing[r], members[c]))
        a, b = (np.concatenate(part) for part in zip(*parts, strict=True))
        return a[a != b], b[a != b]

    def probing_home(self, queries: np.ndarray, rows: np.ndarray, nprobe: int) -> float:
        """Share of the `queries` whose nprobe lists include the one holding their row of
        `rows` (1 when there are none)."""
        if not len(queries):
            return 1.0
        home = np.empty(self.lims[-1], np.int64)
        home[self.members] = np.repeat(np.arange(len(self.centroids)), np.diff(self.lims))
        probes = blas_knn(self.quantized(queries), self.centroids, nprobe, "ivf: known pairs")[1]
        return float((probes == home[rows][:, None]).any(axis=1).mean())

    def _probed(
        self, xq: np.ndarray, nprobe: int, quantized: bool = False
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each list some of the rows `xq` (`quantized`: already in the quantizer's
        space) probe: which of them (positions in xq), and the list's members; lists with no
        member left out."""
        nlist = len(self.centroids)
        # Projected a chunk at a time: all rows at once would be N x IVF_PCA_DIM floats more.
        chunks = [xq] if quantized else _projected_chunks(xq, np.arange(len(xq)), self.projection)
        probes = np.concatenate(
            [
                blas_knn(chunk, self.centroids, nprobe, "ivf: rows to the lists they probe")[1]
                for chunk in chunks
            ]
        ).reshape(-1)
        by_list = np.argsort(probes, kind="stable")
        starts = np.concatenate([[0], np.cumsum(np.bincount(probes, minlength=nlist))])
        return [
            (by_list[starts[lst] : starts[lst + 1]] // nprobe, members)
            for lst in np.flatnonzero(np.diff(starts))
            if len(members := self.members[self.lims[lst] : self.lims[lst + 1]])
        ]


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
    range_rows: Callable[[np.ndarray, int], tuple[np.ndarray, ...]] | None = None,
) -> Neighbours:
    """Run `knn(rows, effort)` at the least effort whose recall@k on a random sample of queries
    reaches min_recall, then on all rows; report the recall measured on that output. Widening is
    tried on the sample only: it is cheap there, and a query's results do not depend on the
    other queries. Rows with k neighbours above the threshold get `range_rows(rows, effort)`
    (default: the exact range search); the pair recall on the sample measures what it found."""
    n = len(unit)
    rng = np.random.default_rng(seed)
    queries = np.sort(rng.choice(n, min(sample, n), replace=False))
    exact_d, exact_i = exact_rows(unit, queries, k)
    effort, history = widening.start, []
    while True:
        recall = _recall_at_k(*knn(queries, effort), exact_d)
        history.append((effort, round(recall, 5)))
        if recall >= min_recall or effort >= widening.cap:
            break
        effort = min(widening.cap, 2 * effort)
    rows = np.arange(n)
    knn_d, knn_i = knn(rows, effort)
    ranged = (lambda more: range_rows(more, effort)) if range_rows else None
    a, b, s = list_and_range_pairs(unit, rows, knn_i, knn_d, threshold, ranged)
    recall = _recall_at_k(knn_d[queries], knn_i[queries], exact_d)
    true_a, true_b, _ = list_and_range_pairs(unit, queries, exact_i, exact_d, threshold)
    true_keys = true_a * n + true_b
    found = found.with_results(knn_i, knn_d, a, b, s)
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


def _nlist(n: int) -> int:
    """~IVF_LISTS_PER_SQRT_N sqrt(n) lists; faiss needs 39 training points per centroid, so a
    tiny n gets fewer, bigger lists."""
    return max(1, min(round(IVF_LISTS_PER_SQRT_N * math.sqrt(n)), n // 39))


def spherical_kmeans(
    points: np.ndarray, k: int, niter: int, rng: np.random.Generator
) -> np.ndarray:
    """k unit centroids of the rows of `points` by spherical k-means (Lloyd's iterations on
    inner products, from k distinct rows at random), the assignment by `blas_knn` (one faiss
    thread per worker: faiss.Kmeans's OpenMP loops took twice as long as one thread on the
    shared 2-core machine), each centroid the normalised sum of its rows; a list left empty
    restarts from a random row. float32, (k, dim)."""
    n = len(points)
    centroids = normalise(points[np.sort(rng.choice(n, k, replace=False))].astype(np.float32))
    for _ in range(niter):
        assign = blas_knn(points, centroids, 1)[1][:, 0]
        order = np.argsort(assign, kind="stable")
        counts = np.bincount(assign, minlength=k)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        filled = counts > 0
        sums = np.add.reduceat(points[order], starts[filled], axis=0)
        centroids[filled] = normalise(sums)
        empty = np.flatnonzero(~filled)
        centroids[empty] = normalise(points[rng.choice(n, len(empty), replace=False)])
    return centroids


def _projected(x: np.ndarray, projection: np.ndarray | None) -> np.ndarray:
    """Rows projected onto the principal axes and L2-normalised; themselves without them."""
    if projection is None:
        return x
    projected = x @ projection
    return normalise(projected, out=projected)


def _chunks(unit: np.ndarray, n: int) -> Iterator[np.ndarray]:
    """Ranges of 0..n, each of PROJECT_VALUES values of `unit`'s rows."""
    step = max(1, PROJECT_VALUES // unit.shape[1])
    for start in range(0, n, step):
        yield np.arange(start, min(n, start + step))


def _projected_chunks(
    unit: np.ndarray, rows: np.ndarray, projection: np.ndarray | None
) -> Iterator[np.ndarray]:
    """`rows` of `unit` in the quantizer's space, a chunk of PROJECT_VALUES values at a time."""
    for chunk in _chunks(unit, len(rows)):
        yield _projected(take(unit, rows[chunk]), projection)


def _principal_axes(unit: np.ndarray, dim: int, rng: np.random.Generator) -> np.ndarray:
    """The `dim` leading eigenvectors (D x dim, float32) of the rows' uncentred second moment,
    estimated on IVF_PCA_SAMPLE of them: the subspace that keeps most of their inner products."""
    n = len(unit)
    rows = (
        np.arange(n)
        if n <= IVF_PCA_SAMPLE
        else np.sort(rng.choice(n, IVF_PCA_SAMPLE, replace=False))
    )
    x = take(unit, rows)
    moment = (x.T @ x).astype(np.float64)
    _, axes = np.linalg.eigh(moment)
    return np.ascontiguousarray(axes[:, ::-1][:, :dim], dtype=np.float32)


def _recall_at_k(found_d: np.ndarray, found_i: np.ndarray, exact_d: np.ndarray) -> float:
    """Share of the exact k nearest neighbours found. Ties count: a found neighbour whose
    similarity reaches the exact k-th is one of the k best (several rows can share it)."""
    valid = np.isfinite(exact_d)
    if not valid.any():
        return 1.0
    kth = np.where(valid, exact_d, np.inf).min(axis=1, keepdims=True)
    hits = ((found_d >= kth - SIM_TOL) & (found_i >= 0)).sum(axis=1)
    return float(np.minimum(hits, valid.sum(axis=1)).sum() / valid.sum())
