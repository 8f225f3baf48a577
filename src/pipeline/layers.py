"""python -m pipeline.layers [overrides]: which layers a model has, with their output shapes,
pooled dims and bytes per image, to choose `layers=[...]` from. Builds the model without
downloading weights: shapes do not depend on them."""

from __future__ import annotations

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.config import CONFIG_DIR, ExtractConfig, user_errors
from pipeline.data import resolve_preprocess
from pipeline.hooks import list_layers
from pipeline.models import build_model


def layer_table(cfg: ExtractConfig) -> list[dict]:
    cfg.model.pretrained, cfg.model.checkpoint = False, None
    model = build_model(cfg.model)
    size = resolve_preprocess(model, cfg.model.input_size).input_size
    return list(list_layers(model, torch.zeros((1, *size))))


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


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    with user_errors():
        print(format_table(layer_table(OmegaConf.to_object(cfg))))


if __name__ == "__main__":
    main()
