"""Typed schemas for the extraction config, registered in Hydra's ConfigStore.

Hydra merges the YAML in `conf/` into these dataclasses, so a misspelled key or a value of the
wrong type fails at compose time, before any model is built or image read. The values live in
the YAML; the schemas only say what may be there.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import json
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import MISSING, OmegaConf

# The repository's conf/ folder, which every Hydra app of the package composes from.
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


class ConfigError(ValueError):
    """A mistake in the config or its inputs: reported as one line, exit code 2, nothing written."""

    exit_code = 2


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Around a stage: a ConfigError becomes one line on stderr and its exit code (2, or 3 for
    too many failed images). In a Hydra multirun it is raised instead, so the sweep records the
    job as failed and goes on."""
    try:
        yield
    except ConfigError as err:
        if HydraConfig.initialized() and HydraConfig.get().mode is RunMode.MULTIRUN:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)


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


class Precision(Enum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class KeyMatch(Enum):
    """How a checkpoint's tensors are matched to the model's parameters."""

    name = "name"
    # By order, every shape checked: for the same architecture saved by another codebase.
    position = "position"


@dataclass
class DatasetConfig:
    name: str = MISSING
    kind: DatasetKind = MISSING
    root: str | None = None
    path: str | None = None
    path_column: str = "path"
    label_column: str | None = None
    labels_from_folders: bool = False
    extensions: list[str] = MISSING
    # Manifest paths that leave `root` (../.., absolute paths elsewhere) are refused unless true.
    allow_outside_root: bool = False


@dataclass
class ModelConfig:
    name: str = MISSING
    pretrained: bool = False
    checkpoint: str | None = None
    checkpoint_keys: KeyMatch = KeyMatch.name
    num_classes: int | None = None
    # A Hydra `_target_` spec that builds any torch.nn.Module; when set, timm is not asked.
    module: dict[str, Any] | None = None
    # The layer whose output is the model's image embedding; the default for `layers`.
    embedding_layer: str = MISSING
    # Preprocessing; null takes the value from the model's own data config.
    input_size: list[int] | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    mean: list[float] | None = None
    std: list[float] | None = None


@dataclass
class TrackingConfig:
    backend: str = MISSING
    uri: str | None = None
    experiment: str = "embeddings"
    required: bool = False


@dataclass
class ExtractConfig:
    dataset: DatasetConfig = MISSING
    model: ModelConfig = MISSING
    tracking: TrackingConfig = MISSING
    layers: list[str] = MISSING
    pool: Pool = Pool.auto
    # Which element to take from a layer that returns a tuple, list or dict (index or key).
    output_key: str | None = None
    output_dir: str = MISSING
    device: str = "auto"
    precision: Precision = Precision.auto
    batch_size: int = 32
    num_workers: int | None = None
    seed: int = 0
    # Reliability: progress is saved every `save_every` images, and a rerun of the same config
    # resumes from there; a run where more than `max_failure_rate` of the images fail stops.
    resume: bool = True
    save_every: int = 2048
    max_failure_rate: float = 0.5
    max_image_pixels: int = 178_956_970  # decompression-bomb guard, PIL's default


class ClusterMethod(Enum):
    kmeans = "kmeans"
    hdbscan = "hdbscan"


class SearchMethod(Enum):
    exact = "exact"  # blocked matrix product: exact, memory bounded by a block of rows
    hnsw = "hnsw"  # faiss HNSW graph: approximate, for large sets


@dataclass
class ClusterParams:
    method: ClusterMethod = ClusterMethod.kmeans
    k: int | None = None  # null: the number of distinct labels
    pca_dim: int | None = None  # null: cluster the normalised embeddings as they are
    min_cluster_size: int = 5  # hdbscan
    seed: int = 0
    sheet_images: int = 8  # thumbnails per cluster in the contact sheet


@dataclass
class DedupParams:
    threshold: float = MISSING  # cosine similarity at or above which two images are duplicates
    k: int = 10  # neighbours searched per image
    method: SearchMethod = SearchMethod.exact
    truth: str | None = None  # a manifest with the true near-duplicate groups
    truth_id_column: str = "path"
    truth_group_column: str = "group"
    top_pairs: int = 12  # pairs shown in the picture


@dataclass
class StageConfig:
    """What the downstream stages share: one layer's embeddings in, a folder of results out."""

    embeddings: str = MISSING
    images_root: str | None = None  # where image_ids point, for the pictures
    output_dir: str = MISSING
    tracking: TrackingConfig = MISSING


@dataclass
class ProbeParams:
    folds: int = 5  # stratified; fewer when the rarest label has fewer images
    c: float = 1.0  # inverse regularisation strength of the logistic regression
    max_iter: int = 2000
    seed: int = 0


@dataclass
class ProbeConfig(StageConfig):
    probe: ProbeParams = MISSING


@dataclass
class ReportConfig:
    """Per layer of one model on one dataset: dim, cluster NMI, duplicate F1, probe accuracy."""

    # The same groups as extraction, so a report takes the overrides its extraction took.
    dataset: DatasetConfig = MISSING
    model: ModelConfig = MISSING
    embeddings_dir: str = MISSING
    cluster_dir: str = MISSING
    dedup_dir: str = MISSING
    probe_dir: str = MISSING
    output_dir: str = MISSING
    # Run the cluster, dedup and probe stages (default settings) for layers that lack them.
    compute_missing: bool = True
    images_root: str | None = None
    tracking: TrackingConfig = MISSING


@dataclass
class VisualizeConfig:
    """Feature maps of a few layers for one or a few images."""

    model: ModelConfig = MISSING
    tracking: TrackingConfig = MISSING
    image: str | None = None  # one image; `images` takes a few
    images: list[str] = MISSING
    layers: list[str] = MISSING
    output_key: str | None = None
    channels: int = 16  # the strongest channels shown per layer
    normalise: str = "channel"  # channel: each map to its own range | layer: one range per layer
    output_dir: str = MISSING
    device: str = "auto"


@dataclass
class ClusterConfig(StageConfig):
    cluster: ClusterParams = MISSING


@dataclass
class DedupConfig(StageConfig):
    dedup: DedupParams = MISSING


# Keys that change where or how fast a run goes, not the numbers it writes.
UNHASHED_KEYS = ("output_dir", "batch_size", "num_workers", "tracking")


def config_hash(cfg: ExtractConfig) -> str:
    """A short digest of everything that decides the embedding values, to tell runs apart."""
    values = {k: v for k, v in asdict(cfg).items() if k not in UNHASHED_KEYS}
    text = json.dumps(
        values, sort_keys=True, default=lambda v: v.value if isinstance(v, Enum) else str(v)
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def package_file(package: str, *parts: str) -> str:
    """Path of a data file shipped inside an installed package (an OmegaConf resolver)."""
    try:
        return str(importlib.resources.files(package).joinpath(*parts))
    except ModuleNotFoundError as err:
        raise ValueError(f"package {package!r} is not installed: pip install it") from err


def embeddings_key(path: str) -> str:
    """`<dataset>/<model>/<layer>` of an embeddings file (an OmegaConf resolver), so that each
    input gets its own result folder: the path under outputs/embeddings/, or its last parts."""
    parts = Path(path).with_suffix("").parts
    if "embeddings" in parts:
        return "/".join(parts[len(parts) - parts[::-1].index("embeddings") :])
    return "/".join(parts[-3:])


def path_name(path: str) -> str:
    """Last component of a path (an OmegaConf resolver), for naming outputs after a folder."""
    return Path(path).expanduser().resolve().name


# Keys a sweep may vary while its jobs still write distinct files in the same folder: the layer
# or folder names differ, or the numbers do not.
SHARED_FOLDER_KEYS = {
    "layers",
    "model",
    "model.name",
    "dataset",
    "output_dir",
    "batch_size",
    "num_workers",
    "tracking",
}
SHARED_FOLDER_PREFIXES = ("dataset.", "tracking.", "hydra.", "hydra/")


def sweep_suffix() -> str:
    """In a Hydra multirun, `/key=value,...` of the swept keys that would otherwise make two
    jobs write the same file (pool, preprocessing, precision...); empty otherwise."""
    if not HydraConfig.initialized() or HydraConfig.get().mode is not RunMode.MULTIRUN:
        return ""
    # The sweep's own command line, with its comma lists, is saved beside the jobs.
    primary = OmegaConf.load(Path(HydraConfig.get().sweep.dir) / "multirun.yaml")
    swept = {
        o.key_or_group
        for o in OverridesParser.create().parse_overrides(list(primary.hydra.overrides.task))
        if o.is_sweep_override()
    }
    distinct = sorted(
        o
        for o in HydraConfig.get().overrides.task
        if (key := o.split("=")[0]) in swept
        and key not in SHARED_FOLDER_KEYS
        and not key.startswith(SHARED_FOLDER_PREFIXES)
    )
    return "/" + ",".join(distinct) if distinct else ""


def register() -> None:
    """Register the schema and resolvers; safe to call more than once."""
    store = ConfigStore.instance()
    store.store(name="extract_schema", node=ExtractConfig)
    store.store(name="cluster_schema", node=ClusterConfig)
    store.store(name="dedup_schema", node=DedupConfig)
    store.store(name="probe_schema", node=ProbeConfig)
    store.store(name="report_schema", node=ReportConfig)
    store.store(name="visualize_schema", node=VisualizeConfig)
    resolvers = {
        "package_file": package_file,
        "path_name": path_name,
        "sweep_suffix": sweep_suffix,
        "embeddings_key": embeddings_key,
    }
    for name, resolver in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


register()
