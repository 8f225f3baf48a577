"""The shape DESIGN.md promises, checked: imports go down the layers (no cycle, no upward or
sideways import), stages import no MLflow, and an extraction writes each embedding byte once."""

from __future__ import annotations

import ast
import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import extract
from pipeline.storage import contract as store

from conftest import N_PHOTOS, REPO, TINY_MODEL, composed

PACKAGE = REPO / "src/pipeline"
STAGES = ["extract", "cluster", "dedup", "probe", "report", "visualize", "explore", "layers"]
# Bottom to top: a module imports only from its own unit or from units of lower rank. Units of
# one rank are independent: images, storage and search know nothing of each other, and no
# command imports another.
UNITS: dict[str, tuple[int, list[str]]] = {
    "base": (
        0,
        [
            "pipeline.errors",
            "pipeline.config",
            "pipeline.results",
            "pipeline.plots",
            "pipeline.progress",
        ],
    ),
    "images": (1, ["pipeline.images"]),
    "storage": (1, ["pipeline.storage"]),
    "search": (1, ["pipeline.search"]),
    "extraction": (2, ["pipeline.extraction"]),
    "pictures": (2, ["pipeline.pictures"]),  # images drawn with matplotlib, read as extracted
    "projection": (2, ["pipeline.projection"]),  # the explorer's map and neighbours, kept
    "review": (3, ["pipeline.review"]),  # dedup's review page: pictures' pairs, no search
    **{stage: (4, [f"pipeline.{stage}"]) for stage in STAGES},
    "dedup": (4, ["pipeline.dedup", "pipeline.dedup_inputs"]),  # the stage, and what it reads
    "report": (4, ["pipeline.report", "pipeline.report_cka"]),  # the table, and the layers' CKA
    "entry": (
        5,
        [
            "pipeline",
            "pipeline.__main__",
            "pipeline.app",
            "pipeline.cli",
            "pipeline.api",
            "pipeline.tracking",
            "pipeline.tracking_runs",
            "pipeline.tracking_sweeps",
            "pipeline.tracking_calls",
        ],
    ),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def module_imports(path: Path, known: set[str] | None = None) -> set[str]:
    """Modules a file imports anywhere (functions and TYPE_CHECKING blocks too) but in its
    `if __name__ == "__main__":` block, which is the command's entry and may reach for the app
    layer. `from a import b` counts as importing `a.b` where that is a module, else `a`."""
    known = known if known is not None else set(modules())
    tree = ast.parse(path.read_text())
    body = [
        n for n in tree.body if not (isinstance(n, ast.If) and "__name__" in ast.unparse(n.test))
    ]
    found: set[str] = set()
    for node in ast.walk(ast.Module(body=body, type_ignores=[])):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            submodules = {f"{node.module}.{a.name}" for a in node.names} & known
            found |= submodules or {node.module}
    return found


def unit_of(module: str) -> str:
    """The unit a module belongs to: the one naming it or its closest package."""
    matches = [
        (len(prefix), unit)
        for unit, (_, prefixes) in UNITS.items()
        for prefix in prefixes
        if module == prefix or (module.startswith(prefix + ".") and prefix != "pipeline")
    ]
    assert matches, f"{module} is in no unit: place it in UNITS"
    return max(matches)[1]


def import_graph() -> dict[str, set[str]]:
    """pipeline's modules and the pipeline modules each imports."""
    found = modules()
    return {
        name: {m for m in module_imports(path, set(found)) if m in found}
        for name, path in found.items()
    }


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import against the units' order, and every cycle, in words."""
    wrong = []
    for source, targets in graph.items():
        here = unit_of(source)
        for target in sorted(targets):
            there = unit_of(target)
            if there != here and UNITS[there][0] >= UNITS[here][0]:
                wrong.append(f"{source} ({here}) imports {target} ({there})")
    wrong += [" -> ".join(cycle) for cycle in cycles(graph)]
    return wrong


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each module that is on one (depth-first, colouring)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_imports_go_down_the_layers_and_close_no_cycle() -> None:
    found = violations(import_graph())
    assert not found, "\n".join(found)


def test_the_layer_check_finds_an_upward_import_a_sibling_import_and_a_cycle() -> None:
    graph = import_graph()
    graph["pipeline.storage.ledger"] = graph["pipeline.storage.ledger"] | {"pipeline.extract"}
    graph["pipeline.search.vectors"] = graph["pipeline.search.vectors"] | {"pipeline.images.decode"}
    graph["pipeline.dedup"] = graph["pipeline.dedup"] | {"pipeline.cluster"}
    graph["pipeline.extraction.hooks"] |= {"pipeline.extraction.loop"}  # loop needs the hooks
    found = violations(graph)
    assert "pipeline.storage.ledger (storage) imports pipeline.extract (extract)" in found
    assert "pipeline.search.vectors (search) imports pipeline.images.decode (images)" in found
    assert "pipeline.dedup (dedup) imports pipeline.cluster (cluster)" in found
    assert any(
        " -> " in v and v.startswith("pipeline.extraction.") and v.endswith(v.split(" -> ")[0])
        for v in found
    ), found


def test_every_module_sits_in_a_unit() -> None:
    assert {name: unit_of(name) for name in modules()}


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_imports_neither_mlflow_nor_the_app(stage: str) -> None:
    imported = module_imports(PACKAGE / f"{stage}.py")
    assert not imported & {"pipeline.tracking", "pipeline.app"}
    assert not any(m.split(".")[0] == "mlflow" for m in imported)


def test_importing_every_stage_loads_no_mlflow() -> None:
    """The transitive check: a notebook that imports the stages never loads MLflow."""
    code = (
        "import sys\n"
        + "".join(f"import pipeline.{s}\n" for s in STAGES)
        + "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_importing_the_package_leaves_opencv_and_matplotlib_as_they_were() -> None:
    """A notebook keeps its own settings: importing the stages, the API and the images modules
    sets no OpenCV thread count and picks no matplotlib backend. A stage's figure picks Agg
    then, where nothing chose a backend, and keeps one that was chosen."""
    images = sorted(m for m in modules() if m.startswith("pipeline.images."))
    code = (
        "import cv2, matplotlib\n"
        "cv2.setNumThreads(3)\n"
        + "".join(f"import {m}\n" for m in [*(f"pipeline.{s}" for s in STAGES), *images])
        + "import pipeline.api\n"
        "print(cv2.getNumThreads(), matplotlib.get_backend(auto_select=False))\n"
        "from pipeline import plots\n"
        "plots.subplots()\n"
        "print(matplotlib.get_backend())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert done.stdout.lower().split() == ["3", "none", "agg"]
    chosen = "import matplotlib\nmatplotlib.use('svg')\nfrom pipeline import plots\n"
    chosen += "plots.subplots()\nprint(matplotlib.get_backend())\n"
    done = subprocess.run(
        [sys.executable, "-c", chosen], capture_output=True, text=True, check=True, env=env
    )
    assert done.stdout.strip() == "svg"


def test_test_files_share_builders_through_conftest_only() -> None:
    """The tests' own layout: under tests/ (no __init__.py) pytest imports each file by its
    name, so names are unique; a test file that imported another would run that file's module
    code and tie the two to one folder, so shared builders live in conftest."""
    files = sorted((REPO / "tests").rglob("test_*.py"))
    names = {path.stem for path in files}
    assert len(names) == len(files), "two test files of one name"
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported = [node.module]
            else:
                continue
            found += [f"{path.name} imports {m}" for m in imported if m.split(".")[0] in names]
    assert not found, found


def _written_bytes() -> int:
    """Bytes this process has passed to write() so far (Linux)."""
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(io["wchar"])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux's /proc/self/io")
def test_each_embedding_byte_is_written_once(
    tmp_path: Path, photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 3-layer run over several chunks: every part file is written once, and all the bytes
    the process writes add up to what is published (no merge, no second copy)."""
    cfg = composed(
        *TINY_MODEL,
        "dataset=folder",
        f"dataset.root={photos}",
        "layers=[blocks.1,blocks.2,global_pool]",
        "pool=flatten",  # large rows, so that embeddings dominate what is written
        "model.input_size=[3,64,64]",
        "batch_size=2",
        "save_every=2",
        "num_workers=0",
        "calibration.images=0",  # the copies are dedup's business; this counts the layers
        f"output_dir={tmp_path / 'out'}",
    )
    writes: list[Path] = []
    real = store.write_bytes

    def counting(path: Path, data: bytes) -> None:
        writes.append(path)
        real(path, data)

    monkeypatch.setattr(store, "write_bytes", counting)
    # extract.run imports the model side where it needs it, and a first `import torch` writes
    # some 46 KB of its own: loaded first, so that only the run's writes are counted.
    importlib.import_module("pipeline.extraction.engines.local")
    importlib.import_module("pipeline.extraction.models")
    before = _written_bytes()
    result = extract.run(cfg)
    written = _written_bytes() - before
    parts = [p for p in writes if p.suffix == ".parquet" and p.name.startswith("part-")]
    chunks = math.ceil(N_PHOTOS / 2)  # save_every=2 images
    assert len(parts) == len(set(parts)) == chunks * 4  # a part per chunk of 3 layers + failures
    published = sum(o.bytes for o in result.outputs.values())
    assert published > 200_000  # the embeddings are what is measured here
    assert published <= written < 1.1 * published, (written, published)
