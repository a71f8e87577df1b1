"""MLflow with one writer: while a command runs, every MLflow call of its job (the driver's, a Ray
task's, a Tune trial's, a training loop's) is made by one actor on the driver's node
(``mlflow_store.writer_session``), into the store the driver resolved into the config.

Real local Ray (the session's), real MLflow: SQLite stores in temp folders, and a real
``mlflow server`` subprocess for the job run against a tracking server."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import ray
import ray.cloudpickle
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ensemble_kd.core.config import ExperimentConfig, from_dict, to_dict, to_yaml
from ensemble_kd.orchestration import pipeline
from ensemble_kd.training import tracking
from ensemble_kd.storage import mlflow_store

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "jobs" / "configs" / "tiny-uci-mfeat.yaml"
# a worker with a runtime env of its own does not have tests/ on its path: this module's functions go by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
EPOCHS = [{"epoch": 1, "test_top1": 0.5, "loss/ce": 1.25}, {"epoch": 2, "test_top1": 0.75, "loss/ce": 0.5}]


def fresh_worker(**env: str) -> dict:
    """A runtime env of its own: Ray starts a new worker process for it (no pooled worker that an
    earlier test's MLflow calls may have touched)."""
    return {"env_vars": {"EKD_TEST_WORKER": uuid.uuid4().hex, **env}}


def distill_here(cfg_dict: dict, run_name: str, student: str) -> dict:
    """What a trial does with MLflow, in whatever process calls it: open the run, log the epochs,
    finish it with the config and the student checkpoint; what this process then holds."""
    before = mlflow_store._client.cache_info().currsize
    cfg = from_dict(cfg_dict)
    rid = tracking.start_distill_run(cfg, run_name, tracking.RunContext(arm="w", kind="arm"))
    tracking.log_epochs(mlflow_store.tracking_uri(cfg), rid, EPOCHS)
    tracking.finish_distill_run(cfg, rid, 0.75, 2, Path(student))
    return {"run_id": rid, "pid": os.getpid(), "clients_before": before,
            "clients": mlflow_store._client.cache_info().currsize, "env_uri": os.environ.get("MLFLOW_TRACKING_URI"),
            "node_id": ray.get_runtime_context().get_node_id()}


@ray.remote(num_cpus=0.25)
def distill_task(cfg_dict: dict, run_name: str, student: str) -> dict:
    return distill_here(cfg_dict, run_name, student)


@ray.remote(num_cpus=0.25)
class TrialLike:
    """An actor, as a Tune trial is one."""

    def distill(self, cfg_dict: dict, run_name: str, student: str) -> dict:
        return distill_here(cfg_dict, run_name, student)


@ray.remote(num_cpus=0.25)
def refused_in_worker(uri: str, run_id: str) -> dict:
    """A call the store refuses, through the writer: what this process sees raised."""
    try:
        mlflow_store.client(uri).get_run(run_id)
    except Exception as e:  # noqa: BLE001 - the test compares what comes back
        return {"type": type(e), "code": getattr(e, "error_code", None), "message": str(e)}
    return {"type": None}


def config(out: Path, **over) -> ExperimentConfig:
    """The embedded default at out, loaded as a command loads it (tracking.uri resolved here)."""
    return pipeline.load(None, {"output_dir": str(out), "name": "writer", **over})


def student_file(out: Path) -> Path:
    p = out / "students" / "s" / "student.pt"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"weights")
    return p


def assert_finished(uri: str, run_id: str, cfg) -> None:
    """The run as finish_distill_run leaves it: FINISHED, every epoch's metrics at its step, the
    final metric, config.yaml (the config's text) and the student checkpoint."""
    c = MlflowClient(uri)
    r = c.get_run(run_id)
    assert r.info.status == "FINISHED"
    assert [(m.step, m.value) for m in c.get_metric_history(run_id, "test_top1")] == [(1, 0.5), (2, 0.75)]
    assert [m.value for m in c.get_metric_history(run_id, "loss/ce")] == [1.25, 0.5]
    assert r.data.metrics["final/test_top1"] == 0.75 and r.data.tags["arm"] == "w"
    assert {a.path for a in c.list_artifacts(run_id)} == {"config.yaml", "student"}
    assert [a.path for a in c.list_artifacts(run_id, "student")] == ["student/student.pt"]
    local = c.download_artifacts(run_id, "config.yaml", str(Path(cfg.output_dir) / f"dl-{run_id}"))
    assert Path(local).read_text() == to_yaml(mlflow_store.recorded_config(cfg))
    assert r.data.params["tracking.uri"] == str(mlflow_store.recorded_config(cfg).tracking.uri)


