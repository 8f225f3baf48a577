"""Neighbour search: the exact paths (faiss, torch on the CPU in fp32, fp16 and bf16 with the fp32
re-check, and the faiss-index path a GPU takes, run with a CPU index) agree with brute force;
range search finds a 60-copy group whole at k=10; the recall an approximate search reports
matches brute force, with its quantizer in the full space or on principal axes; min_recall
widens the search; the embeddings are not copied; bad arguments and tiny inputs behave."""

from __future__ import annotations

import tracemalloc

import faiss
import numpy as np
import pytest
import torch

from pipeline.search import approximate, exact, inverted_lists, neighbours
from pipeline.search.neighbours import exact_cpu, exact_torch, groups, hnsw, ivf, search


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, seed: int = 0, per_cluster: int = 500) -> np.ndarray:
    """Rows around n / per_cluster random centres (cosine ~0.4 within a cluster), as image
    embeddings are: on i.i.d. directions an index cannot beat a full scan on recall@k."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((max(1, n // per_cluster), dim)))
    noise = rng.standard_normal((n, dim)) * 1.2 / np.sqrt(dim)
    return unit(centres[rng.integers(0, len(centres), n)] + noise)


def with_copies(x: np.ndarray, sources: np.ndarray, copies: int, noise: float, seed: int = 1):
    """x with `copies` noisy copies of each source row appended (cosine ~1/sqrt(1+noise^2))."""
    rng = np.random.default_rng(seed)
    src = np.repeat(sources, copies)
    extra = x[src] + rng.standard_normal((len(src), x.shape[1])) * noise / np.sqrt(x.shape[1])
    return np.vstack([x, unit(extra)])


def brute_force(x: np.ndarray, k: int, threshold: float) -> tuple[np.ndarray, set]:
    """Reference by numpy, 1,000 rows at a time: each row's k best similarities to other rows,
    best first, and the pairs (a < b) at or above the threshold."""
    top, pairs = [], set()
    for start in range(0, len(x), 1000):
        sims = x[start : start + 1000] @ x.T
        rows = np.arange(len(sims))
        sims[rows, rows + start] = -np.inf
        best = -np.partition(-sims, k - 1, axis=1)[:, :k]
        top.append(-np.sort(-best, axis=1))
        a, b = np.nonzero(sims >= threshold)
        pairs |= {
            (i + start, j) for i, j in zip(a.tolist(), b.tolist(), strict=True) if i + start < j
        }
    return np.concatenate(top), pairs


def pair_set(found: neighbours.Neighbours) -> set[tuple[int, int]]:
    return set(zip(found.pairs_a.tolist(), found.pairs_b.tolist(), strict=True))


@pytest.fixture(scope="module")
def small() -> np.ndarray:
    """1,500 random rows of dim 32 and 3 copies each of 20 of them: pairs near any threshold."""
    x = unit(np.random.default_rng(0).standard_normal((1500, 32)))
    return with_copies(x, np.arange(0, 400, 20), copies=3, noise=0.4)


@pytest.mark.parametrize(
    "run",
    [
        pytest.param(exact_cpu, id="faiss"),
        # What a GPU with faiss-gpu runs (exact_faiss_gpu), with a CPU flat index in its place.
        pytest.param(
            lambda x, k, t: exact.exact_index(
                x, k, t, faiss.IndexFlatIP(x.shape[1]), "cpu", "flat index"
            ),
            id="faiss-index",
        ),
        pytest.param(lambda x, k, t: exact_torch(x, k, t, device="cpu"), id="torch-cpu-fp32"),
        # fp16 (what CUDA uses) and bf16 products are off by up to ~0.001 and ~0.008: only the
        # fp32 re-check makes these pairs exact. A small block forces many blocks.
        *(
            pytest.param(
                lambda x, k, t, dtype=dtype: exact_torch(
                    x, k, t, device="cpu", dtype=dtype, block_bytes=1 << 18
                ),
                id=f"torch-cpu-{dtype}",
            )
            for dtype in (torch.float16, torch.bfloat16)
        ),
    ],
)
def test_exact_paths_agree_with_brute_force(small: np.ndarray, run) -> None:
    k, threshold = 10, 0.8
    top, truth = brute_force(small, k, threshold)
    sims = small @ small.T
    found = run(small, k, threshold)
    np.testing.assert_allclose(found.knn_similarities, top, atol=1e-5)
    # Indices agree wherever the similarity has no near-tie to swap them.
    listed = np.take_along_axis(sims, found.knn_indices, axis=1)
    np.testing.assert_allclose(listed, found.knn_similarities, atol=1e-5)
    # Pairs agree, but for any within float noise of the threshold.
    edge = {(a, b) for a, b in truth ^ pair_set(found) if abs(sims[a, b] - threshold) < 1e-5}
    assert truth ^ pair_set(found) == edge
    assert len(truth) > 50
    np.testing.assert_allclose(found.similarity, sims[found.pairs_a, found.pairs_b], atol=1e-5)
    assert np.all(np.diff(found.similarity) <= 0)
    assert np.all(found.pairs_a < found.pairs_b)


@pytest.fixture(scope="module")
def sixty_copies() -> np.ndarray:
    """60 noisy copies (cosine ~0.97 to it, ~0.94 to each other) of row 0 among 5,000 random
    rows of dim 64 (cosine to anything else < 0.6): 61 rows, 1830 pairs above 0.85."""
    x = unit(np.random.default_rng(2).standard_normal((5000, 64)))
    return with_copies(x, np.array([0]), copies=60, noise=0.25)


@pytest.mark.parametrize("method", ["exact", "ivf", "hnsw"])
def test_a_sixty_copy_group_is_found_whole_at_k10(sixty_copies: np.ndarray, method: str) -> None:
    found = search(sixty_copies, k=10, threshold=0.85, method=method, device="cpu")
    planted = np.r_[0, np.arange(5000, 5060)]
    assert len(found.pairs_a) == 61 * 60 // 2
    assert set(found.pairs_a.tolist()) | set(found.pairs_b.tolist()) == set(planted.tolist())
    labels = groups(len(sixty_copies), found.pairs_a, found.pairs_b)
    assert np.all(labels[planted] == 0) and np.all(np.delete(labels, planted) == -1)
    assert found.params["rows_range_searched"] == 61
    # The candidates for precision/recall curves hold the range pairs and all k-nearest lists.
    a, b, _ = found.candidates()
    assert len(set(zip(a.tolist(), b.tolist(), strict=True))) == len(a)
    assert pair_set(found) <= set(zip(a.tolist(), b.tolist(), strict=True))
    assert len(a) >= len(sixty_copies) * 10 // 2


def test_ivf_range_searches_the_lists_it_probes(
    sixty_copies: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """IVF lists a big group's pairs from the lists its rows probe, never by reading all rows
    for each (its pair recall on the sample says what that found)."""

    searched = []
    exact_range = exact._range_rows

    def spy(unit: np.ndarray, rows: np.ndarray, threshold: float) -> tuple:
        searched.extend(rows.tolist())
        return exact_range(unit, rows, threshold)

    monkeypatch.setattr(exact, "_range_rows", spy)
    found = ivf(sixty_copies, 10, 0.85, sample=50)
    assert len(found.pairs_a) == 61 * 60 // 2 and found.params["rows_range_searched"] == 61
    # Only the recall sample's own truth is range-searched exactly: its group rows, if any.
    assert len(searched) < 61 and found.pair_recall in (None, 1.0)


@pytest.mark.parametrize("axes", [None, 8], ids=["full", "filtered-on-8-axes"])
def test_pairs_above_a_high_threshold_over_lists_widened_on_known_pairs(
    axes: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ivf_pairs_above` (dedup's look for near-identical images where its search is
    approximate): every pair above the threshold, as brute force finds them, from lists widened
    until the known pairs (near-duplicates less alike than the threshold) probe their rows';
    scanned in full, or (rows of more values than the quantizer's axes) filtered on the axes."""
    if axes is not None:
        monkeypatch.setattr(approximate, "IVF_PCA_DIM", axes)
    rng = np.random.default_rng(7)
    base = clustered(12_000, 32, seed=7, per_cluster=100)
    x = with_copies(base, rng.choice(12_000, 150, replace=False), copies=1, noise=0.05)
    _, truth = brute_force(x, 1, 0.995)
    assert len(truth) >= 150  # the planted near-identical pairs, and any others as alike
    sources = rng.choice(12_000, 200, replace=False)
    near = unit(x[sources] + rng.standard_normal((200, 32)) * 0.5 / np.sqrt(32))  # cos ~0.9
    a, b, settings = approximate.ivf_pairs_above(x, 0.995, (near, sources))
    assert set(zip(a.tolist(), b.tolist(), strict=True)) == truth
    assert settings["nlist"] > 100 and settings["nprobe"] == settings["known_pairs_probed"][-1][0]
    # Widened until the known pairs probe their rows' lists, or up to its cap.
    share, cap = (
        settings["known_pairs_probed"][-1][1],
        settings["nlist"] // approximate.IVF_MAX_SCAN,
    )
    assert share >= 0.99 or settings["nprobe"] == cap
    # Known pairs far apart (cosine ~0.5) widen the lists probed, up to the cap.
    far = unit(x[sources] + rng.standard_normal((200, 32)) * 1.7 / np.sqrt(32))
    _, _, wide = approximate.ivf_pairs_above(x, 0.995, (far, sources), min_recall=1.0)
    assert len(wide["known_pairs_probed"]) > 1 and wide["nprobe"] >= settings["nprobe"]


