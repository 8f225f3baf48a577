"""Typed schemas of the pipeline's one config tree (`conf/config.yaml`).

Every app (`python -m pipeline`, `pipeline.cluster`, `.dedup`, `.probe`, `.report`,
`.visualize`, `.explore`, `.layers`) composes the same tree; the app layer merges it into
`PipelineConfig`, so a value of the wrong type fails before any model is built or image read;
`validate` then checks the ranges the types cannot say, and `check_key` names the closest key
to a misspelled one. The values live in the YAML only; these classes say what may be there.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass
from enum import Enum
from typing import Any

from omegaconf import MISSING

from pipeline.errors import ConfigError


class DatasetKind(Enum):
    demo = "demo"
    folder = "folder"
    csv = "csv"


class Pool(Enum):
    auto = "auto"
    avg = "avg"
    max = "max"
    flatten = "flatten"
    cls = "cls"
    mean = "mean"
    gem = "gem"  # generalised mean, p = gem_p
    grid = "grid"  # pool_grid x pool_grid cells, each averaged, concatenated
    none = "none"  # recorded for layers whose output is already one vector per image


# Values a layer's metadata records but a user does not choose: --help leaves them out.
RECORDED_ONLY: frozenset[Enum] = frozenset({Pool.none})


class Precision(Enum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class Decode(Enum):
    """Where images are decoded and resized: OpenCV in the loader's processes, or JPEGs on the
    GPU (torchvision's nvJPEG decoder), other files still on the CPU; auto: gpu on CUDA."""

    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"


class Identity(Enum):
    """What tells that an image file is the one a row was computed from: its size and
    modification time (one stat), or the SHA-256 of its bytes (reads every file)."""

    stat = "stat"
    content = "content"


class KeyMatch(Enum):
    """How a checkpoint's tensors are matched to the model's parameters: by name, or by order
    with every shape checked (the same architecture saved by another codebase)."""

    name = "name"
    position = "position"


class ClusterMethod(Enum):
    kmeans = "kmeans"
    hdbscan = "hdbscan"


class Projection(Enum):
    """The explorer's 2D map: UMAP where umap-learn is installed and the layer is large enough
    (auto), or PCA."""

    auto = "auto"
    umap = "umap"
    pca = "pca"


class SearchMethod(Enum):
    auto = "auto"  # exact on a GPU or for small sets, ivf for large ones on the CPU
    exact = "exact"
    ivf = "ivf"
    hnsw = "hnsw"


@dataclass
class PathsConfig:
    root: str = MISSING
    data: str = MISSING


@dataclass
class DatasetConfig:
    name: str = MISSING
    kind: DatasetKind = MISSING
    root: str | None = MISSING
    path: str | None = MISSING
    path_column: str = MISSING
    label_column: str | None = MISSING
    labels_from_folders: bool | str = MISSING  # true, false, or auto (kind folder)
    extensions: list[str] = MISSING
    allow_outside_root: bool = MISSING
    truth: str | None = MISSING  # a manifest with true near-duplicate groups, if known
    identity: Identity = Identity.stat  # how a rerun tells an unchanged image file


@dataclass
class ModelConfig:
    name: str = MISSING
    pretrained: bool = MISSING
    checkpoint: str | None = MISSING
    checkpoint_keys: KeyMatch = MISSING
    num_classes: int | None = MISSING
    module: dict[str, Any] | None = MISSING
    embedding_layer: str = MISSING
    input_size: list[int] | None = MISSING
    crop_pct: float | None = MISSING
    interpolation: str | None = MISSING
    mean: list[float] | None = MISSING
    std: list[float] | None = MISSING
    dedup_layer: str = MISSING  # the default layer of python -m pipeline.dedup


@dataclass
class CalibrationConfig:
    """Near-duplicate copies of a sample of the images, embedded beside the layers."""

    images: int = MISSING
    copies: int = MISSING
    flip: bool = MISSING


class Engine(Enum):
    local = "local"
    ray = "ray"


@dataclass
class EngineConfig:
    """Where the inference loop runs: `local` (this process and its loader processes) or `ray`
    (a Ray Data plan on a local or existing cluster). Only `ray` reads the other keys."""

    name: Engine = MISSING
    address: str | None = MISSING  # null: a local cluster in-process; auto or ray://host:port
    workers: int = MISSING  # model actors
    gpus_per_worker: float = MISSING
    cpus_per_worker: float = MISSING
    decode_workers: int | None = MISSING  # concurrent decode tasks; null: Ray decides


@dataclass
class TrackingConfig:
    backend: str = MISSING
    uri: str | None = MISSING
    experiment: str = MISSING
    required: bool = MISSING


@dataclass
class ClusterConfig:
    method: ClusterMethod = MISSING
    k: int | None = MISSING
    pca_dim: int | None = MISSING
    min_cluster_size: int = MISSING
    sample: int = MISSING  # PCA and k-means are fitted on at most this many images
    hdbscan_sample: int = MISSING  # HDBSCAN clusters at most this many; the others join them
    seed: int = MISSING
    sheet_images: int = MISSING
    output_dir: str = MISSING
    headline_file: str | None = MISSING  # the figures DVC compares (results.HEADLINE)


@dataclass
class DedupConfig:
    threshold: float | str = MISSING  # a cosine similarity, or "auto"
    target_precision: float = MISSING
    whiten: bool = MISSING
    whiten_dim: int | None = MISSING
    whiten_shrinkage: float = MISSING
    whiten_sample: int = MISSING
    k: int = MISSING
    method: SearchMethod = MISSING
    device: str = MISSING
    min_recall: float = MISSING
    recall_sample: int = MISSING
    truth: str | None = MISSING
    truth_id_column: str = MISSING
    truth_group_column: str = MISSING
    top_pairs: int = MISSING
    review_pairs: int = MISSING  # on review.html, nearest the threshold
    reviewed: str | None = MISSING  # review.csv as review.html saves it
    output_dir: str = MISSING
    headline_file: str | None = MISSING  # the figures DVC compares (results.HEADLINE)


@dataclass
class ProbeConfig:
    folds: int = MISSING
    c: float = MISSING
    max_iter: int = MISSING
    sample: int = MISSING  # cross-validated up to this many images; beyond, trained on as many
    seed: int = MISSING
    output_dir: str = MISSING
    headline_file: str | None = MISSING  # the figures DVC compares (results.HEADLINE)


@dataclass
class ReportConfig:
    cluster_dir: str = MISSING
    dedup_dir: str = MISSING
    probe_dir: str = MISSING
    output_dir: str = MISSING
    cka_sample: int = MISSING  # linear CKA between the layers on this many images; 0: none
    cka_seed: int = MISSING
    cka_models: list[str] = MISSING  # other models' folders beside this one's (globs)


@dataclass
class VisualizeConfig:
    image: str | None = MISSING
    images: list[str] = MISSING
    layers: list[str] = MISSING
    channels: int = MISSING
    normalise: str = MISSING
    output_dir: str = MISSING


@dataclass
class ExploreConfig:
    projection: Projection = MISSING
    umap_min_images: int = MISSING  # auto: PCA below this many images
    neighbours: int = MISSING
    thumbnail: int = MISSING  # pixels, the longer side
    seed: int = MISSING
    cluster_dir: str = MISSING  # assignments.parquet, when there
    dedup_dir: str = MISSING  # groups.parquet, when there
    host: str = MISSING
    port: int = MISSING
    export: str | None = MISSING  # a folder: a static site, not a server
    output_dir: str = MISSING  # the projection and thumbnails, kept for the next run


@dataclass
class PipelineConfig:
    paths: PathsConfig = MISSING
    dataset: DatasetConfig = MISSING
    model: ModelConfig = MISSING
    tracking: TrackingConfig = MISSING
    engine: EngineConfig = MISSING
    # Extraction
    layers: list[str] = MISSING
    pool: Pool = MISSING
    gem_p: float = MISSING
    pool_grid: int = MISSING
    scales: list[float] = MISSING
    output_key: str | None = MISSING
    extraction_name: str = MISSING  # <dataset>/<model>: names the folders of every stage
    output_dir: str = MISSING
    device: str = MISSING
    precision: Precision = MISSING
    decode: Decode = MISSING
    compile: bool = MISSING
    batch_size: int = MISSING
    num_workers: int | None = MISSING
    seed: int = MISSING
    resume: bool = MISSING
    save_every: int = MISSING
    max_failure_rate: float = MISSING
    max_image_pixels: int = MISSING
    max_file_bytes: int = MISSING
    calibration: CalibrationConfig = MISSING
    # Downstream stages: one layer's embeddings in
    layer: str = MISSING
    embeddings: str = MISSING
    images_root: str | None = MISSING
    verify: bool = MISSING
    cluster: ClusterConfig = MISSING
    dedup: DedupConfig = MISSING
    probe: ProbeConfig = MISSING
    report: ReportConfig = MISSING
    visualize: VisualizeConfig = MISSING
    explore: ExploreConfig = MISSING


# --- checks beyond the types --------------------------------------------------------------------


def validate(cfg: PipelineConfig) -> None:
    """The values' ranges, which their types cannot say: a ConfigError whose message is one line
    naming the key. Run once, when the composed config is typed (`pipeline.app.typed`), so every
    command and the Python API refuse a bad value before any model is built or image read."""
    _check_preprocessing(cfg.model)
    if not isinstance(labels := cfg.dataset.labels_from_folders, bool) and labels != "auto":
        raise ConfigError(f"dataset.labels_from_folders is true, false or auto, got {labels!r}")
    for key in ("batch_size", "save_every", "max_image_pixels", "max_file_bytes"):
        _at_least(key, getattr(cfg, key), 1)
    if not 0 <= cfg.max_failure_rate <= 1:
        raise ConfigError(f"max_failure_rate is a fraction in [0, 1], got {cfg.max_failure_rate}")
    _at_least("calibration.images", cfg.calibration.images, 0)
    _at_least("calibration.copies", cfg.calibration.copies, 1)
    if not (cfg.report.cka_sample == 0 or cfg.report.cka_sample >= 4):  # unbiased HSIC: n - 3
        raise ConfigError(
            f"report.cka_sample is 0 (no CKA) or 4 images or more, got {cfg.report.cka_sample}"
        )
    _at_least("explore.neighbours", cfg.explore.neighbours, 1)
    _at_least("explore.thumbnail", cfg.explore.thumbnail, 8)
    _at_least("explore.umap_min_images", cfg.explore.umap_min_images, 3)
    if not 0 <= cfg.explore.port <= 65535:
        raise ConfigError(f"explore.port is a TCP port in [0, 65535], got {cfg.explore.port}")


def _at_least(key: str, value: int, least: int) -> None:
    if value < least:
        raise ConfigError(f"{key} must be at least {least}, got {value}")


def _check_preprocessing(model: ModelConfig) -> None:
    """The preprocessing overrides; null leaves each to the model's own data config. Images are
    decoded as RGB, hence 3 channels and 3 values per channel statistic."""
    size = model.input_size
    if size is not None and (len(size) != 3 or size[0] != 3 or min(size) < 1):
        raise ConfigError(
            f"model.input_size is [3, height, width] (RGB, sizes of at least 1), got {list(size)}"
        )
    if model.mean is not None and (
        len(model.mean) != 3 or not all(math.isfinite(m) for m in model.mean)
    ):
        raise ConfigError(f"model.mean is 3 numbers, one per RGB channel, got {list(model.mean)}")
    if model.std is not None and (
        len(model.std) != 3 or not all(0 < s < math.inf for s in model.std)
    ):
        raise ConfigError(
            f"model.std is 3 positive numbers, one per RGB channel, got {list(model.std)}"
        )
    # timm reads a crop_pct of 0 as "not given" and takes the model's own: refuse it here.
    if model.crop_pct is not None and not 0 < model.crop_pct <= 1:
        raise ConfigError(f"model.crop_pct is a fraction in (0, 1], got {model.crop_pct}")


def check_key(key: str) -> None:
    """`key` (dotted: `model.name`) is in the schema, else a ConfigError naming the closest key
    at the level where it went wrong. Below a node that is not a dataclass (`model.module`,
    a list) any key may be."""
    node: Any = PipelineConfig
    path: list[str] = []
    for part in key.split("."):
        fields = _field_types(node)
        if part not in fields:
            close = difflib.get_close_matches(part, fields, n=1)
            if close:
                hint = f"did you mean {'.'.join([*path, close[0]])}?"
            elif path:
                hint = f"{'.'.join(path)} has {', '.join(fields)}"
            else:
                hint = "--cfg job lists every key"
            raise ConfigError(f"no key {key!r} in the config: {hint}")
        path.append(part)
        node = fields[part]
        if not dataclasses.is_dataclass(node):
            return


def key_type(key: str) -> Any:
    """The schema's type of `key` (dotted: `cluster.method`): a dataclass, an Enum, a builtin."""
    node: Any = PipelineConfig
    for part in key.split("."):
        node = _field_types(node)[part]
    return node


def _field_types(schema: type) -> dict[str, Any]:
    """A dataclass's field names and their types, the annotations resolved."""
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}