def test_the_driver_resolves_the_store_into_the_config_and_config_show_is_as_given(tmp_path, monkeypatch, capsys):
    """A command's config carries the store its driver resolved (tracking.uri, else
    $MLFLOW_TRACKING_URI, else the folder's SQLite file); `config show` prints the config as given;
    a run records the folder's own store as implicit (config.yaml reused with another --out tracks
    there), any other store as resolved."""
    from ensemble_kd.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    own = config(tmp_path / "a")
    assert own.tracking.uri == f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}"
    assert mlflow_store.recorded_config(own).tracking.uri is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    served = config(tmp_path / "a")
    assert served.tracking.uri == "http://tracking.example:5000" == mlflow_store.recorded_config(served).tracking.uri
    assert config(tmp_path / "a", **{"tracking.uri": "sqlite:////x/y.db"}).tracking.uri == "sqlite:////x/y.db"
    assert main(["config", "show", "--set", f"output_dir={tmp_path / 'a'}"]) == 0
    shown = capsys.readouterr().out
    assert "\n  uri: null\n" in shown and "tracking.example" not in shown


def test_workers_write_through_the_one_writer(ray_cluster, tmp_path, monkeypatch):
    """A Ray task and an actor (a trial's kind of process) run a distillation's MLflow calls while
    the writer is up: the runs land FINISHED with everything, and neither the workers nor the
    driver made an MLflow client of their own; the writer, on the driver's node, did."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = config(tmp_path / "out")
    uri = cfg.tracking.uri
    assert uri == f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    driver_clients = mlflow_store._client.cache_info().currsize
    with mlflow_store.writer_session(True) as writer:
        assert writer is not None  # up: the driver's calls go to it too
        assert isinstance(mlflow_store.client(uri), mlflow_store._WriterClient)
        task = ray.get(distill_task.options(runtime_env=fresh_worker()).remote(to_dict(cfg), "by-task",
                                                                               str(student_file(tmp_path / "out"))))
        trial = TrialLike.options(runtime_env=fresh_worker()).remote()
        actor = ray.get(trial.distill.remote(to_dict(cfg), "by-actor", str(student_file(tmp_path / "out"))))
        ray.kill(trial)
        info = ray.get(writer.info.remote())
    for res in (task, actor):
        assert res["clients_before"] == 0 and res["clients"] == 0, res  # the worker never made a real client
        assert_finished(uri, res["run_id"], cfg)
    assert task["run_id"] != actor["run_id"]
    assert info["clients"] == 1 and info["pid"] not in (os.getpid(), task["pid"], actor["pid"])
    assert info["node_id"] == ray.get_runtime_context().get_node_id()
    assert mlflow_store._client.cache_info().currsize == driver_clients  # the driver's calls went to the writer as well
    # the session over: the writer is gone, and the driver's client is its own again
    assert not isinstance(mlflow_store.client(uri), mlflow_store._WriterClient)
    with pytest.raises(ValueError):
        ray.get_actor(mlflow_store.WRITER_NAME)


def test_a_workers_own_tracking_uri_does_not_redirect_its_run(ray_cluster, tmp_path, monkeypatch):
    """The driver resolved the store into the config (no MLFLOW_TRACKING_URI there: the output
    folder's SQLite file); a worker whose environment names another store still writes into the
    driver's. Nothing is made at the worker's."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    cfg = config(out)
    theirs = f"sqlite:///{elsewhere / 'theirs.db'}"
    with mlflow_store.writer_session(True):
        res = ray.get(distill_task.options(runtime_env=fresh_worker(MLFLOW_TRACKING_URI=theirs)).remote(
            to_dict(cfg), "env-run", str(student_file(out))))
    assert res["env_uri"] == theirs  # the worker did see another store in its environment
    assert_finished(f"sqlite:///{out / 'mlflow.db'}", res["run_id"], cfg)
    assert list(elsewhere.iterdir()) == []


def test_a_refused_call_raises_the_same_error_in_the_worker(ray_cluster, tmp_path, monkeypatch):
    """What the store refuses comes back as MLflow raises it (not Ray's wrapper): in a worker and
    in the driver, the same type, error code and message."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = config(tmp_path / "out")
    uri = cfg.tracking.uri
    mlflow_store.ensure_experiment(uri, "refusals")  # the store exists: a direct client reads it
    missing = uuid.uuid4().hex
    with pytest.raises(MlflowException) as direct:
        MlflowClient(uri).get_run(missing)
    with mlflow_store.writer_session(True):
        got = ray.get(refused_in_worker.options(runtime_env=fresh_worker()).remote(uri, missing))
        with pytest.raises(MlflowException) as in_driver:
            mlflow_store.client(uri).get_run(missing)
    assert got["type"] is type(direct.value) is MlflowException
    assert got["code"] == direct.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    assert got["message"] == str(direct.value)
    assert type(in_driver.value) is MlflowException and in_driver.value.error_code == direct.value.error_code


def test_a_handle_on_an_earlier_sessions_writer_is_dropped(ray_cluster, tmp_path, monkeypatch):
    """A worker keeps its handle on the job's writer; after that session ended and another began
    (a long-lived Ray, as here: a pooled worker, a library's loop), its calls go to the new writer,
    and with none, to its own client as without a writer."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = config(tmp_path / "out")
    student = str(student_file(tmp_path / "out"))
    worker = TrialLike.options(runtime_env=fresh_worker()).remote()  # one process through all three
    try:
        with mlflow_store.writer_session(True):
            first = ray.get(worker.distill.remote(to_dict(cfg), "s1", student))
        with mlflow_store.writer_session(True):
            second = ray.get(worker.distill.remote(to_dict(cfg), "s2", student))
        alone = ray.get(worker.distill.remote(to_dict(cfg), "s3", student))
    finally:
        ray.kill(worker)
    assert first["pid"] == second["pid"] == alone["pid"]
    assert first["clients"] == second["clients"] == 0 and alone["clients"] == 1  # without a writer: its own client
    for res in (first, second, alone):
        assert_finished(cfg.tracking.uri, res["run_id"], cfg)


# -- a tracking server ----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_without_tracking() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for k in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "TQDM_DISABLE"):
        env.pop(k, None)
    return env


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on a free local port (its own process group, killed at the end);
    yields its URI."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{tmp_path / 'srv.db'}", "--default-artifact-root", str(tmp_path / "art"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env_without_tracking())
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        yield uri
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc.poll() is not None:
                break
            os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                continue
        log.close()


@pytest.mark.slow
def test_the_tiny_job_against_a_tracking_server(mlflow_server, tmp_path):
    """`ensemble-kd run` on the tiny job with tracking.uri a server: every run (teachers, arms, the
    parent) is at the server and FINISHED with its config; no SQLite store is made in the output
    folder; `compare --out` finds them through summary.json."""
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "ensemble_kd.cli", "run", "--config", str(TINY), "--out", str(out),
                        "--no-progress", "--set", "run.export=false", "--set", f"tracking.uri={mlflow_server}"],
                       capture_output=True, text=True, env=env_without_tracking(), timeout=900, cwd=REPO)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    assert not (out / "mlflow.db").exists() and not (out / "mlartifacts").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mlflow_tracking_uri"] == mlflow_server
    c = MlflowClient(mlflow_server)
    for name, want in (("tiny-job", 2), ("tiny-job-teachers", 2)):
        exp = c.get_experiment_by_name(name)
        runs = [x for x in c.search_runs([exp.experiment_id]) if mlflow_store.RUN_NAME_TAG in x.data.tags]
        assert len(runs) == want and {x.info.status for x in runs} == {"FINISHED"}, (name, runs)
        for x in runs:
            assert {a.path for a in c.list_artifacts(x.info.run_id)} >= {"config.yaml"}
            assert "final/test_top1" in x.data.metrics and len(c.get_metric_history(x.info.run_id, "loss/total")) >= 2
    assert c.get_run(summary["parent_run_id"]).info.status == "FINISHED"
    given = Path(c.download_artifacts(runs[0].info.run_id, "config.yaml", str(tmp_path / "dl"))).read_text()
    assert f"uri: {mlflow_server}" in given  # a store other than the folder's own is recorded as resolved
    cmp = subprocess.run([sys.executable, "-m", "ensemble_kd.cli", "compare", "--out", str(out), "--group-by", "arm",
                          "--json"], capture_output=True, text=True, env=env_without_tracking(), timeout=300, cwd=REPO)
    assert cmp.returncode == 0, cmp.stderr[-3000:]
    res = json.loads(cmp.stdout)
    assert res["tracking_uri"] == mlflow_server and res["experiment"] == "tiny-job"
    assert {g: row["runs"] for g, row in res["groups"].items()} == {"kd-single": 1, "crd+kd-ensemble": 1}
    assert res["unfinished"] == []
