"""How tracking calls its store without holding up the user's run; no MLflow here (tracking.py
and the two modules beneath it, tracking_runs.py and tracking_sweeps.py, import it).

A call to a server gets a deadline (`within`): one that does not answer in time goes on in a
daemon thread, and if it answers after all, what it made is undone in the background
(`in_background`); the command waits for those threads at exit, for a bounded time
(`wait_for_late_calls`). A new local SQLite store is opened by one process at a time
(`local_store_made_once`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from pipeline.storage.staging import Lock

log = logging.getLogger(__name__)

# Calls still running past their deadline, and the undoing of what they did: waited for at exit.
_late: list[threading.Thread] = []


def within(
    seconds: float | None,
    call: Callable[..., Any],
    *args: Any,
    late: Callable[[Any], None] | None = None,
    **kwargs: Any,
) -> Any:
    """`call(...)`, or TimeoutError after `seconds` (None: as long as it takes). A store that
    never answers (a dead server) must not hold the user's run, so the call goes on in a daemon
    thread; if it answers after all, `late` gets its value there, to undo what it made."""
    if seconds is None:
        return call(*args, **kwargs)
    answer: Future = Future()

    def target() -> None:
        try:
            answer.set_result(call(*args, **kwargs))
        except BaseException as err:  # handed to the caller's thread
            answer.set_exception(err)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if answer.done():
        return answer.result()
    _late.append(thread)
    if late is not None:

        def undo(done: Future) -> None:  # in the call's thread, or in this one if it just ended
            if done.exception() is None:
                in_background(lambda: late(done.result()))

        answer.add_done_callback(undo)
    raise TimeoutError(f"no answer within {seconds:g} s")


def in_background(call: Callable[[], None]) -> None:
    """`call()` in a daemon thread the command waits for at exit (a server may be slow)."""
    thread = threading.Thread(target=call, daemon=True)
    _late.append(thread)
    thread.start()


def wait_for_late_calls(seconds: float) -> None:
    """Wait, at most `seconds` in all, for the late calls and the undoing of what they made: a
    late call may still create a run, or an undoing still end one, and without this wait the run
    stays RUNNING forever."""
    if not any(t.is_alive() for t in _late):
        return
    log.warning(
        "waiting up to %.0f s for the tracking server's late answers, to end the runs they made",
        seconds,
    )
    until = time.monotonic() + seconds
    for thread in _late:
        thread.join(max(0.0, until - time.monotonic()))


@contextlib.contextmanager
def local_store_made_once(uri: str) -> Iterator[None]:
    """Held while a local SQLite store is first opened (MLflow creates and migrates its tables
    then) and its experiment looked up or created: two commands started at once in a new
    folder both made the tables, and one failed ("table runs already exists"). A lock file
    beside the database; a no-op for other stores."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock = Lock(Path(uri.removeprefix("sqlite:///") + ".lock"))
    if not lock.acquire(wait=False):  # said, so that a long wait is not a silent hang
        log.info("waiting for another command (%s) to open the tracking store", lock.holder())
        lock.acquire(wait=True)
    try:
        yield
    finally:
        lock.release()
