"""The project's own errors raised inside Ray workers reach the user as one line.

Each error is raised for real where it happens in a user's run: a local-mode Ray task (a teacher's
training, `ensemble-kd distill`), a Ray Train worker group (two workers), an embed task, a Tune
trial. Ray hands each back wrapped (``RayTaskError(StateFileError)``, a ``WorkerGroupError``, a
failed Tune trial) and the command must still print ``ensemble-kd: error: <the message>`` as
its one stderr line, exit 2 and keep the full traceback (the remote one included) in its log
file. The subprocess tests run the real command with its own Ray; faults that must happen after
the driver's checks (a teacher file replaced after it was recorded, a shard part damaged after
it was verified) are injected by a plugin module that acts when
a Ray worker imports it (the job's ``worker_process_setup_hook``), i.e. after every driver-side
check. The in-process tests use the session's Ray (tests/conftest.py)."""
from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import ray
import torch

from ensemble_kd.storage.artifacts import ShardIndex, ShardRecord, write_index
from ensemble_kd.core.files import DiskFullError, disk_full_cause
from ensemble_kd.orchestration.checks import check_config
from ensemble_kd.cli import error_line, main
from ensemble_kd.core.config import ConfigError, from_dict, to_yaml
from ensemble_kd.core.errors import ProjectError, project_error
from ensemble_kd.storage.shards import ShardMismatchError
from ensemble_kd.stages.embed import plan_shards, write_shard
from ensemble_kd.stages.teachers import checkpoint_path, existing
from ensemble_kd.storage.teacher_checkpoint import load_record, save_teacher
from modalities import build_dataset, build_encoder

REPO = Path(__file__).resolve().parents[1]
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the task below travels to Ray workers by value
ERROR_LINE = re.compile(r"^ensemble-kd: error: (?P<msg>.+) \(full traceback: (?P<log>\S+\.log)\)$")

SABOTAGE = '''"""Test plugin: inside a Ray worker (never in the driver, which imports it before Ray
starts), once per command, do what EKD_TEST_SABOTAGE says to a file the driver has checked."""
import os
import shutil

import ray

spec = os.environ.get("EKD_TEST_SABOTAGE")
if spec and ray.is_initialized():
    action, target, *rest = spec.split("|")
    try:
        os.close(os.open(target + ".sabotaged", os.O_CREAT | os.O_EXCL))  # the first worker only
    except FileExistsError:
        pass
    else:
        if action == "replace":  # another valid teacher file over the recorded one
            shutil.copyfile(rest[0], target)
        elif action == "flip":  # the same size, other bytes: only a sha256 check sees it
            with open(target, "r+b") as f:
                f.seek(os.path.getsize(target) // 2)
                chunk = f.read(64)
                f.seek(os.path.getsize(target) // 2)
                f.write(bytes(b ^ 0xFF for b in chunk))
'''


def folder_config(out: Path, **over) -> dict:
    """One small teacher (an MLP on uci-mfeat's `kar`), a student MLP on `fou`, 1 epoch, no retries."""
    d = {
        "name": "werr", "output_dir": str(out), "device": "cpu",
        "teachers": [{"name": "kar", "arch": "mlp", "modality": "kar", "epochs": 1, "arch_kwargs": {"hidden": [16]}}],
        "embed": {"splits": ["train"], "batch_size": 512, "cpus_per_actor": 0.5},
        "distill": {"teachers": ["kar"], "student": {"arch": "mlp", "modality": "fou", "arch_kwargs": {"hidden": [16]}},
                    "losses": [{"name": "ce"}, {"name": "kd"}], "epochs": 1, "batch_size": 64, "cpus_per_worker": 0.5,
                    "max_failures": 0},
        "tracking": {"enabled": False},
        "ray": {"num_cpus": 2},
    }
    for k, v in over.items():
        cur = d
        *head, last = k.split(".")
        for p in head:
            cur = cur[int(p)] if isinstance(cur, list) else cur.setdefault(p, {})
        cur[last] = v
    return d


def save_kar_teacher(cfg, path: Path, seed: int) -> None:
    t = cfg.teachers[0]
    ds = build_dataset(cfg.data.name, "train")
    torch.manual_seed(seed)
    model = build_encoder(t.arch, ds.spec(t.modality), ds.num_classes, **t.arch_kwargs)
    save_teacher(path, model, t, cfg.data, ds.spec(t.modality), ds.num_classes, {"test_top1": 0.1})


