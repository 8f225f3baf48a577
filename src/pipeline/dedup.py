"""python -m pipeline.dedup [overrides]: near-duplicate images from one layer's embeddings.

Cosine similarity on L2-normalised embeddings; each image's k nearest neighbours and every pair
at or above the threshold found by `neighbours.search`: exactly (on a GPU when there is one, by
blocked matrix products on the CPU for smaller sets) or approximately for large sets on the CPU,
with the approximation's recall measured and reported.
Writes `pairs.parquet` (`image_a`, `image_b`, `similarity`: pairs at or above the threshold),
`groups.parquet` (`image_id`, `group`: connected components of those pairs),
`exact_duplicates.parquet` (files with the same bytes), `metrics.json` (precision, recall and F1
over pairs when the true groups are known), `pr_curve.csv` and `pr_curve.png` (the same over
thresholds) and `top_pairs.png` (the pairs nearest the threshold, on both sides).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from pipeline import neighbours, plots
from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError
from pipeline.results import StageResult
from pipeline.store import embeddings_input, existing_embeddings, images_root, read_embeddings
from pipeline.vectors import normalise

log = logging.getLogger(__name__)
BLOCK_BYTES = 64 * 2**20  # similarity rows computed at once: bounds memory at any N
PR_THRESHOLDS = np.round(np.arange(0.50, 1.00, 0.01), 2)
# Written only by some runs: removed first, so a folder never mixes two runs' results.
OPTIONAL_OUTPUTS = ("exact_duplicates.parquet", "pr_curve.csv", "pr_curve.png", "top_pairs.png")


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


def run(cfg: PipelineConfig) -> StageResult:
    params = cfg.dedup
    if not -1 < params.threshold <= 1:
        raise ConfigError(
            f"dedup.threshold is a cosine similarity in (-1, 1], got {params.threshold}"
        )
    if params.k < 1:
        raise ConfigError(f"dedup.k must be at least 1, got {params.k}")
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
    if not 0 < params.min_recall <= 1:
        raise ConfigError(f"dedup.min_recall is a share in (0, 1], got {params.min_recall}")
    unit = normalise(embeddings.vectors, out=embeddings.vectors)  # in place: one copy in memory
    try:
        found = neighbours.search(
            unit,
            params.k,
            params.threshold,
            params.method.value,
            params.device,
            params.min_recall,
            params.recall_sample,
        )
    except ValueError as err:
        raise ConfigError(f"dedup: {err}") from None
    log.info("%s", found.summary())
    candidates = pd.DataFrame(dict(zip(("a", "b", "similarity"), found.candidates(), strict=True)))
    similarities = candidates["similarity"].to_numpy()
    above = similarities >= params.threshold
    pairs = pd.DataFrame({"a": found.pairs_a, "b": found.pairs_b, "similarity": found.similarity})
    groups = neighbours.groups(n, found.pairs_a, found.pairs_b)
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
        "threshold": params.threshold,
        "n_pairs": len(pairs),
        "n_groups": int(groups.max() + 1) if n else 0,
        **({"recall_at_k": found.recall_at_k} if found.recall_at_k is not None else {}),
        **({"pair_recall": found.pair_recall} if found.pair_recall is not None else {}),
    }
    artifacts = [out / "metrics.json"]
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
            pair_scores(int(above.sum()), int(hits[above].sum()), n_true), true_pairs=n_true
        )
        curve = pr_curve(similarities, hits, n_true)
        curve.to_csv(out / "pr_curve.csv", index=False)
        artifacts += [
            out / "pr_curve.csv",
            plots.save(
                plots.pr_figure(curve, params.threshold, f"{source.stem}: near-duplicate pairs"),
                out / "pr_curve.png",
            ),
        ]
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if root is not None:
        title = f"{source.stem}: pairs nearest the threshold {params.threshold}"
        shown = around_threshold(candidates, params.threshold, params.top_pairs)
        artifacts.append(
            plots.save(top_pairs_figure(shown, ids, root, title), out / "top_pairs.png")
        )
    summary = (
        f"{len(pairs)} pairs in {metrics['n_groups']} groups at cosine similarity "
        f">= {params.threshold}"
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
        metrics=metrics,
        artifacts=artifacts,
        tags={"search": found.summary()},
        inputs=[embeddings_input(source, embeddings.metadata)],
        summary=summary,
    )


def around_threshold(candidates: pd.DataFrame, threshold: float, count: int) -> pd.DataFrame:
    """The pairs a person checks: the weakest kept above the threshold and the strongest
    left below it, half each, in order of similarity."""
    above = candidates[candidates["similarity"] >= threshold].tail(count // 2)
    below = candidates[candidates["similarity"] < threshold].head(count - len(above))
    return pd.concat([above, below])


if __name__ == "__main__":
    from pipeline.app import main

    main("dedup", run)
