"""A training run's progress file: written by the loop's rank 0 after every epoch, read by the
driver thread that waits on the run, wherever the run is (this machine, or another node of a
cluster with the shared output folder). No Ray actor or queue is needed.

``<run folder>/progress.json`` holds the run's label, epoch, epochs, last loss, last test top-1,
the epoch's seconds and the time it was written.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ensemble_kd.core.console import Live

PROGRESS_FILE = "progress.json"  # in a run's folder
PROGRESS_POLL_S = 0.5  # how often a driver thread reads it


def write_progress(run_dir: Path, doc: dict[str, Any]) -> None:
    """``<run_dir>/progress.json`` := ``doc`` (with the time it was written). Written to a temp name
    and renamed, so a reader never sees half of it; not fsynced (it is rewritten next epoch, and a
    lost one costs nothing); best effort: a failed write never stops training."""
    tmp = run_dir / f".{PROGRESS_FILE}.{os.getpid()}.tmp"
    with contextlib.suppress(OSError):
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({**doc, "time": time.time()}))
        os.replace(tmp, run_dir / PROGRESS_FILE)


def read_progress(run_dir: str | Path) -> dict[str, Any] | None:
    """A run's ``progress.json`` (:func:`write_progress`: epoch, epochs, loss, last test top-1,
    time), or None: none yet, or unreadable."""
    try:
        doc = json.loads((Path(run_dir) / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def progress_text(doc: dict[str, Any], seconds: float | None = None) -> str:
    """``epoch 12/30, loss 0.4123, test top-1 0.9520, 14s`` from a run's progress file; without
    ``seconds``, ``loss ..., test top-1 ...`` only (what a bar shows beside its own count and times)."""
    parts = [f"epoch {doc.get('epoch')}/{doc.get('epochs')}"] if seconds is not None else []
    if isinstance(doc.get("loss"), (int, float)):
        parts.append(f"loss {doc['loss']:.4f}")
    if isinstance(doc.get("test_top1"), (int, float)):
        parts.append(f"test top-1 {doc['test_top1']:.4f}")
    return ", ".join(parts + ([f"{seconds:.0f}s"] if seconds is not None else []))


@contextlib.contextmanager
def watch_progress(desc: str, run_dir: Path | Callable[[], Path | None], total: int, log: Callable[[str], None],
                   bar: bool, position: int = 0) -> Iterator[None]:
    """While the block runs (a driver thread waiting on a training run), one live line for the
    run: a thread polls the run's ``progress.json``, which the loop's rank 0 rewrites after every
    epoch wherever it runs (this machine, or another node of a cluster with a shared output
    folder), and shows it as a bar (``bar``: a terminal) or a line through ``log`` every 30 s. No
    Ray actor or queue is needed. ``run_dir``: the run's folder, or a function finding it (None:
    not yet). A file older than the block (an earlier attempt's) is not shown."""
    t0, since = time.perf_counter(), time.time()
    live = Live(desc, total, log, bar, position)
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(PROGRESS_POLL_S):
            folder = run_dir() if callable(run_dir) else run_dir
            doc = read_progress(folder) if folder is not None else None
            if doc and doc.get("time", 0) >= since and isinstance(doc.get("epoch"), int):
                live.update(doc["epoch"], progress_text(doc, time.perf_counter() - t0), progress_text(doc))

    th = threading.Thread(target=poll, name=f"progress-{desc}", daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join()
        live.close()

