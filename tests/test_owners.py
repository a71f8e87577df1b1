"""Who owns a temp folder and whether it is alive (core/owners): one rule for every writer's temp
folder, a command's local Ray dir and a RUNNING MLflow run. A real dead process (a child that
exited) stands for a killed writer."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

from ensemble_kd.core import owners, raycluster


def dead_pid() -> int:
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(p.stdout)


def test_only_a_gone_process_of_this_host_is_gone():
    host = socket.gethostname()
    assert owners.gone(f"{host}:{dead_pid()}")
    assert not owners.gone(owners.tag()) and owners.tag() == f"{host}:{os.getpid()}"
    assert not owners.gone(f"another-{host}:{dead_pid()}")  # another node of a shared folder: never ours to judge
    for junk in ("", "garbage", f"{host}:", f"{host}:abc"):
        assert not owners.gone(junk)


def test_sweep_removes_the_folders_of_gone_writers_only(tmp_path):
    host, dead = socket.gethostname(), dead_pid()
    killed = owners.temp_dir(tmp_path, "shard-a")
    (killed / owners.OWNER).write_text(f"{host}:{dead}")
    live = owners.temp_dir(tmp_path, "shard-b")
    elsewhere = owners.temp_dir(tmp_path, "shard-c")
    (elsewhere / owners.OWNER).write_text(f"other-host:{dead}")
    kept = owners.temp_dir(tmp_path, "shard-d")
    owners.release(kept)  # published or kept on purpose: no owner
    published = tmp_path / "shard-e"
    published.mkdir()
    assert killed.name.startswith(".shard-a.tmp-") and (live / owners.OWNER).read_text() == owners.tag()
    assert owners.sweep_temp_dirs(tmp_path) == [killed]
    assert not killed.exists() and live.exists() and elsewhere.exists() and kept.exists() and published.exists()
    assert owners.sweep_temp_dirs(tmp_path / "missing") == []


def test_a_killed_commands_ray_dir_is_swept_by_the_next_command(tmp_path, monkeypatch):
    monkeypatch.setenv("EKD_RAY_TMPDIR", str(tmp_path))
    old = tmp_path / "ekd-ray-old"
    old.mkdir()
    (old / owners.OWNER).write_text(f"{socket.gethostname()}:{dead_pid()}")
    new = raycluster.short_temp_dir()
    assert not old.exists() and os.path.isdir(new)
    assert (tmp_path / os.path.basename(new) / owners.OWNER).read_text() == owners.tag()
