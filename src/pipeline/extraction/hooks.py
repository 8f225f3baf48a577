"""Forward hooks on named layers: resolve names, capture and pool each layer's output during one
forward pass, stop the pass once the last hooked layer has run, and remove every handle on exit.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.config import Pool
from pipeline.errors import ConfigError
from pipeline.extraction.provenance import LayerInfo

LOGITS = "logits"  # the model's final output, not a module
GEM_EPS = 1e-6  # GeM raises activations to a power: negative ones are clamped to this


class StopForward(Exception):
    """Raised by the last hook so the rest of the forward pass is skipped."""


def resolve_layers(model: torch.nn.Module, requested: Sequence[str]) -> list[str]:
    """Expand globs and check every name; `*` matches one dotted part (`blocks.*` = blocks.0...).

    The result keeps the request's order, each glob expanded in model order, without repeats.
    """
    if not requested:
        raise ConfigError("layers is empty: name at least one, e.g. layers=[global_pool]")
    names = [name for name, _ in model.named_modules() if name]
    resolved: list[str] = []
    for pattern in requested:
        if pattern == LOGITS or pattern in names:
            matched = [pattern]
        elif any(c in pattern for c in "*?["):
            parts = pattern.split(".")
            matched = [
                n
                for n in names
                if len(n.split(".")) == len(parts)
                and all(map(fnmatch.fnmatchcase, n.split("."), parts))
            ]
        else:
            matched = []
        if not matched:
            close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.5)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise ConfigError(
                f"layer {pattern!r} matches no module of the model{hint} "
                "(python -m pipeline.layers lists them all)"
            )
        resolved += [m for m in matched if m not in resolved]
    return resolved


def select_output(output: Any, key: str | None, layer: str) -> torch.Tensor:
    """The tensor of a layer's output; tuples, lists and dicts need an explicit `output_key`."""
    if isinstance(output, torch.Tensor):
        return output
    if key is None:
        kind = type(output).__name__
        choices = list(output.keys()) if isinstance(output, dict) else list(range(len(output)))
        raise ConfigError(
            f"layer {layer!r} returns a {kind}, not a tensor: choose an element "
            f"with output_key=<one of {choices}>"
        )
    try:
        selected = output[int(key)] if isinstance(output, (tuple, list)) else output[key]
    except (KeyError, IndexError, ValueError, TypeError):
        raise ConfigError(
            f"layer {layer!r} output has no element {key!r}: fix output_key"
        ) from None
    if not isinstance(selected, torch.Tensor):
        raise ConfigError(
            f"layer {layer!r} output[{key!r}] is a {type(selected).__name__}, not a tensor"
        )
    return selected


def auto_pool(ndim: int, prefix_tokens: int) -> Pool:
    """avg for conv maps (N, C, H, W), cls or mean for tokens (N, T, D), as-is for vectors."""
    if ndim == 4:
        return Pool.avg
    if ndim == 3:
        return Pool.cls if prefix_tokens else Pool.mean
    return Pool.none if ndim == 2 else Pool.flatten


# Pool -> the output ranks it fits (with the batch dimension).
POOL_RANKS = {
    Pool.avg: {4},
    Pool.max: {4},
    Pool.gem: {4},
    Pool.grid: {3, 4},
    Pool.cls: {3},
    Pool.mean: {3},
}


def pool_output(
    x: torch.Tensor, pool: Pool, prefix_tokens: int = 0, gem_p: float = 3.0, grid: int = 2
) -> torch.Tensor:
    """One vector per image, computed where `x` lives (on the GPU, before any copy).

    gem: (mean of x^p over the map)^(1/p) per channel, the generalised mean that retrieval
    networks pool with (p=1 is avg, large p tends to max); activations below GEM_EPS are
    clamped, and it is computed in float32, where x^p cannot overflow.
    grid: the map (or a ViT's patch tokens, laid back on their square) averaged in
    grid x grid cells (fewer along a side the map is smaller than that), concatenated cell by
    cell in row-major order (grid^2 x C values), so that where things are in the image counts,
    as it does between a photo and its crops.
    """
    if pool is Pool.avg:
        return x.mean(dim=(2, 3))
    if pool is Pool.max:
        return x.amax(dim=(2, 3))
    if pool is Pool.gem:
        return x.float().clamp(min=GEM_EPS).pow(gem_p).mean(dim=(2, 3)).pow(1.0 / gem_p)
    if pool is Pool.grid:
        maps = x if x.ndim == 4 else token_map(x, prefix_tokens)
        cells = (min(grid, maps.shape[2]), min(grid, maps.shape[3]))
        return F.adaptive_avg_pool2d(maps, cells).permute(0, 2, 3, 1).flatten(1)
    if pool is Pool.cls:
        return x[:, 0]
    if pool is Pool.mean:  # over the patch tokens, as timm's avg pooling does for ViTs
        return x[:, prefix_tokens:].mean(dim=1)
    return x.flatten(1)


