"""`jobs/` for real: every config validates, and a local head started with `ray start --head` runs
the tiny job submitted with `ray job submit`; its MLflow runs land in the job's output folder."""
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ensemble_kd.core.config import load_config
from ensemble_kd.orchestration.pipeline import load

JOBS = Path(__file__).resolve().parents[1] / "jobs"


@pytest.mark.parametrize("path", sorted((JOBS / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_job_config_validates(path):
    cfg = load(path)  # schema, registry cross-checks and the run section's arms and sweep
    assert cfg.teachers or cfg.distill.teachers == ()


def test_the_default_config_lives_in_one_place():
    """The embedded default (what the entrypoint runs without --config) has no copy under jobs/."""
    default = load_config(None)
    copies = [p.name for p in (JOBS / "configs").glob("*.yaml") if load_config(p) == default]
    assert copies == []


def _free_ports(n: int) -> list[int]:
    """n distinct free ports: all n sockets are bound at once (one at a time, the OS may hand the
    same port out twice, and Ray refuses a port given to two of its components)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _ray(*args, env, timeout=120, check=True):
    return subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, check=check)


@pytest.mark.slow
def test_ray_job_submit_runs_the_tiny_job_on_a_local_head(tmp_path):
    tmp = tempfile.mkdtemp(prefix="ekd-h-", dir="/tmp")  # short: Ray's socket paths are length-limited
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", TQDM_DISABLE="1")
    # Every fixed default port gets a free one: the suite's own local cluster may still hold the
    # defaults (a second dashboard agent on 52365 never starts, and the job server then has no agent).
    flags = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
             "ray-client-server-port")
    port, dash, *more = _free_ports(2 + len(flags))
    ports = [f"--{flag}={p}" for flag, p in zip(flags, more)]
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}", *ports,
         "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--temp-dir={tmp}", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    out = tmp_path / "out"
    try:
        # Without --no-wait, as a user runs it: `ray job submit` streams the job's log and returns when
        # it ends (one process, not a `ray job status` process every few seconds while it runs)
        submit = ["job", "submit", "--address", address, "--submission-id", "ekd-tiny", "--log-style", "record", "--",
                  sys.executable, str(JOBS / "entrypoint.py"), "--config", str(JOBS / "configs" / "tiny-uci-mfeat.yaml"),
                  "--out", str(out), "--no-progress", "--set", "run.export=false"]  # export: tests/test_runjob.py
        deadline = time.time() + 180
        while True:  # the dashboard answers first; the job agent on the node comes up a little later
            sub = _ray(*submit, env=env, check=False, timeout=600)
            logs = sub.stdout + sub.stderr
            if "submitted successfully" in logs:
                break
            assert head.poll() is None, f"ray start --head exited: {head.stdout.read()}"
            assert time.time() < deadline, f"the job server at {address} took no job: {sub.stderr[-2000:]}"
            time.sleep(2)
        status = _ray("job", "status", "--address", address, "--log-color", "false", "ekd-tiny", env=env)
        status = (status.stdout + status.stderr).lower()  # "Job 'ekd-tiny' succeeded" goes to the log stream
        assert "job 'ekd-tiny' succeeded" in status, f"job status: {status}\nlogs:\n{logs[-4000:]}"
        assert sub.returncode == 0, logs[-4000:]
        assert "mlflow ui --backend-store-uri" in logs and "kd-single" in logs
        assert "[tune 2/2" in logs
        # ray.train's INFO lines (a report per epoch, a checkpoint line each) stay out of the job's log
        assert "Reporting training result" not in logs and "Checkpoint successfully created" not in logs
    finally:
        with contextlib.suppress(ProcessLookupError):  # (gone already if it failed to start)
            os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops its processes on SIGTERM
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["arms"]) == {"kd-single", "crd+kd-ensemble"}
    client = MlflowClient(summary["mlflow_tracking_uri"])
    exp = client.get_experiment_by_name("tiny-job")
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["arm"] for r in runs} == {"kd-single", "crd+kd-ensemble"}
    assert {r.data.tags["teacher_set"] for r in runs} == {"single", "ensemble"}
