"""python -m pipeline [overrides]: the inference loop. One forward pass per batch, every hooked
layer pooled on the device, each finished chunk of images staged as one part file per layer,
and the whole set published once every image is a row or a failure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import platform
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import timm
import torch
from tqdm import tqdm

import pipeline
from pipeline import augment, ledger, update
from pipeline.config import CalibrationConfig, Decode, Engine, PipelineConfig, Pool, Precision
from pipeline.data import (
    Batch,
    ImageDataset,
    Preprocess,
    batch_loader,
    build_transform,
    collate,
    image_loader,
    load_manifest,
    resolve_preprocess,
)
from pipeline.devices import (
    LoaderPlan,
    computing,
    model_input,
    place_model,
    plan_loader,
    resolve_decode,
    resolve_device,
    resolve_precision,
    reusing_freed_memory,
    torch_threads,
)
from pipeline.errors import ConfigError
from pipeline.gpu_decode import DeviceDecoder, JpegDataset, collate_jpegs
from pipeline.hooks import HookPlan, LayerHooks, LayerInfo
from pipeline.models import build_model, weights_provenance
from pipeline.publish import LayerOutput, published_outputs
from pipeline.results import DatasetRef, StageResult
from pipeline.staging import IMAGES_DIR, Chunk, Staging
from pipeline.store import (
    FAILURES_FILE,
    embedding_schema,
    embedding_table,
    layer_path,
    part_name,
    read_metadata,
    write_manifest,
    write_part,
)
from pipeline.update import Plan, copies_stale, judge_failures, publish_changes

log = logging.getLogger(__name__)
CHUNK_BYTES = 64 * 2**20  # embeddings held in memory before a chunk is staged: a part's size
GLANCE_ROWS = 5000  # rows of the last layer kept for the "embeddings at a glance" picture
# Keys that decide the embedding values of a layer; the rest say where or how fast a run goes,
# or which layers (a layer's rows do not depend on which others are captured beside it).
HASHED_KEYS = (
    "dataset",
    "model",
    "pool",
    "gem_p",
    "pool_grid",
    "scales",
    "output_key",
    "precision",
    "decode",  # the GPU's decoder and resize give slightly different pixels
    "seed",
    "max_image_pixels",
    "max_file_bytes",
)


@dataclass
class ExtractResult(StageResult):
    """What an extraction wrote: a published folder per layer, and how it went."""

    layers: dict[str, LayerInfo] = field(default_factory=dict)
    outputs: dict[str, LayerOutput] = field(default_factory=dict)
    images: int = 0
    failures: int = 0


def config_hash(cfg: PipelineConfig) -> str:
    """A short digest of everything that decides the embedding values, to tell runs apart."""
    values = {k: getattr(cfg, k) for k in HASHED_KEYS}
    values["dataset"] = {
        k: v for k, v in asdict(cfg.dataset).items() if k not in ("truth", "identity")
    }
    text = json.dumps(
        values,
        sort_keys=True,
        default=lambda v: (
            v.value
            if isinstance(v, Enum)
            else asdict(v)
            if hasattr(v, "__dataclass_fields__")
            else str(v)
        ),
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def chunk_rows(save_every: int, batch_size: int, total_dim: int) -> int:
    """Images per chunk: about `save_every`, at most ~CHUNK_BYTES of embeddings, and a whole
    number of batches, so that a resumed run sees the very same batches."""
    rows = min(save_every, max(1, CHUNK_BYTES // (4 * total_dim)))
    return max(1, rows // batch_size) * batch_size


def layer_schemas(
    info: dict[str, LayerInfo], labelled: bool, metadata: dict[str, Any], sourced: bool = False
) -> dict[str, pa.Schema]:
    """Each layer's Parquet schema, its metadata telling the layer's own shape and pooling;
    `sourced` for the calibration copies' layers."""
    return {
        name: embedding_schema(
            layer.dim,
            labelled,
            {
                **metadata,
                "layer": name,
                "output_shape": list(layer.shape),
                "pool": layer.pool.value,
                "pool_params": layer.params,
                "dim": layer.dim,
                "depth": layer.depth,
            },
            sourced,
        )
        for name, layer in info.items()
    }


