"""Faults and bad inputs a user meets: damaged shards, bad option values, a bad `--set`,
concurrent and disk-full first use of an output folder, Ctrl-C. Each test fails on the code
before the fix; the CLI ones run the real command in a subprocess."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from ensemble_kd.storage.artifacts import ShardIndex, ShardRecord, write_index
from ensemble_kd.orchestration.checks import check_config
from ensemble_kd.core.config import from_dict, to_yaml
from ensemble_kd.stages.embed import plan_shards, write_shard
from ensemble_kd.stages.teachers import checkpoint_path, existing
from ensemble_kd.storage.teacher_checkpoint import load_record, save_teacher
from modalities import build_dataset, build_encoder

REPO = Path(__file__).resolve().parents[1]


def folder_config(out: Path, **over) -> dict:
    """One small untrained teacher (an MLP on uci-mfeat's `kar`), a student MLP on `fou`, 1 epoch."""
    d = {
        "name": "faults", "output_dir": str(out), "device": "cpu",
        "teachers": [{"name": "kar", "arch": "mlp", "modality": "kar", "epochs": 1, "arch_kwargs": {"hidden": [16]}}],
        "embed": {"splits": ["train"], "batch_size": 512, "cpus_per_actor": 0.5},
        "distill": {"teachers": ["kar"], "student": {"arch": "mlp", "modality": "fou", "arch_kwargs": {"hidden": [16]}},
                    "losses": [{"name": "ce"}, {"name": "kd"}], "epochs": 1, "batch_size": 64, "cpus_per_worker": 0.5,
                    "max_failures": 0},
        "ray": {"num_cpus": 2},
    }
    for k, v in over.items():
        cur = d
        *head, last = k.split(".")
        for p in head:
            cur = cur.setdefault(p, {})
        cur[last] = v
    return d


def make_folder(out: Path, **over) -> tuple[Path, object]:
    """An output folder as `teachers train` + `embed` leave it, made without Ray: the teacher's
    (untrained) checkpoint and its train shard with the shard index. Returns (config file, config)."""
    cfg = check_config(from_dict(folder_config(out, **over)))
    t = cfg.teachers[0]
    ds = build_dataset(cfg.data.name, "train")
    torch.manual_seed(0)
    model = build_encoder(t.arch, ds.spec(t.modality), ds.num_classes, **t.arch_kwargs)
    save_teacher(checkpoint_path(t, cfg.checkpoint_dir), model, t, cfg.data, ds.spec(t.modality), ds.num_classes,
                 {"test_top1": 0.1})
    ts = existing(cfg.teachers, cfg.checkpoint_dir, cfg.data)
    recs = []
    for name, split, key, _n in plan_shards(ts, cfg.data, ["train"], cfg.embed, cfg.output_dir):
        teacher = load_record(asdict(ts[name]), ds)
        *_, manifest = write_shard(teacher, ds, key, cfg.shard_dir, cfg.embed, torch.device("cpu"), False)
        recs.append(ShardRecord(name, split, str(cfg.shard_dir / key.dirname), key.shard_id, manifest["num_rows"], False, 0.0))
    write_index(out, "shards", ShardIndex(tuple(recs)).to_dict())
    p = out / "config.yaml"
    p.write_text(to_yaml(cfg))
    return p, cfg


def cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "ensemble_kd.cli", *args], capture_output=True, text=True, env=e,
                          timeout=timeout, cwd=REPO)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    """The command's error: exit 2, no traceback, the message on stderr's last line(s)."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return r.stderr


def main_error(capsys, *args: str) -> tuple[str, str]:
    """``ensemble-kd ARGS`` in this process: (stdout, stderr) of a command that must exit 2
    with the error on stderr (the CLI's error path, no traceback)."""
    from ensemble_kd.cli import main

    assert main(list(args)) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return out, err


def part_of(out: Path) -> Path:
    (shard,) = [p for p in (out / "shards").iterdir() if not p.name.startswith(".")]
    return shard / "part-00000.arrow"


def damage(path: Path) -> None:
    """Overwrite bytes in the middle of a file with others, keeping its size (and its mtime)."""
    st = path.stat()
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + 64] = bytes(b ^ 0xFF for b in raw[mid : mid + 64])
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


# -- shards ----------------------------------------------------------------------------------

