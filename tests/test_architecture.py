"""The shape DESIGN.md promises, checked: stages import neither MLflow nor each other, and an
extraction writes each embedding byte once."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import extract, store

from conftest import REPO, TINY_MODEL, composed

PACKAGE = REPO / "src/pipeline"
STAGES = ["extract", "cluster", "dedup", "probe", "report", "visualize", "layers"]
FORBIDDEN = {"mlflow", "pipeline.tracking", "pipeline.app"}


def module_imports(path: Path) -> set[str]:
    """Modules a file imports anywhere but in its `if __name__ == "__main__":` block, which is
    the command's entry and may reach for the app layer."""
    tree = ast.parse(path.read_text())
    body = [
        n for n in tree.body if not (isinstance(n, ast.If) and "__name__" in ast.unparse(n.test))
    ]
    found: set[str] = set()
    for node in ast.walk(ast.Module(body=body, type_ignores=[])):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "pipeline":
                found |= {f"pipeline.{a.name}" for a in node.names}
    return found


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_imports_neither_mlflow_nor_another_stage(stage: str) -> None:
    imported = module_imports(PACKAGE / f"{stage}.py")
    others = {f"pipeline.{s}" for s in STAGES if s != stage}
    assert not imported & (FORBIDDEN | others), imported & (FORBIDDEN | others)
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
    before = _written_bytes()
    result = extract.run(cfg)
    written = _written_bytes() - before
    parts = [p for p in writes if p.suffix == ".parquet" and p.name.startswith("part-")]
    assert len(parts) == len(set(parts)) == 4 * 3  # 3 chunks x (3 layers + failures)
    published = sum(o.bytes for o in result.outputs.values())
    assert published > 200_000  # the embeddings are what is measured here
    assert published <= written < 1.1 * published, (written, published)
