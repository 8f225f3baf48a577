"""python -m pipeline.layers [overrides]: which layers a model has, with their output shapes,
dims as `pool` pools them and bytes per image, to choose `layers=[...]` from. Builds the model
without downloading weights: shapes do not depend on them."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.results import StageResult


def layer_table(cfg: PipelineConfig) -> list[dict]:
    # torch and timm only now: this module runs as `python -m pipeline.layers`, and its --help
    # and config errors need neither.
    import torch

    from pipeline.extraction.hooks import list_layers
    from pipeline.extraction.models import build_model
    from pipeline.images.preprocess import resolve_preprocess

    cfg.model.pretrained, cfg.model.checkpoint = False, None
    model = build_model(cfg.model)
    size = resolve_preprocess(model, cfg.model.input_size).input_size
    return list(list_layers(model, torch.zeros((1, *size)), cfg.pool, cfg.gem_p, cfg.pool_grid))


def format_table(rows: list[dict]) -> str:
    header = {
        "layer": "layer",
        "type": "type",
        "output": "output",
        "dim": "dim",
        "bytes": "bytes/image",
        "calls": "calls",
    }
    cells = [header] + [{k: "-" if v is None else str(v) for k, v in row.items()} for row in rows]
    widths = {k: max(len(c[k]) for c in cells) for k in header}
    return "\n".join("  ".join(c[k].ljust(widths[k]) for k in header).rstrip() for c in cells)


def run(cfg: PipelineConfig) -> StageResult:
    """Print the table; nothing is written."""
    print(format_table(layer_table(cfg)))
    return StageResult(output_dir=Path("."))


if __name__ == "__main__":
    from pipeline.app import main

    main("layers", run, track=False)
