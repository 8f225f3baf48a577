"""python -m pipeline.dedup [overrides]: near-duplicate images from one layer's embeddings.

Cosine similarity on L2-normalised embeddings, PCA-whitened first (`dedup.whiten`, fitted on the
embeddings and the extraction's calibration copies); each image's k nearest neighbours and every
pair at or above the threshold found by `neighbours.search`: exactly (on a GPU when there is one, by
blocked matrix products on the CPU for smaller sets) or approximately for large sets, its recall
measured and reported. The threshold is fixed, or (`dedup.threshold=auto`) calibrated on the copies
(`search.calibration`, which says when it cannot tell how precise its threshold is). Images more
alike in plain cosine than any copy is to its source are a pair whatever the threshold
(`search.identical`): whitening fitted on a burst of near-identical frames spreads them apart.
Writes `pairs.parquet` (`image_a`, `image_b`, `similarity`: pairs at or above the threshold),
`groups.parquet` (`image_id`, `group`: connected components of those pairs),
`exact_duplicates.parquet` (files with the same bytes), `metrics.json` (the threshold; average
precision, precision, recall and F1 over pairs when the true groups are known; the calibration's
numbers on the copies), `pr_curve.csv` and `pr_curve.png` (against the truth, over thresholds),
`calibration_curve.csv` and `calibration_curve.png` (on the copies), `whitening.npz` (`mean`,
`projection`: apply as normalise((x - mean) @ projection)), `top_pairs.png` (the pairs nearest
the threshold, on both sides) and `review.html` (`dedup.review_pairs` of them, for a person to mark
same or different: `review`). `dedup.reviewed` (the CSV that page saves) adds precision and recall
on the reviewed pairs, and the threshold they suggest (`search.reviewed`). What it reads, and how
it is checked before anything is written: `dedup_inputs`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.config import DedupConfig, PipelineConfig
from pipeline.dedup_inputs import Copies, DedupInputs, check_params, fixed_threshold, read_inputs
from pipeline.errors import ConfigError
from pipeline.progress import step, tick
from pipeline.results import StageResult, write_headline
from pipeline.search import identical
from pipeline.search.vectors import Whitening, postprocess, whitening_metrics

# pandas, pyarrow, faiss, SciPy and matplotlib are imported where they are used: this module
# runs as `python -m pipeline.dedup`, and its --help and config errors need none of them.
if TYPE_CHECKING:
    import pandas as pd

    from pipeline.search import neighbours
    from pipeline.search.calibration import Calibration
    from pipeline.storage.contract import Embeddings

log = logging.getLogger(__name__)
APP_CONFIG = "dedup_app"  # conf/dedup_app.yaml: config.yaml, with the model's dedup_layer
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


def exact_duplicates(ids: list[str], root: Path) -> pd.DataFrame:
    """Files with identical bytes, grouped by their SHA-256."""
    import pandas as pd

    digests = {
        i: hashlib.sha256((root / i).read_bytes()).hexdigest()
        for i in tick(ids, "hashing the image files", unit="file")
        if (root / i).is_file()
    }
    table = pd.DataFrame({"image_id": list(digests), "sha256": list(digests.values())})
    return table[table["sha256"].duplicated(keep=False)].reset_index(drop=True)


def check(cfg: PipelineConfig) -> None:
    """What can be refused before anything is read (the command runs it before tracking)."""
    from pipeline.search.reviewed import read_decisions
    from pipeline.storage.contract import existing_embeddings

    fixed_threshold(cfg.dedup.threshold)
    check_params(cfg.dedup)
    if cfg.dedup.reviewed is not None:  # the file; its images are matched at read_inputs
        read_decisions(Path(cfg.dedup.reviewed).expanduser())
    existing_embeddings(cfg.embeddings)


def run(cfg: PipelineConfig) -> StageResult:
    inputs = read_inputs(cfg)
    found = find_duplicates(inputs, cfg.dedup, cfg.seed)
    out = Path(cfg.dedup.output_dir)
    metrics, artifacts = write_outputs(out, inputs, found, cfg)
    summary = summarise(found, metrics, cfg.dedup.threshold == "auto", out)
    log.info("%s", summary)
    return StageResult(
        output_dir=out,
        metrics={k: v for k, v in metrics.items() if isinstance(v, float | int)},
        artifacts=artifacts,
        tags={"search": found.search.summary()},
        inputs=[inputs.record],
        summary=summary,
    )


@dataclass
class Duplicates:
    """What dedup found: the search at the threshold, and what the threshold came from."""

    search: neighbours.Neighbours
    threshold: float
    whitening: Whitening | None
    calibration: Calibration | None
    candidates: pd.DataFrame  # a, b, similarity: every pair the search looked at closely
    groups: np.ndarray  # each image's group of near-duplicates, -1 for none
    unit: np.ndarray  # the vectors as searched (in the embeddings' own buffer)


def find_duplicates(inputs: DedupInputs, params: DedupConfig, seed: int) -> Duplicates:
    """Whiten and normalise, calibrate the threshold on the copies, search, group."""
    import pandas as pd

    from pipeline.search import neighbours
    from pipeline.search.calibration import calibrate, calibrated_threshold, given_threshold_check

    vectors, copies = inputs.embeddings.vectors, inputs.copies
    near = near_identical(vectors, copies, params, seed) if params.whiten else None
    with step("whitening and normalising" if params.whiten else "normalising"):
        unit, copies_unit, whitening = postprocess(
            vectors, copies.vectors if copies else None, params, seed
        )
    calibration = None
    if copies is not None and len(unit) > 1:
        with step(f"calibrating on {len(copies.vectors):,} copies"):
            calibration = calibrate(
                unit, copies_unit, copies.sources, params.k, params.target_precision
            )
    threshold = inputs.threshold
    if threshold is None:
        threshold = calibrated_threshold(calibration, inputs.source)
    elif calibration is not None:
        given_threshold_check(calibration, threshold, params.whiten)
    with step(f"searching {len(unit):,} images"):
        found = search_pairs(unit, threshold, params)
    log.info("%s", found.summary())
    if near is not None and len(near[0]):
        found = identical.kept_near_identical(found, unit, near)
    with step("grouping the pairs"):
        candidates = pd.DataFrame(
            dict(zip(("a", "b", "similarity"), found.candidates(), strict=True))
        )
        groups = neighbours.groups(len(unit), found.pairs_a, found.pairs_b)
    return Duplicates(found, threshold, whitening, calibration, candidates, groups, unit)


def near_identical(
    vectors: np.ndarray, copies: Copies | None, params: DedupConfig, seed: int
) -> identical.Pairs:
    """`search.identical.near_identical`, searched exactly where dedup's search is exact, and
    else over inverted lists widened until the calibration copies probe their sources' lists
    (`approximate.ivf_pairs_above`): an approximate search widened on each row's nearest
    neighbour would cost more than the whitened search (at 1M x 1280, 4.6 min against 1.1),
    as rows all look alike before whitening."""
    from pipeline.search.approximate import ivf_pairs_above
    from pipeline.search.neighbours import chosen_method

    sources = copies.sources if copies else np.empty(0, np.int64)
    exact = chosen_method(params.method.value, params.device, *vectors.shape) == "exact"

    def search(unit: np.ndarray, bound: float, made: np.ndarray) -> tuple[np.ndarray, ...]:
        if exact:
            found = search_pairs(unit, bound, params, k=1)
            return found.pairs_a, found.pairs_b
        a, b, settings = ivf_pairs_above(
            unit, bound, (made, sources), min_recall=params.min_recall, seed=seed
        )
        log.info("near-identical images looked for by ivf on CPU: %s", settings)
        return a, b

    return identical.near_identical(vectors, copies.vectors if copies else None, sources, search)


def search_pairs(
    unit: np.ndarray, threshold: float, params: DedupConfig, k: int | None = None
) -> neighbours.Neighbours:
    """`neighbours.search` with dedup's settings (`k` in place of dedup.k when given); a
    setting it refuses is a ConfigError."""
    from pipeline.search import neighbours

    try:
        return neighbours.search(
            unit,
            k or params.k,
            threshold,
            params.method.value,
            params.device,
            params.min_recall,
            params.recall_sample,
        )
    except ValueError as err:
        raise ConfigError(f"dedup: {err}") from None


def write_outputs(
    out: Path, inputs: DedupInputs, found: Duplicates, cfg: PipelineConfig
) -> tuple[dict, list[Path]]:
    """Every file of the stage in `out`, cleared first of an earlier run's optional files; the
    metrics, and the files to record."""
    from pipeline import plots
    from pipeline.review import top_pairs_figure, write_review_page
    from pipeline.search.reviewed import score_reviewed
    from pipeline.search.truth import truth_scores

    params, ids, name = cfg.dedup, inputs.embeddings.ids, inputs.source.stem
    clear_outputs(out)
    with step(f"writing {out}"):
        write_pairs(out, ids, found)
        metrics = search_metrics(inputs, found, params)
        artifacts = [out / "metrics.json"]
        artifacts += write_postprocessing(
            out, found.whitening, found.calibration, found.threshold, name
        )
    root = pictures_root(cfg.images_root, inputs.embeddings)
    if root is not None:
        with step(f"finding files with the same bytes in {root}"):
            exact = exact_duplicates(ids, root)
            exact.to_parquet(out / "exact_duplicates.parquet", index=False)
        metrics["exact_duplicates"] = len(exact)
    if inputs.codes is not None:
        with step("scoring the pairs against the true groups"):
            kept = (found.search.pairs_a, found.search.pairs_b)
            scores, curve = truth_scores(inputs.codes, found.candidates, found.threshold, kept)
            metrics.update(scores)
            artifacts += write_pr_curve(out, curve, found.threshold, name)
    if inputs.reviewed is not None:
        metrics.update(
            score_reviewed(inputs.reviewed, found.unit, found.threshold, params.target_precision)
        )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    layer = inputs.embeddings.metadata["layer"]
    write_headline(params.headline_file, layer, metrics, ["dedup_ap", "dedup_f1"])
    if root is not None:
        kept = len(found.search.pairs_a)
        title = (
            f"{name}: the pairs nearest the threshold, cosine similarity {found.threshold:.3f}"
            f"\n({kept:,} pair{'s' if kept != 1 else ''} at or above it in all; the weakest of "
            "them and the strongest"
            " below it, most similar first)"
        )
        shown = around_threshold(found.candidates, found.threshold, params.top_pairs)
        with step("drawing the pairs nearest the threshold"):
            figure = top_pairs_figure(shown, ids, root, found.threshold, title)
            artifacts.append(plots.save(figure, out / "top_pairs.png"))
    review = around_threshold(found.candidates, found.threshold, params.review_pairs)
    decided = inputs.reviewed.pairs(ids) if inputs.reviewed is not None else ()
    with step(f"writing review.html: the {len(review)} pairs nearest the threshold"):
        page, heading = out / "review.html", "/".join(inputs.source.with_suffix("").parts[-3:])
        write_review_page(page, review, ids, root, found.threshold, heading, decided)
    return metrics, [*artifacts, page]


def clear_outputs(out: Path) -> None:
    """The output folder, made if need be, without an earlier run's OPTIONAL_OUTPUTS."""
    out.mkdir(parents=True, exist_ok=True)
    for name in OPTIONAL_OUTPUTS:
        (out / name).unlink(missing_ok=True)


