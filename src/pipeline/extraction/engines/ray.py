"""engine=ray: the extraction as a Ray Data plan, on a local cluster or an existing one.

    positions 0..n-1 of the images still to do, in blocks of whole batches
      -> map_batches(decode_batch), CPU tasks    the local engine's own ImageDataset, per row
      -> map_batches(_Model), an actor pool      model and LayerHooks built once per actor
      -> iter_batches, in dataset order          -> Forwarded batches, to the one loop

Row order: Ray Data's order-preserving execution (`preserve_order`), not an index column sorted
on write. Sorting needs the whole output before the first part can be written; in order, this
process stages chunk after chunk as they arrive, so a rerun after a kill resumes at the first
chunk not yet staged, exactly as the local engine does. Each row still carries its position,
and the driver checks that they arrive consecutive.

Byte identity with the local engine needs the same batches in every forward pass (CPU kernels
may round differently for another batch shape): blocks hold whole batches of `batch_size`
positions counted from the first, and the actor runs one forward pass per batch on its
decodable images, so the model sees exactly the local DataLoader's batches. A block holds
about BLOCK_IMAGES images, fewer when their pixels pass BLOCK_BYTES, never less than a batch:
Ray's cost per block (a task, object store puts, ~20 ms on a busy 2-core machine) is then
small next to decoding them (~1-2 ms an image at ImageNet sizes).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from pipeline.config import Decode, EngineConfig, PipelineConfig, Precision
from pipeline.errors import ConfigError
from pipeline.extraction.devices import (
    computing,
    keep_freed_memory,
    model_input,
    place_model,
    resolve_device,
    resolve_precision,
)
from pipeline.extraction.forward import Forwarded
from pipeline.extraction.hooks import HookPlan, LayerHooks
from pipeline.images.decode import single_threaded_opencv
from pipeline.images.loader import ImageDataset
from pipeline.images.preprocess import Preprocess

try:
    import ray
except ModuleNotFoundError:
    raise ConfigError("engine=ray needs Ray: pip install 'pipeline[ray]'") from None

EMBEDDING_PREFIX = "embedding:"  # a layer's pooled outputs, as a column of the model's blocks
log = logging.getLogger(__name__)
DECODE_MEMORY = 2**30
BLOCK_IMAGES = 256
BLOCK_BYTES = 16 * 2**20


@dataclass(frozen=True)
class Placement:
    """Where the model actors compute, as resolved on a worker with their resources."""

    device: str
    precision: Precision


@dataclass(frozen=True)
class ModelPlan:
    """What each model actor needs besides the model: its hooks as the local engine's (the
    layers resolved), its input size and where it computes."""

    hooks: HookPlan
    input_size: tuple[int, int, int]
    placement: Placement


class RayEngine:
    """The Ray engine for one extraction: this process only describes the layers and writes
    the parts (on its CPU); the actors decode and compute."""

    name = "ray"

    def __init__(self, cfg: PipelineConfig, model: torch.nn.Module) -> None:
        if cfg.decode is Decode.gpu or cfg.compile:
            raise ConfigError(
                "decode=gpu and compile=true are the local engine's: the Ray engine decodes "
                "in its CPU tasks and runs the model as it is (engine=local, or leave them)"
            )
        self.batch_size = cfg.batch_size
        self.session = RaySession(cfg.engine, model)  # ships the model before any hook is on it
        self.placement = self.session.placement(cfg.device, cfg.precision)
        self.device, self.decode = torch.device("cpu"), Decode.cpu
        self.precision, self.device_name = self.placement.precision, self.placement.device

    def batches(
        self,
        hooks: LayerHooks,
        hook_plan: HookPlan,
        dataset: ImageDataset,
        preprocess: Preprocess,
    ) -> Iterator[Forwarded]:
        layers = dataclasses.replace(hook_plan, layers=tuple(hooks.info))  # patterns resolved
        plan = ModelPlan(layers, preprocess.input_size, self.placement)
        return self.session.batches(dataset, 0, plan, self.batch_size)

    def tags(self) -> dict[str, str]:
        return self.session.tags()

    def close(self) -> None:
        self.session.close()


class RaySession:
    """A Ray cluster for one extraction: started in-process when `address` is null and
    RAY_ADDRESS is unset, joined otherwise. The model goes to the actors through the object
    store, weights included, so every actor computes with this process's weights, also on
    nodes that have neither the checkpoint file nor the hub cache."""

    def __init__(self, settings: EngineConfig, model: torch.nn.Module) -> None:
        if settings.workers < 1:
            raise ConfigError(f"engine.workers must be at least 1, got {settings.workers}")
        if settings.decode_workers is not None and settings.decode_workers < 1:
            raise ConfigError(
                f"engine.decode_workers must be at least 1 or null, got {settings.decode_workers}"
            )
        self.settings = settings
        self.dashboard: str | None = None
        self.owned = not ray.is_initialized()  # else the caller's session, left as it is
        if self.owned:
            try:
                context = ray.init(address=settings.address, log_to_driver=False)
            except (ConnectionError, ValueError) as err:
                raise ConfigError(
                    f"cannot reach the Ray cluster at engine.address={settings.address}: {err}"
                ) from None
            self.dashboard = context.dashboard_url or None
        gpus = ray.cluster_resources().get("GPU", 0)
        if settings.gpus_per_worker > gpus:
            log.warning(
                "engine.gpus_per_worker=%s but the cluster has %s GPUs now: the model workers "
                "wait until an autoscaler adds GPU nodes (engine.gpus_per_worker=0: CPU)",
                settings.gpus_per_worker,
                gpus,
            )
        self.model = ray.put(model)

    def close(self) -> None:
        """Leave the cluster (stopping it, if it was started here), unless the caller had
        connected: each run, each sweep job among them, is its own Ray job."""
        if self.owned:
            ray.shutdown()

    def placement(self, device: str, precision: Precision) -> Placement:
        """The actors' device and precision, resolved on a worker that has their resources."""

        @ray.remote(num_cpus=0, num_gpus=self.settings.gpus_per_worker)
        def probe() -> tuple[str, Precision]:
            resolved = resolve_device(device)
            return resolved.type, resolve_precision(precision, resolved)

        return Placement(*ray.get(probe.remote()))

    def tags(self) -> dict[str, str]:
        """The cluster and the plan, for the tracking run."""
        resources = ray.cluster_resources()
        tags = {
            "ray.cluster_cpus": str(int(resources.get("CPU", 0))),
            "ray.cluster_gpus": str(int(resources.get("GPU", 0))),
            "ray.nodes": str(sum(1 for node in ray.nodes() if node.get("Alive"))),
            "ray.workers": str(self.settings.workers),
            "ray.gpus_per_worker": str(self.settings.gpus_per_worker),
            "ray.cpus_per_worker": str(self.settings.cpus_per_worker),
            "ray.decode_workers": str(self.settings.decode_workers or "auto"),
        }
        if self.dashboard:
            tags["ray.dashboard"] = self.dashboard
        return tags

    def batches(
        self, images: ImageDataset, start: int, plan: ModelPlan, batch_size: int
    ) -> Iterator[Forwarded]:
        """Each batch of `images` through the model, in dataset order, as the local engine
        yields them; indices count from `start`, like the manifest's."""
        context = ray.data.DataContext.get_current()  # this process's, for its plans
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        positions = np.arange(len(images), dtype=np.int64)
        batch_bytes = batch_size * 4 * int(np.prod(plan.input_size))
        rows = batch_size * max(1, min(BLOCK_IMAGES // batch_size, BLOCK_BYTES // batch_bytes))
        blocks = [
            pd.DataFrame({"position": positions[i : i + rows]}) for i in range(0, len(images), rows)
        ]
        dataset = (
            ray.data.from_pandas(blocks)
            .map_batches(
                decode_batch,
                batch_size=rows,
                batch_format="numpy",
                fn_kwargs={"images": ray.put(images), "input_size": plan.input_size},
                compute=ray.data.TaskPoolStrategy(size=self.settings.decode_workers),
                num_cpus=1,
                # A decode worker's footprint (Python, torch, OpenCV: ~0.5 GiB) and a block's
                # pixels, out and in the making.
                # Set, it also keeps decoding in its own tasks: Ray Data fuses a task op into
                # the next actor op when their resources match, and decode would then run
                # inside the model actors, one batch at a time.
                memory=DECODE_MEMORY + 2 * rows // batch_size * batch_bytes,
            )
            .map_batches(
                _Model,
                batch_size=rows,
                batch_format="numpy",
                fn_constructor_kwargs={
                    "model": self.model,
                    "plan": plan,
                    "threads": max(1, int(self.settings.cpus_per_worker)),
                    "batch_size": batch_size,
                },
                # Ray Data restarts an actor that dies and runs its batches again
                # (max_restarts and max_task_retries default to -1 for actor pools).
                compute=ray.data.ActorPoolStrategy(size=self.settings.workers),
                num_cpus=self.settings.cpus_per_worker,
                num_gpus=self.settings.gpus_per_worker,
            )
        )
        expected = 0
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            position = batch["position"]
            if not np.array_equal(position, np.arange(expected, expected + len(position))):
                raise RuntimeError(f"Ray returned rows out of order at image {start + expected}")
            expected += len(position)
            for lo in range(0, len(position), batch_size):  # the local batches, one by one
                part = slice(lo, lo + batch_size)
                index, ok = position[part] + start, batch["ok"][part]
                failures = [
                    (int(i), str(error), str(reason))
                    for i, error, reason, good in zip(
                        index, batch["error"][part], batch["reason"][part], ok, strict=True
                    )
                    if not good
                ]
                outputs = {
                    name: batch[EMBEDDING_PREFIX + name][part][ok] for name in plan.hooks.layers
                }
                yield Forwarded(index[ok].tolist(), failures, outputs)
        if expected != len(images):
            raise RuntimeError(f"Ray returned {expected} of {len(images)} images")


def decode_batch(
    batch: dict[str, np.ndarray], images: ray.ObjectRef, input_size: tuple[int, int, int]
) -> dict[str, np.ndarray]:
    """Read, decode and transform each row with the local engine's own ImageDataset (the same
    object, so the same pixels). An unreadable image is a row with ok=False, its error and its
    reason, and zeros for pixels."""
    single_threaded_opencv()  # a CPU reserved per task: the tasks are the parallelism
    dataset: ImageDataset = ray.get(images)  # fetched once per node, then shared in memory
    count = len(batch["position"])
    pixels = np.zeros((count, *input_size), np.float32)
    ok = np.zeros(count, bool)
    error, reason = np.full(count, "", object), np.full(count, "", object)
    for row, position in enumerate(batch["position"]):
        _, image, failure = dataset[int(position)]
        if failure is None:
            pixels[row], ok[row] = image.numpy(), True
        else:
            error[row], reason[row] = failure
    return {
        "position": batch["position"],
        "pixels": pixels,
        "ok": ok,
        "error": error,
        "reason": reason,
    }


class _Model:
    """A model actor: the model and its hooks built once, then one forward pass per batch of
    a block, pooled on the device, stopped early as locally, under autocast on CUDA."""

    def __init__(
        self, model: ray.ObjectRef, plan: ModelPlan, threads: int, batch_size: int
    ) -> None:
        # As many threads as CPUs reserved. On the CPU the bytes depend on it (a reduction split
        # over threads adds in another order): the local engine's equal those of a process
        # with the same count (OMP_NUM_THREADS=<engine.cpus_per_worker>).
        torch.set_num_threads(threads)
        keep_freed_memory()  # for the process's lifetime: it ends with the plan
        self.plan, self.batch_size = plan, batch_size
        self.device = torch.device(plan.placement.device)
        self.model = place_model(ray.get(model), self.device)
        # Entered for the actor's lifetime: its process ends with the plan.
        self.hooks = plan.hooks.on(self.model).__enter__()
        with computing(self.device, plan.placement.precision):
            self.hooks.describe(torch.zeros((1, *plan.input_size), device=self.device))

    def __call__(self, block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {key: block[key] for key in ("position", "ok", "error", "reason")}
        for name, info in self.hooks.info.items():
            out[EMBEDDING_PREFIX + name] = np.zeros((len(block["ok"]), info.dim), np.float32)
        # Blocks start at a multiple of batch_size: these are the local engine's batches.
        for lo in range(0, len(block["ok"]), self.batch_size):
            part = slice(lo, lo + self.batch_size)
            ok = block["ok"][part]
            if not ok.any():
                continue
            pixels = np.ascontiguousarray(block["pixels"][part][ok])
            images = model_input(torch.from_numpy(pixels), self.device)
            with computing(self.device, self.plan.placement.precision):
                pooled = self.hooks(images)
            for name, tensor in pooled.items():
                out[EMBEDDING_PREFIX + name][part][ok] = tensor.float().cpu().numpy()
        return out