def test_exact_torch_finds_the_group_in_bf16(sixty_copies: np.ndarray) -> None:
    found = exact_torch(sixty_copies, 10, 0.85, device="cpu", dtype=torch.bfloat16)
    assert len(found.pairs_a) == 1830


@pytest.fixture(scope="module")
def planted_20k() -> np.ndarray:
    """20,000 clustered rows of dim 64 and 2 copies each of 200 of them."""
    x = clustered(20_000, 64)
    return with_copies(x, np.arange(0, 20_000, 100), copies=2, noise=0.2)


def test_reported_recall_matches_brute_force(planted_20k: np.ndarray) -> None:
    k, threshold = 10, 0.9
    # nprobe=2 and no widening: a recall well below 1, so a wrong estimate shows.
    found = ivf(planted_20k, k, threshold, nprobe=2, min_recall=0.01, sample=1000)
    top, truth = brute_force(planted_20k, k, threshold)
    kth = top[:, -1:]
    per_row = ((found.knn_similarities >= kth - approximate.SIM_TOL).sum(axis=1)) / k
    true_recall = per_row.mean()
    assert 0.3 < true_recall < 0.95
    # A sample of 1,000 rows: 4 standard errors of the mean.
    assert abs(found.recall_at_k - true_recall) < 4 * per_row.std() / np.sqrt(1000)
    assert found.params["nprobe"] == 2 and found.params["sample"] == 1000
    # The planted pairs sit in the same list: found, and the sampled pair recall says so.
    assert pair_set(found) == truth
    assert found.pair_recall == 1.0 and found.params["sample_pairs"] > 0


