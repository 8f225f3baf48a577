"""PCA-whitening against values computed by hand, and the invariants it promises; rows
transformed in place, chunk by chunk, into their own memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from pipeline.search.vectors import fit_whitening, map_rows_in_place, normalise

# Variance 8/3 along x, 2/3 along y, no covariance: the principal axes are x and y.
CROSS = np.array([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0]])


def test_full_whitening_divides_each_axis_by_its_deviation() -> None:
    whitening = fit_whitening(CROSS, shrinkage=0.0)
    np.testing.assert_allclose(whitening.mean, [0, 0], atol=1e-7)
    np.testing.assert_allclose(
        whitening.projection, [[np.sqrt(3 / 8), 0], [0, np.sqrt(3 / 2)]], rtol=1e-6, atol=1e-7
    )


def test_shrinkage_pulls_variances_toward_their_mean() -> None:
    # Mean variance 5/3: shrunk by half, 8/3 -> 13/6 and 2/3 -> 7/6.
    whitening = fit_whitening(CROSS + np.array([1.0, -1.0]), shrinkage=0.5)
    np.testing.assert_allclose(whitening.mean, [1, -1], rtol=1e-6)
    np.testing.assert_allclose(
        whitening.projection, [[np.sqrt(6 / 13), 0], [0, np.sqrt(6 / 7)]], rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(
        whitening.apply(np.array([[3.0, 0.0]])),
        normalise(np.array([[2 * np.sqrt(6 / 13), 1 * np.sqrt(6 / 7)]])),
        rtol=1e-6,
    )


def test_normalise_scales_in_place_without_a_copy_and_float16_without_overflow() -> None:
    rows = np.random.default_rng(0).standard_normal((20_000, 256)).astype(np.float32)
    expected = rows / np.linalg.norm(rows.astype(np.float64), axis=1, keepdims=True)
    tracemalloc.start()
    try:
        scaled = normalise(rows, out=rows)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert scaled is rows and peak < rows.nbytes / 10  # 20 MB of rows; np.linalg.norm takes 20 more
    np.testing.assert_allclose(rows, expected, atol=1e-6)
    loud = np.full((2, 1280), 300.0, np.float16)  # each square overflows float16
    np.testing.assert_allclose(normalise(loud), np.full((2, 1280), 1 / np.sqrt(1280)), rtol=1e-3)
    np.testing.assert_array_equal(normalise(np.zeros((1, 3), np.float32)), [[0, 0, 0]])


def test_dim_keeps_the_components_of_largest_variance() -> None:
    whitening = fit_whitening(CROSS, dim=1, shrinkage=0.0)
    np.testing.assert_allclose(whitening.projection, [[np.sqrt(3 / 8)], [0]], atol=1e-7)
    # n vectors span at most n - 1 directions: no more are kept, whatever dim asks.
    assert fit_whitening(np.eye(3, 10), dim=8).projection.shape == (10, 2)


def test_fitted_vectors_come_out_decorrelated_with_unit_variance() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((500, 6)) @ rng.standard_normal((6, 6)) + 3
    whitening = fit_whitening(vectors, shrinkage=0.0)
    centred = (vectors - whitening.mean) @ whitening.projection
    np.testing.assert_allclose(np.cov(centred.T), np.eye(6), atol=1e-4)


def test_full_shrinkage_only_rotates() -> None:
    """Shrinkage 1: every variance becomes their mean, so cosine similarities of the centred
    vectors are kept."""
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((50, 5)) * [5, 4, 3, 2, 1]
    whitening = fit_whitening(vectors, shrinkage=1.0)
    centred = normalise(vectors - vectors.mean(axis=0))
    out = whitening.apply(vectors)
    np.testing.assert_allclose(out @ out.T, centred @ centred.T, atol=1e-5)


def test_refit_gives_the_same_projection_and_bad_input_is_refused() -> None:
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((30, 4))
    first, second = fit_whitening(vectors), fit_whitening(vectors[::-1])
    np.testing.assert_allclose(first.projection, second.projection, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        fit_whitening(vectors[:1])
    with pytest.raises(ValueError, match="shrinkage"):
        fit_whitening(vectors, shrinkage=1.5)


@pytest.mark.parametrize("dim", [6, 3])
def test_rows_are_mapped_in_place_chunk_by_chunk(dim: int) -> None:
    """The (N, dim) result is the front of the input's own buffer, equal to the transform of
    all rows at once, however the chunks fall (7 values: a chunk of one row)."""
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((50, 6)).astype(np.float32)
    reference = vectors.copy()
    whitening = fit_whitening(normalise(reference), dim=dim)

    def transform(x: np.ndarray) -> np.ndarray:
        return whitening.apply(normalise(x))

    out = map_rows_in_place(vectors, transform, dim, chunk_values=7)
    assert out.shape == (50, dim) and out.flags.c_contiguous
    assert np.shares_memory(out, vectors) and out.ctypes.data == vectors.ctypes.data
    np.testing.assert_allclose(out, transform(reference), rtol=1e-5, atol=1e-6)


def test_rows_that_cannot_be_overwritten_are_mapped_into_a_new_array() -> None:
    vectors = np.arange(12, dtype=np.float64).reshape(4, 3)
    frozen = np.arange(12, dtype=np.float32).reshape(4, 3)
    frozen.flags.writeable = False
    for rows in (vectors, frozen, np.asfortranarray(frozen)):
        out = map_rows_in_place(rows, lambda x: np.asarray(x[:, :2] * 2, np.float32), 2, 3)
        assert not np.shares_memory(out, rows) and out.dtype == np.float32
        np.testing.assert_array_equal(out, np.asarray(rows)[:, :2] * 2)
    np.testing.assert_array_equal(vectors, np.arange(12).reshape(4, 3))  # untouched
    with pytest.raises(ValueError, match="cannot hold 4"):
        map_rows_in_place(frozen, lambda x: x, 4)
    with pytest.raises(ValueError, match=r"transform returned shape \(1, 3\), not \(4, 3\)"):
        map_rows_in_place(vectors.astype(np.float32), lambda x: x[:1], 3)
