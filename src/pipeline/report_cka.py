"""How alike the layers are, for the report (`cka.csv`, `cka.png`): debiased linear CKA between
every two layers extracted for a model, and those of the other models extracted for the dataset
(`report.cka_models`), on a seeded sample of the images they all share (`report.cka_sample`),
joined by image_id. Only those rows are read; a layer wider than the sample is kept as its Gram
matrix. docs/stages/report.md gives the estimator and how to read the heatmap.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError
from pipeline.progress import step, tick

# numpy, pandas, pyarrow and matplotlib are imported where they are used: `python -m
# pipeline.report --help` and its config errors need none of them.
if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

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


def label(layer: str, folder: str) -> str:
    """A layer as the pictures name it: its name, and its sweep job's folder if any."""
    return layer if folder == "-" else f"{layer} ({folder})"


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
    from pipeline.storage.contract import layer_folders, read_metadata

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