def test_ivf_on_principal_axes_reports_recall_that_matches_brute_force(
    planted_20k: np.ndarray,
) -> None:
    """The quantizer on the rows' 16 leading principal axes (as 1280-dim rows get 128): the
    lists and probes come from the projection, the scan is exact in the full 64 dimensions."""
    k, threshold = 10, 0.9
    found = ivf(planted_20k, k, threshold, nprobe=2, pca_dim=16, min_recall=0.01, sample=1000)
    assert found.params["quantizer_dim"] == 16 and found.params["nprobe"] == 2
    top, truth = brute_force(planted_20k, k, threshold)
    per_row = (found.knn_similarities >= top[:, -1:] - approximate.SIM_TOL).sum(axis=1) / k
    assert 0.3 < per_row.mean() < 0.99
    assert abs(found.recall_at_k - per_row.mean()) < 4 * per_row.std() / np.sqrt(1000)
    # Every listed similarity is the exact one, from the full space.
    listed = np.einsum("ij,ikj->ik", planted_20k, planted_20k[found.knn_indices])
    np.testing.assert_allclose(listed, found.knn_similarities, atol=1e-5)
    assert pair_set(found) <= truth  # at nprobe=2 a few copies sit in lists not probed
    widened = ivf(planted_20k, k, threshold, nprobe=1, pca_dim=16, min_recall=0.99)
    assert widened.recall_at_k >= 0.99 and widened.params["recall_reached"]
    assert "quantizer_dim=16" in widened.summary() and pair_set(widened) == truth


def test_spherical_kmeans_gives_unit_centroids_and_refills_empty_lists() -> None:
    rng = np.random.default_rng(0)
    points = unit(np.repeat(rng.standard_normal((3, 8)), 50, axis=0))  # 3 distinct points
    centroids = inverted_lists.spherical_kmeans(points, 5, 4, rng)
    assert centroids.shape == (5, 8) and centroids.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-6)
    # Each of the 3 points is a centroid; the lists left empty restart from rows.
    best = (points @ centroids.T).max(axis=1)
    np.testing.assert_allclose(best, 1, atol=1e-6)


