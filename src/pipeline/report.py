"""python -m pipeline.report [overrides]: which layer serves which purpose.

For every layer extracted for one model on one dataset (from a sweep or one multi-layer run,
sweeps over pooling in their sub-folders): the pooling, the embedding dim, clustering NMI,
near-duplicate average precision and F1 (against the true groups when known, else on the
calibration copies: `dedup_on`) and linear-probe accuracy, in one table (`report.md`,
`report.parquet`) and one picture of each against layer depth (`report.png`).
It reads the layers' Parquet metadata and the stages' JSON files. A result that is not there
yet is named in the report with the command that makes it; DVC (`dvc repro`) is the one
orchestrator that runs stages. What it computes itself is how alike the layers are
(`report_cka`): debiased linear CKA between every two of them, and those of the other models
extracted for the dataset, on a seeded sample of the images they share (`cka.csv`, `cka.png`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError
from pipeline.progress import step, tick
from pipeline.report_cka import cka_figure, cka_table, label
from pipeline.results import HEADLINE, StageResult

# pandas, pyarrow and matplotlib are imported where they are used: this module runs as
# `python -m pipeline.report`, and its --help and config errors need none of them.
if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)
# metric column -> (stage folder key, file, keys in the file: the first one there is shown)
METRICS = {
    "cluster_nmi": ("cluster_dir", "metrics.json", HEADLINE["cluster_nmi"]),
    "dedup_ap": ("dedup_dir", "metrics.json", HEADLINE["dedup_ap"]),
    "dedup_f1": ("dedup_dir", "metrics.json", HEADLINE["dedup_f1"]),
    "probe_accuracy": ("probe_dir", "probe.json", HEADLINE["probe_accuracy"]),
}


# metric column -> the stage that makes it
STAGES = {
    "cluster_nmi": "cluster",
    "dedup_ap": "dedup",
    "dedup_f1": "dedup",
    "probe_accuracy": "probe",
}


def pooling(metadata: dict) -> str:
    """How a layer was pooled, as the table shows it: `grid 4`, `gem p=3`, `avg x2 scales`."""
    params = " ".join(
        f"{'p=' if key == 'gem_p' else ''}{value:g}"
        for key, value in metadata.get("pool_params", {}).items()
    )
    scales = metadata.get("scales", [1.0])
    text = f"{metadata.get('pool', '-')} {params}".strip()
    return text + (f" @ {','.join(f'{s:g}' for s in scales)}" if len(scales) > 1 else "")


def extracted_layers(folder: Path) -> list[Path]:
    """`storage.contract.layer_folders`, or a ConfigError when there are none."""
    from pipeline.storage.contract import layer_folders

    files = layer_folders(folder)
    if not files:
        raise ConfigError(
            f"no layer embeddings in {folder}: run `python -m pipeline` (or a "
            "sweep over layers) for this model and dataset first"
        )
    return files


def layer_table(cfg: PipelineConfig) -> tuple[pd.DataFrame, list[str]]:
    """One row per extracted layer, and the commands that would fill its missing cells."""
    import pandas as pd

    from pipeline.storage.contract import read_metadata

    folder = Path(cfg.output_dir)
    files = extracted_layers(folder)
    rows, missing = [], []
    dirs = {
        "cluster_dir": cfg.report.cluster_dir,
        "dedup_dir": cfg.report.dedup_dir,
        "probe_dir": cfg.report.probe_dir,
    }
    for file in tick(files, "layers", unit="layer"):
        metadata = read_metadata(file)
        relative = file.relative_to(folder).with_suffix("")  # where each stage put its results
        row = {
            "layer": metadata.get("layer", file.stem),  # a layer written elsewhere: its name
            "folder": relative.parent.as_posix() if relative.parent != Path() else "-",
            "depth": metadata.get("depth", math.inf),
            "dim": metadata.get("dim"),
            "pool": pooling(metadata),
        }
        for column, (key, name, fields) in METRICS.items():
            path = Path(dirs[key]) / relative / name
            found = json.loads(path.read_text()) if path.is_file() else {}
            row[column] = next((found[f] for f in fields if f in found), None)
            command = f"python -m pipeline.{STAGES[column]} embeddings={file}"
            if not path.is_file() and command not in missing:
                missing.append(command)
            if column == "dedup_ap":
                row["dedup_on"] = (
                    "truth" if "ap" in found else "copies" if "calibration_ap" in found else "-"
                )
        rows.append(row)
    table = pd.DataFrame(rows).sort_values(["depth", "layer", "folder"], kind="stable")
    return table.reset_index(drop=True), missing


def markdown(table: pd.DataFrame, title: str) -> str:
    import pandas as pd

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
    "dedup_ap": "near-duplicate average precision",
    "dedup_f1": "near-duplicate pair F1",
    "probe_accuracy": "linear probe accuracy",
}


def figure(table: pd.DataFrame, title: str, note: str) -> Figure:
    """Each metric against layer depth, layers in model order; `note` says how the metrics
    were measured."""
    import pandas as pd

    from pipeline import plots

    columns = ["dim", *METRICS]
    fig, axes = plots.subplots(
        1, len(columns), figsize=(3.2 * len(columns), 3.4), layout="constrained"
    )
    names = [
        label(layer, folder) for layer, folder in zip(table["layer"], table["folder"], strict=True)
    ]
    for ax, column in zip(axes, columns, strict=True):
        values = pd.to_numeric(table[column], errors="coerce")
        ax.plot(range(len(table)), values, marker="o")
        ax.set_xticks(range(len(table)), names, rotation=45, ha="right", fontsize=7)
        ax.set_title(column)
        ax.set(xlabel="layer (model order)", ylabel=LABELS[column])
        if column != "dim":
            ax.set_ylim(0, 1.05)
    fig.suptitle(title)
    fig.supxlabel(note, fontsize=8)
    return fig


def check(cfg: PipelineConfig) -> None:
    """What can be refused before anything is read (the command runs it before tracking)."""
    extracted_layers(Path(cfg.output_dir))


def run(cfg: PipelineConfig) -> StageResult:
    from pipeline import plots

    with step(f"reading the layers under {cfg.output_dir} and their results"):
        table, missing = layer_table(cfg)
    similar = cka_table(cfg) if cfg.report.cka_sample else None
    out = Path(cfg.report.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = f"Layers of {cfg.extraction_name}"
    text = markdown(table, title)
    if missing:
        text += "\nNot computed yet (run these, or `dvc repro`):\n\n" + "".join(
            f"    {command}\n" for command in missing
        )
    names = ["report.md", "report.parquet", "report.png"]
    with step(f"writing {out}"):
        table.to_parquet(out / "report.parquet", index=False)
        (out / "report.md").write_text(text)
        plots.save(figure(table, title, measured_how(cfg, table)), out / "report.png")
        if similar is not None:
            similar.to_csv(out / "cka.csv", index=False)
            title = f"Debiased linear CKA, {cfg.extraction_name}"
            plots.save(cka_figure(similar, title), out / "cka.png")
            names += ["cka.csv", "cka.png"]
    summary = f"{len(table)} layers -> {out}" + (
        f" ({len(missing)} results missing)" if missing else ""
    )
    if similar is not None:
        compared = similar[["model_a", "layer_a"]].drop_duplicates()
        models = compared["model_a"].nunique()
        of = f" of {models} models" if models > 1 else ""
        summary += f"; CKA of {len(compared)} layers{of} on {similar['n'].iat[0]} images"
    log.info("%s\n%s", summary, text)
    return StageResult(output_dir=out, artifacts=[out / name for name in names], summary=summary)


def measured_how(cfg: PipelineConfig, table: pd.DataFrame) -> str:
    """How each metric was measured, for the picture's axis labels."""
    on = set(table["dedup_on"]) - {"-"}
    truth = "the true groups" if on == {"truth"} else "calibration copies where no truth"
    return (
        f"dedup AP, and F1 at each layer's threshold, against {truth}; "
        f"probe: {cfg.probe.folds}-fold CV (held out beyond {cfg.probe.sample} images)"
    )


if __name__ == "__main__":
    from pipeline.app import main

    main("report", run, check=check)
