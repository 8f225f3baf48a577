"""The environment of a subprocess whose start-up patches a module (patched_start/)."""

from __future__ import annotations

import os
from pathlib import Path

PATCHED_START = Path(__file__).parent / "patched_start"


def patched_env(**settings: str) -> dict[str, str]:
    """PYTHONPATH with the patching sitecustomize first, and its settings (SLOW_STORE_S,
    LOW_MEMORY_BYTES: see patched_start/sitecustomize.py)."""
    path = os.pathsep.join(p for p in (str(PATCHED_START), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, **settings}
