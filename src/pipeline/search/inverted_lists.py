"""Inverted lists: rows grouped by the nearest of k-means centroids, each query compared with
the members of the lists whose centroids are nearest it, list by list, one BLAS product each
(`search.approximate` widens how many lists it probes).

The coarse quantizer (the centroids, each row's list and each query's probes) works on the rows
projected onto their leading principal axes when they have more dimensions than that: training
and assignment cost a fraction of what they cost in the full space (1280 dimensions: k-means
alone took minutes at 1M rows), and the lists follow the directions the data varies most along.
The lists are then scanned in the full space, so every similarity is exact and recall is lost
only to the probes.

Memory: the lists read the embeddings in place; the training sample is copied projected (40 rows
per list: 16% of the rows at N=1M), and nothing of size N x dim is allocated.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import faiss
import numpy as np

from pipeline.progress import bar, step
from pipeline.search.exact import IP, blas_knn, in_threads, knn_chunked
from pipeline.search.found import take
from pipeline.search.vectors import normalise

# Probe-list entries searched at once (their argsort, the rows probing them, the rows' result
# heaps: 8 bytes an entry, 12 x (k + 1) / nprobe a row per thread): bound host memory.
QUERY_PROBES = 1 << 22
# k-means trained on 40 points per list (faiss warns below 39) for 10 iterations (more moved
# recall@10 by < 0.001 on the benchmark data).
IVF_TRAIN_PER_LIST = 40
IVF_KMEANS_ITER = 10
# The principal axes (uncentred: inner products are what they keep) are fitted on this many rows.
IVF_PCA_SAMPLE = 20_000
# Values projected at once (a chunk of rows gathered for it: 64 MiB).
PROJECT_VALUES = 1 << 24


@dataclass(frozen=True)
class InvertedLists:
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
        return projected(x, self.projection)

    @classmethod
    def build(cls, unit: np.ndarray, nlist: int, seed: int, pca_dim: int) -> InvertedLists:
        n, dim = unit.shape
        # A stream of its own: the recall sample, drawn with `seed`, must not be the rows the
        # k-means starts from (they would sit on centroids, and their recall flatter the rest).
        rng = np.random.default_rng([seed, 1])
        projection = principal_axes(unit, pca_dim, rng) if pca_dim < dim else None
        size = IVF_TRAIN_PER_LIST * nlist
        rows = np.arange(n) if size >= n else np.sort(rng.choice(n, size, replace=False))
        if projection is None:  # the sample itself: a copy of 40 rows per list at most
            train = unit if size >= n else unit[rows]
        else:
            train = np.concatenate(list(projected_chunks(unit, rows, projection)))
        with step(f"ivf: k-means of {len(train):,} rows into {nlist:,} lists"):
            centroids = spherical_kmeans(train, nlist, IVF_KMEANS_ITER, rng)
        del train
        with bar("ivf: rows to their lists", n, "row") as placed:
            assign = np.concatenate(
                [
                    blas_knn(chunk, centroids, 1, placed)[1][:, 0]
                    for chunk in projected_chunks(unit, np.arange(n), projection)
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
        for q, members, sims in self._products(unit, rows, nprobe):
            r, c = np.nonzero(sims >= threshold)
            parts.append((q[r], members[c], sims[r, c]))
        a, b, sims = (np.concatenate(part) for part in zip(*parts, strict=True))
        return a[a != b], b[a != b], sims[a != b]

    def coordinates(self, unit: np.ndarray) -> np.ndarray:
        """The rows on the quantizer's principal axes, not normalised: never farther apart
        than the rows themselves (n x its dimensions, float32)."""
        return np.concatenate([take(unit, c) @ self.projection for c in chunks(unit, len(unit))])

    def close(
        self, coords: np.ndarray, nprobe: int, radius: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every (row, other) with `other` in one of the row's nprobe lists and a squared
        distance of at most `radius` between their `coordinates`."""
        norms = np.einsum("ij,ij->i", coords, coords)
        parts = [(np.empty(0, np.int64), np.empty(0, np.int64))]
        rows = np.arange(len(coords))
        for q, members, near in self._products(coords, rows, nprobe, quantized=True):
            near *= -2
            near += norms[members]
            near += norms[q][:, None]
            r, c = np.nonzero(near <= radius)
            parts.append((q[r], members[c]))
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

    def _products(
        self, points: np.ndarray, rows: np.ndarray, nprobe: int, quantized: bool = False
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """List by list, the `rows` probing it, its members and their inner products in
        `points` (rows x members), QUERY_PROBES probe entries at a time. `quantized`: the points
        are the rows' `coordinates`, probed once normalised."""
        step = max(1, QUERY_PROBES // nprobe)
        for start in range(0, len(rows), step):
            q = rows[start : start + step]
            xq = take(points, q)
            probing_by = normalise(xq.copy()) if quantized else xq
            for probing, members in self._probed(probing_by, nprobe, quantized):
                yield q[probing], members, xq[probing] @ points[members].T

    def _probed(
        self, xq: np.ndarray, nprobe: int, quantized: bool = False
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each list some of the rows `xq` (`quantized`: already in the quantizer's
        space) probe: which of them (positions in xq), and the list's members; lists with no
        member left out."""
        nlist = len(self.centroids)
        # Projected a chunk at a time: all rows at once would be N x IVF_PCA_DIM floats more.
        in_space = [xq] if quantized else projected_chunks(xq, np.arange(len(xq)), self.projection)
        probes = np.concatenate(
            [
                blas_knn(chunk, self.centroids, nprobe, "ivf: rows to the lists they probe")[1]
                for chunk in in_space
            ]
        ).reshape(-1)
        by_list = np.argsort(probes, kind="stable")
        starts = np.concatenate([[0], np.cumsum(np.bincount(probes, minlength=nlist))])
        return [
            (by_list[starts[lst] : starts[lst + 1]] // nprobe, members)
            for lst in np.flatnonzero(np.diff(starts))
            if len(members := self.members[self.lims[lst] : self.lims[lst + 1]])
        ]


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


def projected(x: np.ndarray, projection: np.ndarray | None) -> np.ndarray:
    """Rows projected onto the principal axes and L2-normalised; themselves without them."""
    if projection is None:
        return x
    projected = x @ projection
    return normalise(projected, out=projected)


def chunks(unit: np.ndarray, n: int) -> Iterator[np.ndarray]:
    """Ranges of 0..n, each of PROJECT_VALUES values of `unit`'s rows."""
    step = max(1, PROJECT_VALUES // unit.shape[1])
    for start in range(0, n, step):
        yield np.arange(start, min(n, start + step))


def projected_chunks(
    unit: np.ndarray, rows: np.ndarray, projection: np.ndarray | None
) -> Iterator[np.ndarray]:
    """`rows` of `unit` in the quantizer's space, a chunk of PROJECT_VALUES values at a time."""
    for chunk in chunks(unit, len(rows)):
        yield projected(take(unit, rows[chunk]), projection)


def principal_axes(unit: np.ndarray, dim: int, rng: np.random.Generator) -> np.ndarray:
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