def run(cfg: PipelineConfig) -> ExtractResult:
    """Extract every configured layer for every image of the dataset into `cfg.output_dir`."""
    torch.manual_seed(cfg.seed)
    manifest = load_manifest(cfg.dataset)
    if skipped := manifest.attrs.get("skipped"):
        log.info(
            "skipped %d files (%s): dataset.extensions lists what is read",
            sum(skipped.values()),
            ", ".join(f"{ext}: {n}" for ext, n in sorted(skipped.items())),
        )
    weights = weights_provenance(cfg.model)
    manifest = ledger.with_identity(manifest, cfg.dataset.identity)  # one stat an image, once
    if (ready := up_to_date(cfg, manifest, weights)) is not None:
        return ready
    model = build_model(cfg.model)
    return extract_images(model, manifest, cfg, weights)


def up_to_date(
    cfg: PipelineConfig, manifest: pd.DataFrame, weights: dict[str, Any]
) -> ExtractResult | None:
    """The result of a run with nothing to do, found without building the model: every layer
    (named, not a pattern) is published for these images as they are, with this config and
    these weights, its calibration copies too. None when there is work (or patterns)."""
    if cfg.engine.name is not Engine.local or not cfg.resume:
        return None
    if any(any(c in name for c in "*?[") for name in cfg.layers):
        return None
    started = time.perf_counter()
    output_dir = Path(cfg.output_dir).expanduser()
    values = values_key(config_hash(cfg), weights)
    keys = ledger.keys(manifest)
    info, failed = {}, set()
    for name in dict.fromkeys(cfg.layers):
        folder = layer_path(output_dir, name)
        previous = update.published(folder, values, cfg.verify)
        if previous is None or not previous.holds_exactly(keys):
            return None
        if copies_stale(previous, calibration_spec(cfg), values, set(keys)):
            return None
        info[name] = layer_info(read_metadata(folder))
        failed |= set(previous.outcomes.failures)  # a failure in any layer, as a run judges it
    judge_failures(
        len(keys), len(failed), len(keys), cfg.max_failure_rate, output_dir / FAILURES_FILE,
        before=True,
    )  # fmt: skip
    log.info("up to date: all %d images of %s are in %s", len(keys), ", ".join(info), output_dir)
    metadata = read_metadata(layer_path(output_dir, next(iter(info))))
    result = _result(
        cfg,
        output_dir,
        info,
        published_outputs(output_dir, list(info)),
        len(manifest),
        0,
        time.perf_counter() - started,
        None,
        DatasetRef(
            cfg.dataset.name, manifest_digest(manifest), metadata["dataset"]["root"], "images"
        ),
        metadata,
    )
    counts = {"new": 0, "changed": 0, "removed": 0, "reused": len(manifest), "missing": 0}
    result.metrics.update({f"images.{k}": v for k, v in counts.items()})
    return result


def layer_info(metadata: dict[str, Any]) -> LayerInfo:
    """A published layer's LayerInfo, from its metadata."""
    return LayerInfo(
        tuple(metadata["output_shape"]),
        Pool(metadata["pool"]),
        metadata["dim"],
        metadata["depth"],
        metadata.get("pool_params") or {},
    )


