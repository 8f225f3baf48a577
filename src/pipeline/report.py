"""python -m pipeline.report [overrides]: which layer serves which purpose.

For every layer extracted for one model on one dataset (from a sweep or one multi-layer run):
the embedding dim, clustering NMI, near-duplicate F1 and linear-probe accuracy, in one table
(`report.md`, `report.parquet`) and one picture of each against layer depth (`report.png`).
Reads only the Parquet contract and the stages' JSON files; layers the stages have not seen yet
get them run now (`compute_missing`), extraction is never re-run.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import hydra
import matplotlib.pyplot as plt
import pandas as pd
from hydra import compose
from omegaconf import DictConfig, OmegaConf

from pipeline import cluster, dedup, plots, probe, tracking
from pipeline.config import CONFIG_DIR, ConfigError, ReportConfig
from pipeline.store import FAILURES_FILE, read_metadata

log = logging.getLogger(__name__)
# metric column -> (stage folder key, file, key in the file)
METRICS = {
    "cluster_nmi": ("cluster_dir", "metrics.json", "nmi"),
    "dedup_f1": ("dedup_dir", "metrics.json", "f1"),
    "probe_accuracy": ("probe_dir", "probe.json", "accuracy"),
}


def stage_config(name: str, overrides: list[str]) -> object:
    """A downstream stage's own config, composed (within this Hydra app) as its command line
    would compose it."""
    return OmegaConf.to_object(compose(name, overrides=overrides))


def run_missing(layer_file: Path, cfg: ReportConfig, layer_dir: dict[str, Path]) -> None:
    """Run cluster, dedup and probe on a layer that lacks their results, with their defaults."""
    shared = [
        f"embeddings={layer_file}",
        "tracking=none",
        f"images_root={cfg.images_root or 'null'}",
    ]
    truth = Path(cfg.images_root or "") / "manifest.csv"
    no_truth = [] if cfg.images_root and truth.is_file() else ["dedup.truth=null"]
    stages = {
        "cluster_dir": ("cluster", cluster.run, []),
        "dedup_dir": ("dedup", dedup.run, no_truth),  # without true groups: pairs, but no F1
        "probe_dir": ("probe", probe.run, []),
    }
    for key, (name, stage, own) in stages.items():
        if layer_dir[key].exists():
            continue
        log.info("%s has no %s results yet: running it", layer_file.stem, name)
        overrides = [*shared, *own, f"output_dir={layer_dir[key]}"]
        try:
            stage(stage_config(name, overrides), tracking.Run())
        except ConfigError as err:  # e.g. no labels to probe: leave that metric empty
            log.warning("%s on %s: %s", name, layer_file.stem, err)


def layer_table(cfg: ReportConfig) -> pd.DataFrame:
    folder = Path(cfg.embeddings_dir)
    files = sorted(p for p in folder.glob("*.parquet") if p.name != FAILURES_FILE)
    if not files:
        raise ConfigError(
            f"no layer embeddings in {folder}: run `python -m pipeline` (or a "
            "sweep over layers) for this model and dataset first"
        )
    rows = []
    for file in files:
        metadata = read_metadata(file)
        layer = metadata["layer"]
        layer_dir = {
            key: Path(getattr(cfg, key)) / layer
            for key in ("cluster_dir", "dedup_dir", "probe_dir")
        }
        if cfg.compute_missing:
            run_missing(file, cfg, layer_dir)
        row = {
            "layer": layer,
            "depth": metadata.get("depth", math.inf),
            "dim": metadata["dim"],
            "pool": metadata["pool"],
        }
        for column, (key, name, field) in METRICS.items():
            path = layer_dir[key] / name
            row[column] = json.loads(path.read_text()).get(field) if path.is_file() else None
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["depth", "layer"], kind="stable").reset_index(drop=True)


def markdown(table: pd.DataFrame, title: str) -> str:
    shown = table.drop(columns="depth")
    cells = [
        [("-" if pd.isna(v) else f"{v:.3f}" if isinstance(v, float) else str(v)) for v in row]
        for row in shown.itertuples(index=False)
    ]
    lines = [
        f"# {title}",
        "",
        "| " + " | ".join(shown.columns) + " |",
        "|" + "---|" * len(shown.columns),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def figure(table: pd.DataFrame, title: str) -> plots.Figure:
    """Each metric against layer depth, layers in model order."""
    columns = ["dim", *METRICS]
    fig, axes = plt.subplots(
        1, len(columns), figsize=(3.2 * len(columns), 3.4), layout="constrained"
    )
    for ax, column in zip(axes, columns, strict=True):
        values = pd.to_numeric(table[column], errors="coerce")
        ax.plot(range(len(table)), values, marker="o")
        ax.set_xticks(range(len(table)), table["layer"], rotation=45, ha="right", fontsize=7)
        ax.set_title(column)
        if column != "dim":
            ax.set_ylim(0, 1.05)
    fig.suptitle(title)
    return fig


def run(cfg: ReportConfig, run_log: tracking.Run) -> pd.DataFrame:
    table = layer_table(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = f"Layers of {Path(cfg.embeddings_dir).name} on {Path(cfg.embeddings_dir).parent.name}"
    table.to_parquet(out / "report.parquet", index=False)
    (out / "report.md").write_text(markdown(table, title))
    plots.save(figure(table, title), out / "report.png")
    for name in ("report.md", "report.parquet", "report.png"):
        run_log.log_artifact(out / name)
    log.info("%d layers -> %s\n%s", len(table), out, markdown(table, title))
    return table


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="report")
def main(cfg: DictConfig) -> None:
    tracking.run_stage(cfg, "report", run)


if __name__ == "__main__":
    main()
