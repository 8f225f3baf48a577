"""Vector math the downstream stages share."""

from __future__ import annotations

import numpy as np


def normalise(vectors: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rows scaled to unit length, so that dot products are cosine similarities; `out=vectors`
    scales in place (a large set then needs no second copy)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, np.maximum(norms, np.finfo(np.float32).tiny), out=out)
