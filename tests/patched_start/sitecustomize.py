"""Put on PYTHONPATH by a test (`patched_env`): a process with a module patched as it is first
imported, as the environment asks, everything else starting as usual. Python imports
`sitecustomize` at start-up; a module is patched only when the process imports it.

- SLOW_STORE_S: a new MLflow SQLite store takes that many seconds longer to create its tables,
  as on a loaded machine (11.6 s measured at load 9 on 2 cores).
- LOW_MEMORY_BYTES: `available_memory` says that much, as under a cgroup with that little room
  (patched on import, not before `pipeline.app` has set what torch must find when it loads).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import time
from collections.abc import Callable, Sequence
from types import ModuleType


class PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds `target` with the usual finders and calls `patch` on the module once loaded."""

    def __init__(self, target: str, patch: Callable[[ModuleType], None]) -> None:
        self.target, self.patch = target, patch

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name != self.target:
            return None
        sys.meta_path.remove(self)  # once is enough, and the usual finders do the finding
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            load(module)
            self.patch(module)

        spec.loader.exec_module = exec_module
        return spec


def slow_tables(module: ModuleType) -> None:
    """`_initialize_tables` (run once, on a store without tables) sleeps first."""
    make = module._initialize_tables

    def slowly(engine: object) -> None:
        time.sleep(float(os.environ["SLOW_STORE_S"]))
        make(engine)

    module._initialize_tables = slowly


def low_memory(module: ModuleType) -> None:
    module.available_memory = lambda *_: int(os.environ["LOW_MEMORY_BYTES"])


if os.environ.get("SLOW_STORE_S"):
    sys.meta_path.insert(0, PatchOnImport("mlflow.store.db.utils", slow_tables))
if os.environ.get("LOW_MEMORY_BYTES"):
    sys.meta_path.insert(0, PatchOnImport("pipeline.extraction.devices", low_memory))
