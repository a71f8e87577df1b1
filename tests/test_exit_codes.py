"""Failure is failure: `ensemble-kd run` and `tune` exit 1 when an arm (or the sweep) has no finished
trial, and say why in one line; some seeds failing is reported and exits 0.

The real command in a subprocess (its own local Ray) on the tiny job of
jobs/configs/tiny-uci-mfeat.yaml, in one output folder (the later commands reuse its teachers and
shards). The failures are real ones, raised where a user's would be: an arm whose learning rate
makes the student's weights overflow in its first step (NonFiniteError in the loop), and a student
encoder (a plugin, the way a user's own encoder comes in) that refuses to be built at one seed, so
that only some seeds of an arm fail."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# one module fixture (a tiny run) per suite, not one per xdist worker
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_exit_codes")]

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "jobs" / "configs" / "tiny-uci-mfeat.yaml"

PLUGIN = '''"""Test plugin: an MLP student that refuses to be built at the seeds it is told (arch_kwargs
fail_seeds): the loop seeds torch with distill.seed before it builds the student."""
import torch

from modalities import ENCODERS
from modalities.encoders.mlp import mlp


@ENCODERS.register("mlp_fails_at_seed", input_kinds=("vector", "image"), test_shape=(20,), family="mlp")
def mlp_fails_at_seed(spec, num_classes, fail_seeds=(), **kwargs):
    if torch.initial_seed() in tuple(fail_seeds):
        raise ValueError(f"the test plugin refuses seed {torch.initial_seed()}")
    return mlp(spec, num_classes, **kwargs)
'''

# summary.json's keys before this change: a run whose trials all finish must keep exactly these
SUMMARY_KEYS = {"experiment", "mlflow_tracking_uri", "parent_run_id", "dataset", "student", "epochs", "teachers",
                "best_single_teacher", "arms", "reference", "interval", "unfinished", "sweep", "seconds", "plot",
                "output_dir", "selection"}
ARM_KEYS = {"teacher_set", "teachers", "method", "labels", "mean_top1", "std_top1", "seeds", "top1", "vs_student",
            "vs_kd", "of_reference"}


def cli(*args: str, plugins: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in (REPO, plugins) if p)}
    for k in ("RAY_ADDRESS", "TQDM_DISABLE"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "ensemble_kd.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=REPO)


def config(path: Path, **changes) -> Path:
    """The tiny job with top-level sections changed (a dict section is updated, a value replaced)."""
    d = yaml.safe_load(TINY.read_text())
    for k, v in changes.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("ensemble-kd: error:")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """(output folder, plugin folder, the first run): the tiny job with a third arm, `hot`, whose every
    trial diverges at once; `hot` is the last arm, so the one `run` exports."""
    tmp = tmp_path_factory.mktemp("exit-codes")
    plugins = tmp / "plugins"
    plugins.mkdir()
    (plugins / "ekd_test_seedfail.py").write_text(PLUGIN)
    out = tmp / "out"
    d = yaml.safe_load(TINY.read_text())
    arms = [d["run"]["arms"][0], {"name": "hot", "teachers": "none", "losses": [{"name": "ce"}],
                                  "set": {"distill.optim.lr": 1e30}}]
    cfg = config(tmp / "hot.yaml", run={"arms": arms})
    r = cli("run", "--config", str(cfg), "--out", str(out))
    return out, plugins, r


def test_run_whose_arm_has_no_finished_trial_exits_1_and_says_why(folder):
    out, _, r = folder
    assert r.returncode == 1, (r.stdout[-3000:], r.stderr[-3000:])
    assert "Traceback" not in r.stdout + r.stderr, r.stderr[-3000:]
    (line,) = error_lines(r.stderr)
    assert line.startswith("ensemble-kd: error: arm 'hot' has no finished trial; its trial did not finish: "
                           "loss part 'ce' became non-finite at epoch 1"), line
    assert f"{out}/summary.json" in line
    # the table: the failed trial with its reason, and the arm as failed; the export says why it has nothing
    assert any(ln.strip().startswith("hot/seed0") and "ERROR" in ln and "became non-finite" in ln
               for ln in r.stdout.splitlines()), r.stdout
    assert "FAILED: no finished trial, nothing averaged (the command exits 1):" in r.stdout
    assert any(ln.startswith("  hot: its trial did not finish: loss part 'ce' became non-finite")
               for ln in r.stdout.splitlines()), r.stdout
    export = [ln for ln in r.stdout.splitlines() if ln.startswith("export:")]
    assert len(export) == 1 and export[0].startswith(
        "export: nothing to export: arm 'hot' (the one run exports) has no finished trial; its trial did not finish: "
        "loss part 'ce' became non-finite"), export
    s = json.loads((out / "summary.json").read_text())
    assert set(s) == SUMMARY_KEYS | {"failed_arms"}, set(s) ^ SUMMARY_KEYS
    assert list(s["failed_arms"]) == ["hot"] and "became non-finite" in s["failed_arms"]["hot"]
    (u,) = s["unfinished"]
    assert u["arm"] == "hot" and u["status"] == "ERROR" and u["reason"].startswith("loss part 'ce' became non-finite")
    assert "\n" not in u["reason"]
    assert list(s["arms"]) == ["kd-single"] and set(s["arms"]["kd-single"]) == ARM_KEYS  # the finished arm: as before


def test_run_where_only_some_seeds_fail_exits_0_and_the_table_shows_them(folder):
    out, plugins, first = folder
    assert first.returncode == 1, first.stderr[-3000:]
    d = yaml.safe_load(TINY.read_text())
    student = {**d["distill"]["student"], "arch": "mlp_fails_at_seed",
               "arch_kwargs": {**d["distill"]["student"]["arch_kwargs"], "fail_seeds": [1]}}
    cfg = config(out.parent / "seeds.yaml", plugins=["ekd_test_seedfail"], distill={"student": student},
                 run={"seeds": [0, 1], "arms": [d["run"]["arms"][0]], "export": False})
    r = cli("run", "--config", str(cfg), "--out", str(out), plugins=plugins)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert not error_lines(r.stderr) and "Traceback" not in r.stdout + r.stderr
    row = next(ln for ln in r.stdout.splitlines() if ln.startswith("kd-single "))
    assert " 1/2 " in row and "(seeds 1 did not finish: below)" in row, row
    bad = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith("kd-single/seed1"))
    assert "ERROR" in bad and "ValueError: the test plugin refuses seed 1" in bad, bad
    assert "FAILED" not in r.stdout
    s = json.loads((out / "summary.json").read_text())
    assert "failed_arms" not in s and s["arms"]["kd-single"]["seeds"] == [0]
    assert s["arms"]["kd-single"]["unfinished_seeds"] == [1]
    (u,) = s["unfinished"]
    assert u["trial"] == "kd-single/seed1" and "ValueError: the test plugin refuses seed 1" in u["reason"]


def _sweep_config(folder, name: str, seeds: list[int]) -> Path:
    out, _, _ = folder
    d = yaml.safe_load(TINY.read_text())
    student = {**d["distill"]["student"], "arch": "mlp_fails_at_seed",
               "arch_kwargs": {**d["distill"]["student"]["arch_kwargs"], "fail_seeds": [1]}}
    return config(out.parent / f"{name}.yaml", plugins=["ekd_test_seedfail"],
                  distill={"student": student, "teachers": [], "losses": [{"name": "ce"}], "seed": 1},
                  tune={"scheduler": "fifo", "space": {"distill.seed": {"grid": seeds}}}, run={"arms": []})


def test_tune_with_no_finished_trial_exits_1_in_one_line(folder):
    out, plugins, _ = folder
    r = cli("tune", "--config", str(_sweep_config(folder, "tune-none", [1])), "--out", str(out), plugins=plugins)
    assert r.returncode == 1, (r.stdout[-3000:], r.stderr[-3000:])
    assert "Traceback" not in r.stdout + r.stderr, r.stderr[-3000:]
    (line,) = error_lines(r.stderr)
    assert line.startswith("ensemble-kd: error: the sweep has no finished trial (1 of 1 did not finish): "
                           "ValueError: the test plugin refuses seed 1"), line


def test_tune_with_some_trials_failed_exits_0_and_lists_them(folder):
    out, plugins, _ = folder
    r = cli("tune", "--config", str(_sweep_config(folder, "tune-some", [0, 1])), "--out", str(out), plugins=plugins)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert not error_lines(r.stderr)
    lines = r.stdout.splitlines()
    i = lines.index("failed:")
    assert "distill.seed=1: ERROR after 0 epochs: ValueError: the test plugin refuses seed 1" in lines[i + 1], lines[i:]
