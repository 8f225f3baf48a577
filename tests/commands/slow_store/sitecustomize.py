"""Put on PYTHONPATH by a test: a process that makes a new MLflow SQLite store takes
SLOW_STORE_S seconds longer to create its tables, as on a loaded machine (11.6 s measured at
load 9 on 2 cores). Python imports `sitecustomize` at start-up; MLflow is patched only when a
process imports it, so everything else starts as usual."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import time
from collections.abc import Sequence
from types import ModuleType

TARGET = "mlflow.store.db.utils"  # its _initialize_tables runs once, on a store without tables


class SlowTables(importlib.abc.MetaPathFinder):
    """Finds TARGET with the usual finders and wraps its `_initialize_tables` once loaded."""

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # once is enough, and the usual finders do the finding
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            load(module)
            make = module._initialize_tables

            def slowly(engine: object) -> None:
                time.sleep(float(os.environ["SLOW_STORE_S"]))
                make(engine)

            module._initialize_tables = slowly

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("SLOW_STORE_S"):
    sys.meta_path.insert(0, SlowTables())
