"""What `ensemble-kd` shows a person, and what it keeps.

The real command in a subprocess, its output piped (as in CI, `| tee`, `> out.txt`), on the tiny
job of jobs/configs/tiny-uci-mfeat.yaml (two teachers, two arms, one seed). Before this, the
console of such a run carried Ray's colour codes and `(_fit_local pid=...)` prefixes on every
per-epoch worker line (with the buffer checksums), bar redraws, and MLflow's, Ray's and Tune's
INFO lines; now those go to `<out>/logs/run-<time>.log` and the console holds the steps, one line
per trial, the table and the paths, ending with the log file. `-v` brings the per-epoch lines
back to the console, `-q` leaves only the table and the paths."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# one module fixture (a tiny run) per suite, not one per xdist worker
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_console")]

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "jobs" / "configs" / "tiny-uci-mfeat.yaml"
# The tiny run's console, counted: 3 opening lines (the run, the two data splits), 2 per teacher
# (started, finished), 2 shard lines per teacher, the shard summary and the run plan, 1 per trial
# (2), the table (teachers 4, arms 5 + 1 blank), 5 path lines (summary, export, MLflow, done, log):
# 31 with its blank lines. 40 leaves room for a warning or two, not for a line per epoch (12).
MAX_LINES = 40


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for k in ("RAY_ADDRESS", "TQDM_DISABLE"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "ensemble_kd.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=REPO)


def log_of(r: subprocess.CompletedProcess, out: Path, command: str = "run") -> Path:
    """The log file the console's last line names (on stderr: a JSON stdout stays parseable)."""
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("log: "), r.stderr[-2000:]
    path = Path(last[len("log: "):])
    assert path.parent == out / "logs" and re.fullmatch(rf"{command}-\d{{8}}-\d{{6}}(-\d+)?\.log", path.name), path
    assert path.is_file()
    return path


def plain(text: str) -> None:
    """Nothing a file or a pipe should not get: no escape codes (colour, cursor moves), no bar
    redraws, no process ids, no internal diagnostics."""
    assert "\x1b" not in text, [ln for ln in text.splitlines() if "\x1b" in ln][:3]
    assert "\r" not in text, [ln for ln in text.splitlines() if "\r" in ln][:3]
    assert "pid=" not in text, [ln for ln in text.splitlines() if "pid=" in ln][:3]
    assert "buffer_checksums" not in text


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """A fresh output folder after `ensemble-kd run` on the tiny job: (folder, the finished command)."""
    out = tmp_path_factory.mktemp("console") / "out"
    r = cli("run", "--config", str(TINY), "--out", str(out))
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return out, r


def test_piped_console_is_plain_short_and_ends_naming_the_log_file(first):
    out, r = first
    text = r.stdout + r.stderr
    plain(text)
    assert not re.search(r"\bINFO\b", text), [ln for ln in text.splitlines() if "INFO" in ln][:3]  # MLflow, Ray, Tune
    assert "[teacher " not in text  # no per-epoch line
    lines = text.splitlines()
    assert len(lines) <= MAX_LINES, "\n".join(lines)
    for want in ("teacher pix_cnn: test top-1", "teacher kar_mlp: test top-1", "kd-single/seed0: done after 2 epochs",
                 "crd+kd-ensemble/seed0: done after 2 epochs", "summary: ", "done in "):
        assert want in r.stdout, want
    log_of(r, out)


def test_the_log_file_holds_every_console_line_and_the_details(first):
    out, r = first
    log = log_of(r, out).read_text()
    for line in r.stdout.splitlines():  # every console line, in order of arrival, behind a time stamp
        assert line.strip() == "" or line in log, line
    for teacher in ("pix_cnn", "kar_mlp"):  # the loop's per-epoch lines from the teachers' Ray tasks (3 epochs)
        got = re.findall(rf"\(_fit_local pid=\d+\) \[teacher {teacher}\] loss/ce=\S+ .*epoch=(\d+)", log)
        assert got == ["1", "2", "3"], (teacher, got)
    for trial in ("kd-single/seed0", "crd+kd-ensemble/seed0"):  # and from each Tune trial (2 epochs)
        assert re.findall(rf"\[{re.escape(trial)}\] .*epoch=(\d+)", log) == ["1", "2"], trial
    for info in ("INFO mlflow.store.db.utils: Creating initial MLflow database tables",
                 "INFO ray._private.worker: Started a local Ray instance",
                 "INFO ray.tune.tune: Wrote the latest version of all result files"):
        assert info in log, info
    assert "\x1b" not in log and "buffer_checksums" not in log


def test_verbose_shows_the_per_epoch_lines_and_info_on_the_console(first):
    out, _ = first
    r = cli("run", "--config", str(TINY), "--out", str(out), "-v")  # teachers and shards reused; the trials run again
    assert r.returncode == 0, r.stderr[-4000:]
    text = r.stdout + r.stderr
    plain(text)
    for trial in ("kd-single/seed0", "crd+kd-ensemble/seed0"):
        assert re.findall(rf"^\(distill_trial\) \[{re.escape(trial)}\] .*epoch=(\d+)", r.stdout, re.M) == ["1", "2"], trial
    assert "INFO ray._private.worker: Started a local Ray instance" in r.stderr
    log_of(r, out)


def test_quiet_shows_only_the_table_and_the_paths(first):
    out, _ = first
    r = cli("run", "--config", str(TINY), "--out", str(out), "-q")
    assert r.returncode == 0, r.stderr[-4000:]
    text = r.stdout + r.stderr
    plain(text)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert lines[0].split() == ["teacher", "arch", "modality", "test", "top-1"], lines[:3]  # nothing before the table
    for step in ("ensemble-kd run:", "data uci-mfeat", "teacher kar_mlp: reused", "shard ", "run: 2 arms", "[tune "):
        assert not any(ln.startswith(step) for ln in lines), step
    paths = [ln.split(":")[0] for ln in lines if re.match(r"^(summary|export|MLflow|log): ", ln)]
    assert paths == ["summary", "export", "MLflow", "log"], paths
    assert lines[-2].startswith("done in ")
    log = log_of(r, out).read_text()
    assert "teacher kar_mlp: reused" in log and "[tune 2/2" in log  # the steps are still in the file
