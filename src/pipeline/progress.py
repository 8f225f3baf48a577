"""How a stage shows that it is moving: each long step logged as it starts and as it ends, with
its seconds (`step`), and a progress bar on stderr, with a rate and an estimate, over each loop
that knows its total (`bar`, `tick`: rows read, rows searched, folds fitted, files hashed).

While a step runs and no bar has been redrawn for HEARTBEAT_S (a library call that reports
nothing, such as a k-means fit, or a bar whose items are slow), the log says it is still running,
every HEARTBEAT_S. Bars are tqdm's (`tqdm.std`, as extraction's), and tqdm's own settings in the
environment (read as each bar starts) win over the defaults here: TQDM_DISABLE=1 shows none,
TQDM_DELAY=0 shows every bar even of a loop that takes no time, TQDM_MININTERVAL sets how often
one is redrawn. Without them a bar shows once its loop has run DELAY_S (a short step prints only
its two log lines) and is redrawn at most every MININTERVAL_S.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from tqdm.std import tqdm

log = logging.getLogger(__name__)
T = TypeVar("T")

DELAY_S = 2.0
MININTERVAL_S = 1.0
HEARTBEAT_S = 30.0


def bar(desc: str, total: float | None = None, unit: str = "it", **options: Any) -> tqdm:
    """A progress bar on stderr for a loop of `total` `unit`s, updated by the caller (thread
    safe: a pool's threads may update it). Large counts are shown as 20.0k, 1.00M."""
    return _Bar(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit == "B" or (total or 0) >= 10_000,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=_setting("mininterval", MININTERVAL_S, float),
        delay=_setting("delay", DELAY_S, float),
        disable=_setting("disable", False, bool),  # tqdm's reading: any text but "" is true
        **options,
    )


class _Bar(tqdm):
    """tqdm whose count is added to under a lock: the threads of a pool update one bar."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._counting = threading.Lock()
        super().__init__(*args, **kwargs)

    def update(self, n: float | None = 1) -> bool | None:
        with self._counting:
            return super().update(n)


def _setting(name: str, default: T, cast: Callable[[str], T]) -> T:
    """tqdm's setting `name` from the environment (TQDM_<NAME>), read now: tqdm itself reads
    them once, when it is imported."""
    value = os.environ.get(f"TQDM_{name.upper()}")
    return default if value is None else cast(value)


def tick(
    items: Iterable[T],
    desc: str,
    total: float | None = None,
    unit: str = "it",
    size: Callable[[T], float] | None = None,
) -> Iterator[T]:
    """`items`, counted on a bar as each one is done (when the next is asked for): one each,
    or `size(item)` (the rows of a record batch)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with bar(desc, total, unit) as progress:
        for item in items:
            yield item
            progress.update(size(item) if size else 1)


@contextlib.contextmanager
def step(what: str, total: float | None = None, unit: str = "it") -> Iterator[tqdm | None]:
    """Log `what` as it starts and, with its seconds, as it ends (nothing more if it fails:
    the error says that); while it runs, a line every HEARTBEAT_S in which no bar moved. With a
    `total`, a bar of `unit`s for the caller to update is handed over."""
    log.info("%s ...", what)
    start = time.perf_counter()
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(HEARTBEAT_S):
            if not _a_bar_moved(HEARTBEAT_S):
                log.info("%s: still running, %s so far", what, _seconds(start))

    beating = threading.Thread(target=heartbeat, name=f"progress: {what}", daemon=True)
    beating.start()
    try:
        with bar(what, total, unit) if total is not None else contextlib.nullcontext() as shown:
            yield shown
    finally:
        done.set()
        beating.join()
    log.info("%s: done in %s", what, _seconds(start))


class Folds:
    """A scikit-learn splitter (`StratifiedKFold(...)`) whose folds are counted on a bar as a
    cross-validation fits them: pass it as `cv`."""

    def __init__(self, splitter: Any, desc: str = "folds") -> None:
        self.splitter = splitter
        self.desc = desc

    def get_n_splits(self, *args: Any, **kwargs: Any) -> int:
        return self.splitter.get_n_splits(*args, **kwargs)

    def split(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        total = self.get_n_splits(*args, **kwargs)
        yield from tick(self.splitter.split(*args, **kwargs), self.desc, total, "fold")


def _a_bar_moved(seconds: float) -> bool:
    """Whether a bar open now was drawn within the last `seconds`."""
    now = time.time()  # tqdm's clock
    with _Bar.get_lock():  # the lock under which tqdm adds and removes its open bars
        bars = list(getattr(_Bar, "_instances", ()))
    return any(now - getattr(b, "last_print_t", 0) < seconds and not b.disable for b in bars)


def _seconds(start: float) -> str:
    seconds = time.perf_counter() - start
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"