def extract_images(
    model: torch.nn.Module, manifest: pd.DataFrame, cfg: PipelineConfig, weights: dict[str, Any]
) -> ExtractResult:
    """The extraction of `manifest`'s images with a model already built (the Python API hands
    its own); `cfg` says which layers, how, and where. Only what is not published yet, as it
    is, gets embedded (`update.py`)."""
    session = None
    if cfg.engine.name is Engine.ray:
        if cfg.decode is Decode.gpu or cfg.compile:
            raise ConfigError(
                "decode=gpu and compile=true are the local engine's: the Ray engine decodes "
                "in its CPU tasks and runs the model as it is (engine=local, or leave them)"
            )
        from pipeline.engines.ray import ModelPlan, RaySession  # ray: an optional extra

        session = RaySession(cfg.engine, model)  # ships the model before any hook is on it
        placement = session.placement(cfg.device, cfg.precision)
        # This process only describes the layers and writes the parts; the actors compute.
        device, precision, decode = torch.device("cpu"), placement.precision, Decode.cpu
    else:
        device = resolve_device(cfg.device)
        precision = resolve_precision(cfg.precision, device)
        decode = resolve_decode(cfg.decode, device)
    output_dir = Path(cfg.output_dir).expanduser()
    m = cfg.model
    preprocess = resolve_preprocess(model, m.input_size, m.crop_pct, m.interpolation, m.mean, m.std)
    place_model(model, device)
    if "size" not in manifest:  # the Python API hands a bare manifest
        manifest = ledger.with_identity(manifest, cfg.dataset.identity)
    labels = manifest["label"].tolist() if "label" in manifest else None
    device_name = placement.device if session else device.type
    metadata = extraction_metadata(cfg, weights, preprocess, decode, device_name, precision)
    values = values_key(metadata["config_hash"], weights)
    hook_plan = HookPlan(
        tuple(cfg.layers), cfg.pool, cfg.output_key, cfg.gem_p, cfg.pool_grid, tuple(cfg.scales)
    )
    with (
        hook_plan.on(model) as hooks,
        computing(device, precision),
        reusing_freed_memory(),
    ):
        info = hooks.describe(torch.zeros((1, *preprocess.input_size), device=device))
        if cfg.compile:
            hooks.compile(cfg.batch_size)
        schemas = layer_schemas(info, labels is not None, metadata)
        rows = chunk_rows(cfg.save_every, cfg.batch_size, sum(i.dim for i in info.values()))
        layers_digest = hashlib.sha256("\n".join(info).encode()).hexdigest()[:8]
        key = f"{metadata['config_hash']}-{layers_digest}-b{cfg.batch_size}-c{rows}"
        if session is not None:  # the parts' metadata name their engine: never mix them
            key += "-ray"
        started = time.perf_counter()
        with Staging(output_dir, key, list(info)) as staging:
            done = staging.resume(cfg.resume)
            plan = Plan.make(
                manifest, output_dir, list(info), values, staging, done, cfg.resume, cfg.verify
            )
            if done:
                log.info(
                    "resuming: %d images were staged by an earlier run of this command "
                    "(resume=false starts afresh)",
                    len(plan.staged.keys),
                )
            log.info("images: %s", plan.describe())
            judged, failed = plan.reused_failures()
            judge_failures(
                judged, failed, len(manifest), cfg.max_failure_rate, staging.dir, before=True
            )
            writer = ChunkWriter(
                staging, schemas, plan, rows, done, cfg.max_failure_rate, (judged, failed)
            )
            if plan.work:
                dataset = _work_dataset(manifest.iloc[plan.work], cfg, preprocess, decode)
                if session is not None:
                    model_plan = ModelPlan(
                        dataclasses.replace(hook_plan, layers=tuple(info)),
                        preprocess.input_size,
                        placement,
                    )
                    session.extract(writer, dataset, 0, model_plan, cfg.batch_size)
                else:
                    loader = extraction_plan(cfg, len(plan.work), device, decode)
                    log.info("loader: %s", loader.describe())
                    with torch_threads(loader.main_threads):
                        forwarded = _forwarded(
                            hooks, dataset, cfg.batch_size, loader, preprocess, device, precision
                        )
                        _extract(forwarded, writer)
            spec = calibration_spec(cfg)
            schemas_of_copies = layer_schemas(
                info, False, copies_metadata(metadata, cfg), sourced=True
            )

            def make_copies(folder: Path) -> None:
                picked = calibration_sample(len(manifest), spec["images"], cfg.seed)
                embed_copies(
                    hooks,
                    manifest.iloc[picked],
                    CopyPlan(cfg.calibration, cfg.seed, preprocess, cfg.batch_size),
                    schemas_of_copies,
                    folder,
                    device,
                    loader_options(cfg, device, len(picked)),
                    {"values": values, "calibration": spec},
                )

            changed = publish_changes(
                plan, staging, writer.chunks, schemas, rows, values, spec, make_copies
            )
            if not changed:
                log.info("up to date: nothing new to embed or publish in %s", output_dir)
            staging.clear()
        outputs = published_outputs(output_dir, list(info))
        seconds = time.perf_counter() - started
    result = _result(
        cfg,
        output_dir,
        info,
        outputs,
        len(manifest),
        len(plan.work),
        seconds,
        writer.sample,
        DatasetRef(
            cfg.dataset.name, manifest_digest(manifest), metadata["dataset"]["root"], "images"
        ),
        metadata,
    )
    result.metrics.update({f"images.{k}": v for k, v in plan.counts.items()})
    if session is not None:
        result.tags.update(session.tags())
        session.close()
    return result


