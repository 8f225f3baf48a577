"""Approximate search on the CPU: inverted lists from spherical k-means searched list by list
with BLAS (`ivf`), or a faiss HNSW graph (`hnsw`). Each widens its search (nprobe, efSearch) until
recall@k, measured on a random sample of queries against the exact search, reaches `min_recall`,
and reports that recall and the share of the sample's pairs above the threshold it found. A row
with k neighbours above the threshold has its pairs listed by a range search: HNSW's the exact
methods' (all rows), IVF's over the lists the row probes (an exact one reads all N rows for each:
at 1M x 1280, 1,677 such rows cost as much as the whole scan). `ivf_pairs_above` lists only the
pairs above a high threshold (dedup's near-identical images), its probes widened on pairs known
to be near-duplicates rather than on recall@k.

IVF's lists (`search.inverted_lists`) are scanned in the full space, so every similarity is
exact and recall is lost only to the probes; they read the embeddings in place. HNSW keeps its
own copy of the vectors: faiss stores them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import faiss
import numpy as np

from pipeline.progress import bar, step
from pipeline.search.exact import (
    IP,
    exact_rows,
    knn_chunked,
    list_and_range_pairs,
)
from pipeline.search.found import Neighbours, checked, take, unique_pairs
from pipeline.search.inverted_lists import InvertedLists, chunks

# IVF parameters from N: nlist ~ 4 sqrt(N) lists of ~sqrt(N)/4 vectors. nprobe starts at 8 and
# doubles until the sampled recall holds, up to nlist/8: beyond that the scan costs more than an
# eighth of the exact search.
IVF_LISTS_PER_SQRT_N = 4
IVF_NPROBE_START = 8
IVF_MAX_SCAN = 8
# The quantizer's space: rows of more dimensions are projected onto this many principal axes.
IVF_PCA_DIM = 128
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
    lists = InvertedLists.build(unit, nlist, seed, pca_dim or IVF_PCA_DIM)
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
    lists = InvertedLists.build(unit, nlist, seed, IVF_PCA_DIM)
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
        a, b = lists.close(lists.coordinates(unit), nprobe, 2 * (1 - threshold) + CLOSE_TOL)
        s = np.concatenate(
            [np.einsum("ij,ij->i", unit[a[c]], unit[b[c]]) for c in chunks(unit, len(a))]
        )
        above = s >= threshold
        a, b, s = a[above], b[above], s[above]
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


def _recall_at_k(found_d: np.ndarray, found_i: np.ndarray, exact_d: np.ndarray) -> float:
    """Share of the exact k nearest neighbours found. Ties count: a found neighbour whose
    similarity reaches the exact k-th is one of the k best (several rows can share it)."""
    valid = np.isfinite(exact_d)
    if not valid.any():
        return 1.0
    kth = np.where(valid, exact_d, np.inf).min(axis=1, keepdims=True)
    hits = ((found_d >= kth - SIM_TOL) & (found_i >= 0)).sum(axis=1)
    return float(np.minimum(hits, valid.sum(axis=1)).sum() / valid.sum())
