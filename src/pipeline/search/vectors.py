"""Vector math the downstream stages share: normalising, PCA-whitening, and rows transformed in
place a chunk at a time (a large set is never copied whole)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pipeline.config import DedupConfig

log = logging.getLogger(__name__)
MIN_WHITENED = 16  # fewer embeddings than this cannot estimate a whitening worth applying

# Values transformed at once by `map_rows_in_place` (each chunk's input and output): 64 MiB.
MAP_CHUNK_VALUES = 16 * 2**20


def normalise(vectors: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rows scaled to unit length, so that dot products are cosine similarities; `out=vectors`
    scales in place (a large set then needs no second copy). The lengths come from einsum, which
    unlike np.linalg.norm makes no squared copy of the rows, summed in float32 at least (float16
    squares overflow)."""
    dtype = np.promote_types(vectors.dtype, np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors, dtype=dtype))[:, None]
    return np.divide(vectors, np.maximum(norms, np.finfo(np.float32).tiny), out=out)


@dataclass(frozen=True)
class Whitening:
    """A PCA-whitening fitted on some vectors: `apply` maps x to
    normalise((x - mean) @ projection), the same for the vectors it was fitted on and for new
    ones. `projection` holds the principal axes as columns, each divided by the square root of
    its (shrunk) variance."""

    mean: np.ndarray  # (D,)
    projection: np.ndarray  # (D, dim)
    shrinkage: float

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """normalise((x - mean) @ projection), as a new float32 array (the input is read only)."""
        centred = np.subtract(vectors, self.mean, dtype=np.float32)
        projected = centred @ self.projection.astype(np.float32, copy=False)
        return normalise(projected, out=projected)


def fit_whitening(vectors: np.ndarray, dim: int | None = None, shrinkage: float = 0.5) -> Whitening:
    """PCA-whitening of `vectors` (n, D), keeping the `dim` components of largest variance
    (None: all that n vectors span, at most n - 1).

    Each variance v is shrunk toward the mean variance m of the kept components,
    (1 - shrinkage) * v + shrinkage * m, before dividing by its square root: shrinkage 0 whitens
    fully, which also blows up the noise of directions the sample barely spans; 1 leaves a
    plain PCA rotation. Signs of the axes follow the data (the largest entry positive), so a
    refit on the same vectors gives the same projection.
    """
    x = vectors.astype(np.float64)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"whitening needs at least 2 vectors, got {n}")
    if not 0 <= shrinkage <= 1:
        raise ValueError(f"shrinkage is a fraction in [0, 1], got {shrinkage}")
    mean = x.mean(axis=0)
    centred = x - mean
    if n > d:  # the covariance is small: its eigendecomposition is the cheaper way
        variances, axes = np.linalg.eigh(centred.T @ centred / (n - 1))
        variances, axes = variances[::-1], axes[:, ::-1]
    else:
        _, singular, rows = np.linalg.svd(centred, full_matrices=False)
        variances, axes = singular**2 / (n - 1), rows.T
    keep = min(dim or d, d, n - 1)
    variances, axes = np.maximum(variances[:keep], 0), axes[:, :keep]
    axes = axes * np.sign(axes[np.abs(axes).argmax(axis=0), np.arange(keep)])
    shrunk = (1 - shrinkage) * variances + shrinkage * variances.mean()
    # A direction no vector varies along (all variances zero) stays zero, not infinite.
    scale = np.divide(1.0, np.sqrt(shrunk), out=np.zeros_like(shrunk), where=shrunk > 0)
    return Whitening(mean.astype(np.float32), (axes * scale).astype(np.float32), shrinkage)


def map_rows_in_place(
    vectors: np.ndarray,
    transform: Callable[[np.ndarray], np.ndarray],
    dim: int,
    chunk_values: int | None = None,
) -> np.ndarray:
    """`transform` applied to `vectors` (N, D) a chunk of rows at a time, its (rows, dim) float32
    results written back into the same memory (dim <= D): the (N, dim) result is a C-ordered
    view of the front of `vectors`' buffer, whose values are gone. A chunk's rows are read by
    `transform` before its output is written, and row i's output never reaches past row i's
    input, so no row is overwritten before it is read. Memory beyond `vectors`: what
    `transform` makes of a chunk of `chunk_values` values (default MAP_CHUNK_VALUES). Arrays
    that are not writable float32 in C order are transformed into a new array instead (chunk
    by chunk all the same)."""
    n, width = vectors.shape
    if dim > width:
        raise ValueError(f"rows of {width} values cannot hold {dim} in place")
    in_place = (
        vectors.dtype == np.float32 and vectors.flags.c_contiguous and vectors.flags.writeable
    )
    out = (
        vectors.reshape(-1)[: n * dim].reshape(n, dim)
        if in_place
        else np.empty((n, dim), np.float32)
    )
    step = max(1, (chunk_values or MAP_CHUNK_VALUES) // max(1, width))
    for start in range(0, n, step):
        result = transform(vectors[start : start + step])
        expected = (min(step, n - start), dim)
        if result.shape != expected:
            raise ValueError(f"transform returned shape {result.shape}, not {expected}")
        out[start : start + expected[0]] = result
    return out


def non_finite_rows(layers: Mapping[str, np.ndarray]) -> dict[int, str]:
    """Rows with a NaN or Inf in any of the layers' (N, D) matrices, each with the first such
    layer: what must become a failure, never a row that looks fine."""
    found: dict[int, str] = {}
    for name, rows in layers.items():
        for row in np.flatnonzero(~np.isfinite(rows).all(axis=1)):
            found.setdefault(int(row), name)
    return found


def postprocess(
    vectors: np.ndarray, copies: np.ndarray | None, params: DedupConfig, seed: int
) -> tuple[np.ndarray, np.ndarray | None, Whitening | None]:
    """The embeddings and copies as the search compares them: PCA-whitened (fitted on up to
    `whiten_sample` embeddings, and the copies, whose variations whitening then weighs down)
    and L2-normalised; plain L2-normalised when whitening is off or the set too small.

    The embeddings are transformed in place, a chunk of rows at a time, into the front of their
    own buffer (`map_rows_in_place`): the result is a view of `vectors`, whose values are gone,
    and a million rows of 1280 floats need no second 5 GB copy."""
    fit = vectors
    if len(fit) > params.whiten_sample:
        rows = np.random.default_rng(seed).choice(len(fit), params.whiten_sample, replace=False)
        fit = fit[np.sort(rows)]
    if copies is not None:
        fit = np.concatenate([fit, copies])
    whitening = None
    if params.whiten and len(fit) >= MIN_WHITENED:
        whitening = fit_whitening(normalise(fit), params.whiten_dim, params.whiten_shrinkage)
    elif params.whiten:
        log.info("not whitened: %d embeddings are too few to fit it (%d)", len(fit), MIN_WHITENED)
    del fit

    def transform(x: np.ndarray) -> np.ndarray:
        return whitening.apply(normalise(x)) if whitening else normalise(x)

    dim = whitening.projection.shape[1] if whitening else vectors.shape[1]
    unit = map_rows_in_place(vectors, transform, dim)
    return unit, None if copies is None else transform(copies), whitening


def whitening_metrics(whitening: Whitening | None, params: DedupConfig) -> dict[str, float]:
    if whitening is None:
        return {"whiten_dim": 0}
    return {
        "whiten_dim": whitening.projection.shape[1],
        "whiten_shrinkage": params.whiten_shrinkage,
    }
