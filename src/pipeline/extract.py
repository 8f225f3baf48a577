"""python -m pipeline [overrides]: the extraction command. Finds what is not published yet
(`storage.update`), runs it through the engine's batches into the one loop
(`extraction.loop`), makes the calibration copies, and publishes the changed layers whole.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import DatasetKind, Decode, Engine, PipelineConfig
from pipeline.extraction.provenance import (
    LayerInfo,
    calibration_spec,
    config_hash,
    extraction_metadata,
    layer_info,
    manifest_digest,
    values_key,
    weights_provenance,
)
from pipeline.images.manifest import build_demo_if_missing, load_manifest
from pipeline.results import DatasetRef, StageResult
from pipeline.storage import ledger, update
from pipeline.storage.contract import FAILURES_FILE, layer_path, read_metadata
from pipeline.storage.publish import LayerOutput, published_outputs
from pipeline.storage.staging import Staging
from pipeline.storage.update import Plan, copies_stale, judge_failures, publish_changes

# torch, timm, albumentations and the model side (pipeline.extraction's engines, hooks, loop,
# writer; the images' loader) are imported where the images are embedded: a run that finds
# every layer published already (`up_to_date`) answers without loading them.
if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import torch

    from pipeline.extraction.engines import Engine as ExtractionEngine
    from pipeline.extraction.hooks import HookPlan, LayerHooks
    from pipeline.extraction.writer import ChunkWriter
    from pipeline.images.loader import ImageDataset
    from pipeline.images.preprocess import Preprocess

log = logging.getLogger(__name__)


@dataclass
class ExtractResult(StageResult):
    """What an extraction wrote: a published folder per layer, and how it went."""

    layers: dict[str, LayerInfo] = field(default_factory=dict)
    outputs: dict[str, LayerOutput] = field(default_factory=dict)
    images: int = 0
    failures: int = 0


def run(cfg: PipelineConfig) -> ExtractResult:
    """Extract every configured layer for every image of the dataset into `cfg.output_dir`."""
    build_demo_if_missing(cfg.dataset)  # dataset=demo: the first run writes the demo images
    manifest = load_manifest(cfg.dataset)
    cfg = decided_labels(cfg, manifest)
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
    import torch

    from pipeline.extraction.models import build_model

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    return extract_images(model, manifest, cfg, weights)


def decided_labels(cfg: PipelineConfig, manifest: pd.DataFrame) -> PipelineConfig:
    """The config with `dataset.labels_from_folders: auto` decided as the manifest was listed:
    true when a folder's images were labelled by their folders (every image sits in a
    sub-folder), false otherwise and for manifests (their labels are a column's). The hash and
    the metadata record the decision, not `auto`: a layer extracted unlabelled with `false` is
    still reused where auto labels nothing."""
    if cfg.dataset.labels_from_folders != "auto":
        return cfg
    labelled = cfg.dataset.kind is DatasetKind.folder and "label" in manifest
    top = int((~manifest["image_id"].str.contains("/", regex=False)).sum())
    if labelled:
        log.info("labels: each image's folder name (dataset.labels_from_folders=auto)")
    elif cfg.dataset.kind is DatasetKind.folder and top < len(manifest):
        log.info(
            "no labels: %d of %d images sit at the top of dataset.root, not in a sub-folder "
            "(dataset.labels_from_folders=true labels by folder all the same)",
            top,
            len(manifest),
        )
    return replace(cfg, dataset=replace(cfg.dataset, labels_from_folders=labelled))


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
    for name in cfg.layers:
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
    outputs = published_outputs(output_dir, list(info))
    seconds = time.perf_counter() - started
    dataset = _dataset_ref(cfg, manifest, metadata)
    result = _result(
        cfg, output_dir, info, outputs, len(manifest), 0, seconds, None, dataset, metadata
    )
    counts = {"new": 0, "changed": 0, "removed": 0, "reused": len(manifest), "missing": 0}
    result.metrics.update({f"images.{k}": v for k, v in counts.items()})
    return result


def extract_images(
    model: torch.nn.Module, manifest: pd.DataFrame, cfg: PipelineConfig, weights: dict[str, Any]
) -> ExtractResult:
    """The extraction of `manifest`'s images with a model already built (the Python API hands
    its own); `cfg` says which layers, how, and where. Only what is not published yet, as it
    is, gets embedded (`storage.update`)."""
    from pipeline.extraction.engines import start_engine
    from pipeline.images.decode import opencv_threads

    cfg = decided_labels(cfg, manifest)  # the Python API hands its own manifest
    engine = start_engine(cfg, model)
    try:
        # One OpenCV thread in this process, as in the loader's: decoding's parallelism is
        # those processes, and OpenCV's thread pool would not survive the fork that starts them.
        with opencv_threads(1):
            return _extract(engine, model, manifest, cfg, weights)
    finally:
        engine.close()


def _extract(
    engine: ExtractionEngine,
    model: torch.nn.Module,
    manifest: pd.DataFrame,
    cfg: PipelineConfig,
    weights: dict[str, Any],
) -> ExtractResult:
    import torch

    from pipeline.extraction.devices import computing, place_model, reusing_freed_memory
    from pipeline.extraction.hooks import HookPlan
    from pipeline.images.preprocess import resolve_preprocess

    m = cfg.model
    preprocess = resolve_preprocess(model, m.input_size, m.crop_pct, m.interpolation, m.mean, m.std)
    place_model(model, engine.device)
    if "size" not in manifest:  # the Python API hands a bare manifest
        manifest = ledger.with_identity(manifest, cfg.dataset.identity)
    metadata = extraction_metadata(
        cfg, weights, preprocess, engine.decode, engine.device_name, engine.precision
    )
    hook_plan = HookPlan(
        tuple(cfg.layers), cfg.pool, cfg.output_key, cfg.gem_p, cfg.pool_grid, tuple(cfg.scales)
    )
    with (
        hook_plan.on(model) as hooks,
        computing(engine.device, engine.precision),
        reusing_freed_memory(),
    ):
        info = hooks.describe(torch.zeros((1, *preprocess.input_size), device=engine.device))
        if cfg.compile:
            hooks.compile(cfg.batch_size)
        started = time.perf_counter()
        run = _Extraction(cfg, engine, hooks, hook_plan, preprocess, manifest, metadata, info)
        plan, writer = run.stage_and_publish()
        seconds = time.perf_counter() - started
    output_dir = run.output_dir
    outputs = published_outputs(output_dir, list(info))
    result = _result(
        cfg, output_dir, info, outputs, len(manifest), len(plan.work), seconds, writer.sample,
        _dataset_ref(cfg, manifest, metadata), metadata, run.copies,
    )  # fmt: skip
    result.metrics.update({f"images.{k}": v for k, v in plan.counts.items()})
    result.tags.update(engine.tags())
    return result


@dataclass
class _Extraction:
    """One run's settings, its model with the hooks on, and its images: what its steps share."""

    cfg: PipelineConfig
    engine: ExtractionEngine
    hooks: LayerHooks
    hook_plan: HookPlan
    preprocess: Preprocess
    manifest: pd.DataFrame
    metadata: dict[str, Any]
    info: dict[str, LayerInfo]
    copies: tuple[int, float] | None = None  # calibration copies embedded, and their seconds

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output_dir).expanduser()

    @property
    def values(self) -> str:
        return values_key(self.metadata["config_hash"], self.metadata["weights"])

    def staging_key(self, rows: int) -> str:
        """Staged chunks are resumed only by a run that would stage the very same ones."""
        layers_digest = hashlib.sha256("\n".join(self.info).encode()).hexdigest()[:8]
        key = f"{self.metadata['config_hash']}-{layers_digest}-b{self.cfg.batch_size}-c{rows}"
        # The parts' metadata name their engine: never mix them.
        return key if self.engine.name == "local" else f"{key}-{self.engine.name}"

    def stage_and_publish(self) -> tuple[Plan, ChunkWriter]:
        """Embed what the plan says is missing, chunk by chunk, then publish the layers it
        changes (with their calibration copies)."""
        from pipeline.extraction.loop import embed_batches
        from pipeline.extraction.writer import chunk_rows, layer_schemas

        cfg = self.cfg
        schemas = layer_schemas(self.info, "label" in self.manifest, self.metadata)
        rows = chunk_rows(cfg.save_every, cfg.batch_size, sum(i.dim for i in self.info.values()))
        with Staging(self.output_dir, self.staging_key(rows), list(self.info)) as staging:
            plan, writer = self.plan(staging, schemas, rows)
            if plan.work:
                work = self.manifest.iloc[plan.work]
                dataset = _work_dataset(work, cfg, self.preprocess, self.engine.decode)
                batches = self.engine.batches(self.hooks, self.hook_plan, dataset, self.preprocess)
                embed_batches(batches, writer)
            spec = calibration_spec(cfg)
            changed = publish_changes(
                plan, staging, writer.chunks, schemas, rows, self.values, spec, self.make_copies
            )
            if not changed:
                log.info("up to date: nothing new to embed or publish in %s", self.output_dir)
            staging.clear()
        return plan, writer

    def plan(
        self, staging: Staging, schemas: dict[str, Any], rows: int
    ) -> tuple[Plan, ChunkWriter]:
        """What to embed, and the writer that stages it; stops at once when the outcomes reused
        already fail more images than `max_failure_rate` allows."""
        from pipeline.extraction.writer import ChunkWriter

        cfg = self.cfg
        done = staging.resume(cfg.resume)
        plan = Plan.make(
            self.manifest, self.output_dir, list(self.info), self.values, staging, done,
            cfg.resume, cfg.verify,
        )  # fmt: skip
        if done:
            log.info(
                "resuming: %d images were staged by an earlier run of this command "
                "(resume=false starts afresh)",
                len(plan.staged.keys),
            )
        log.info("images: %s", plan.describe())
        judged, failed = plan.reused_failures()
        judge_failures(
            judged, failed, len(self.manifest), cfg.max_failure_rate, staging.dir, before=True
        )
        writer = ChunkWriter(
            staging, schemas, plan, rows, done, cfg.max_failure_rate, (judged, failed)
        )
        return plan, writer

    def make_copies(self, folder: Path) -> None:
        """The calibration copies of every layer, written under `folder`."""
        from pipeline.extraction.copies import (
            CopyPlan,
            calibration_sample,
            copies_metadata,
            embed_copies,
            loader_options,
        )
        from pipeline.extraction.writer import layer_schemas

        cfg, device = self.cfg, self.engine.device
        spec = calibration_spec(cfg)
        schemas = layer_schemas(self.info, False, copies_metadata(self.metadata, cfg), sourced=True)
        picked = calibration_sample(len(self.manifest), spec["images"], cfg.seed)
        started = time.perf_counter()
        made = embed_copies(
            self.hooks,
            self.manifest.iloc[picked],
            CopyPlan(cfg.calibration, cfg.seed, self.preprocess, cfg.batch_size),
            schemas,
            folder,
            device,
            loader_options(cfg, device, len(picked)),
            {"values": self.values, "calibration": spec},
        )
        before = self.copies or (0, 0.0)
        self.copies = (before[0] + made, before[1] + time.perf_counter() - started)


