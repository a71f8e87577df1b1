"""`ensemble-kd run --resume` after a real interruption.

The real command in subprocesses (each its own local Ray) on the tiny job of
jobs/configs/tiny-uci-mfeat.yaml (two arms, one seed, one trial at a time), in one output folder:
the run is stopped with SIGINT, as Ctrl-C stops it, once its first trial has finished and its
second has saved a few of its epochs; `run --resume` then keeps the finished trial (its student
file and MLflow run untouched), continues the other from its last saved epoch, and its summary
holds what an uninterrupted run of the same config gives, seed for seed. `--resume` with nothing
to resume, or with another config, is one line and exit 2, before any work."""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.xdist_group("test_run_resume")

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "jobs" / "configs" / "tiny-uci-mfeat.yaml"
EPOCHS = 12


@pytest.fixture
def ray_tmp():
    """A short private base for the commands' Ray temp dirs (socket paths must stay short)."""
    d = Path(tempfile.mkdtemp(prefix="ekdr-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _args(cfg: Path, out: Path, *more: str) -> list[str]:
    return [sys.executable, "-m", "ensemble_kd.cli", "run", "--config", str(cfg), "--out", str(out), "--no-progress", *more]


def _env(ray_tmp: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "EKD_RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    return env


def run(cfg: Path, out: Path, ray_tmp: Path, *more: str) -> subprocess.CompletedProcess:
    return subprocess.run(_args(cfg, out, *more), capture_output=True, text=True, env=_env(ray_tmp), timeout=600, cwd=REPO)


def record(out: Path) -> dict | None:
    p = out / "index" / "run.json"
    return json.loads(p.read_text()) if p.is_file() else None


def saved_epochs(run_dir: Path) -> int:
    """Epochs in a trial's last saved state (0: none yet)."""
    try:
        return int(torch.load(run_dir / "state.pt", map_location="cpu", weights_only=True)["epoch"]) + 1
    except (FileNotFoundError, RuntimeError, EOFError, KeyError):  # not there yet, or being replaced
        return 0


def progress(out: Path) -> tuple[list[str], dict[str, int]]:
    """This run's finished trials (their students) and the others' saved epochs (run name -> epochs)."""
    rec = record(out)
    if rec is None:
        return [], {}
    exp = rec["experiment"]
    done = sorted(d.name for d in (out / "students").glob(f"{exp}-*") if (d / "student.pt").is_file())
    return done, {d.name: saved_epochs(d) for d in (out / "ray_results").glob(f"{exp}-*") if d.name not in done}


def mlflow_run(out: Path, name: str) -> tuple:
    with sqlite3.connect(f"file:{out / 'mlflow.db'}?mode=ro", uri=True, timeout=10) as c:
        row = c.execute("SELECT run_uuid, status, end_time FROM runs WHERE name = ?", (name,)).fetchall()
        tags = c.execute("SELECT t.key FROM tags t JOIN runs r ON r.run_uuid = t.run_uuid WHERE r.name = ?", (name,)).fetchall()
    assert len(row) == 1, row
    return (*row[0], "stopped_reason" in {k for (k,) in tags})


def errors(r: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if ln.startswith("ensemble-kd: error:")]


def top1(summary: dict) -> dict[str, list[float]]:
    return {arm: a["top1"] for arm, a in summary["arms"].items()}


def test_tune_resume_with_nothing_to_resume_is_one_line_before_any_work(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "ensemble_kd.cli", "tune", "--config", str(TINY), "--out", str(out),
                        "--resume"], capture_output=True, text=True, env=_env(tmp_path), timeout=300, cwd=REPO)
    assert r.returncode == 2 and errors(r) == [errors(r)[0]], r.stderr[-3000:]
    assert errors(r)[0].startswith("ensemble-kd: error: tune --resume: nothing to resume: no earlier `ensemble-kd tune`")
    assert not (out / "tune").exists() and not (out / "data").exists()


@pytest.mark.slow
def test_run_resume_keeps_finished_trials_and_ends_as_an_uninterrupted_run(tmp_path, ray_tmp):
    d = yaml.safe_load(TINY.read_text())
    d["device"] = "cpu"
    d["distill"]["epochs"] = EPOCHS  # its state saved every epoch (distill.checkpoint_every: 1)
    d["tune"]["max_concurrent_trials"] = 1  # the second trial starts when the first has finished
    d["run"]["export"] = False
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(d, sort_keys=False))
    out = tmp_path / "out"

    r = run(cfg, out, ray_tmp, "--resume")  # nothing to resume yet
    assert r.returncode == 2 and len(errors(r)) == 1 and "nothing to resume" in errors(r)[0], r.stderr[-3000:]
    assert not (out / "teachers").exists() and not (out / "tune").exists()

    t0 = time.monotonic()
    proc = subprocess.Popen(_args(cfg, out), env=_env(ray_tmp), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        while True:  # Ctrl-C once the first trial finished and the second saved a few epochs
            done, going = progress(out)
            if done and any(3 <= e < EPOCHS - 3 for e in going.values()):
                break
            assert proc.poll() is None, f"the run ended before it was interrupted: {proc.communicate()}"
            assert time.monotonic() - t0 < 500, "no second trial under way within 500 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    rec = record(out)
    assert not rec["finished"]
    done, going = progress(out)
    assert len(done) == 1 and len(going) == 1, (done, going)
    (kept,), ((resumed, stopped_at),) = done, going.items()
    assert 3 <= stopped_at < EPOCHS, stopped_at
    student = out / "students" / kept / "student.pt"
    before = (student.stat().st_mtime_ns, student.read_bytes(), mlflow_run(out, kept))
    assert before[2][1] == "FINISHED" and mlflow_run(out, resumed)[1] == "KILLED"

    r = run(cfg, out, ray_tmp, "--resume", "--set", f"distill.epochs={EPOCHS + 1}")  # another config: refused
    assert r.returncode == 2 and len(errors(r)) == 1, r.stderr[-3000:]
    assert "config differs" in errors(r)[0] and f"distill.epochs: {EPOCHS} then, {EPOCHS + 1} now" in errors(r)[0]

    r = run(cfg, out, ray_tmp, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "1 of 2 trials had finished (kept)" in r.stdout + r.stderr
    log = Path(next(ln for ln in r.stderr.splitlines() if ln.startswith("log: "))[5:])
    assert f"resumed from the checkpoint of epoch {stopped_at}" in log.read_text()  # not from scratch
    assert (student.stat().st_mtime_ns, student.read_bytes(), mlflow_run(out, kept)) == before  # not run again
    assert mlflow_run(out, resumed)[1:2] == ("FINISHED",) and not mlflow_run(out, resumed)[3]
    assert record(out)["finished"] and record(out)["experiment"] == rec["experiment"]
    resumed_summary = json.loads((out / "summary.json").read_text())
    assert resumed_summary["parent_run_id"] == rec["parent_run_id"] and resumed_summary["unfinished"] == []

    r = run(cfg, out, ray_tmp, "--resume")  # it finished: nothing to resume
    assert r.returncode == 2 and "nothing to resume" in errors(r)[0] and "finished" in errors(r)[0], r.stderr[-3000:]

    r = run(cfg, out, ray_tmp)  # the same config uninterrupted (teachers and shards reused)
    assert r.returncode == 0, r.stderr[-3000:]
    whole = json.loads((out / "summary.json").read_text())
    assert record(out)["experiment"] != rec["experiment"]
    assert top1(resumed_summary) == top1(whole) and len(top1(whole)) == 2
    assert {a: v["mean_top1"] for a, v in resumed_summary["arms"].items()} == {a: v["mean_top1"] for a, v in whole["arms"].items()}


def test_resume_refuses_a_tune_folder_someone_else_could_have_written(tmp_path):
    """Tune's restore unpickles the experiment's files (code execution): a folder or file in it
    writable by anyone is refused in one line before any restore; the same folder, private, is not."""
    from ensemble_kd.core.config import ConfigError, load_config
    from ensemble_kd.orchestration.sweep import record_trials, resume_point

    cfg = load_config(None, {"output_dir": str(tmp_path / "out")})
    record_trials(cfg, "run", "exp-1", None)
    exp = tmp_path / "out" / "tune" / "exp-1"
    exp.mkdir(parents=True)
    pkl = exp / "tuner.pkl"
    pkl.write_bytes(b"not a real pickle")
    pkl.chmod(0o666)
    with pytest.raises(ConfigError, match=r"refusing to restore .*tuner\.pkl is writable by anyone"):
        resume_point(cfg, "run")
    pkl.chmod(0o644)
    assert resume_point(cfg, "run")["experiment"] == "exp-1"