def make_folder(out: Path, teacher: bool = True, shards: bool = True, **over) -> tuple[Path, object]:
    """An output folder as `teachers train` (``teacher``) and `embed` (``shards``) leave it, made
    without Ray: the (untrained) teacher's checkpoint, its train shard and the shard index.
    Returns (config file, config)."""
    cfg = check_config(from_dict(folder_config(out, **over)))
    if teacher:
        save_kar_teacher(cfg, checkpoint_path(cfg.teachers[0], cfg.checkpoint_dir), seed=0)
    if teacher and shards:
        ts = existing(cfg.teachers, cfg.checkpoint_dir, cfg.data)
        ds = build_dataset(cfg.data.name, "train")
        recs = []
        for name, split, key, _n in plan_shards(ts, cfg.data, ["train"], cfg.embed, cfg.output_dir):
            teacher = load_record(asdict(ts[name]), ds)
            *_, manifest = write_shard(teacher, ds, key, cfg.shard_dir, cfg.embed, torch.device("cpu"), False)
            recs.append(ShardRecord(name, split, str(cfg.shard_dir / key.dirname), key.shard_id, manifest["num_rows"],
                                    False, 0.0))
        write_index(out, "shards", ShardIndex(tuple(recs)).to_dict())
    p = out / "config.yaml"
    out.mkdir(parents=True, exist_ok=True)
    p.write_text(to_yaml(cfg))
    return p, cfg


def cli(*args: str, env: dict | None = None, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    """The real command in a subprocess (its own local Ray), its output piped."""
    path = os.pathsep.join(str(p) for p in (REPO, pythonpath) if p)
    e = {**os.environ, "PYTHONPATH": path, **(env or {})}
    e.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "ensemble_kd.cli", *args], capture_output=True, text=True, env=e,
                          timeout=600, cwd=REPO)