def test_damaged_shard_bytes_are_refused_by_distill_before_ray(tmp_path, capsys):
    cfg_path, _ = make_folder(tmp_path / "out")
    part = part_of(tmp_path / "out")
    damage(part)
    out, err = main_error(capsys, "distill", "--config", str(cfg_path), "--no-progress")
    assert str(part) in err and "sha256" in err and "manifest" in err
    assert "Ray" not in out + err.replace("ensemble-kd", "")  # refused before Ray started (no Ray log line)
    assert not (tmp_path / "out" / "ray_results").exists()


def test_edited_manifest_checkpoint_hash_is_refused_by_distill(tmp_path, capsys):
    cfg_path, _ = make_folder(tmp_path / "out")
    mpath = part_of(tmp_path / "out").parent / "manifest.json"
    m = json.loads(mpath.read_text())
    real = m["key"]["checkpoint_sha256"]
    m["teacher"]["checkpoint_sha256"] = "0" * 64  # the teacher record's hash (an edited key was refused already)
    mpath.write_text(json.dumps(m))
    _, err = main_error(capsys, "distill", "--config", str(cfg_path), "--no-progress")
    assert str(mpath.parent) in err and "teacher.checkpoint_sha256" in err and "0" * 64 in err and real in err


def test_embed_rewrites_a_damaged_shard_and_refuses_an_edited_one(ray_cluster, tmp_path):
    from ensemble_kd.orchestration import pipeline

    _, cfg = make_folder(tmp_path / "out")
    part = part_of(tmp_path / "out")
    good = part.read_bytes()
    damage(part)
    logs: list[str] = []
    res = pipeline.embed(cfg, pipeline.existing_teachers(cfg), progress=False, log=logs.append)
    assert [r.reused for r in res] == [False] and any("rewriting" in m and "damaged" in m for m in logs), logs
    assert part.read_bytes() == good  # written again by the same teacher: the same bytes
    mpath = part.parent / "manifest.json"
    m = json.loads(mpath.read_text())
    m["teacher"]["checkpoint_sha256"] = "0" * 64
    mpath.write_text(json.dumps(m))
    with pytest.raises(Exception, match="teacher.checkpoint_sha256"):
        pipeline.embed(cfg, pipeline.existing_teachers(cfg), progress=False, log=logs.append)


# -- config values ---------------------------------------------------------------------------

@pytest.mark.parametrize("key,value,field", [
    ("distill.losses.crd.kwargs.tau", "0", "distill.losses.crd.kwargs.tau"),
    ("distill.losses.crd.kwargs.tau", "abc", "distill.losses.crd.kwargs.tau"),
    ("distill.losses.crd.kwargs.num_negatives", "-5", "distill.losses.crd.kwargs.num_negatives"),
    ("distill.losses.kd.kwargs.temperature", "-4", "distill.losses.kd.kwargs.temperature"),
    ("distill.losses.kd.kwargs.temperature", ".nan", "distill.losses.kd.kwargs.temperature"),
    ("distill.optim.lr", ".inf", "distill.optim.lr"),
])
def test_bad_values_fail_at_load_naming_the_field(capsys, key, value, field):
    _, err = main_error(capsys, "config", "show", "--set", f"{key}={value}")  # the embedded default has ce + kd + crd
    assert field in err and len(err.strip().splitlines()) <= 2, err


def test_valid_loss_options_still_load():
    from ensemble_kd.orchestration.checks import loss_option_errors

    assert loss_option_errors("crd", {"tau": 0.1, "num_negatives": 4096, "feat_dim": 64}, ("a", "b")) == []
    assert loss_option_errors("kd", {"temperature": 2, "reduction": "per_teacher"}) == []


def test_unparsable_set_value_is_one_line(capsys):
    _, err = main_error(capsys, "config", "show", "--set", "distill.epochs=[1")
    assert len(err.strip().splitlines()) == 1 and "distill.epochs=[1" in err and "YAML" in err, err


# -- first use of an output folder: the MLflow store -----------------------------------------

RACER = """
import pathlib, sys, time
from ensemble_kd.storage import mlflow_store
uri, ready, go = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
ready.touch()
while not go.exists():
    time.sleep(0.01)
exp = mlflow_store.ensure_experiment(uri, "race")
print(mlflow_store.client(uri).create_run(exp).info.run_id)
"""


def test_concurrent_first_use_of_a_folder_both_succeed(tmp_path):
    """Three processes, imports done, released at once on a folder without mlflow.db: every one
    gets its run (on the code before the fix, MLflow's schema migration raced: alembic errors)."""
    uri = f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    (tmp_path / "out").mkdir()
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", RACER, uri, str(tmp_path / f"ready{i}"), str(go)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    deadline = time.monotonic() + 300
    while not all((tmp_path / f"ready{i}").exists() for i in range(3)) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e[-2000:] for _, e in outs]
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(uri).get_experiment_by_name("race")
    assert len(MlflowClient(uri).search_runs([exp.experiment_id])) == 3


