"""python -m pipeline.report [overrides]: which layer serves which purpose.

For every layer extracted for one model on one dataset (from a sweep or one multi-layer run):
the embedding dim, clustering NMI, near-duplicate F1 and linear-probe accuracy, in one table
(`report.md`, `report.parquet`) and one picture of each against layer depth (`report.png`).
It only reads: the layers' Parquet metadata and the stages' JSON files. A result that is not
there yet is named in the report with the command that makes it; DVC (`dvc repro`) is the one
orchestrator that runs stages.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from pipeline import plots
from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError
from pipeline.results import StageResult
from pipeline.store import read_metadata

log = logging.getLogger(__name__)
# metric column -> (stage folder key, file, key in the file)
METRICS = {
    "cluster_nmi": ("cluster_dir", "metrics.json", "nmi"),
    "dedup_f1": ("dedup_dir", "metrics.json", "f1"),
    "probe_accuracy": ("probe_dir", "probe.json", "accuracy"),
}


# metric column -> the stage that makes it
STAGES = {"cluster_nmi": "cluster", "dedup_f1": "dedup", "probe_accuracy": "probe"}


def layer_table(cfg: PipelineConfig) -> tuple[pd.DataFrame, list[str]]:
    """One row per extracted layer, and the commands that would fill its missing cells."""
    folder = Path(cfg.output_dir)
    files = sorted(p for p in folder.glob("*.parquet") if p.is_dir())
    if not files:
        raise ConfigError(
            f"no layer embeddings in {folder}: run `python -m pipeline` (or a "
            "sweep over layers) for this model and dataset first"
        )
    rows, missing = [], []
    dirs = {
        "cluster_dir": cfg.report.cluster_dir,
        "dedup_dir": cfg.report.dedup_dir,
        "probe_dir": cfg.report.probe_dir,
    }
    for file in files:
        metadata = read_metadata(file)
        layer = metadata["layer"]
        row = {
            "layer": layer,
            "depth": metadata.get("depth", math.inf),
            "dim": metadata["dim"],
            "pool": metadata["pool"],
        }
        for column, (key, name, field) in METRICS.items():
            path = Path(dirs[key]) / layer / name
            row[column] = json.loads(path.read_text()).get(field) if path.is_file() else None
            if not path.is_file():
                missing.append(f"python -m pipeline.{STAGES[column]} embeddings={file}")
        rows.append(row)
    table = pd.DataFrame(rows).sort_values(["depth", "layer"], kind="stable")
    return table.reset_index(drop=True), missing


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


LABELS = {
    "dim": "embedding dim",
    "cluster_nmi": "k-means NMI vs labels",
    "dedup_f1": "near-duplicate pair F1",
    "probe_accuracy": "linear probe accuracy",
}


def figure(table: pd.DataFrame, title: str, note: str) -> plots.Figure:
    """Each metric against layer depth, layers in model order; `note` says how the metrics
    were measured."""
    columns = ["dim", *METRICS]
    fig, axes = plt.subplots(
        1, len(columns), figsize=(3.2 * len(columns), 3.4), layout="constrained"
    )
    for ax, column in zip(axes, columns, strict=True):
        values = pd.to_numeric(table[column], errors="coerce")
        ax.plot(range(len(table)), values, marker="o")
        ax.set_xticks(range(len(table)), table["layer"], rotation=45, ha="right", fontsize=7)
        ax.set_title(column)
        ax.set(xlabel="layer (model order)", ylabel=LABELS[column])
        if column != "dim":
            ax.set_ylim(0, 1.05)
    fig.suptitle(title)
    fig.supxlabel(note, fontsize=8)
    return fig


def run(cfg: PipelineConfig) -> StageResult:
    table, missing = layer_table(cfg)
    out = Path(cfg.report.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = f"Layers of {cfg.extraction_name}"
    text = markdown(table, title)
    if missing:
        text += "\nNot computed yet (run these, or `dvc repro`):\n\n" + "".join(
            f"    {command}\n" for command in missing
        )
    table.to_parquet(out / "report.parquet", index=False)
    (out / "report.md").write_text(text)
    plots.save(figure(table, title, thresholds(cfg, table)), out / "report.png")
    summary = f"{len(table)} layers -> {out}" + (
        f" ({len(missing)} results missing)" if missing else ""
    )
    log.info("%s\n%s", summary, text)
    return StageResult(
        output_dir=out,
        artifacts=[out / name for name in ("report.md", "report.parquet", "report.png")],
        summary=summary,
    )


def thresholds(cfg: PipelineConfig, table: pd.DataFrame) -> str:
    """How each metric was measured, for the picture's axis labels."""
    dedup = {
        json.loads(p.read_text()).get("threshold")
        for layer in table["layer"]
        if (p := Path(cfg.report.dedup_dir) / layer / "metrics.json").is_file()
    }
    at = ", ".join(str(t) for t in sorted(t for t in dedup if t is not None)) or "?"
    return f"dedup F1 at cosine similarity >= {at}; probe: {cfg.probe.folds}-fold CV"


if __name__ == "__main__":
    from pipeline.app import main

    main("report", run)
