"""What a search found, and the bookkeeping every search method shares: `Neighbours` (each
row's k nearest neighbours and every pair at or above the threshold, with what the search cost),
pairs made unique and ordered, the empty k-nearest lists, and the argument check that reads the
embeddings in place."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np


@dataclass(frozen=True)
class Neighbours:
    """What a search found.

    pairs_a, pairs_b, similarity: every pair with similarity >= threshold, a < b, each once,
        most similar first (found by range search: not capped at k).
    knn_indices, knn_similarities: each row's k most similar other rows, best first; -1 and
        -inf where the data has fewer than k other rows.
    recall_at_k: share of the exact k nearest neighbours found, measured on `params["sample"]`
        random queries against brute force; None for exact methods.
    pair_recall: on the same queries, share of their exact pairs >= threshold that are in
        `pairs_*`; None for exact methods, or when the sampled queries have no such pair.
    params: what was used (nlist, nprobe, efSearch, calibration history, ...).
    reason: one line saying why this method ran, with the switch points.
    """

    pairs_a: np.ndarray
    pairs_b: np.ndarray
    similarity: np.ndarray
    knn_indices: np.ndarray
    knn_similarities: np.ndarray
    threshold: float
    method_used: str
    device: str
    reason: str
    params: dict[str, object] = field(default_factory=dict)
    recall_at_k: float | None = None
    pair_recall: float | None = None

    @classmethod
    def none(
        cls, n: int, k: int, threshold: float, method: str, device: str, reason: str
    ) -> Neighbours:
        """No neighbours and no pairs for n rows: what fewer than two rows have."""
        knn_d, knn_i = no_knn(n, k)
        return cls(
            pairs_a=np.empty(0, np.int64),
            pairs_b=np.empty(0, np.int64),
            similarity=np.empty(0, np.float32),
            knn_indices=knn_i,
            knn_similarities=knn_d,
            threshold=threshold,
            method_used=method,
            device=device,
            reason=reason,
        )

    def summary(self) -> str:
        """One line for a run's log: method, why, pairs found, and what the approximation cost."""
        k = self.knn_indices.shape[1]
        line = f"{self.reason}; {len(self.pairs_a):,} pairs >= {self.threshold}"
        if self.recall_at_k is not None:
            line += f"; recall@{k} {self.recall_at_k:.4f} on {self.params['sample']:,} queries"
            if self.pair_recall is not None:
                line += (
                    f", pairs >= threshold {self.pair_recall:.4f} of "
                    f"{self.params['sample_pairs']:,}"
                )
            if not self.params["recall_reached"]:
                line += f" (min_recall {self.params['min_recall']} NOT reached at the cap)"
        ranged = self.params.get("rows_range_searched", 0)
        if ranged:
            line += f"; {ranged:,} rows range-searched"
        settings = {
            key: value
            for key, value in self.params.items()
            if key in ("nlist", "nprobe", "quantizer_dim", "ef_search", "dtype")
        }
        if settings:
            line += " [" + ", ".join(f"{key}={value}" for key, value in settings.items()) + "]"
        return line

    def candidates(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All pairs the search looked at closely, for precision/recall over thresholds: the
        union of the k-nearest lists and the range pairs; (a, b, similarity), a < b, each once,
        most similar first."""
        n, k = self.knn_indices.shape
        found = self.knn_indices.reshape(-1) >= 0
        # Each array made and dropped in turn: N x k of them at once would be 2 GB at 1M x 10.
        a = np.concatenate([np.repeat(np.arange(n), k)[found], self.pairs_a])
        b = np.concatenate([self.knn_indices.reshape(-1)[found], self.pairs_b])
        s = np.concatenate([self.knn_similarities.reshape(-1)[found], self.similarity])
        del found
        return unique_pairs(a, b, s, n)

    def including(self, a: np.ndarray, b: np.ndarray, s: np.ndarray) -> Neighbours:
        """These pairs found too, whatever their similarity (the pairs made unique and sorted,
        most similar first)."""
        n = len(self.knn_indices)
        a, b, s = unique_pairs(
            np.concatenate([self.pairs_a, a]),
            np.concatenate([self.pairs_b, b]),
            np.concatenate([self.similarity, s]),
            n,
        )
        return replace(self, pairs_a=a, pairs_b=b, similarity=s, params=dict(self.params))

    def with_results(
        self, knn_i: np.ndarray, knn_d: np.ndarray, a: np.ndarray, b: np.ndarray, s: np.ndarray
    ) -> Neighbours:
        """These neighbours and pairs (a < b, each once, most similar first) in place of ours."""
        return replace(
            self,
            pairs_a=a,
            pairs_b=b,
            similarity=s,
            knn_indices=knn_i,
            knn_similarities=knn_d,
            # Rows in groups larger than k + 1: their pairs came from a range search.
            params={
                **self.params,
                "rows_range_searched": int((knn_d[:, -1] >= self.threshold).sum()),
            },
        )


def unique_pairs(
    a: np.ndarray, b: np.ndarray, s: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unordered pairs as a < b, each once, most similar first. One int64 key a pair (lo * n +
    hi) and its sort order are all that is held beside the input: 10M pairs, 160 MB."""
    keys = np.minimum(a, b).astype(np.int64)
    keys *= n
    keys += np.maximum(a, b)
    by_key = np.argsort(keys, kind="stable")  # np.unique(return_index) was 5x slower here
    if len(keys):
        ordered = keys[by_key]
        by_key = by_key[np.r_[True, ordered[1:] != ordered[:-1]]]  # each key's first
        del ordered
    order = by_key[np.argsort(-s[by_key], kind="stable")]
    keys = keys[order]
    return keys // n, keys % n, s[order].astype(np.float32)


def no_knn(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, indices) of n rows with no neighbours found yet: -inf, -1."""
    return np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)


def take(unit: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """unit[rows]; a view, not a copy, when the sorted rows are consecutive."""
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
        return unit[rows[0] : rows[-1] + 1]
    return unit[rows]


def checked(unit: np.ndarray, k: int, threshold: float) -> np.ndarray:
    """The embeddings as float32 in C order (no copy when they already are), arguments checked."""
    if unit.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array (rows x dim), got shape {unit.shape}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if not -1 < threshold <= 1:
        raise ValueError(f"threshold is a cosine similarity in (-1, 1], got {threshold}")
    return np.ascontiguousarray(unit, dtype=np.float32)