def token_map(tokens: torch.Tensor, prefix_tokens: int) -> torch.Tensor:
    """A ViT's patch tokens (N, T, D), class and register tokens left out, as a map
    (N, D, side, side); the patches must fill a square."""
    patches = tokens[:, prefix_tokens:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise ConfigError(
            f"pool=grid needs the patch tokens on a square, got {patches.shape[1]} after "
            f"{prefix_tokens} prefix tokens: use pool=mean or pool=cls"
        )
    return patches.unflatten(1, (side, side)).permute(0, 3, 1, 2)


def pool_params(pool: Pool, gem_p: float, grid: int) -> dict[str, float]:
    """The parameters a pooling used, as the Parquet metadata records them."""
    if pool is Pool.gem:
        return {"gem_p": gem_p}
    if pool is Pool.grid:
        return {"grid": grid}
    return {}


def rescaled(images: torch.Tensor, scale: float) -> torch.Tensor:
    """The batch resized by `scale` (antialiased when shrinking), for multi-scale descriptors."""
    if scale == 1:
        return images
    return F.interpolate(
        images, scale_factor=scale, mode="bilinear", antialias=scale < 1, align_corners=False
    )


@dataclass(frozen=True)
class HookPlan:
    """Which layers to capture and how to pool them: the config's part that `LayerHooks` takes,
    built once and put on a model wherever it runs (this process, a loader process, a Ray
    actor)."""

    layers: tuple[str, ...]
    pool: Pool | str = Pool.auto
    output_key: str | None = None
    gem_p: float = 3.0
    grid: int = 2
    scales: tuple[float, ...] = (1.0,)

    def on(self, model: torch.nn.Module) -> LayerHooks:
        return LayerHooks(
            model,
            self.layers,
            self.pool,
            self.output_key,
            gem_p=self.gem_p,
            grid=self.grid,
            scales=self.scales,
        )


class LayerHooks:
    """Capture the pooled outputs of named layers in one forward pass.

    with LayerHooks(model, ["layer2", "global_pool"], pool="auto") as hooks:
        hooks.describe(example)        # shapes, pooling and dims; checks the config fits
        outputs = hooks(images)        # {"layer2": (N, 512), "global_pool": (N, 2048)}

    Unless `logits` is requested, the forward pass stops as soon as every hooked layer has run.
    `pool` is a Pool or its name ("auto", "avg", ...); `gem_p` and `grid` are the parameters of
    pool=gem and pool=grid. With more than one of `scales`, the model runs once per scale on
    the resized batch and each layer's descriptor is the sum of its L2-normalised pooled
    outputs. The handles are removed on exit, also when the forward pass raised; any model
    works, timm's or not.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        layers: Sequence[str],
        pool: Pool | str = Pool.auto,
        output_key: str | None = None,
        *,
        gem_p: float = 3.0,
        grid: int = 2,
        scales: Sequence[float] = (1.0,),
    ) -> None:
        self.model = model
        self.layers = resolve_layers(model, [layers] if isinstance(layers, str) else layers)
        self.modules = {n: model.get_submodule(n) for n in self.layers if n != LOGITS}
        try:
            self.pool = Pool(pool)
        except ValueError:
            choices = ", ".join(p.value for p in Pool if p is not Pool.none)
            raise ConfigError(f"pool={pool!r} is not one of {choices}") from None
        if gem_p <= 0:
            raise ConfigError(f"gem_p must be positive, got {gem_p}")
        if grid < 1:
            raise ConfigError(f"pool_grid must be at least 1, got {grid}")
        if not scales or min(scales) <= 0:
            raise ConfigError(f"scales must be positive numbers, e.g. [1.0, 0.7], got {scales}")
        self.gem_p, self.grid, self.scales = gem_p, grid, tuple(scales)
        self.output_key = output_key
        self.prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
        self.stop_early = LOGITS not in self.layers
        self.info: dict[str, LayerInfo] = {}
        self._captured: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._compiled: Any = None
        self._batch_size = 0

    def __enter__(self) -> LayerHooks:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook_for(name)))
        return self

    def __exit__(self, *_: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._captured = {}
        self._compiled = None

    def compile(self, batch_size: int) -> None:
        """torch.compile the model for the passes that follow.

        The hooks run eagerly between the compiled graphs (a graph ends at each hooked layer),
        and the early stop ends the pass after the last one, as without compiling. Call it
        after `describe`, which runs the eager model with its probes. Passes are padded to
        `batch_size` images, so that one graph serves every batch, the short last one included.
        """
        self._compiled = torch.compile(self.model)
        self._batch_size = batch_size

    def _hook_for(self, name: str) -> Any:
        def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
            if name in self._captured:
                raise ConfigError(
                    f"layer {name!r} ran more than once in one forward pass "
                    "(a shared module): hook the modules that call it instead"
                )
            self._captured[name] = self._pooled(name, output)
            if self.stop_early and len(self._captured) == len(self.modules):
                raise StopForward

        # Under torch.compile the hook runs eagerly, between the graphs before and after it:
        # traced, the early stop's exception would make Dynamo give up on the whole forward
        # and run it eagerly, and the graph would hold the hooks of the moment it was traced.
        return torch.compiler.disable(hook)

    def _pooled(self, name: str, output: Any) -> torch.Tensor:
        tensor = select_output(output, self.output_key, name)
        info = self.info.get(name)
        pool = info.pool if info else self._pool_for(name, tensor)
        return pool_output(tensor, pool, self.prefix_tokens, self.gem_p, self.grid)

    def _pool_for(self, name: str, tensor: torch.Tensor) -> Pool:
        # A vector per image is already an embedding, whatever pooling the maps get.
        if self.pool is Pool.auto or tensor.ndim == 2:
            return auto_pool(tensor.ndim, self.prefix_tokens)
        if self.pool in POOL_RANKS and tensor.ndim not in POOL_RANKS[self.pool]:
            fitting = ["auto", "flatten"] + [
                p.value for p, r in POOL_RANKS.items() if tensor.ndim in r
            ]
            raise ConfigError(
                f"pool={self.pool.value} does not fit layer {name!r}, whose output has shape "
                f"{tuple(tensor.shape)}: use pool={' or '.join(fitting)}"
            )
        return self.pool

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pooled outputs, (N, dim) each, in the order the layers were requested."""
        if len(self.scales) == 1:
            return self._run(rescaled(images, self.scales[0]))[0]
        summed: dict[str, torch.Tensor] = {}
        for scale in self.scales:
            for name, pooled in self._run(rescaled(images, scale))[0].items():
                unit = F.normalize(pooled.float(), dim=1)
                summed[name] = summed[name] + unit if name in summed else unit
        return summed

    def _run(
        self, images: torch.Tensor, eager: bool = False
    ) -> tuple[dict[str, torch.Tensor], Any]:
        self._captured = {}
        model, count = self.model, len(images)
        if self._compiled is not None and not eager:
            # Zeros after the images, to the batch size. Every batch goes through the pad, a
            # copy, so that all are alike to Dynamo's guards (an inference tensor or not);
            # F.pad keeps channels_last.
            model = self._compiled
            pad = (0, 0) * (images.dim() - 1) + (0, max(0, self._batch_size - count))
            images = torch.nn.functional.pad(images, pad)
        try:
            output = model(images)
        except StopForward:
            output = None
        if LOGITS in self.layers:
            self._captured[LOGITS] = self._pooled(LOGITS, output)
        captured = {name: pooled[:count] for name, pooled in self._captured.items()}
        self._captured = {}
        silent = [n for n in self.layers if n not in captured]
        if silent:
            raise ConfigError(
                f"layers {silent} did not run in the forward pass: "
                "hook modules that forward() calls"
            )
        return {name: captured[name] for name in self.layers}, output

    def describe(self, example: torch.Tensor) -> dict[str, LayerInfo]:
        """Run one full pass on `example` to learn each layer's shape, pooling and dim (at scale
        1), and one pass per other scale to check that the model takes that size and the dims
        agree. It also checks what a stopped pass could not: that no hooked module runs twice.
        """
        self.info = {}
        shapes: dict[str, tuple[int, ...]] = {}
        stop_early, self.stop_early = self.stop_early, False
        probes = [
            module.register_forward_hook(_shape_recorder(name, self.output_key, shapes))
            for name, module in self.modules.items()
        ]
        try:
            outputs, final = self._run(example, eager=True)
        finally:
            self.stop_early = stop_early
            for probe in probes:
                probe.remove()
        if LOGITS in self.layers:
            shapes[LOGITS] = tuple(select_output(final, self.output_key, LOGITS).shape[1:])
        order = {name: i for i, (name, _) in enumerate(self.model.named_modules())}
        pools = {name: self._pool_for(name, _blank(shapes[name])) for name in self.layers}
        self.info = {
            name: LayerInfo(
                shapes[name],
                pools[name],
                outputs[name].shape[1],
                order.get(name, len(order)),
                pool_params(pools[name], self.gem_p, self.grid),
            )
            for name in self.layers
        }
        for scale in self.scales:
            self._check_scale(example, scale, {n: o.shape[1] for n, o in outputs.items()})
        return self.info

    def _check_scale(self, example: torch.Tensor, scale: float, dims: dict[str, int]) -> None:
        if scale == 1:
            return
        try:
            outputs = self._run(rescaled(example, scale))[0]
        except ConfigError:
            raise
        except (RuntimeError, AssertionError, ValueError) as err:
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(
                f"the model does not take images resized by scale {scale} ({message}): "
                "use scales=[1.0]"
            ) from None
        changed = [n for n, o in outputs.items() if o.shape[1] != dims[n]]
        if changed:
            raise ConfigError(
                f"layers {changed} give another dim at scale {scale} (pool={self.pool.value}): "
                "multi-scale descriptors need a pooling that does not depend on the map's size"
            )


def _shape_recorder(name: str, key: str | None, shapes: dict[str, tuple[int, ...]]) -> Any:
    def record(_module: torch.nn.Module, _args: Any, output: Any) -> None:
        shapes[name] = tuple(select_output(output, key, name).shape[1:])

    return record


def _blank(shape: tuple[int, ...]) -> torch.Tensor:
    """A stand-in with the rank of a batch of this shape, for checking a pooling fits."""
    return torch.empty((1, *shape), device="meta")


def list_layers(
    model: torch.nn.Module,
    example: torch.Tensor,
    pool: Pool = Pool.auto,
    gem_p: float = 3.0,
    grid: int = 2,
) -> Iterator[dict[str, Any]]:
    """Every module in model order, then `logits` (the model's output): type, output shape,
    dim pooled by `pool` (auto where it does not fit), bytes per image (as float32) and how
    often it runs in one forward pass."""
    outputs: dict[str, list[Any]] = {}

    def recorder(name: str) -> Any:
        def record(_module: torch.nn.Module, _args: Any, output: Any) -> None:
            outputs.setdefault(name, []).append(
                tuple(output.shape[1:])
                if isinstance(output, torch.Tensor)
                else type(output).__name__
            )

        return record

    modules = [(n, m) for n, m in model.named_modules() if n]
    handles = [m.register_forward_hook(recorder(n)) for n, m in modules]
    try:
        with torch.inference_mode():
            final = model(example)
    finally:
        for handle in handles:
            handle.remove()
    if isinstance(final, torch.Tensor):
        outputs[LOGITS] = [tuple(final.shape[1:])]
        modules.append((LOGITS, final))
    prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
    for name, module in modules:
        calls = outputs.get(name, [])
        shape = calls[0] if calls else None
        dim = None
        if isinstance(shape, tuple):
            blank = _blank(shape)
            fits = pool in POOL_RANKS and blank.ndim in POOL_RANKS[pool]
            chosen = pool if fits else auto_pool(blank.ndim, prefix_tokens)
            dim = pool_output(blank, chosen, prefix_tokens, gem_p, grid).shape[1]
        yield {
            "layer": name,
            "type": "model output" if name == LOGITS else type(module).__name__,
            "output": "x".join(map(str, shape)) if isinstance(shape, tuple) else shape or "-",
            "dim": dim,
            "bytes": 4 * dim if dim else None,
            "calls": len(calls),
        }
