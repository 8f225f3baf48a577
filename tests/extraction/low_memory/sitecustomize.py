"""Put on PYTHONPATH by a test: a process in which `available_memory` says LOW_MEMORY_BYTES,
as under a cgroup with that little room. Python imports `sitecustomize` at start-up; the
pipeline's module is patched only when the process imports it (not before `pipeline.app` has
set what torch must find when it loads), so everything else starts as usual."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType

TARGET = "pipeline.extraction.devices"


class LowMemory(importlib.abc.MetaPathFinder):
    """Finds TARGET with the usual finders and replaces its `available_memory` once loaded."""

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
            module.available_memory = lambda *_: int(os.environ["LOW_MEMORY_BYTES"])

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("LOW_MEMORY_BYTES"):
    sys.meta_path.insert(0, LowMemory())
