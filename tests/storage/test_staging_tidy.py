"""The staging folder goes when its last run leaves it with nothing worth keeping, and its locks
stay right while runs come and go: a run that arrives while another removes the folder waits
and makes it afresh, never holding a lock on a file that was removed."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

from pipeline.errors import OutputBusy
from pipeline.storage.staging import RUNS_LOCK, Lock, Staging, staging_root

ROUNDS = 25


def _writer(out: str, key: str, inside: str, rounds: int, queue: multiprocessing.Queue) -> None:
    """Runs writing the layer `pool` of `out` until `rounds` of them got in, each to its end
    (its work cleared), a refused one trying again at once: how many were refused, and how
    many found another run inside with them."""
    entered = refused = overlaps = 0
    deadline = time.monotonic() + 120
    while entered < rounds and time.monotonic() < deadline:
        try:
            with Staging(Path(out), key, ["pool"]) as run:
                try:
                    os.close(os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    overlaps += 1
                    continue
                entered += 1
                time.sleep(0.001)
                os.unlink(inside)
                run.clear()
        except OutputBusy:
            refused += 1
            time.sleep(0.001)
    queue.put((entered, refused, overlaps))


def test_runs_coming_and_going_exclude_each_other_and_leave_no_staging(tmp_path: Path) -> None:
    out, inside = tmp_path / "out", tmp_path / "inside"
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    writers = [
        context.Process(target=_writer, args=(str(out), f"config{i}", str(inside), ROUNDS, queue))
        for i in range(4)
    ]
    for writer in writers:
        writer.start()
    results = [queue.get(timeout=180) for _ in writers]
    for writer in writers:
        writer.join(timeout=60)
    assert sum(overlaps for _, _, overlaps in results) == 0, results  # one writer at a time
    assert all(entered == ROUNDS for entered, _, _ in results), results
    assert not staging_root(out).exists()


def test_the_folder_stays_while_a_run_is_in_it_or_it_holds_work(tmp_path: Path) -> None:
    out = tmp_path / "out"
    root = staging_root(out)
    other = Lock(root / RUNS_LOCK)  # another run, inside
    other.acquire(wait=True, shared=True)
    with Staging(out, "k", ["pool"]) as run:
        run.clear()
    assert (root / "locks" / "pool.lock").is_file()
    other.release()
    with Staging(out, "k", ["pool"]):
        pass  # leaves its staged folder (run.json): a failed run's, kept
    assert (root / "k" / "run.json").is_file()
    with Staging(out, "k", ["pool"]) as run:
        run.clear()
    assert not root.exists()
