"""python -m pipeline.report [overrides]: which layer serves which purpose.

For every layer extracted for one model on one dataset (from a sweep or one multi-layer run,
sweeps over pooling in their sub-folders): the pooling, the embedding dim, clustering NMI,
near-duplicate average precision and F1 (against the true groups when known, else on the
calibration copies: `dedup_on`) and linear-probe accuracy, in one table (`report.md`,
`report.parquet`) and one picture of each against layer depth (`report.png`).
It reads the layers' Parquet metadata and the stages' JSON files. A result that is not there
yet is named in the report with the command that makes it; DVC (`dvc repro`) is the one
orchestrator that runs stages. What it computes itself is how alike the layers are: debiased
linear CKA between every two of them, and those of the other models extracted for the dataset,
on a seeded sample of the images they share (`cka.csv`, `cka.png`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError
from pipeline.progress import step, tick
from pipeline.results import HEADLINE, StageResult

# pandas, pyarrow and matplotlib are imported where they are used: this module runs as
# `python -m pipeline.report`, and its --help and config errors need none of them.
if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)
# metric column -> (stage folder key, file, keys in the file: the first one there is shown)
METRICS = {
    "cluster_nmi": ("cluster_dir", "metrics.json", HEADLINE["cluster_nmi"]),
    "dedup_ap": ("dedup_dir", "metrics.json", HEADLINE["dedup_ap"]),
    "dedup_f1": ("dedup_dir", "metrics.json", HEADLINE["dedup_f1"]),
    "probe_accuracy": ("probe_dir", "probe.json", HEADLINE["probe_accuracy"]),
}


# metric column -> the stage that makes it
STAGES = {
    "cluster_nmi": "cluster",
    "dedup_ap": "dedup",
    "dedup_f1": "dedup",
    "probe_accuracy": "probe",
}


def pooling(metadata: dict) -> str:
    """How a layer was pooled, as the table shows it: `grid 4`, `gem p=3`, `avg x2 scales`."""
    params = " ".join(
        f"{'p=' if key == 'gem_p' else ''}{value:g}"
        for key, value in metadata.get("pool_params", {}).items()
    )
    scales = metadata.get("scales", [1.0])
    text = f"{metadata.get('pool', '-')} {params}".strip()
    return text + (f" @ {','.join(f'{s:g}' for s in scales)}" if len(scales) > 1 else "")


def layer_folders(folder: Path) -> list[Path]:
    """Every layer folder under an extraction's folder: its own, and those of sweep jobs in
    sub-folders (pool=gem, ...); not the calibration copies."""
    from pipeline.storage.contract import CALIBRATION_DIR

    return sorted(
        p
        for p in folder.rglob("*.parquet")
        if p.is_dir() and CALIBRATION_DIR not in p.relative_to(folder).parts
    )


def extracted_layers(folder: Path) -> list[Path]:
    """`layer_folders`, or a ConfigError when there are none."""
    files = layer_folders(folder)
    if not files:
        raise ConfigError(
            f"no layer embeddings in {folder}: run `python -m pipeline` (or a "
            "sweep over layers) for this model and dataset first"
        )
    return files


def layer_table(cfg: PipelineConfig) -> tuple[pd.DataFrame, list[str]]:
    """One row per extracted layer, and the commands that would fill its missing cells."""
    import pandas as pd

    from pipeline.storage.contract import read_metadata

    folder = Path(cfg.output_dir)
    files = extracted_layers(folder)
    rows, missing = [], []
    dirs = {
        "cluster_dir": cfg.report.cluster_dir,
        "dedup_dir": cfg.report.dedup_dir,
        "probe_dir": cfg.report.probe_dir,
    }
    for file in tick(files, "layers", unit="layer"):
        metadata = read_metadata(file)
        relative = file.relative_to(folder).with_suffix("")  # where each stage put its results
        row = {
            "layer": metadata.get("layer", file.stem),  # a layer written elsewhere: its name
            "folder": relative.parent.as_posix() if relative.parent != Path() else "-",
            "depth": metadata.get("depth", math.inf),
            "dim": metadata.get("dim"),
            "pool": pooling(metadata),
        }
        for column, (key, name, fields) in METRICS.items():
            path = Path(dirs[key]) / relative / name
            found = json.loads(path.read_text()) if path.is_file() else {}
            row[column] = next((found[f] for f in fields if f in found), None)
            command = f"python -m pipeline.{STAGES[column]} embeddings={file}"
            if not path.is_file() and command not in missing:
                missing.append(command)
            if column == "dedup_ap":
                row["dedup_on"] = (
                    "truth" if "ap" in found else "copies" if "calibration_ap" in found else "-"
                )
        rows.append(row)
    table = pd.DataFrame(rows).sort_values(["depth", "layer", "folder"], kind="stable")
    return table.reset_index(drop=True), missing


def label(layer: str, folder: str) -> str:
    """A layer as the pictures name it: its name, and its sweep job's folder if any."""
    return layer if folder == "-" else f"{layer} ({folder})"