HALF_CREATE = """
import resource, signal, sys
from mlflow.tracking import MlflowClient
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
MlflowClient(sys.argv[1]).search_experiments()  # MLflow's own first use, as the code before the fix did it
"""


def test_half_created_store_is_repaired(tmp_path):
    """A store whose creation ran out of disk (no runs in it) is moved aside and made again."""
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    r = subprocess.run([sys.executable, "-c", HALF_CREATE, uri], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and db.exists()  # the disk "filled" during MLflow's migration
    from ensemble_kd.storage import mlflow_store

    exp = mlflow_store.ensure_experiment(uri, "after")
    assert mlflow_store.client(uri).create_run(exp).info.status == "RUNNING"
    assert len(list(tmp_path.glob("mlflow.db.broken-*"))) == 1  # kept, not deleted


def test_full_disk_on_first_use_is_one_line(tmp_path):
    """RLIMIT_FSIZE stands in for a full disk (no small filesystem can be mounted here): past the
    limit a write fails with EFBIG, which the command reports like ENOSPC, naming the file."""
    pre = ("import resource, signal, sys, runpy; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
           "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000)); "
           "sys.argv = ['ensemble-kd'] + sys.argv[1:]; runpy.run_module('ensemble_kd.cli', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", pre, "compare", "--out", str(tmp_path / "out")], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode in (1, 2) and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]  # SQLite reports EFBIG as "disk I/O error", ENOSPC as "disk is full"
    assert last.startswith("ensemble-kd: error:") and str(tmp_path / "out" / "mlflow.db") in last and "disk" in last
    assert not (tmp_path / "out" / "mlflow.db").exists()  # nothing half-made is left to break the next command
    assert not list((tmp_path / "out").glob(".mlflow.db.*"))


def test_full_disk_while_writing_a_shard_names_the_part(tmp_path):
    code = """
import resource, signal, sys
import numpy as np
from ensemble_kd.core.files import DiskFullError
from ensemble_kd.storage.shards import ShardKey, ShardWriter
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
k = ShardKey("t", "c" * 64, "toy", "train", "f" * 64, {"num_views": 1}, "float32")
n = 2000
try:
    with ShardWriter(sys.argv[1], k, 16, 4, rows_per_part=n) as w:
        w.write(np.arange(n), np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n, bool),
                np.ones((n, 16), np.float32), np.ones((n, 4), np.float32))
except DiskFullError as e:
    print(e)
"""
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("the disk is full: cannot write ") and "part-00000.arrow" in r.stdout, r.stdout
    assert list(tmp_path.iterdir()) == []  # no half shard, no temp folder


# -- Ctrl-C ----------------------------------------------------------------------------------

def _db_rows(db: Path, sql: str) -> list[tuple]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
            return c.execute(sql).fetchall()
    except sqlite3.Error:  # not created yet, or busy
        return []