def test_min_recall_widens_nprobe(planted_20k: np.ndarray) -> None:
    found = ivf(planted_20k, 10, 0.9, nprobe=1, min_recall=0.98)
    tried = [nprobe for nprobe, _ in found.params["calibration"]]
    recalls = [recall for _, recall in found.params["calibration"]]
    assert tried[0] == 1 and recalls[0] < 0.98
    assert tried == [2**i for i in range(len(tried))] and found.params["nprobe"] == tried[-1]
    assert found.recall_at_k >= 0.98 and found.params["recall_reached"]
    assert "NOT reached" not in found.summary()


def test_min_recall_stops_at_the_cap_and_says_so() -> None:
    # i.i.d. directions: the nearest neighbours are noise that no list holds together.
    x = unit(np.random.default_rng(3).standard_normal((4000, 32)))
    found = ivf(x, 10, 0.9, min_recall=0.999)
    nlist = found.params["nlist"]
    assert found.params["nprobe"] == nlist // approximate.IVF_MAX_SCAN
    assert not found.params["recall_reached"] and found.recall_at_k < 0.999
    assert "NOT reached" in found.summary()


def test_hnsw_widens_ef_search() -> None:
    # i.i.d. directions: a hard case for a graph, which needs a wide search to reach 0.99.
    x = unit(np.random.default_rng(4).standard_normal((5000, 32)))
    found = hnsw(x, 10, 0.9, ef_search=2, min_recall=0.99)
    tried = [ef for ef, _ in found.params["calibration"]]
    # efSearch below k + 1 would return fewer than k neighbours: it starts there.
    assert tried[0] == 11 and len(tried) > 1 and found.params["ef_search"] == tried[-1]
    assert found.recall_at_k >= 0.99