def write_pairs(out: Path, ids: list[str], found: Duplicates) -> None:
    """pairs.parquet (the pairs at or above the threshold) and groups.parquet (the images in a
    group)."""
    import pandas as pd

    search = found.search
    pd.DataFrame(
        {
            "image_a": [ids[a] for a in search.pairs_a],
            "image_b": [ids[b] for b in search.pairs_b],
            "similarity": search.similarity,
        }
    ).to_parquet(out / "pairs.parquet", index=False)
    grouped = found.groups >= 0
    pd.DataFrame({"image_id": np.array(ids)[grouped], "group": found.groups[grouped]}).to_parquet(
        out / "groups.parquet", index=False
    )


def search_metrics(inputs: DedupInputs, found: Duplicates, params: DedupConfig) -> dict:
    """The threshold, pairs and groups found, the search's measured recall, the whitening's
    settings and the calibration's numbers."""
    n, search = len(inputs.embeddings.ids), found.search
    metrics: dict = {
        "n_images": n,
        "threshold": found.threshold,
        "threshold_auto": params.threshold == "auto",
        "n_pairs": len(search.pairs_a),
        "n_groups": int(found.groups.max() + 1) if n else 0,
        **({"recall_at_k": search.recall_at_k} if search.recall_at_k is not None else {}),
        **({"pair_recall": search.pair_recall} if search.pair_recall is not None else {}),
        **{k: v for k, v in search.params.items() if k.startswith("near_identical_")},
        **whitening_metrics(found.whitening, params),
    }
    if found.calibration is not None:
        metrics.update(found.calibration.metrics(), calibration_images=inputs.copies.images)
    return metrics