def extraction_metadata(
    cfg: PipelineConfig,
    weights: dict[str, Any],
    preprocess: Preprocess,
    decode: Decode,
    device: str,
    precision: Precision,
) -> dict[str, Any]:
    """What every part's schema metadata says of the run that wrote it."""
    return {
        "model": cfg.model.name,
        "weights": weights,
        "dataset": {
            "name": cfg.dataset.name,
            "kind": cfg.dataset.kind.value,
            "root": str(Path(cfg.dataset.root or ".").expanduser().resolve()),
            "truth": str(Path(t).expanduser().resolve()) if (t := cfg.dataset.truth) else None,
        },
        "preprocess": {**preprocess.as_dict(), "decode": decode.value},
        "config_hash": config_hash(cfg),
        "engine": cfg.engine.name.value,
        "device": device,
        "precision": precision.value,
        "compile": cfg.compile,
        "scales": list(cfg.scales),
        "versions": versions(),
    }


def _work_dataset(
    work: pd.DataFrame, cfg: PipelineConfig, preprocess: Preprocess, decode: Decode
) -> ImageDataset:
    """The images to embed, as the loader reads them (JPEG bytes for the GPU's decoder)."""
    dataset_cls = JpegDataset if decode is Decode.gpu else ImageDataset
    return dataset_cls(
        work["path"].tolist(),
        build_transform(preprocess),
        cfg.max_image_pixels,
        errors=work["error"].tolist() if "error" in work else None,
        min_side=preprocess.min_side,
        max_file_bytes=cfg.max_file_bytes,
    )


