"""The output folder of a bench: a temporary one (the default), or ``--workdir DIR``, kept, whose
teachers, shards and MLflow store later runs reuse (the suite's smoke tests share one, so only
the first trains and embeds)."""
from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path


def add_workdir_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--workdir", default=None,
                    help="output folder to use and keep (teachers and shards there are reused); default: a temporary one")


@contextlib.contextmanager
def workdir(path: str | None, prefix: str) -> Iterator[str]:
    if path is None:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            yield tmp
    else:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield str(Path(path).resolve())
