"""Who owns a temp folder (or a RUNNING MLflow run), and whether that owner is still alive.

One tag format, ``"<host>:<pid>"``, one liveness rule and one sweep, used by every writer that
leaves a temp folder behind when it is killed: the data store's and the shards' writers, a
command's local Ray temp dir, and the MLflow runs a killed process left RUNNING.

The rule: an owner is *gone* only when it is a process of this host that no longer exists. An owner
on another host (a shared folder on a cluster) or an unreadable tag is never taken for gone: a
live writer's folder must not be removed under it.
"""
from __future__ import annotations

import os
import shutil
import socket
import uuid
from pathlib import Path

OWNER = ".owner"  # the file in a temp folder that names its owner


def tag() -> str:
    """This process's owner tag, ``"<host>:<pid>"``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def claim(folder: Path) -> None:
    """Mark ``folder`` as owned by this process (until it is published or swept)."""
    (Path(folder) / OWNER).write_text(tag())


def release(folder: Path) -> None:
    """Drop the owner file: a published folder has no writer."""
    (Path(folder) / OWNER).unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists (another user's live process counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def gone(owner: str) -> bool:
    """True only when ``owner`` (a tag) is a process of this host that no longer exists."""
    host, _, pid = owner.strip().rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid))


def temp_dir(root: str | Path, final_name: str) -> Path:
    """A new hidden folder ``.<final_name>.tmp-<id>`` under ``root``, claimed by this process: where a
    writer builds what it then renames to ``<final_name>`` (readers never see it half written)."""
    tmp = Path(root) / f".{final_name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    claim(tmp)
    return tmp


def sweep_temp_dirs(root: str | Path) -> list[Path]:
    """The :func:`temp_dir` folders under ``root`` whose writer is gone, removed (none when ``root``
    does not exist)."""
    return sweep(root, ".*.tmp-*") if Path(root).is_dir() else []


def sweep(root: str | Path, pattern: str) -> list[Path]:
    """Remove the folders under ``root`` matching ``pattern`` whose owner is gone; a folder with no
    owner file (one kept on purpose, or not yet claimed) is left alone. Returns what was removed."""
    removed = []
    for d in Path(root).glob(pattern):
        try:
            owner = (d / OWNER).read_text()
        except OSError:
            continue
        if gone(owner):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed
