"""Typed schemas of the pipeline's one config tree (`src/pipeline/conf/config.yaml`).

Every app (`python -m pipeline`, `pipeline.cluster`, `.dedup`, `.probe`, `.report`,
`.visualize`, `.layers`) composes the same tree; the app layer merges it into `PipelineConfig`,
so a value of the wrong type fails before any model is built or image read. The values live in
the YAML only; these classes say what may be there.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from omegaconf import MISSING


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


class KeyMatch(Enum):
    """How a checkpoint's tensors are matched to the model's parameters: by name, or by order
    with every shape checked (the same architecture saved by another codebase)."""

    name = "name"
    position = "position"


class ClusterMethod(Enum):
    kmeans = "kmeans"
    hdbscan = "hdbscan"


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
    labels_from_folders: bool = MISSING
    extensions: list[str] = MISSING
    allow_outside_root: bool = MISSING
    truth: str | None = MISSING  # a manifest with true near-duplicate groups, if known


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
    seed: int = MISSING
    sheet_images: int = MISSING
    output_dir: str = MISSING


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
    output_dir: str = MISSING


@dataclass
class ProbeConfig:
    folds: int = MISSING
    c: float = MISSING
    max_iter: int = MISSING
    seed: int = MISSING
    output_dir: str = MISSING


@dataclass
class ReportConfig:
    cluster_dir: str = MISSING
    dedup_dir: str = MISSING
    probe_dir: str = MISSING
    output_dir: str = MISSING


@dataclass
class VisualizeConfig:
    image: str | None = MISSING
    images: list[str] = MISSING
    layers: list[str] = MISSING
    channels: int = MISSING
    normalise: str = MISSING
    output_dir: str = MISSING


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
