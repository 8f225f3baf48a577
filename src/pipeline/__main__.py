"""python -m pipeline [overrides]: extract the configured layers' embeddings to Parquet."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline import extract, tracking
from pipeline.config import CONFIG_DIR, config_hash, user_errors


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    config = OmegaConf.to_object(cfg)
    with (
        user_errors(),
        tracking.tracked(
            config.tracking, "extract", cfg, {"config_hash": config_hash(config)}
        ) as run,
    ):
        tracking.log_extraction(run, extract.run(config))


if __name__ == "__main__":
    main()