def _ray_processes(base: Path) -> list[str]:
    """Command lines of live processes that belong to the Ray session under ``base``."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(base) in cmd:
                out.append(cmd)
    return out


def _interrupt_when(proc: subprocess.Popen, ready, what: str, limit: float = 900) -> None:
    deadline = time.monotonic() + limit
    while not ready():
        assert proc.poll() is None, f"the command ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"no {what} within {limit}s"
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)


@pytest.fixture
def ray_tmp():
    """A short private base for the command's Ray temp dir (socket paths must stay short)."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="ekdf-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _start(args: list[str], ray_tmp: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "EKD_RAY_TMPDIR": str(ray_tmp)}
    return subprocess.Popen([sys.executable, "-m", "ensemble_kd.cli", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _assert_stopped_cleanly(proc: subprocess.Popen, ray_tmp: Path) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, (proc.returncode, err[-4000:])
    assert "interrupted (SIGINT)" in err
    left = _ray_processes(ray_tmp)
    for _ in range(20):  # processes Ray's shutdown signalled may take a moment to be reaped
        if not left:
            break
        time.sleep(0.5)
        left = _ray_processes(ray_tmp)
    assert left == [], left
    assert list(ray_tmp.iterdir()) == []  # the session's temp dir is gone too
    return out + err


@pytest.mark.slow
def test_sigint_during_distill_exits_130_run_killed_no_ray_left(tmp_path, ray_tmp):
    cfg_path, _ = make_folder(tmp_path / "out", **{"distill.epochs": 200})
    db = tmp_path / "out" / "mlflow.db"
    proc = _start(["distill", "--config", str(cfg_path), "--no-progress"], ray_tmp)
    _interrupt_when(proc, lambda: _db_rows(db, "SELECT count(*) FROM metrics WHERE key = 'loss/total'") not in ([], [(0,)]),
                    "first epoch logged")
    _assert_stopped_cleanly(proc, ray_tmp)
    rows = _db_rows(db, "SELECT r.status, t.value FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                        "AND t.key = 'stopped_reason'")
    assert rows == [("KILLED", "interrupted (SIGINT)")], _db_rows(db, "SELECT status FROM runs")


@pytest.mark.slow
def test_sigint_during_run_keeps_the_summary_and_kills_every_trial(tmp_path, ray_tmp):
    arms = [{"name": "a", "teachers": "all", "losses": [{"name": "ce"}, {"name": "kd"}]},
            {"name": "b", "teachers": "none", "losses": [{"name": "ce"}]}]
    cfg_path, _ = make_folder(tmp_path / "out", **{"distill.epochs": 200, "run.arms": arms, "run.seeds": [0],
                                                   "embed.splits": ["train", "test"], "tune.cpus_per_trial": 0.5,
                                                   "tune.max_concurrent_trials": 1})
    out = tmp_path / "out"
    summary = out / "summary.json"
    summary.write_text('{"complete": "from an earlier run"}')
    db = out / "mlflow.db"
    proc = _start(["run", "--config", str(cfg_path), "--no-progress"], ray_tmp)
    _interrupt_when(proc, lambda: _db_rows(db, "SELECT count(*) FROM tags WHERE key = 'mlflow.parentRunId'") not in ([], [(0,)]),
                    "a trial's MLflow run")  # Tune is running trials
    _assert_stopped_cleanly(proc, ray_tmp)
    assert summary.read_text() == '{"complete": "from an earlier run"}' and not (out / "summary.png").exists()
    statuses = _db_rows(db, "SELECT r.status, t.value FROM runs r LEFT JOIN tags t ON t.run_uuid = r.run_uuid "
                            "AND t.key = 'stopped_reason'")
    assert statuses and all(s == ("KILLED", "interrupted (SIGINT)") for s in statuses), statuses


# -- leftovers of a killed command -------------------------------------------------------------

def test_next_command_ends_runs_of_killed_processes_and_removes_their_temp_folders(tmp_path, capsys):
    """What a SIGKILLed driver leaves (a RUNNING run, a shard writer's temp folder, a checkpoint
    folder its snapshot does not name) is dealt with by the next command on the folder, here
    `compare`; a live process's run is left alone."""
    import socket

    from ensemble_kd.cli import main
    from ensemble_kd.storage import mlflow_store

    out = tmp_path / "out"
    cfg = from_dict(folder_config(out))
    uri = mlflow_store.tracking_uri(cfg)
    exp = mlflow_store.ensure_experiment(uri, cfg.name)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    c = mlflow_store.client(uri)
    orphan = c.create_run(exp, tags={"ekd.owner": f"{host}:{dead.stdout.strip()}"}).info.run_id
    live = c.create_run(exp, tags={"ekd.owner": f"{host}:{os.getpid()}"}).info.run_id
    writer = out / "shards" / ".kar__train__x.tmp-1234abcd"
    writer.mkdir(parents=True)
    (writer / ".owner").write_text(f"{host}:{dead.stdout.strip()}")
    run_dir = out / "ray_results" / "r1"
    (run_dir / "checkpoint_2020-01-01_00-00-00.000000").mkdir(parents=True)  # half-copied, never registered
    kept = run_dir / "checkpoint_2020-01-01_00-00-01.000000"
    kept.mkdir()
    os.utime(run_dir / "checkpoint_2020-01-01_00-00-00.000000", (1, 1))
    os.utime(kept, (1, 1))
    (run_dir / "checkpoint_manager_snapshot.json").write_text(json.dumps({"checkpoints": [kept.name]}))
    assert main(["compare", "--out", str(out), "--experiment", cfg.name, "--json"]) == 0
    capsys.readouterr()
    assert c.get_run(orphan).info.status == "KILLED" and "killed" in c.get_run(orphan).data.tags["stopped_reason"]
    assert c.get_run(live).info.status == "RUNNING"
    assert not writer.exists()
    assert sorted(p.name for p in run_dir.iterdir()) == [kept.name, "checkpoint_manager_snapshot.json"]