def _dataset_ref(
    cfg: PipelineConfig, manifest: pd.DataFrame, metadata: dict[str, Any]
) -> DatasetRef:
    """The images, as tracking records the run's input."""
    root = metadata["dataset"]["root"]
    return DatasetRef(cfg.dataset.name, manifest_digest(manifest), root, "images")


def _work_dataset(
    work: pd.DataFrame, cfg: PipelineConfig, preprocess: Preprocess, decode: Decode
) -> ImageDataset:
    """The images to embed, as the loader reads them (JPEG bytes for the GPU's decoder)."""
    from pipeline.images.gpu_decode import JpegDataset
    from pipeline.images.loader import ImageDataset
    from pipeline.images.preprocess import build_transform

    dataset_cls = JpegDataset if decode is Decode.gpu else ImageDataset
    return dataset_cls(
        work["path"].tolist(),
        build_transform(preprocess),
        cfg.max_image_pixels,
        errors=work["error"].tolist() if "error" in work else None,
        min_side=preprocess.min_side,
        max_file_bytes=cfg.max_file_bytes,
    )


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
    copies: tuple[int, float] | None = None,
) -> ExtractResult:
    """What the run did; `seconds` is all its work, `copies` the calibration copies' share of
    it (how many, in how many seconds), which the images' rate leaves out."""
    written = next(iter(outputs.values())).rows
    failures = images - written
    made, copy_seconds = copies or (0, 0.0)
    model_seconds = max(seconds - copy_seconds, 0.0)
    rate = processed / model_seconds if model_seconds else 0.0
    summary = _summary(output_dir, written, failures, processed, model_seconds, copies)
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
            **({"calibration_copies": made, "calibration_seconds": copy_seconds} if made else {}),
            **{f"dim.{name}": layer.dim for name, layer in info.items()},
        },
        documents=_documents(info, outputs, metadata),
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
    """The sample's 2D PCA, coloured by label where the images have labels."""
    from pipeline.plots import projection_figure  # matplotlib, only when a picture is asked for

    vectors, labels = sample
    labelled = labels is not None and any(label is not None for label in labels)
    return projection_figure(vectors, title, {"label": labels} if labelled else None)


