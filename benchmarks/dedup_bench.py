"""Near-duplicate search at scale, side by side: time, peak memory and recall of each method of
pipeline.search.neighbours, and of imagededup's CNN.find_duplicates on encodings of the same size.

    python benchmarks/dedup_bench.py [--sizes 50000,200000,1000000] [--methods auto,exact,...]
    python benchmarks/dedup_bench.py --quick          # a few seconds: N=3,000, all methods

Data: N unit vectors of dim 256. The background is clustered like image embeddings (N/1000
centres, cosine ~0.4 within a cluster; --background isotropic for i.i.d. Gaussian directions,
where the k nearest neighbours of a row are noise at cosine ~0.25 and no index beats a full scan
on recall@k; --background embedding for `EmbeddingLike`'s rows, normalised and whitened as
`python -m pipeline.dedup` whitens them by default). 1% of the rows are in planted groups: a
background row (0.25% of them) and 1-5 noisy copies of it (cosine 0.94-0.995 to it; for
`embedding`, the generator's own copies).

Each (method, N) runs in a fresh subprocess that makes the data, resets the kernel's high-water
mark of resident memory (/proc/self/clear_refs), searches, and reads the mark back: peak memory
includes faiss's and torch's native allocations (tracemalloc sees neither) and the data itself.
Columns:
  time           wall seconds of the search alone (data generation excluded)
  peak GB        resident-memory high-water mark during the search, data included
  recall@k self  what the method reports, measured on its own sample of 1,000 queries
  recall@k check recomputed here against brute force on 1,000 other queries
  planted@k      share of planted pairs (both members of a group) found in the k-nearest lists
  planted pairs  share of planted pairs at or above the threshold found in the pairs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.search import approximate, neighbours

METHODS = ("auto", "exact", "ivf", "hnsw", "exact-cuda", "imagededup")
# Exact on the CPU grows as N^2 (254 s at 200k on the busy 2-core machine): above this it is
# extrapolated, not run.
EXACT_RUN_MAX_N = 200_000
EXACT_PROBE_N = 20_000  # the size timed to extrapolate from
# imagededup stacks an N x N float16 matrix from float16 chunks: twice its size at the peak.
IMAGEDEDUP_MEMORY_SHARE = 0.6  # of the memory available now
PLANTED_SHARE = 0.01  # of the rows, in planted groups (a source and 1-5 copies: 4 rows on average)
CHECK_QUERIES = 1000


class EmbeddingLike:
    """Rows like a CNN's pooled image embeddings, made a chunk at a time (a million rows of 1280
    values never have to be in memory at once), the same whatever the chunks.

    What makes them like embeddings: a positive mean (pooled activations are non-negative:
    cosine ~0.75 between unrelated rows before whitening), variance falling off as a power of
    the principal axis (i^-alpha), and structure at several scales: N/1000 classes, each of 10
    subclasses, each of 10 scenes of ~10 rows (a class's photos, of one kind of scene, of one
    scene), each level varying less than the one above and over a flatter spectrum (coarse
    differences along the leading axes, fine ones spread over many): after whitening a row's
    nearest neighbours are its scene's other rows, at cosine ~0.5 against ~0.25 for its 50th
    nearest. Near-duplicates (`copies`) are a row plus a fifth to three fifths of a row's own
    variation, the fine-scale kind: the copies a crop or a re-compression makes.

    Rows are in scene order (as a folder per class holds them); `chunk(start, stop)` makes rows
    [start, stop) and each one's scene."""

    SCALES = (1.0, 0.7, 0.5, 0.4)  # class, subclass, scene, row
    ALPHAS = (1.2, 1.0, 0.8, 0.6)  # each level's variance ~ i^-alpha along axis i
    FANOUT = 10  # subclasses per class, scenes per subclass
    ROWS_PER_CLASS = 1000
    BLOCK = 4096  # scene and subclass centres are made in blocks of this many, each seeded

    def __init__(self, n: int, dim: int, seed: int = 0) -> None:
        self.n, self.dim, self.seed = n, dim, seed
        rng = np.random.default_rng([seed, 0])
        axis = np.arange(1, dim + 1, dtype=np.float32)
        self.spectra = [s * axis ** (-a / 2) for s, a in zip(self.SCALES, self.ALPHAS, strict=True)]
        self.mean = np.abs(rng.standard_normal(dim, dtype=np.float32)) * 3 / np.sqrt(axis)
        classes = max(1, n // self.ROWS_PER_CLASS)
        self.scenes = np.sort(rng.integers(0, classes * self.FANOUT**2, n))
        self.classes = rng.standard_normal((classes, dim), dtype=np.float32) * self.spectra[0]
        self._made: dict[tuple[int, int], np.ndarray] = {}

    def _centres(self, level: int, ids: np.ndarray) -> np.ndarray:
        """Subclass (level 1) or scene (level 2) centres of `ids`, made in seeded blocks."""
        out = np.empty((len(ids), self.dim), np.float32)
        for block in np.unique(ids // self.BLOCK):
            key = (level, int(block))
            if key not in self._made:  # consecutive chunks share blocks: the last is kept
                rng = np.random.default_rng([self.seed, *key])
                centres = rng.standard_normal((self.BLOCK, self.dim), dtype=np.float32)
                self._made = {k: v for k, v in self._made.items() if k[0] != level}
                self._made[key] = centres * self.spectra[level]
            mine = ids // self.BLOCK == block
            out[mine] = self._made[key][ids[mine] % self.BLOCK]
        return out

    def chunk(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows [start, stop) (float32, not normalised) and their scenes."""
        scenes = self.scenes[start:stop]
        rng = np.random.default_rng([self.seed, 3, start])
        x = rng.standard_normal((len(scenes), self.dim), dtype=np.float32) * self.spectra[3]
        x += self.mean
        x += self.classes[scenes // self.FANOUT**2]
        x += self._centres(1, scenes // self.FANOUT)
        x += self._centres(2, scenes)
        return x, scenes

    def copies(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A near-duplicate of each of `rows`: 0.2-0.6 of a row's own variation added."""
        scale = rng.uniform(0.2, 0.6, (len(rows), 1)).astype(np.float32)
        noise = rng.standard_normal(rows.shape, dtype=np.float32) * self.spectra[3]
        return rows + scale * noise


def embedding_rows(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n `EmbeddingLike` rows as `python -m pipeline.dedup` searches them by default
    (normalised, whitened with its defaults, normalised) and each row's planted group: 1% of
    the rows are copies (1-5 each) of 0.25% of the others, replacing the rows at the end."""
    from pipeline.search.vectors import fit_whitening

    data = EmbeddingLike(n, dim, seed)
    rng = np.random.default_rng(seed)
    copies = rng.integers(1, 6, size=max(1, round(PLANTED_SHARE * n / 4)))
    copies = copies[np.cumsum(copies) < n // 2]
    n_base = n - int(copies.sum())
    x = np.empty((n, dim), np.float32)
    for start in range(0, n_base, 1 << 16):
        x[start : min(n_base, start + (1 << 16))] = data.chunk(
            start, min(n_base, start + (1 << 16))
        )[0]
    sources = rng.choice(n_base, len(copies), replace=False)
    group = np.full(n, -1)
    group[sources] = np.arange(len(copies))
    src_rows = np.repeat(sources, copies)
    x[n_base:] = data.copies(x[src_rows], rng)
    group[n_base:] = group[src_rows]
    unit(x, out=x)
    sample = x[np.sort(rng.choice(n, min(n, 20_000), replace=False))]
    whitening = fit_whitening(sample, None, 0.5)
    for start in range(0, n, 1 << 14):
        x[start : start + (1 << 14)] = whitening.apply(x[start : start + (1 << 14)])
    return x, group


def planted_data(n: int, dim: int, seed: int, background: str) -> tuple[np.ndarray, np.ndarray]:
    """n unit vectors (float32) and each row's planted group (-1 outside any): PLANTED_SHARE of
    the rows are in groups of a background row and its 1-5 noisy copies, appended at the end."""
    if background == "embedding":
        return embedding_rows(n, dim, seed)
    rng = np.random.default_rng(seed)
    copies = rng.integers(1, 6, size=max(1, round(PLANTED_SHARE * n / 4)))
    copies = copies[np.cumsum(copies) < n // 2]  # tiny n: the copies never crowd out the rest
    n_base = n - int(copies.sum())
    x = np.empty((n, dim), np.float32)
    centres = unit(rng.standard_normal((max(1, n_base // 1000), dim), dtype=np.float32))
    for start in range(0, n_base, 1 << 16):
        rows = min(n_base, start + (1 << 16)) - start
        noise = rng.standard_normal((rows, dim), dtype=np.float32)
        if background == "clustered":
            noise *= 1.2 / np.sqrt(dim)
            noise += centres[rng.integers(0, len(centres), rows)]
        x[start : start + rows] = unit(noise)
    sources = rng.choice(n_base, len(copies), replace=False)
    group = np.full(n, -1)
    group[sources] = np.arange(len(copies))
    src_rows = np.repeat(sources, copies)
    sigma = rng.uniform(0.1, 0.35, (len(src_rows), 1)).astype(np.float32)
    noise = rng.standard_normal((len(src_rows), dim), dtype=np.float32) * sigma / np.sqrt(dim)
    x[n_base:] = unit(x[src_rows] + noise)
    group[n_base:] = group[src_rows]
    return x, group


def unit(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    return np.divide(x, np.linalg.norm(x, axis=1, keepdims=True), out=out)


def planted_pairs(group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (a < b) of rows in the same planted group (groups are small: at most 6)."""
    rows = np.flatnonzero(group >= 0)
    rows = rows[np.argsort(group[rows], kind="stable")]
    sizes = np.bincount(group[rows])
    a, b = [], []
    for members in np.split(rows, np.cumsum(sizes)[:-1]):
        i, j = np.triu_indices(len(members), 1)
        a.append(members[i])
        b.append(members[j])
    a, b = np.concatenate(a), np.concatenate(b)
    return np.minimum(a, b), np.maximum(a, b)


def peak_gb() -> float:
    """The high-water mark of resident memory, GB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "VmHWM":
            return int(value.split()[0]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status: peak memory needs Linux")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS


def worker(spec: dict) -> dict:
    """One (method, N): make the data, search, measure; a JSON-able row for the table."""
    n, dim, k, threshold, method = (spec[key] for key in ("n", "dim", "k", "threshold", "method"))
    x, group = planted_data(n, dim, spec["seed"], spec["background"])
    keys_a, keys_b = planted_pairs(group)
    truth_sims = np.einsum("ij,ij->i", x[keys_a], x[keys_b])
    row: dict = {"n": n, "method": method}
    if method == "imagededup":
        return row | run_imagededup(x, threshold, keys_a, keys_b, truth_sims)
    reset_peak()
    start = time.perf_counter()
    device = "cuda" if method == "exact-cuda" else "cpu"
    found = neighbours.search(
        x, k, threshold, method=method.removesuffix("-cuda"), device=device, seed=spec["seed"]
    )
    row["seconds"] = time.perf_counter() - start
    row["peak_gb"] = peak_gb()
    row["recall_self"] = found.recall_at_k
    row["summary"] = found.summary()
    row["n_pairs"] = len(found.pairs_a)
    # Independent check on other queries than the method's own sample.
    rng = np.random.default_rng(spec["seed"] + 1)
    queries = np.sort(rng.choice(n, min(CHECK_QUERIES, n), replace=False))
    row["recall_check"] = recall_check(x, queries, found.knn_indices, found.knn_similarities, k)
    listed = np.zeros(len(keys_a), bool)
    knn = found.knn_indices
    for a, b in ((keys_a, keys_b), (keys_b, keys_a)):
        listed |= (knn[a] == b[:, None]).any(axis=1)
    row["planted_knn"] = float(listed.mean())
    above = truth_sims >= threshold
    found_keys = found.pairs_a * n + found.pairs_b
    row["planted_pairs"] = float(np.isin((keys_a * n + keys_b)[above], found_keys).mean())
    row["planted_total"] = int(above.sum())
    return row


def recall_check(
    x: np.ndarray, queries: np.ndarray, knn_i: np.ndarray, knn_d: np.ndarray, k: int
) -> float:
    """recall@k of the given lists on `queries`, against brute force (numpy, a block of
    columns at a time), ties counted as found."""
    kk = min(k, len(x) - 1)
    best = np.full((len(queries), kk), -np.inf, np.float32)
    for start in range(0, len(x), 1 << 16):
        sims = x[queries] @ x[start : start + (1 << 16)].T
        own = (queries >= start) & (queries < start + len(sims[0]))
        sims[own, queries[own] - start] = -np.inf  # a row is not its own neighbour
        both = np.concatenate([best, sims], axis=1)
        best = -np.partition(-both, kk - 1, axis=1)[:, :kk]
    kth = best.min(axis=1, keepdims=True)
    hits = ((knn_d[queries] >= kth - approximate.SIM_TOL) & (knn_i[queries] >= 0)).sum(axis=1)
    return float(np.minimum(hits, kk).sum() / (kk * len(queries)))


def run_imagededup(
    x: np.ndarray, threshold: float, keys_a: np.ndarray, keys_b: np.ndarray, sims: np.ndarray
) -> dict:
    n = len(x)
    try:
        from imagededup.methods import CNN
        from imagededup.utils.logger import return_logger
    except ImportError:
        return {"skipped": "not run: imagededup is not installed"}
    encodings = {str(i): x[i] for i in range(n)}
    # CNN() downloads MobileNet weights to encode images; these encodings are given, so only
    # what find_duplicates reads is set up (no network here).
    cnn = CNN.__new__(CNN)
    cnn.verbose, cnn.logger = 0, return_logger(__name__)
    reset_peak()
    start = time.perf_counter()
    duplicates = cnn.find_duplicates(
        encoding_map=encodings, min_similarity_threshold=threshold, scores=False
    )
    seconds = time.perf_counter() - start
    peak = peak_gb()
    found = {
        (min(int(a), int(b)), max(int(a), int(b))) for a, dups in duplicates.items() for b in dups
    }
    above = sims >= threshold
    hits = [(a, b) in found for a, b in zip(keys_a[above], keys_b[above], strict=True)]
    return {
        "seconds": seconds,
        "peak_gb": peak,
        "n_pairs": len(found),
        "planted_pairs": float(np.mean(hits)),
        "planted_total": int(above.sum()),
        "summary": "N x N cosine matrix (float16 above 10,000 rows), thresholded row by row",
    }


def skip_reason(method: str, n: int, args: argparse.Namespace) -> str | None:
    """Why (method, n) is not run here, or None."""
    if method == "exact" and n > args.exact_max:
        return "extrapolate"
    if method == "exact-cuda":
        import torch

        if not torch.cuda.is_available():
            return "not run: no CUDA device"
    if method == "imagededup":
        import psutil

        need = 2 * n * n * 2  # float16 chunks and their stacked copy
        budget = IMAGEDEDUP_MEMORY_SHARE * psutil.virtual_memory().available
        if need > budget:
            return (
                f"not run: N x N float16 = {n * n * 2 / 2**30:,.0f} GiB, twice that while "
                f"stacked, > {budget / 2**30:.0f} GiB available here"
            )
    return None


def spawn(spec: dict) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    if result.returncode != 0:
        return {**spec, "skipped": f"failed: {result.stderr.strip().splitlines()[-1]}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="50000,200000,1000000")
    parser.add_argument("--methods", default="auto,exact,ivf,hnsw,exact-cuda,imagededup")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threshold", type=float, default=0.85)
    parser.add_argument(
        "--background", choices=("clustered", "isotropic", "embedding"), default="clustered"
    )
    parser.add_argument("--exact-max", type=int, default=EXACT_RUN_MAX_N)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="N=3,000: a few seconds")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    sizes = [3000] if args.quick else [int(s) for s in args.sizes.split(",")]
    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    base = {
        "dim": args.dim,
        "k": args.k,
        "threshold": args.threshold,
        "seed": args.seed,
        "background": args.background,
    }
    print(
        f"dim {args.dim}, k {args.k}, threshold {args.threshold}, {args.background} background, "
        f"{PLANTED_SHARE:.0%} of rows in planted groups (a row and 1-5 copies); "
        f"{os.cpu_count()} CPU cores; "
        f"auto: exact on CPU up to EXACT_CPU_MAX_N={neighbours.EXACT_CPU_MAX_N:,}, IVF above"
    )
    # Other processes on the machine slow every column but the recalls: say how busy it was.
    load_start = os.getloadavg()[0]
    rows = []
    probe_seconds: float | None = None
    for n in sizes:
        for method in methods:
            reason = skip_reason(method, n, args)
            if reason == "extrapolate":
                if probe_seconds is None:
                    probe = spawn({**base, "n": EXACT_PROBE_N, "method": "exact"})
                    probe_seconds = probe["seconds"]
                guess = probe_seconds * (n / EXACT_PROBE_N) ** 2
                reason = (
                    f"not run: N > --exact-max {args.exact_max:,}; extrapolated ~{guess / 60:,.0f} "
                    f"min from {probe_seconds:.1f} s at N={EXACT_PROBE_N:,} (time ~ N^2)"
                )
            row = {"n": n, "method": method, "skipped": reason} if reason else None
            row = row or spawn({**base, "n": n, "method": method})
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    k = args.k
    header = (
        f"{'N':>9} {'method':<11} {'time s':>8} {'peak GB':>8} {f'recall@{k}':>9} "
        f"{'check':>7} {f'planted@{k}':>10} {'planted':>8} {'pairs':>9}  notes"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        if "skipped" in row:
            print(f"{row['n']:>9,} {row['method']:<11} {row['skipped']}")
            continue
        print(
            f"{row['n']:>9,} {row['method']:<11} {row['seconds']:>8.1f} {row['peak_gb']:>8.2f} "
            f"{fmt(row.get('recall_self'), '.4f'):>9} {fmt(row.get('recall_check'), '.4f'):>7} "
            f"{fmt(row.get('planted_knn'), '.4f'):>10} {row['planted_pairs']:>8.4f} "
            f"{row['n_pairs']:>9,}  {row['summary']}"
        )
    print(
        f"load average (1 min): {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    )


if __name__ == "__main__":
    main()
