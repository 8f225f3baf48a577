"""docs/notebook.ipynb, run as a reader runs it: in a Jupyter kernel (nbclient), top to bottom,
in a fresh folder, on the photos its first cell writes; what it shows is checked, and that no
cell printed a warning (tqdm's `IProgress not found` included: no ipywidgets here)."""

from __future__ import annotations

import ast
import os
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO

NOTEBOOK = REPO / "docs/notebook.ipynb"


def shown(notebook: nbformat.NotebookNode, tag: str) -> object:
    """The value the cell tagged `tag` shows (its last expression), as Python data."""
    cell = next(c for c in notebook.cells if tag in c.metadata.get("tags", []))
    results = [o for o in cell.outputs if o.output_type == "execute_result"]
    assert results, f"the cell tagged {tag!r} shows nothing"
    return ast.literal_eval(results[0].data["text/plain"])


def printed(notebook: nbformat.NotebookNode, name: str) -> str:
    return "".join(
        o.text
        for c in notebook.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "stream" and o.name == name
    )


@pytest.mark.slow
def test_the_notebook_runs_and_shows_what_it_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert NOTEBOOK.is_file()
    committed = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(committed)
    assert not any(c.get("outputs") for c in committed.cells if c.cell_type == "code")
    shutil.copy(NOTEBOOK, tmp_path / NOTEBOOK.name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's scratch folder: here
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # The kernel imports this tree's pipeline, wherever the environment's is installed from.
    paths = [str(REPO / "src"), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
    notebook = nbformat.read(tmp_path / NOTEBOOK.name, as_version=4)
    NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()  # a cell that raises fails here, with its traceback

    assert shown(notebook, "photos") == sorted(
        f"{n}.jpg" for n in ["astronaut", "camera", "chelsea", "coffee", "coins", "rocket"]
    )
    # The command's defaults: global_pool as it is, blocks.4's 112 channels in 4 x 4 cells.
    assert shown(notebook, "widths") == {"global_pool": (6, 1280), "blocks.4": (6, 16 * 112)}
    assert shown(notebook, "pools") == {"grid": (6, 16 * 80), "avg": (6, 80)}
    files = shown(notebook, "files")
    assert files["files"] == ["blocks.4.parquet", "failures.parquet", "global_pool.parquet"]
    assert files["calibration copies"] == [
        "blocks.4.parquet/_calibration",
        "global_pool.parquet/_calibration",
    ]
    assert shown(notebook, "module") == {"layer3": (4, 256), "avgpool": (4, 512)}
    assert shown(notebook, "hooks") == {
        "layer2": ((128, 28, 28), "grid", 4 * 128),
        "layer4": ((512, 7, 7), "grid", 4 * 512),
    }
    assert shown(notebook, "after") == {"rows": 4, "hooks left on the model": 0}
    assert "model kept" in printed(notebook, "stdout")
    errors = printed(notebook, "stderr")
    assert "Warning" not in errors and "IProgress" not in errors, errors