def _summary(
    output_dir: Path,
    written: int,
    failures: int,
    processed: int,
    seconds: float,
    copies: tuple[int, float] | None = None,
) -> str:
    """The run's last line: the whole set, then what this run computed: the images (`seconds`
    theirs alone) and the calibration copies (how many, in how many seconds), each apart."""
    rate = processed / seconds if seconds else 0.0
    this_run = (
        f"{processed} images run through the model in {seconds:.1f} s, {rate:.1f} images/s"
        if processed
        else f"nothing new to embed, {seconds:.1f} s"
    )
    if copies is not None and copies[0]:
        this_run += f"; {copies[0]} calibration copies in {copies[1]:.1f} s"
    return (
        f"{written} embedded, {failures} failed"
        + (f", see {output_dir / FAILURES_FILE}" if failures else "")
        + f" ({this_run}) -> {output_dir}"
    )


def _documents(
    info: dict[str, LayerInfo], outputs: dict[str, LayerOutput], metadata: dict[str, Any]
) -> dict[str, Any]:
    """The JSON documents tracking keeps with the run: layers, output files, weights."""
    layers = {
        name: {
            "output_shape": list(layer.shape),
            "pool": layer.pool.value,
            "pool_params": layer.params,
            "dim": layer.dim,
        }
        for name, layer in info.items()
    }
    files = {
        str(o.path): {"rows": o.rows, "bytes": o.bytes, "sha256": o.sha256, "parts": o.parts}
        for o in outputs.values()
    }
    return {"layers.json": layers, "outputs.json": files, "weights.json": metadata["weights"]}