def one_line(rc: int, err: str, *exc_names: str) -> tuple[str, str]:
    """A project error's report: exit 2, no traceback on the console, stderr's last line the one
    error line, naming the log file, which holds the full traceback with the exception's class
    (and Ray's wrapper where one of ``exc_names`` is given for it). Returns (message, log text)."""
    assert rc == 2, (rc, err[-4000:])
    assert "Traceback" not in err, err[-4000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert [ln for ln in lines if ln.startswith("ensemble-kd: error:")] == lines[-1:], err[-4000:]
    m = ERROR_LINE.match(lines[-1])
    assert m, lines[-1]
    log = Path(m["log"]).read_text()
    assert "Traceback (most recent call last)" in log
    for name in exc_names:
        assert name in log, (name, log[-3000:])
    assert "\x1b[" not in err + log  # Ray colours its remote tracebacks: not here
    return m["msg"], log


@pytest.fixture
def sabotage(tmp_path):
    """(plugin folder, env maker): a plugin module `ekd_sabotage` the config names under `plugins:`."""
    d = tmp_path / "plugins"
    d.mkdir()
    (d / "ekd_sabotage.py").write_text(SABOTAGE)
    return d, (lambda *spec: {"EKD_TEST_SABOTAGE": "|".join(str(s) for s in spec)})


# -- local-mode Ray tasks (a subprocess: the command's own Ray) ---------------------------------

class _Shell:
    """What an attacker would plant: unpickling it runs a command."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_state(run_dir: Path, marker: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "state.pt", "wb") as f:
        pickle.dump({"module": _Shell(str(marker))}, f)


def test_state_file_refused_in_the_local_mode_task_of_distill_resume(tmp_path):
    """The issue's own case: a crafted state.pt, then `ensemble-kd distill --resume`. Before, a
    40-line RayTaskError(StateFileError) traceback; now the one line naming the file."""
    cfg_path, _ = make_folder(tmp_path / "out", **{"distill.run_name": "crafted"})
    marker = tmp_path / "pwned"
    plant_state(tmp_path / "out" / "ray_results" / "crafted", marker)
    r = cli("distill", "--config", str(cfg_path), "--resume")
    msg, log = one_line(r.returncode, r.stderr, "StateFileError", "RayTaskError")
    assert msg.startswith(f"refusing to load training state {tmp_path / 'out' / 'ray_results' / 'crafted' / 'state.pt'}")
    assert "ray::_fit_local" in log  # the remote frames are in the log
    assert not marker.exists()


def test_teacher_file_replaced_after_its_record_is_refused_by_the_embed_task(tmp_path, sabotage):
    """`ensemble-kd embed` records the teacher (its content hash) before Ray starts; the file is
    replaced by another valid teacher before the embed task loads it: the task refuses it."""
    plugins, env = sabotage
    cfg_path, cfg = make_folder(tmp_path / "out", shards=False, plugins=["ekd_sabotage"])
    teacher = checkpoint_path(cfg.teachers[0], cfg.checkpoint_dir)
    other = tmp_path / "other.pt"
    save_kar_teacher(cfg, other, seed=1)
    r = cli("embed", "--config", str(cfg_path), env=env("replace", teacher, other), pythonpath=plugins)
    msg, _ = one_line(r.returncode, r.stderr, "CheckpointError", "RayTaskError")
    assert msg.startswith(f"{teacher}: the file's weights hash to") and "teacher set recorded" in msg
    assert Path(f"{teacher}.sabotaged").exists()  # (the fault did happen in a worker)


def test_shard_part_damaged_after_the_drivers_check_is_refused_by_the_distill_task(tmp_path, sabotage):
    """`ensemble-kd distill` verifies the train shard (every part's sha256) before Ray starts; a
    part whose bytes change after that is refused by the distill task when it opens the shard
    (ShardCorruptError). (A stored dataset file damaged likewise is not an error in a worker:
    ``datastore.open_split`` writes the split again from its source.)"""
    plugins, env = sabotage
    cfg_path, _ = make_folder(tmp_path / "out", plugins=["ekd_sabotage"])
    (part,) = list((tmp_path / "out" / "shards").glob("*/part-00000.arrow"))
    r = cli("distill", "--config", str(cfg_path), env=env("flip", part), pythonpath=plugins)
    msg, _ = one_line(r.returncode, r.stderr, "ShardCorruptError", "RayTaskError")
    assert msg.startswith(f"shard part {part} is damaged: its sha256 is"), msg


# -- in this process, on the session's Ray: a Ray Train worker group, teacher tasks, Tune trials --

def run_main(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_state_file_refused_in_a_ray_train_worker_group(ray_cluster, tmp_path, capsys):
    """Two Ray Train workers both refuse the crafted state: trainer.fit() raises Ray Train's
    WorkerGroupError, whose worker_failures hold each rank's StateFileError."""
    cfg_path, _ = make_folder(tmp_path / "out", **{"distill.run_name": "crafted", "distill.num_workers": 2,
                                                   "distill.local_mode": False})
    marker = tmp_path / "pwned"
    plant_state(tmp_path / "out" / "ray_results" / "crafted", marker)
    code, _, err = run_main(capsys, "distill", "--config", str(cfg_path), "--resume")
    msg, log = one_line(code, err, "StateFileError", "WorkerGroupError")
    assert msg.startswith("refusing to load training state") and not marker.exists()


def test_non_finite_loss_in_a_teacher_task_is_one_line(ray_cluster, tmp_path, capsys):
    """A teacher whose learning rate makes its weights overflow: NonFiniteError in its training task."""
    cfg_path, _ = make_folder(tmp_path / "out", teacher=False, **{"teachers.0.lr": 1e30})
    code, _, err = run_main(capsys, "teachers", "train", "--config", str(cfg_path))
    msg, _ = one_line(code, err, "NonFiniteError", "RayTaskError")
    assert "became non-finite" in msg and "epoch 1" in msg, msg


def test_tune_whose_every_trial_diverges_fails_with_the_trials_error(ray_cluster, tmp_path, capsys):
    """`ensemble-kd tune`: a failed trial gets a line saying why; a sweep none of whose trials
    finished fails with the first trial's error (Tune's own traceback of it: in the log only)."""
    cfg_path, _ = make_folder(tmp_path / "out", **{"tune.space": {"distill.optim.lr": {"grid": [1e30]}},
                                                   "tune.cpus_per_trial": 0.5})
    code, out, err = run_main(capsys, "tune", "--config", str(cfg_path))
    msg, log = one_line(code, err, "NonFiniteError", "Trial task failed")
    assert "became non-finite" in msg
    trial_line = next(ln for ln in out.splitlines() if ln.startswith("[tune 1/1"))
    assert ": ERROR after 0 epochs" in trial_line and "became non-finite" in trial_line, trial_line
    assert "Traceback" not in out


def test_run_lists_a_diverging_trial_as_unfinished_with_its_reason(ray_cluster, tmp_path, capsys):
    """`ensemble-kd run` by design goes on past a failed trial (listed apart, never averaged): the
    user sees its line with the reason, no traceback, and the trial under `unfinished`; an arm none
    of whose trials finished makes the command exit 1 (tests/test_exit_codes.py)."""
    arms = [{"name": "ok", "teachers": "all", "losses": [{"name": "ce"}, {"name": "kd"}]},
            {"name": "hot", "teachers": "none", "losses": [{"name": "ce"}], "set": {"distill.optim.lr": 1e30}}]
    cfg_path, _ = make_folder(tmp_path / "out", **{"run.arms": arms, "run.seeds": [0], "run.export": False,
                                                   "embed.splits": ["train", "test"], "tune.cpus_per_trial": 0.5})
    code, out, err = run_main(capsys, "run", "--config", str(cfg_path))
    assert code == 1, err[-3000:]  # the arm 'hot' has no finished trial
    assert "Traceback" not in out + err, (out + err)[-3000:]
    hot = next(ln for ln in out.splitlines() if "hot/seed0:" in ln)
    assert "ERROR" in hot and "became non-finite" in hot, hot
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [u["arm"] for u in summary["unfinished"]] == ["hot"] and summary["arms"]["ok"]["seeds"] == [0]


# -- finding the cause inside Ray's wrappers ------------------------------------------------

@ray.remote
def _raise(kind: str) -> None:
    if kind == "project":
        try:
            raise OSError("the shard's disk went away")
        except OSError as e:  # a project error raised while handling another: found through the chain
            raise ShardMismatchError("shard /x: key differs") from e
    if kind == "config":
        raise ConfigError("distill.teachers: unknown teacher 'x'")
    if kind == "disk":  # what shards.PartWriter and files.atomic_write raise in a worker
        raise DiskFullError("the disk is full: cannot write /x/part-00000.arrow (No space left on device)")
    raise KeyError("a bug")


def test_project_error_is_found_in_a_ray_task_error_and_a_bug_keeps_its_traceback(ray_cluster):
    with pytest.raises(ray.exceptions.RayTaskError) as e1:
        ray.get(_raise.remote("project"))
    pe = project_error(e1.value)
    assert type(pe) is ShardMismatchError and str(pe) == "shard /x: key differs"
    assert isinstance(e1.value, ShardMismatchError)  # Ray's dual class: an instance, yet not the error to show
    assert error_line(e1.value) == ("ensemble-kd: error: shard /x: key differs", 2)
    with pytest.raises(RuntimeError) as e2:  # the driver wraps a task's error: found through __cause__, then .cause
        try:
            ray.get(_raise.remote("config"))
        except ray.exceptions.RayTaskError as e:
            raise RuntimeError("while embedding") from e
    assert str(project_error(e2.value)) == "distill.teachers: unknown teacher 'x'"
    with pytest.raises(ray.exceptions.RayTaskError) as e4:
        ray.get(_raise.remote("disk"))
    assert error_line(e4.value, Path("/o/logs/run.log")) == (
        "ensemble-kd: error: the disk is full: cannot write /x/part-00000.arrow (No space left on device) "
        "(full traceback: /o/logs/run.log)", 1)  # exit 1, as a full disk in the driver
    # the embed stage turns a task's full disk into one DiskFullError with this (not the remote traceback)
    assert disk_full_cause(e4.value) == "the disk is full: cannot write /x/part-00000.arrow (No space left on device)"
    with pytest.raises(ray.exceptions.RayTaskError) as e3:
        ray.get(_raise.remote("bug"))
    assert project_error(e3.value) is None and error_line(e3.value) is None  # main re-raises: a traceback
    assert isinstance(ConfigError("x"), ValueError) and isinstance(ConfigError("x"), ProjectError)
