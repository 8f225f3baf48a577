"""Near-identical images, found before whitening: whitening is fitted on the set, and on a set
full of near-identical images (a burst of frames of one scene) it spreads them apart, so dedup
keeps them as pairs whatever its threshold.

Near-identical means more alike, in plain cosine (the L2-normalised embeddings), than any
calibration copy is to the image it was made from (cropped, turned, recoloured, rescaled,
re-compressed): the bound follows the layer. Without copies, only identical embeddings
(IDENTICAL) are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from pipeline.progress import step
from pipeline.search.vectors import map_rows_in_place, normalise

if TYPE_CHECKING:
    from pipeline.search.found import Neighbours

log = logging.getLogger(__name__)
# Plain cosine at or above which two images are identical when there are no calibration copies
# to say what near-identical is.
IDENTICAL = 0.9999
Pairs = tuple[np.ndarray, np.ndarray, float]  # rows a and b of each pair, and the bound


def near_identical_bound(unit: np.ndarray, made: np.ndarray, sources: np.ndarray) -> float:
    """The plain cosine at or above which two of the L2-normalised rows `unit` are
    near-identical: that of the copy (`made[i]`, L2-normalised, made from row `sources[i]`) most
    alike its source, at most IDENTICAL. On the hard benchmarks no two different images came
    above it, in any layer or pooling but one pair of one (blocks.4 averaged); a burst of frames
    of one scene (shifted, +-5% brightness, noise) is above it in the default layer (0.955 and
    up, against copies at most 0.935)."""
    if not len(made):
        return IDENTICAL
    return float(min(IDENTICAL, np.einsum("ij,ij->i", made, unit[sources]).max()))


def near_identical(
    vectors: np.ndarray,
    copies: np.ndarray | None,
    sources: np.ndarray,
    search: Callable[[np.ndarray, float, np.ndarray], tuple[np.ndarray, ...]],
) -> Pairs:
    """The pairs of rows whose plain cosine is at least `near_identical_bound`, found by
    `search(unit, bound, copies L2-normalised)` (rows a and b), and the bound. The rows are
    L2-normalised in place, a chunk at a time, where they can be (the whitening normalises
    them first anyway)."""
    unit = map_rows_in_place(vectors, normalise, vectors.shape[1])
    made = (
        normalise(copies.astype(np.float32, copy=True))
        if copies is not None
        else np.empty((0, unit.shape[1]), np.float32)
    )
    bound = near_identical_bound(unit, made, sources)
    with step(f"finding near-identical images (plain cosine >= {bound:.4f})"):
        a, b = search(unit, bound, made)
    return a, b, bound


def kept_near_identical(found: Neighbours, unit: np.ndarray, pairs: Pairs) -> Neighbours:
    """The search's pairs and the near-identical ones, said in the log when whitening put some
    of them below the threshold."""
    a, b, bound = pairs
    similarity = np.einsum("ij,ij->i", unit[a], unit[b])
    below = int((similarity < found.threshold).sum())
    if below:
        log.warning(
            "%d near-identical pair(s) (plain cosine >= %.4f, more alike than any calibration "
            "copy is to its source) fall below the threshold %.3f after whitening (down to "
            "%.3f): kept as pairs all the same. Whitening fitted on a set full of near-identical "
            "images spreads them apart; dedup.whiten=false compares plain cosines",
            below,
            bound,
            found.threshold,
            float(similarity.min()),
        )
    kept = found.including(a, b, similarity)
    kept.params.update(near_identical_bound=bound, near_identical_below=below)
    return kept