def test_auto_states_its_switch_point(
    planted_20k: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = search(planted_20k[:3000], 10, 0.9, device="cpu")
    assert small.method_used == "exact" and small.recall_at_k is None
    assert "N=3,000 <= EXACT_CPU_MAX_N" in small.reason
    assert small.reason in small.summary()
    monkeypatch.setattr(neighbours, "EXACT_CPU_MAX_N", 1000)
    large = search(planted_20k[:3000], 10, 0.9, device="cpu")
    assert large.method_used == "ivf" and "N=3,000 > EXACT_CPU_MAX_N=1,000" in large.reason
    assert f"recall@10 {large.recall_at_k:.4f}" in large.summary()


def test_auto_lowers_its_switch_point_for_long_rows(
    planted_20k: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exact search costs N^2 x dim: above EXACT_CPU_DIM dimensions fewer rows get it."""
    assert neighbours.exact_cpu_max_n(256) == neighbours.EXACT_CPU_MAX_N
    assert neighbours.exact_cpu_max_n(1024) == neighbours.EXACT_CPU_MAX_N // 2
    monkeypatch.setattr(neighbours, "EXACT_CPU_MAX_N", 2000)
    wide = np.hstack([planted_20k[:1500]] * 16) / 4  # 1024 dims, still unit rows
    found = search(wide, 10, 0.9, device="cpu")
    assert found.method_used == "ivf"
    assert "N=1,500 > EXACT_CPU_MAX_N=2,000, 1,000 at dim 1024" in found.reason
    assert found.params["quantizer_dim"] == approximate.IVF_PCA_DIM
    assert search(wide[:1000], 10, 0.9, device="cpu").method_used == "exact"


def test_a_gpu_with_faiss_gpu_searches_through_its_flat_index(
    small: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """device=cuda where faiss has GPU support: exact_faiss_gpu, here with a CPU flat index in
    place of the GPU's (the same code otherwise); the result is the CPU's exact search."""
    made = []

    def cpu_index(dim: int, device: str) -> faiss.Index:
        made.append(device)
        return faiss.IndexFlatIP(dim)

    monkeypatch.setattr(neighbours, "_cuda_available", lambda: True)
    monkeypatch.setattr(exact, "faiss_gpus", lambda: 1)
    monkeypatch.setattr(exact, "gpu_flat_index", cpu_index)
    found = search(small, 10, 0.8, device="cuda:1")
    assert made == ["cuda:1"] and found.method_used == "exact" and found.device == "cuda:1"
    assert "(faiss GPU)" in found.reason and found.reason in found.summary()
    cpu = exact_cpu(small, 10, 0.8)
    np.testing.assert_allclose(found.knn_similarities, cpu.knn_similarities, atol=1e-5)
    assert pair_set(found) == pair_set(cpu)


@pytest.mark.parametrize("method", ["exact", "ivf"])
def test_embeddings_are_not_copied(method: str) -> None:
    x = clustered(8_000, 768)  # 25 MB
    tracemalloc.start()
    search(x, 10, 0.9, method=method, device="cpu")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # Results, blocks, (IVF) probe lists, heaps and the rows gathered for one list: about half
    # the data here (less at larger N). A copy of the data would be all of it on its own.
    assert peak < 0.9 * x.nbytes


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "annoy"}, "method must be one of auto, exact, ivf, hnsw"),
        ({"device": "tpu"}, "device must be"),
        ({"k": 0}, "k must be at least 1"),
        ({"threshold": 1.5}, "threshold is a cosine similarity"),
        ({"min_recall": 0}, "min_recall"),
        ({"sample": 0}, "sample must be"),
    ],
)
def test_invalid_arguments(kwargs: dict, message: str) -> None:
    args = {"unit": unit(np.ones((3, 4))), "k": 2, "threshold": 0.9, **kwargs}
    with pytest.raises(ValueError, match=message):
        search(**args)


def test_approximate_methods_refuse_a_gpu() -> None:
    # Without CUDA the device itself is refused; with it, the method is: both say why.
    with pytest.raises(ValueError, match=r"CUDA|cuda"):
        search(unit(np.ones((3, 4))), 2, 0.9, method="ivf", device="cuda")


@pytest.mark.parametrize("method", ["auto", "exact", "ivf", "hnsw", "torch"])
@pytest.mark.parametrize("n", [0, 1, 2])
def test_tiny_inputs(method: str, n: int) -> None:
    x = unit(np.ones((n, 8)) + np.arange(8) * 1e-3)
    if method == "torch":
        found = exact_torch(x, 5, 0.9, device="cpu")
    else:
        found = search(x, 5, 0.9, method=method, device="cpu")
    assert found.knn_indices.shape == (n, 5) and found.knn_similarities.shape == (n, 5)
    assert np.all(found.knn_indices[:, 1:] == -1)
    if n == 2:  # two near-identical rows: one pair, each the other's only neighbour
        assert found.knn_indices[:, 0].tolist() == [1, 0]
        assert (found.pairs_a.tolist(), found.pairs_b.tolist()) == ([0], [1])
    else:
        assert len(found.pairs_a) == 0 and np.all(found.knn_indices == -1)
    assert groups(n, found.pairs_a, found.pairs_b).tolist() == ([0, 0] if n == 2 else [-1] * n)


def test_groups_are_connected_components() -> None:
    labels = groups(7, np.array([0, 1, 4]), np.array([1, 2, 6]))
    assert labels.tolist() == [0, 0, 0, -1, 1, -1, 1]


@pytest.mark.gpu
@pytest.mark.skipif(exact.faiss_gpus() == 0, reason="needs faiss with GPU support and a GPU")
def test_faiss_gpu_exact_equals_cpu_exact(small: np.ndarray, sixty_copies: np.ndarray) -> None:
    for x in (small, sixty_copies):
        cpu = exact_cpu(x, 10, 0.8)
        gpu = exact.exact_faiss_gpu(x, 10, 0.8, device="cuda")
        np.testing.assert_allclose(gpu.knn_similarities, cpu.knn_similarities, atol=1e-5)
        assert pair_set(gpu) == pair_set(cpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_exact_equals_cpu_exact(
    small: np.ndarray, sixty_copies: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(exact, "faiss_gpus", lambda: 0)  # the torch path, even with faiss-gpu
    for x in (small, sixty_copies):
        cpu = exact_cpu(x, 10, 0.8)
        gpu = search(x, 10, 0.8, method="auto", device="cuda")
        assert gpu.method_used == "exact" and gpu.device.startswith("cuda")
        assert gpu.params["dtype"] == "torch.float16"
        np.testing.assert_allclose(gpu.knn_similarities, cpu.knn_similarities, atol=1e-5)
        sims = x @ x.T
        edge = {(a, b) for a, b in pair_set(cpu) ^ pair_set(gpu) if abs(sims[a, b] - 0.8) < 1e-5}
        assert pair_set(cpu) ^ pair_set(gpu) == edge
        np.testing.assert_allclose(gpu.similarity, sims[gpu.pairs_a, gpu.pairs_b], atol=1e-5)