def markdown(table: pd.DataFrame, title: str) -> str:
    import pandas as pd

    shown = table.drop(columns="depth")
    cells = [
        [("-" if pd.isna(v) else f"{v:.3f}" if isinstance(v, float) else str(v)) for v in row]
        for row in shown.itertuples(index=False)
    ]
    lines = [
        f"# {title}",
        "",
        "| " + " | ".join(shown.columns) + " |",
        "|" + "---|" * len(shown.columns),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


LABELS = {
    "dim": "embedding dim",
    "cluster_nmi": "k-means NMI vs labels",
    "dedup_ap": "near-duplicate average precision",
    "dedup_f1": "near-duplicate pair F1",
    "probe_accuracy": "linear probe accuracy",
}


def figure(table: pd.DataFrame, title: str, note: str) -> Figure:
    """Each metric against layer depth, layers in model order; `note` says how the metrics
    were measured."""
    import pandas as pd

    from pipeline import plots

    columns = ["dim", *METRICS]
    fig, axes = plots.subplots(
        1, len(columns), figsize=(3.2 * len(columns), 3.4), layout="constrained"
    )
    names = [
        label(layer, folder) for layer, folder in zip(table["layer"], table["folder"], strict=True)
    ]
    for ax, column in zip(axes, columns, strict=True):
        values = pd.to_numeric(table[column], errors="coerce")
        ax.plot(range(len(table)), values, marker="o")
        ax.set_xticks(range(len(table)), names, rotation=45, ha="right", fontsize=7)
        ax.set_title(column)
        ax.set(xlabel="layer (model order)", ylabel=LABELS[column])
        if column != "dim":
            ax.set_ylim(0, 1.05)
    fig.suptitle(title)
    fig.supxlabel(note, fontsize=8)
    return fig


def check(cfg: PipelineConfig) -> None:
    """What can be refused before anything is read (the command runs it before tracking)."""
    extracted_layers(Path(cfg.output_dir))


def run(cfg: PipelineConfig) -> StageResult:
    from pipeline import plots

    with step(f"reading the layers under {cfg.output_dir} and their results"):
        table, missing = layer_table(cfg)
    similar = cka_table(cfg) if cfg.report.cka_sample else None
    out = Path(cfg.report.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = f"Layers of {cfg.extraction_name}"
    text = markdown(table, title)
    if missing:
        text += "\nNot computed yet (run these, or `dvc repro`):\n\n" + "".join(
            f"    {command}\n" for command in missing
        )
    names = ["report.md", "report.parquet", "report.png"]
    with step(f"writing {out}"):
        table.to_parquet(out / "report.parquet", index=False)
        (out / "report.md").write_text(text)
        plots.save(figure(table, title, measured_how(cfg, table)), out / "report.png")
        if similar is not None:
            similar.to_csv(out / "cka.csv", index=False)
            title = f"Debiased linear CKA, {cfg.extraction_name}"
            plots.save(cka_figure(similar, title), out / "cka.png")
            names += ["cka.csv", "cka.png"]
    summary = f"{len(table)} layers -> {out}" + (
        f" ({len(missing)} results missing)" if missing else ""
    )
    if similar is not None:
        compared = similar[["model_a", "layer_a"]].drop_duplicates()
        models = compared["model_a"].nunique()
        of = f" of {models} models" if models > 1 else ""
        summary += f"; CKA of {len(compared)} layers{of} on {similar['n'].iat[0]} images"
    log.info("%s\n%s", summary, text)
    return StageResult(output_dir=out, artifacts=[out / name for name in names], summary=summary)


def measured_how(cfg: PipelineConfig, table: pd.DataFrame) -> str:
    """How each metric was measured, for the picture's axis labels."""
    on = set(table["dedup_on"]) - {"-"}
    truth = "the true groups" if on == {"truth"} else "calibration copies where no truth"
    return (
        f"dedup AP, and F1 at each layer's threshold, against {truth}; "
        f"probe: {cfg.probe.folds}-fold CV (held out beyond {cfg.probe.sample} images)"
    )


# --- how alike the layers are: linear CKA ------------------------------------------------------

GRAM_BLOCK = 1024  # feature columns at a time into a Gram matrix: a float64 copy of n x this
MIN_CKA_IMAGES = 4  # the unbiased HSIC divides by n - 3


@dataclass
class Centred:
    """One layer's sample (n images x d values) centred column-wise, in float64, kept in the
    smaller of two forms: the features X (n x d) while d <= n, else the Gram matrix K = X X^T
    (n x n). `squares` is each image's squared length (K's diagonal), `alignment` <K, K>_F."""

    features: np.ndarray | None
    gram: np.ndarray | None
    squares: np.ndarray
    alignment: float


def centred(x: np.ndarray) -> Centred:
    """`x` (any float dtype) centred column-wise in float64; the Gram matrix of a wide `x` is
    summed a block of columns at a time, so no float64 copy of all of it is made."""
    import numpy as np

    n, d = x.shape
    mean = x.mean(axis=0, dtype=np.float64)
    if d <= n:
        features = np.subtract(x, mean, dtype=np.float64)
        squares = np.einsum("ij,ij->i", features, features)
        return Centred(features, None, squares, float(np.square(features.T @ features).sum()))
    gram = np.zeros((n, n))
    for start in range(0, d, GRAM_BLOCK):
        columns = slice(start, start + GRAM_BLOCK)
        block = np.subtract(x[:, columns], mean[columns], dtype=np.float64)
        gram += block @ block.T
    return Centred(None, gram, np.diag(gram).copy(), float(np.vdot(gram, gram)))


def unbiased_hsic(a: Centred, b: Centred, alignment: float) -> float:
    """The unbiased HSIC estimator (Song et al. 2012) of two centred layers, times n(n - 3),
    from their Gram matrices' alignment <K, L>_F: the images' pairs with themselves (the Gram
    diagonals) are left out. Centred, K 1 = 0, which leaves
    <K, L> - n/(n-2) k.l + tr K tr L / ((n-1)(n-2)) for the diagonals k and l. NaN under 4
    images."""
    n = len(a.squares)
    if n < MIN_CKA_IMAGES:
        return math.nan
    return (
        alignment
        - n / (n - 2) * float(a.squares @ b.squares)
        + a.squares.sum() * b.squares.sum() / ((n - 1) * (n - 2))
    )


def spread(a: Centred) -> float:
    """HSIC(K, K), times n(n - 3): 0 where a layer is constant on the sample (NaN under 4
    images)."""
    return unbiased_hsic(a, a, a.alignment)


def cka(a: Centred, b: Centred) -> float:
    """Debiased linear CKA (Kornblith et al. 2019, with the unbiased HSIC that Nguyen et al.
    2021 use) of two centred layers on the same images: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)),
    the alignment <K, L>_F = ||Y^T X||_F^2 from whichever forms they hold. About 0 for unrelated
    layers however wide; NaN where a layer is constant on the sample or there are under 4
    images."""
    import numpy as np

    if a.features is not None and b.features is not None:
        alignment = np.square(b.features.T @ a.features).sum()  # d_b x d_a, both at most n
    elif a.gram is not None and b.gram is not None:
        alignment = np.vdot(a.gram, b.gram)
    else:
        gram, features = (a.gram, b.features) if a.gram is not None else (b.gram, a.features)
        alignment = np.einsum("ij,ij->", gram @ features, features)  # tr(Y^T K Y), n x d at most
    scale = spread(a) * spread(b)
    return float(unbiased_hsic(a, b, alignment) / math.sqrt(scale)) if scale > 0 else math.nan


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Debiased linear CKA between two feature matrices of the same n images (n x d1, n x d2),
    in float64, without an n x n matrix unless a layer has more values than images."""
    return cka(centred(x), centred(y))


Layer = tuple[str, str, Path]  # model, layer as the pictures name it, layer folder


def compared_models(cfg: PipelineConfig) -> list[tuple[str, Path]]:
    """(name, folder) of this model's extraction, then, by name, of the folders beside it that
    `cka_models` names and that hold layers: in them or a sweep's sub-folder (looked for no
    deeper, where output_dir is not under embeddings/<dataset>/ and its siblings are anything)."""
    own = Path(cfg.output_dir)
    others = {
        folder
        for pattern in cfg.report.cka_models
        for folder in own.parent.glob(pattern)
        if folder.is_dir()
        and folder.resolve() != own.resolve()
        and any(p.is_dir() for depth in ("*", "*/*") for p in folder.glob(f"{depth}.parquet"))
    }
    return [(own.name, own)] + [(f.name, f) for f in sorted(others)]


def compared_layers(cfg: PipelineConfig) -> list[Layer]:
    """(model, layer as the pictures name it, layer folder): each model's layers in model
    order, as the report's table lists them."""
    from pipeline.storage.contract import read_metadata

    found = []
    for index, (model, folder) in enumerate(compared_models(cfg)):
        layers = []
        for file in layer_folders(folder):
            try:
                metadata = read_metadata(file)
            except ConfigError as err:
                if index == 0:  # this model's own layers
                    raise
                # A folder beside it that is no extraction (output_dir's siblings are anything
                # where it is not under embeddings/<dataset>/): not compared, not a failure.
                log.warning("CKA: %s left out: %s", model, err)
                layers = []
                break
            relative = file.relative_to(folder).with_suffix("")
            where = relative.parent.as_posix() if relative.parent != Path() else "-"
            name = metadata.get("layer", file.stem)
            layers.append((metadata.get("depth", math.inf), name, where, file))
        layers.sort(key=lambda row: row[:3])
        found += [(model, label(name, where), file) for _, name, where, file in layers]
    return found


def image_ids(file: Path) -> pa.Array:
    """A layer's image_id column (strings, as the contract has them), or a ConfigError."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    try:
        column = ds.dataset(file, format="parquet").to_table(columns=["image_id"])["image_id"]
    except (pa.ArrowException, OSError) as err:
        raise ConfigError(f"{file} cannot be read: {err}") from None
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise ConfigError(f"{file}: its image_id is {column.type}, not text: not a layer")
    return column.combine_chunks()


def shared_sample(
    layers: list[Layer], size: int, seed: int
) -> tuple[list[Layer], list[str], list[np.ndarray]]:
    """The images compared: `size` (all, if fewer), drawn with `seed` from those that the first
    model's layers all have and every other model's layers too; another model whose layers
    share fewer than 4 of them is left out. The layers kept, the ids drawn, and each layer's
    rows of them in that order. Only the id columns are read."""
    import numpy as np
    import pyarrow.compute as pc

    models = list(dict.fromkeys(model for model, _, _ in layers))
    ids, unread = {}, set()
    for model, _, file in layers:
        try:
            ids[file] = image_ids(file)
        except ConfigError as err:
            if model == models[0]:
                raise
            log.warning("CKA: %s left out: %s", model, err)
            unread.add(model)
    layers = [layer for layer in layers if layer[0] not in unread]
    models = [model for model in models if model not in unread]
    common, kept = None, []
    for model in models:
        theirs = [layer for layer in layers if layer[0] == model]
        found = common
        for _, _, file in theirs:
            column = ids[file]
            found = column if found is None else found.filter(pc.is_in(found, value_set=column))
        if len(found) < MIN_CKA_IMAGES and model == models[0]:
            raise ConfigError(
                f"the layers of {model} share {len(found)} image ids: CKA needs "
                f"{MIN_CKA_IMAGES} or more "
                "(report.cka_sample=0: no CKA)"
            )
        if len(found) < MIN_CKA_IMAGES:
            log.warning(
                "CKA: %s left out: its layers share < %d images with %s's",
                model,
                MIN_CKA_IMAGES,
                models[0],
            )
            continue
        common, kept = found, kept + theirs
    largest = max(len(ids[file]) for _, _, file in kept)
    if len(common) < largest:
        log.warning("CKA: the layers share %d of up to %d images", len(common), largest)
    common = common.take(pc.array_sort_indices(common))  # the draw does not depend on order
    if len(common) > size:
        drawn = np.random.default_rng(seed).choice(len(common), size, replace=False)
        common = common.take(np.sort(drawn))
    rows = [pc.index_in(common, value_set=ids[file]).to_numpy() for _, _, file in kept]
    return kept, common.to_pylist(), rows


def cka_table(cfg: PipelineConfig) -> pd.DataFrame:
    """Linear CKA between every two layers compared, both orders and each with itself: model_a,
    layer_a, model_b, layer_b, cka, n (the images of the sample)."""
    import numpy as np
    import pandas as pd

    from pipeline.storage.contract import read_embeddings
    from pipeline.storage.inputs import check_parts

    found = compared_layers(cfg)
    layers, ids, rows = shared_sample(found, cfg.report.cka_sample, cfg.report.cka_seed)
    files = [file for _, _, file in layers]
    samples = []
    for file, taken in tick(list(zip(files, rows, strict=True)), "CKA: reading", unit="layer"):
        check_parts(file, verify=False)  # the parts listed, by name and size: no full read
        embeddings = read_embeddings(file, taken.tolist())
        if embeddings.ids != ids:  # the rows index_in found: only a changed layer differs
            raise ConfigError(f"{file} changed while it was read: run the report again")
        if not np.isfinite(embeddings.vectors).all():
            raise ConfigError(
                f"embeddings {file} hold NaN or Inf values: extract again with precision=fp32"
            )
        samples.append(centred(embeddings.vectors))
        del embeddings
    grid = np.diag([1.0 if spread(sample) > 0 else np.nan for sample in samples])  # NaN: constant
    with step(f"linear CKA between {len(layers)} layers on {len(ids)} images"):
        for i, j in zip(*np.tril_indices(len(layers), -1), strict=True):
            grid[i, j] = grid[j, i] = cka(samples[i], samples[j])
    table = pd.DataFrame(
        [(*a[:2], *b[:2], grid[i, j]) for i, a in enumerate(layers) for j, b in enumerate(layers)],
        columns=["model_a", "layer_a", "model_b", "layer_b", "cka"],
    )
    table["n"] = len(ids)
    return table


def cka_figure(table: pd.DataFrame, title: str) -> Figure:
    """The CKA table as a heatmap, rows and columns the layers in model order (models apart),
    each cell annotated, colours on 0..1."""
    import numpy as np

    from pipeline import plots

    keys = list(dict.fromkeys(zip(table["model_a"], table["layer_a"], strict=True)))
    index = {key: k for k, key in enumerate(keys)}
    grid = np.full((len(keys), len(keys)), np.nan)
    for a, b, c, d, value in table[["model_a", "layer_a", "model_b", "layer_b", "cka"]].itertuples(
        index=False
    ):
        grid[index[(a, b)], index[(c, d)]] = value
    models = list(dict.fromkeys(model for model, _ in keys))
    names = [layer if len(models) == 1 else f"{model}: {layer}" for model, layer in keys]
    side = 2.5 + 0.5 * len(keys)
    fig, ax = plots.subplots(figsize=(side + 1.2, side), layout="constrained")
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    fontsize = max(4, min(9, 60 / len(keys)))
    for (r, c), value in np.ndenumerate(grid):
        text = "-" if np.isnan(value) else f"{value:.2f}"
        colour = "white" if value < 0.6 else "black"  # NaN: an empty (white) cell
        ax.text(c, r, text, ha="center", va="center", color=colour, fontsize=fontsize)
    ax.set_xticks(range(len(keys)), names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(keys)), names, fontsize=7)
    for end in np.cumsum([sum(m == model for m, _ in keys) for model in models])[:-1]:
        ax.axhline(end - 0.5, color="white", linewidth=2)
        ax.axvline(end - 0.5, color="white", linewidth=2)
    fig.colorbar(image, ax=ax, label="linear CKA (below 0 as 0)", shrink=0.8)
    n = table["n"].iat[0]
    ax.set_title(f"{title} (n = {n} images)", fontsize=9)
    fig.supxlabel(
        "debiased linear CKA: 1, the same up to rotation and scale; about 0, unrelated\n"
        "(however many values a layer has; slightly below 0 by chance)",
        fontsize=7,
    )
    return fig


if __name__ == "__main__":
    from pipeline.app import main

    main("report", run, check=check)
