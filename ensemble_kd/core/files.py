"""Atomic file writes, file hashes and JSON manifests: what every writer of the output folder uses.

Nothing half-written is ever taken for whole: every file is written to a temporary name in
the same directory, fsynced, then renamed over the final name (atomic on POSIX).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ensemble_kd.core.errors import ProjectError, is_ray_wrapper


# No space left, a quota, or the process's file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored):
# to the user all three are "the disk is full" for that file.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class DiskFullError(OSError, ProjectError):
    """A write that failed for lack of space; the message names the file (one line for the CLI)."""

    def __reduce__(self):  # picklable with its message (it crosses from Ray actors to the driver)
        return (DiskFullError, (str(self),))


def disk_full_cause(e: BaseException | None) -> str | None:
    """What says "disk full" in ``e`` or the errors it wraps (``__cause__``/``__context__``, a Ray
    task error's ``cause``): an OSError with ENOSPC/EDQUOT/EFBIG, or SQLite's "database or disk is
    full"; None if nothing does."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DiskFullError) and not is_ray_wrapper(e):  # Ray's RayTaskError(DiskFullError) is one too,
            return str(e)  # but its message is the remote traceback: its cause's is the one line
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
        if "database or disk is full" in str(e):
            return "database or disk is full"
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return None


@contextlib.contextmanager
def naming_full_disk(path: str | Path):
    """Turn a disk-full OSError raised in the block into a :class:`DiskFullError` naming ``path``
    (Python's and Arrow's write errors do not say which file)."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as e:
        if e.errno in DISK_FULL_ERRNOS:  # Arrow's write errors carry the errno too
            raise DiskFullError(f"the disk is full: cannot write {path} ({e.strerror or e})") from e
        raise


def atomic_write(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Call ``write(f)`` on a temp file next to ``path``, then rename it to ``path``. A full disk
    raises :class:`DiskFullError` naming ``path`` (the temp file is removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with naming_full_disk(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return path


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def state_dict_hash(state: Mapping[str, torch.Tensor], extra: str = "") -> str:
    """sha256 over sorted parameter names, dtypes, shapes and bytes (+ ``extra``)."""
    h = hashlib.sha256(extra.encode())
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"|{k}:{t.dtype}:{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def publish_dir(tmp: Path, final: Path, marker: str) -> None:
    """Rename the finished temp directory ``tmp`` to ``final`` (atomic, so no half-written artifact
    is ever seen at ``final``). When a concurrent writer of the same content-addressed artifact
    published first (``final/marker`` exists), keep theirs and drop ``tmp``."""
    try:
        os.rename(tmp, final)  # fails when final exists
    except OSError:
        if not (final / marker).exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def read_json_manifest(d: str | Path, name: str, fmt: str, version: int, error: type[Exception], what: str,
                       hint: str = "") -> dict[str, Any]:
    """The JSON manifest ``d/name`` of an artifact directory (shard, selection), checked for its
    format tag and version; any problem raises ``error`` naming the file (``what`` names the kind)."""
    d = Path(d)
    path = d / name
    if not d.is_dir():
        raise error(f"{what} not found: {d}{hint}")
    if not path.is_file():
        raise error(f"{what} {d} has no {name} (an unfinished or foreign directory)")
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise error(f"{what} manifest {path} is unreadable: {e}") from None
    if not isinstance(m, dict) or m.get("format") != fmt:
        raise error(f"{path} is not an ensemble-kd {what} manifest")
    if m.get("version") != version:
        raise error(f"{path}: {what} version {m.get('version')} is not supported (this is {version})")
    return m