def values_key(config: str, weights: dict[str, Any]) -> str:
    """What a published layer's rows depend on besides the layer: the config's hash and the
    weights. A layer published under another key is embedded again, whole."""
    text = json.dumps({"config": config, "weights": weights}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def calibration_spec(cfg: PipelineConfig) -> dict[str, Any]:
    return {**asdict(cfg.calibration), "seed": cfg.seed}


def _result(
    cfg: PipelineConfig,
    output_dir: Path,
    info: dict[str, LayerInfo],
    outputs: dict[str, LayerOutput],
    images: int,
    processed: int,
    seconds: float,
    sample: tuple[np.ndarray, list[str] | None] | None,
    dataset: DatasetRef,
    metadata: dict[str, Any],
) -> ExtractResult:
    written = next(iter(outputs.values())).rows
    failures = images - written
    rate = processed / seconds if seconds else 0.0
    this_run = (
        f"{processed} images run through the model in {seconds:.1f} s, {rate:.1f} images/s"
        if processed
        else f"nothing new to embed, {seconds:.1f} s"
    )
    summary = (
        f"{written} embedded, {failures} failed"
        + (f", see {output_dir / FAILURES_FILE}" if failures else "")
        + f" ({this_run}) -> {output_dir}"
    )
    log.info("%s", summary)
    last = list(info)[-1]
    figures = {}
    if sample is not None and len(sample[0]) >= 3:
        title = (
            f"{cfg.extraction_name} {last}: PCA of {len(sample[0])} of {written} images\n"
            f"(model {cfg.model.name}, dataset {cfg.dataset.name})"
        )
        figures["embeddings_pca.png"] = lambda: _projection(sample, title)
    return ExtractResult(
        output_dir=output_dir,
        metrics={
            "images": written,
            "failures": failures,
            "seconds": seconds,
            "images_per_s": rate,
            **{f"dim.{name}": layer.dim for name, layer in info.items()},
        },
        documents={
            "layers.json": {
                name: {
                    "output_shape": list(layer.shape),
                    "pool": layer.pool.value,
                    "pool_params": layer.params,
                    "dim": layer.dim,
                }
                for name, layer in info.items()
            },
            "outputs.json": {
                str(o.path): {
                    "rows": o.rows,
                    "bytes": o.bytes,
                    "sha256": o.sha256,
                    "parts": o.parts,
                }
                for o in outputs.values()
            },
            "weights.json": metadata["weights"],
        },
        figures=figures,
        tags={
            "config_hash": metadata["config_hash"],
            "device": metadata["device"],
            "precision": metadata["precision"],
            "engine": metadata["engine"],
            "weights": metadata["weights"]["init"],
            "output.sha256": " ".join(o.sha256 for o in outputs.values()),
        },
        inputs=[dataset],
        summary=summary,
        layers=info,
        outputs=outputs,
        images=written,
        failures=failures,
    )


def _projection(sample: tuple[np.ndarray, list[str] | None], title: str) -> Any:
    from pipeline.plots import projection_figure  # matplotlib, only when a picture is asked for

    return projection_figure(sample[0], sample[1], title)


class ChunkWriter:
    """Collects the rows and failures of the images a run embeds (`plan.work`, in dataset
    order) and stages each finished chunk of them with its ledger.

    Rows whose embedding has a NaN or Inf in any layer (fp16 overflow, broken weights) become
    failures, never rows. When more than `max_failure_rate` of the images judged so far (the
    reused ones included) have failed, the run stops after staging the chunk (what is staged
    stays, and a rerun judges it again).
    """

    def __init__(
        self,
        staging: Staging,
        schemas: dict[str, pa.Schema],
        plan: Plan,
        rows: int,
        done: list[Chunk],
        max_failure_rate: float,
        reused: tuple[int, int],
    ) -> None:
        self.staging, self.schemas, self.plan, self.rows = staging, schemas, plan, rows
        self.chunks = list(done)
        manifest = plan.manifest.iloc[plan.work]
        self.ids = manifest["image_id"].tolist()
        self.labels = manifest["label"].tolist() if "label" in manifest else None
        self.max_failure_rate = max_failure_rate
        self.judged, self.failed_before = reused
        self.start = 0
        self.last = list(schemas)[-1]
        count = len(self.ids)
        self.glance = set(np.linspace(0, count - 1, min(count, GLANCE_ROWS)).astype(int))
        self._sample: list[tuple[int, np.ndarray]] = []
        self._reset()

    def _reset(self) -> None:
        self.indices: list[int] = []
        self.arrays: dict[str, list[np.ndarray]] = {name: [] for name in self.schemas}
        self.failures: list[tuple[int, str, str]] = []
        self.seen = 0

    @property
    def sample(self) -> tuple[np.ndarray, list[str] | None] | None:
        """Rows of the last layer spread over the images embedded, for a picture."""
        if not self._sample:
            return None
        indices = [i for i, _ in self._sample]
        labels = [self.labels[i] for i in indices] if self.labels is not None else None
        return np.stack([v for _, v in self._sample]), labels

    def add(
        self,
        indices: list[int],
        outputs: dict[str, np.ndarray],
        failures: list[tuple[int, str, str]],
    ) -> None:
        self.seen += len(indices) + len(failures)
        finite = np.ones(len(indices), bool)
        for name, array in outputs.items():
            bad = ~np.isfinite(array).all(axis=1) & finite
            failures = failures + [
                (
                    indices[i],
                    "NonFiniteEmbedding",
                    f"NaN or Inf in layer {name}: try precision=fp32, or check the weights",
                )
                for i in np.flatnonzero(bad)
            ]
            finite &= ~bad
        kept = [i for i, ok in zip(indices, finite, strict=True) if ok]
        self.indices += kept
        for name, array in outputs.items():
            self.arrays[name].append(array[finite])
        self._sample += [
            (i, v)
            for i, v in zip(kept, outputs[self.last][finite], strict=True)
            if i in self.glance
        ]
        self.failures += failures
        if self.seen >= self.rows:
            self.save()

    def save(self) -> None:
        if not self.seen:
            return
        stop = self.start + self.seen
        ids = [self.ids[i] for i in self.indices]
        labels = [self.labels[i] for i in self.indices] if self.labels is not None else None
        tables = {
            name: embedding_table(schema, ids, labels, np.concatenate(self.arrays[name]))
            for name, schema in self.schemas.items()
        }
        work = self.plan.work
        failed = {work[i]: (error, reason) for i, error, reason in self.failures}
        images = ledger.table(self.plan.manifest, work[self.start : stop], failed)
        self.chunks.append(self.staging.write_chunk(len(self.chunks), tables, images))
        self.judged += self.seen
        self.failed_before += len(self.failures)
        self.start = stop
        self._reset()
        judge_failures(
            self.judged,
            self.failed_before,
            len(self.plan.keys),
            self.max_failure_rate,
            self.staging.dir / IMAGES_DIR,
        )


def _batches(
    dataset: ImageDataset,
    batch_size: int,
    plan: LoaderPlan,
    preprocess: Preprocess,
    device: torch.device,
) -> Iterable[Batch]:
    """The loader's batches; a JpegDataset's JPEGs decoded on `device` as they arrive."""
    gpu = isinstance(dataset, JpegDataset)
    loader = batch_loader(
        dataset,
        collate_jpegs if gpu else collate,
        batch_size,
        plan.workers,
        plan.pin_memory,
        plan.prefetch_factor,
    )
    return map(DeviceDecoder(dataset, preprocess, device), loader) if gpu else loader


def extraction_plan(
    cfg: PipelineConfig, images: int, device: torch.device, decode: Decode
) -> LoaderPlan:
    """The loader plan for extracting `images` images (`pipeline.devices.plan_loader`): the
    model stays in the main process when it is compiled there, or fed batches that the GPU's
    decoder makes there."""
    return plan_loader(
        cfg.num_workers,
        -(-images // cfg.batch_size),
        device,
        model_in_main=cfg.compile or decode is Decode.gpu,
    )


@dataclass
class Forwarded:
    """A batch after the model: its images' indices, its failures, and each layer's pooled rows
    (tensors being copied to the host until `copied`, a CUDA event, has happened; else on it)."""

    indices: list[int]
    failures: list[tuple[int, str, str]]
    outputs: dict[str, Any]
    copied: Any = None

    def on_host(self) -> dict[str, np.ndarray]:
        if self.copied is not None:
            self.copied.synchronize()
        return {name: np.asarray(rows) for name, rows in self.outputs.items()}


def _forward(hooks: LayerHooks, batch: Batch, device: torch.device) -> Forwarded:
    """One forward pass; on a GPU the pooled rows are copied to the host without waiting."""
    if batch.images is None:
        empty = {name: torch.empty((0, info.dim)) for name, info in hooks.info.items()}
        return Forwarded(batch.indices, batch.failures, empty)
    outputs = {
        name: out.float().to("cpu", non_blocking=True)
        for name, out in hooks(model_input(batch.images, device)).items()
    }
    copied = None
    if device.type == "cuda":
        copied = torch.cuda.Event()
        copied.record()
    return Forwarded(batch.indices, batch.failures, outputs, copied)


class ForwardInWorker:
    """A loader's collate_fn that runs the model in the loader process on the batch it decoded
    (`LoaderPlan.model_in_workers`): the worker, forked after the hooks were put on the model,
    has its own copy of both, and only the pooled rows travel back."""

    def __init__(self, hooks: LayerHooks, precision: Precision) -> None:
        self.hooks = hooks
        self.precision = precision

    def __call__(self, samples: list) -> Forwarded:
        cpu = torch.device("cpu")
        with computing(cpu, self.precision):
            batch = collate(samples, shared=False)  # it stays in this process
            forwarded = _forward(self.hooks, batch, cpu)
        forwarded.outputs = forwarded.on_host()
        return forwarded


def _forwarded(
    hooks: LayerHooks,
    dataset: ImageDataset,
    batch_size: int,
    plan: LoaderPlan,
    preprocess: Preprocess,
    device: torch.device,
    precision: Precision,
) -> Iterable[Forwarded]:
    """Every batch through the model, in order: in the loader processes where the plan says so,
    else in this process as the loader hands the batches over."""
    if plan.model_in_workers:
        return batch_loader(
            dataset,
            ForwardInWorker(hooks, precision),
            batch_size,
            plan.workers,
            plan.pin_memory,
            plan.prefetch_factor,
            balanced=True,
        )
    batches = _batches(dataset, batch_size, plan, preprocess, device)
    return (_forward(hooks, batch, device) for batch in batches)


def _extract(forwarded: Iterable[Forwarded], writer: ChunkWriter) -> None:
    """The batch loop. Each batch is handed to the writer one batch later, so on a GPU the next
    forward pass overlaps the copy of the previous batch's rows and their saving."""
    pending: Forwarded | None = None

    def hand_on(batch: Forwarded) -> None:
        writer.add(batch.indices, batch.on_host(), batch.failures)

    with tqdm(total=len(writer.ids), unit="img", desc="extract", mininterval=1.0) as progress:
        for batch in forwarded:
            if pending is not None:
                hand_on(pending)
            pending = batch
            progress.update(len(batch.indices) + len(batch.failures))
        if pending is not None:
            hand_on(pending)
    writer.save()


def loader_options(cfg: PipelineConfig, device: torch.device, images: int) -> dict[str, Any]:
    """The keywords of `image_loader` that come from the config, for `images` images."""
    plan = plan_loader(cfg.num_workers, -(-images // cfg.batch_size), device)
    return {
        "num_workers": plan.workers,
        "pin_memory": plan.pin_memory,
        "prefetch_factor": plan.prefetch_factor,
        "max_image_pixels": cfg.max_image_pixels,
        "max_file_bytes": cfg.max_file_bytes,
    }


def copies_metadata(metadata: dict[str, Any], cfg: PipelineConfig) -> dict[str, Any]:
    """The layers' metadata, plus how their calibration copies were made."""
    return {
        **metadata,
        "calibration": {
            **asdict(cfg.calibration),
            "seed": cfg.seed,
            "transformations": augment.FAMILY,
        },
    }


def calibration_sample(images: int, wanted: int, seed: int) -> np.ndarray:
    """Which images get calibration copies: `wanted` of them at random, in dataset order."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(images, size=min(wanted, images), replace=False))


@dataclass(frozen=True)
class CopyPlan:
    """How the calibration copies are made and batched."""

    calibration: CalibrationConfig
    seed: int
    preprocess: Preprocess
    batch_size: int

    @property
    def images_per_batch(self) -> int:
        return max(1, self.batch_size // self.calibration.copies)

    @property
    def min_side(self) -> int:
        """Decode sources large enough that the smallest rescale of a copy still gives the
        model its full input; large JPEGs still decode at reduced scale."""
        return math.ceil(self.preprocess.min_side / augment.RESCALE[0])


def embed_copies(
    hooks: LayerHooks,
    sample: pd.DataFrame,
    plan: CopyPlan,
    schemas: dict[str, pa.Schema],
    folder: Path,
    device: torch.device,
    options: dict[str, Any],
    about: dict[str, Any],
) -> None:
    """Make `plan.calibration.copies` near-duplicates of each sampled image (manifest rows),
    embed them with the same hooks, and write one part per layer under `folder` (in staging,
    then published inside each layer's folder), its manifest saying `about` them and which
    images they were made from. Images that fail are left out."""
    copies = plan.calibration.copies
    transform = augment.CopyTransform(
        build_transform(plan.preprocess), copies, plan.seed, plan.calibration.flip
    )
    loader = image_loader(
        sample["path"].tolist(),
        transform,
        plan.images_per_batch,
        errors=sample["error"].tolist() if "error" in sample else None,
        min_side=plan.min_side,
        **options,
    )
    sources: list[str] = []
    arrays: dict[str, list[np.ndarray]] = {name: [] for name in schemas}
    for batch in tqdm(loader, unit="batch", desc="calibration copies", mininterval=1.0):
        if batch.images is None:
            continue
        images = model_input(batch.images.flatten(0, 1), device)  # copies in a row
        for name, out in hooks(images).items():
            arrays[name].append(out.float().cpu().numpy())
        sources += [sample["image_id"].iloc[i] for i in batch.indices for _ in range(copies)]
    ids = [f"{source}#copy{i % copies}" for i, source in enumerate(sources)]
    for name, schema in schemas.items():
        dim = schema.field("embedding").type.list_size
        vectors = np.concatenate(arrays[name]) if arrays[name] else np.empty((0, dim))
        table = embedding_table(schema, ids, None, vectors.astype(np.float32), sources)
        path = layer_path(folder, name)
        write_manifest(
            path,
            [write_part(table, path / part_name(0))],
            {**about, "sources": sorted(set(sources))},
        )


def manifest_digest(manifest: pd.DataFrame) -> str:
    """Of the ids and labels, in order: which images, not their bytes."""
    columns = [c for c in ("image_id", "label") if c in manifest]
    return hashlib.sha256(manifest[columns].to_csv(index=False).encode()).hexdigest()


def versions() -> dict[str, str]:
    return {
        "pipeline": pipeline.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