def pictures_root(configured: str | None, embeddings: Embeddings) -> Path | None:
    """Where the images are, for the exact-copy pass and the pictures; None, with a warning,
    when the folder named does not hold them."""
    from pipeline.storage.contract import images_root

    root = images_root(configured, embeddings.metadata)
    if root is not None and not (root / embeddings.ids[0]).is_file():
        log.warning(
            "no exact-copy pass, no pictures: images_root=%s does not hold the images", root
        )
        return None
    return root


def write_pr_curve(out: Path, curve: pd.DataFrame, threshold: float, name: str) -> list[Path]:
    """pr_curve.csv and pr_curve.png."""
    from pipeline import plots

    curve.to_csv(out / "pr_curve.csv", index=False)
    figure = plots.pr_figure(curve, threshold, f"{name}: near-duplicate pairs")
    return [out / "pr_curve.csv", plots.save(figure, out / "pr_curve.png")]


def summarise(found: Duplicates, metrics: dict, calibrated: bool, out: Path) -> str:
    """The run's one line: pairs and groups at the threshold, and the scores when known."""
    from pipeline.search.reviewed import summary

    return (
        f"{len(found.search.pairs_a)} pairs in {metrics['n_groups']} groups at cosine "
        f"similarity >= {found.threshold:.3f}{' (calibrated)' if calibrated else ''}"
        + (
            f" (precision {metrics['precision']:.3f}, recall {metrics['recall']:.3f})"
            if "precision" in metrics
            else ""
        )
        + summary(metrics)
        + f" -> {out}"
    )


def write_postprocessing(
    out: Path,
    whitening: Whitening | None,
    calibration: Calibration | None,
    threshold: float,
    name: str,
) -> list[Path]:
    """whitening.npz, and the calibration curve as CSV and picture, when there are."""
    from pipeline import plots

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
            f"({calibration.pairs} true pairs; target precision {calibration.target_precision}: "
            f"threshold {threshold:.3f})"
        )
        figure = plots.pr_figure(calibration.curve, threshold, title)
        written += [
            out / "calibration_curve.csv",
            plots.save(figure, out / "calibration_curve.png"),
        ]
    return written


def around_threshold(candidates: pd.DataFrame, threshold: float, count: int) -> pd.DataFrame:
    """The pairs a person checks: the weakest kept above the threshold and the strongest
    left below it, half each, in order of similarity."""
    import pandas as pd

    above = candidates[candidates["similarity"] >= threshold].tail(count // 2)
    below = candidates[candidates["similarity"] < threshold].head(count - len(above))
    return pd.concat([above, below])


if __name__ == "__main__":
    from pipeline.app import main

    main("dedup", run, config=APP_CONFIG, check=check)
