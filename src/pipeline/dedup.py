"""python -m pipeline.dedup [overrides]: near-duplicate images from one layer's embeddings.

Cosine similarity on L2-normalised embeddings, PCA-whitened first (`dedup.whiten`, fitted on
the embeddings and the extraction's calibration copies); each image's k nearest neighbours found
exactly by a blocked matrix product (never an N x N matrix in memory) or approximately with
faiss HNSW. The threshold is fixed, or (`dedup.threshold=auto`) calibrated on the copies
(`pipeline.calibration`). Writes `pairs.parquet` (`image_a`, `image_b`, `similarity`: pairs at
or above the threshold), `groups.parquet` (`image_id`, `group`: connected components of those
pairs), `exact_duplicates.parquet` (files with the same bytes), `metrics.json` (the threshold;
average precision, precision, recall and F1 over pairs when the true groups are known; the
calibration's numbers on the copies), `pr_curve.csv` and `pr_curve.png` (against the truth, over
thresholds), `calibration_curve.csv` and `calibration_curve.png` (on the copies), `whitening.npz`
(`mean`, `projection`: apply as normalise((x - mean) @ projection)) and `top_pairs.png` (the
pairs nearest the threshold, on both sides).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline import plots
from pipeline.calibration import Calibration, average_precision, calibrate
from pipeline.config import DedupConfig, PipelineConfig, SearchMethod
from pipeline.errors import ConfigError
from pipeline.results import StageResult
from pipeline.store import (
    Embeddings,
    calibration_path,
    embeddings_input,
    existing_embeddings,
    images_root,
    read_embeddings,
)
from pipeline.vectors import Whitening, fit_whitening, normalise

log = logging.getLogger(__name__)
BLOCK_BYTES = 64 * 2**20  # similarity rows computed at once: bounds memory at any N
PR_THRESHOLDS = np.round(np.arange(-1.0, 1.0, 0.01), 2)
APP_CONFIG = "dedup_app"  # conf/dedup_app.yaml: config.yaml, with the model's dedup_layer
MIN_WHITENED = 16  # fewer embeddings than this cannot estimate a whitening worth applying
# Written only by some runs: removed first, so a folder never mixes two runs' results.
OPTIONAL_OUTPUTS = (
    "exact_duplicates.parquet",
    "pr_curve.csv",
    "pr_curve.png",
    "top_pairs.png",
    "calibration_curve.csv",
    "calibration_curve.png",
    "whitening.npz",
)


def knn_exact(unit: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k most similar other rows (indices, cosine similarities), best first."""
    n = len(unit)
    k = min(k, n - 1)
    # Per similarity computed at once: 4 bytes for it, 8 for argpartition's index.
    block = max(1, BLOCK_BYTES // (12 * n))
    indices = np.empty((n, k), np.int64)
    similarities = np.empty((n, k), np.float32)
    for start in range(0, n, block):
        rows = np.arange(start, min(n, start + block))
        distances = np.negative(unit[rows] @ unit.T)  # smallest first for argpartition
        distances[np.arange(len(rows)), rows] = np.inf  # an image is not its own duplicate
        top = np.argpartition(distances, k - 1, axis=1)[:, :k]
        top_distances = np.take_along_axis(distances, top, axis=1)
        order = np.argsort(top_distances, axis=1, kind="stable")
        indices[rows] = np.take_along_axis(top, order, axis=1)
        similarities[rows] = -np.take_along_axis(top_distances, order, axis=1)
    return indices, similarities


def knn_hnsw(unit: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Approximate k nearest neighbours by inner product on a faiss HNSW graph."""
    import faiss  # only this method needs it

    index = faiss.IndexHNSWFlat(unit.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = max(64, 2 * k)
    index.add(np.ascontiguousarray(unit, dtype=np.float32))
    sims, indices = index.search(np.ascontiguousarray(unit, dtype=np.float32), k + 1)
    own = indices == np.arange(len(unit))[:, None]
    # Drop each row's own entry (or, if it was not found, its weakest neighbour).
    drop = np.where(own.any(axis=1), own.argmax(axis=1), k)
    keep = np.ones_like(own)
    keep[np.arange(len(unit)), drop] = False
    return indices[keep].reshape(len(unit), k), sims[keep].reshape(len(unit), k)


def candidate_pairs(indices: np.ndarray, similarities: np.ndarray) -> pd.DataFrame:
    """Neighbour lists as unordered pairs (a < b in dataset order), each once."""
    a = np.repeat(np.arange(len(indices)), indices.shape[1])
    b = indices.reshape(-1)
    found = b >= 0  # faiss pads missing neighbours with -1: drop them before ordering a, b
    a, b, similarities = a[found], b[found], similarities.reshape(-1)[found]
    pairs = pd.DataFrame({"a": np.minimum(a, b), "b": np.maximum(a, b), "similarity": similarities})
    return (
        pairs.sort_values("similarity", ascending=False, kind="stable")
        .drop_duplicates(["a", "b"])
        .reset_index(drop=True)
    )


def groups_of(n: int, pairs: pd.DataFrame) -> np.ndarray:
    """Connected components of the pair graph; -1 for images in no pair."""
    graph = coo_matrix((np.ones(len(pairs)), (pairs["a"], pairs["b"])), shape=(n, n))
    _, components = connected_components(graph, directed=False)
    in_pair = np.zeros(n, bool)
    in_pair[pairs["a"]] = in_pair[pairs["b"]] = True
    _, renumbered = np.unique(components[in_pair], return_inverse=True)
    groups = np.full(n, -1)
    groups[in_pair] = renumbered
    return groups


def truth_codes(groups: pd.Series) -> np.ndarray:
    """Each image's true group as a number, -1 where the truth does not say."""
    return pd.factorize(groups)[0]


def count_true_pairs(codes: np.ndarray) -> int:
    """How many pairs of images share a group, counted without listing them: a group of g
    images holds g(g-1)/2 pairs, which for large groups would not fit in memory as a list."""
    sizes = np.bincount(codes[codes >= 0])
    return int((sizes * (sizes - 1) // 2).sum())


def shares_group(codes: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whether each pair (a[i], b[i]) is a true pair: both in the same known group."""
    return (codes[a] == codes[b]) & (codes[a] >= 0)


def pair_scores(found: int, hits: int, truth: int) -> dict[str, float]:
    """Precision, recall and F1 from counts: pairs found, true pairs among them, true pairs."""
    precision = hits / found if found else 1.0
    recall = hits / truth if truth else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def pr_curve(similarities: np.ndarray, hits: np.ndarray, truth: int) -> pd.DataFrame:
    """Precision, recall and F1 of `similarity >= t` over the candidate pairs, for each
    threshold t; `hits` says which candidates are true pairs, `truth` how many there are."""
    rows = []
    for threshold in PR_THRESHOLDS:
        above = similarities >= threshold
        scores = pair_scores(int(above.sum()), int(hits[above].sum()), truth)
        rows.append({"threshold": float(threshold), **scores})
    return pd.DataFrame(rows)


def exact_duplicates(ids: list[str], root: Path) -> pd.DataFrame:
    """Files with identical bytes, grouped by their SHA-256."""
    digests = {
        i: hashlib.sha256((root / i).read_bytes()).hexdigest() for i in ids if (root / i).is_file()
    }
    table = pd.DataFrame({"image_id": list(digests), "sha256": list(digests.values())})
    return table[table["sha256"].duplicated(keep=False)].reset_index(drop=True)


def truth_groups(path: Path, id_column: str, group_column: str, ids: list[str]) -> pd.Series:
    """The true group of each embedded image (NaN where the manifest does not say)."""
    if not path.is_file():
        raise ConfigError(
            f"dedup.truth {path} does not exist: point it at a manifest with the "
            "true groups, or set dedup.truth=null"
        )
    manifest = pd.read_csv(path, dtype=str) if path.suffix != ".parquet" else pd.read_parquet(path)
    missing = [c for c in (id_column, group_column) if c not in manifest]
    if missing:
        raise ConfigError(
            f"dedup.truth {path} has no column {missing[0]!r}: set "
            "dedup.truth_id_column / dedup.truth_group_column"
        )
    groups = pd.Series(ids).map(manifest.set_index(id_column)[group_column])
    if groups.isna().all():
        raise ConfigError(
            f"dedup.truth {path} names none of the embedded images: point it at this "
            "dataset's manifest, or leave it null"
        )
    return groups


def top_pairs_figure(pairs: pd.DataFrame, ids: list[str], root: Path, title: str) -> Figure:
    """The given pairs side by side, their cosine similarity as the row title; with no pairs, a
    figure that says so (the file is still written, for DVC and for whoever looks)."""
    if pairs.empty:
        figure = Figure(figsize=(5, 1))
        figure.text(0.5, 0.5, f"{title}: no pairs", ha="center", va="center")
        return figure
    rows = [
        (f"{s:.3f}", [(root / ids[a], ids[a]), (root / ids[b], ids[b])])
        for a, b, s in zip(pairs["a"], pairs["b"], pairs["similarity"], strict=True)
    ]
    return plots.image_grid(rows, title)


def fixed_threshold(value: float | str) -> float | None:
    """dedup.threshold as a number, or None for auto."""
    if value == "auto":
        return None
    try:
        threshold = float(value)
    except ValueError:
        raise ConfigError(
            f"dedup.threshold is auto or a cosine similarity, got {value!r}"
        ) from None
    if not -1 < threshold <= 1:
        raise ConfigError(f"dedup.threshold is a cosine similarity in (-1, 1], got {threshold}")
    return threshold


@dataclass
class Copies:
    """The calibration copies of the embedded images: vectors, and each one's source row."""

    vectors: np.ndarray
    sources: np.ndarray
    images: int  # how many images they were made from


def calibration_copies(source: Path, embeddings: Embeddings, required: bool) -> Copies | None:
    """The copies the extraction embedded beside these embeddings; a ConfigError when they
    are `required` (threshold=auto) and missing, or when they belong to another extraction."""
    path = calibration_path(source)
    if not path.is_dir():
        if required:
            raise ConfigError(
                f"dedup.threshold=auto needs the calibration copies the extraction embeds, and "
                f"{path} does not exist: extract again with calibration.images > 0, or set a "
                "threshold, e.g. dedup.threshold=0.8"
            )
        return None
    copies = read_embeddings(path)
    rows = {image_id: i for i, image_id in enumerate(embeddings.ids)}
    stale = copies.metadata.get("config_hash") != embeddings.metadata.get("config_hash") or any(
        s not in rows for s in copies.sources
    )
    if stale or not copies.sources:
        raise ConfigError(
            f"the calibration copies in {path} were not made with these embeddings: extract "
            "again (python -m pipeline with the same overrides)"
        )
    sources = np.array([rows[s] for s in copies.sources])
    return Copies(copies.vectors, sources, len(set(copies.sources)))


def postprocess(
    vectors: np.ndarray, copies: Copies | None, params: DedupConfig, seed: int
) -> tuple[np.ndarray, np.ndarray | None, Whitening | None]:
    """The embeddings and copies as the search compares them: PCA-whitened (fitted on up to
    `whiten_sample` embeddings, and the copies, whose variations whitening then weighs down)
    and L2-normalised; plain L2-normalised when whitening is off or the set too small."""
    fit = vectors
    if len(fit) > params.whiten_sample:
        rows = np.random.default_rng(seed).choice(len(fit), params.whiten_sample, replace=False)
        fit = fit[np.sort(rows)]
    if copies is not None:
        fit = np.concatenate([fit, copies.vectors])
    whitening = None
    if params.whiten and len(fit) >= MIN_WHITENED:
        whitening = fit_whitening(normalise(fit), params.whiten_dim, params.whiten_shrinkage)
    elif params.whiten:
        log.info("not whitened: %d embeddings are too few to fit it (%d)", len(fit), MIN_WHITENED)

    def transform(x: np.ndarray) -> np.ndarray:
        return whitening.apply(normalise(x)) if whitening else normalise(x)

    return transform(vectors), transform(copies.vectors) if copies else None, whitening


def _check_params(params: DedupConfig) -> None:
    if params.k < 1:
        raise ConfigError(f"dedup.k must be at least 1, got {params.k}")
    if not 0 < params.target_precision <= 1:
        raise ConfigError(
            f"dedup.target_precision is a fraction in (0, 1], got {params.target_precision}"
        )
    if not 0 <= params.whiten_shrinkage <= 1:
        raise ConfigError(
            f"dedup.whiten_shrinkage is a fraction in [0, 1], got {params.whiten_shrinkage}"
        )
    if params.whiten_dim is not None and params.whiten_dim < 1:
        raise ConfigError(f"dedup.whiten_dim must be at least 1 or null, got {params.whiten_dim}")
    if params.whiten_sample < MIN_WHITENED:
        raise ConfigError(
            f"dedup.whiten_sample must be at least {MIN_WHITENED}, got {params.whiten_sample}"
        )


def run(cfg: PipelineConfig) -> StageResult:
    params = cfg.dedup
    threshold = fixed_threshold(params.threshold)
    _check_params(params)
    source = existing_embeddings(cfg.embeddings)
    embeddings = read_embeddings(source)
    ids, n = embeddings.ids, len(embeddings.ids)
    if n == 0:
        raise ConfigError(f"embeddings {source} hold no images: nothing to compare")
    if len(set(ids)) != n:
        raise ConfigError(f"embeddings {source} repeat image ids: each image may appear once")
    if not np.isfinite(embeddings.vectors).all():
        raise ConfigError(
            f"embeddings {source} hold NaN or Inf values: extract again (precision=fp32)"
        )
    copies = calibration_copies(source, embeddings, required=threshold is None)
    unit, copies_unit, whitening = postprocess(embeddings.vectors, copies, params, cfg.seed)
    search = knn_hnsw if params.method is SearchMethod.hnsw else knn_exact
    candidates = (
        candidate_pairs(*search(unit, params.k))
        if n > 1
        else candidate_pairs(np.empty((n, 0), np.int64), np.empty((n, 0), np.float32))
    )
    calibration = (
        calibrate(unit, copies_unit, copies.sources, params.k, params.target_precision)
        if copies is not None and n > 1
        else None
    )
    if threshold is None:
        threshold = calibrated_threshold(calibration, source)
    similarities = candidates["similarity"].to_numpy()
    above = similarities >= threshold
    pairs = candidates[above]
    groups = groups_of(n, pairs)
    out = Path(params.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in OPTIONAL_OUTPUTS:
        (out / name).unlink(missing_ok=True)
    pd.DataFrame(
        {
            "image_a": [ids[a] for a in pairs["a"]],
            "image_b": [ids[b] for b in pairs["b"]],
            "similarity": pairs["similarity"].to_numpy(),
        }
    ).to_parquet(out / "pairs.parquet", index=False)
    grouped = groups >= 0
    pd.DataFrame({"image_id": np.array(ids)[grouped], "group": groups[grouped]}).to_parquet(
        out / "groups.parquet", index=False
    )
    metrics: dict = {
        "n_images": n,
        "threshold": threshold,
        "threshold_auto": params.threshold == "auto",
        "n_pairs": len(pairs),
        "n_groups": int(groups.max() + 1),
    }
    artifacts = [out / "metrics.json"]
    artifacts += write_postprocessing(out, whitening, calibration, threshold, source.stem)
    metrics.update(whitening_metrics(whitening, params))
    if calibration is not None:
        metrics.update(calibration.metrics(), calibration_images=copies.images)
    root = images_root(cfg.images_root, embeddings.metadata)
    if root is not None and not (root / ids[0]).is_file():
        log.warning(
            "no exact-copy pass, no pictures: images_root=%s does not hold the images", root
        )
        root = None
    if root is not None:
        exact = exact_duplicates(ids, root)
        exact.to_parquet(out / "exact_duplicates.parquet", index=False)
        metrics["exact_duplicates"] = len(exact)
    truth = params.truth or embeddings.metadata.get("dataset", {}).get("truth")
    if truth is not None:
        codes = truth_codes(
            truth_groups(
                Path(truth).expanduser(), params.truth_id_column, params.truth_group_column, ids
            )
        )
        hits = shares_group(codes, candidates["a"].to_numpy(), candidates["b"].to_numpy())
        n_true = count_true_pairs(codes)
        metrics.update(
            pair_scores(int(above.sum()), int(hits[above].sum()), n_true),
            true_pairs=n_true,
            ap=average_precision(similarities, hits, n_true),
        )
        curve = pr_curve(similarities, hits, n_true)
        curve.to_csv(out / "pr_curve.csv", index=False)
        artifacts += [
            out / "pr_curve.csv",
            plots.save(
                plots.pr_figure(curve, threshold, f"{source.stem}: near-duplicate pairs"),
                out / "pr_curve.png",
            ),
        ]
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if root is not None:
        title = f"{source.stem}: pairs nearest the threshold {threshold:.3f}"
        shown = around_threshold(candidates, threshold, params.top_pairs)
        artifacts.append(
            plots.save(top_pairs_figure(shown, ids, root, title), out / "top_pairs.png")
        )
    summary = (
        f"{len(pairs)} pairs in {metrics['n_groups']} groups at cosine similarity "
        f">= {threshold:.3f}{' (calibrated)' if params.threshold == 'auto' else ''}"
        + (
            f" (precision {metrics['precision']:.3f}, recall {metrics['recall']:.3f})"
            if "precision" in metrics
            else ""
        )
        + f" -> {out}"
    )
    log.info("%s", summary)
    return StageResult(
        output_dir=out,
        metrics={k: v for k, v in metrics.items() if isinstance(v, float | int)},
        artifacts=artifacts,
        inputs=[embeddings_input(source, embeddings.metadata)],
        summary=summary,
    )


def calibrated_threshold(calibration: Calibration | None, source: Path) -> float:
    """The calibrated threshold, with a warning when the target precision was out of reach."""
    if calibration is None:  # a single image: nothing to pair, any threshold will do
        return 1.0
    if not calibration.reached:
        log.warning(
            "%s: no similarity finds the calibration copies at precision %.2f against their "
            "nearest other images; the threshold is above them all (%.3f): try another layer "
            "or pooling (python -m pipeline.report compares them)",
            source,
            calibration.target_precision,
            calibration.threshold,
        )
    return calibration.threshold


def write_postprocessing(
    out: Path,
    whitening: Whitening | None,
    calibration: Calibration | None,
    threshold: float,
    name: str,
) -> list[Path]:
    """whitening.npz, and the calibration curve as CSV and picture, when there are."""
    written = []
    if whitening is not None:
        np.savez(
            out / "whitening.npz",
            mean=whitening.mean,
            projection=whitening.projection,
            shrinkage=whitening.shrinkage,
        )
        written.append(out / "whitening.npz")
    if calibration is not None:
        calibration.curve.to_csv(out / "calibration_curve.csv", index=False)
        title = (
            f"{name}: {calibration.copies} calibration copies vs their nearest other images\n"
            f"(target precision {calibration.target_precision}: threshold {threshold:.3f})"
        )
        figure = plots.pr_figure(calibration.curve, threshold, title)
        written += [
            out / "calibration_curve.csv",
            plots.save(figure, out / "calibration_curve.png"),
        ]
    return written


def whitening_metrics(whitening: Whitening | None, params: DedupConfig) -> dict[str, float]:
    if whitening is None:
        return {"whiten_dim": 0}
    return {
        "whiten_dim": whitening.projection.shape[1],
        "whiten_shrinkage": params.whiten_shrinkage,
    }


def around_threshold(candidates: pd.DataFrame, threshold: float, count: int) -> pd.DataFrame:
    """The pairs a person checks: the weakest kept above the threshold and the strongest
    left below it, half each, in order of similarity."""
    above = candidates[candidates["similarity"] >= threshold].tail(count // 2)
    below = candidates[candidates["similarity"] < threshold].head(count - len(above))
    return pd.concat([above, below])


if __name__ == "__main__":
    from pipeline.app import main

    main("dedup", run, config=APP_CONFIG)
