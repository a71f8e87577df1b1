"""A real Ray cluster of several nodes on this machine (tests/cluster.py): a CPU-less head with the
job server and two 1-CPU worker nodes, each its own `ray start` process group with its own ports
and temp dir. Jobs go in with `ray job submit --working-dir .`, as a user submits them; a node
started in its own mount namespace sees an empty folder where the others see the output folder."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ensemble_kd.storage.shards import Shard
from tests.cluster import REPO, LocalCluster

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("cluster")]

TINY = ["python", "jobs/entrypoint.py", "--config", "jobs/configs/tiny-uci-mfeat.yaml", "--no-progress",
        "--set", "run.export=false"]


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(head_cpus=0) as c:
        c.add_worker(1, wait=False)
        c.add_worker(1)
        yield c


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The folder every node mounts (here: the same folder, seen by every node but a hidden one)."""
    return tmp_path_factory.mktemp("shared")


def _all_runs(uri: str) -> list:
    c = MlflowClient(uri)
    return [r for e in c.search_experiments() for r in c.search_runs([e.experiment_id], max_results=1000)]


def test_the_tiny_job_runs_on_both_worker_nodes_and_writes_everything_whole(cluster, shared):
    out = shared / "out"
    workers = cluster.nodes[1:]
    t0 = time.perf_counter()
    sub = cluster.submit(*TINY, "--out", str(out), submission_id="ekd-tiny-3nodes")
    took = time.perf_counter() - t0
    logs = sub.stdout + sub.stderr
    assert "job 'ekd-tiny-3nodes' succeeded" in cluster.job_status("ekd-tiny-3nodes"), logs[-4000:]
    assert f"output folder {out}: seen by all 3 nodes" in logs
    # work on both worker nodes: each node's own logs hold the loop's per-epoch lines of its workers
    for node in workers:
        assert "[teacher " in node.log_text() or "test_top1" in node.log_text(), f"no work on {node.name}"
    per_node = [node.log_text().count("epoch") for node in workers]
    assert all(n > 0 for n in per_node), per_node
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["arms"]) == {"kd-single", "crd+kd-ensemble"}
    assert all(a["seeds"] == [0] and len(a["top1"]) == 1 for a in summary["arms"].values()) and not summary["unfinished"]
    shards = sorted((out / "shards").iterdir())
    assert len(shards) == 4  # 2 teachers x train/test
    for d in shards:
        Shard(d)  # the manifest and the sha256 of every part
    assert len(list((out / "students").glob("*/student.pt"))) == 2
    runs = _all_runs(summary["mlflow_tracking_uri"])
    assert len(runs) == 2 + 2 + 1  # 2 teachers, 2 distillations and the run's parent
    assert {r.info.status for r in runs} == {"FINISHED"}, [(r.info.run_name, r.info.status) for r in runs]
    arms = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == summary["parent_run_id"]]
    assert {r.data.tags["arm"]: r.data.tags["teacher_set"] for r in arms} == {"kd-single": "single",
                                                                               "crd+kd-ensemble": "ensemble"}
    # what the job's log shows a user: the trial lines and where MLflow is; no Ray Train INFO line per report
    assert "[tune 2/2" in logs and "mlflow ui --backend-store-uri" in logs
    assert "Reporting training result" not in logs and "Checkpoint successfully created" not in logs
    print(f"tiny job on a 3-node cluster: {took:.1f}s from submission")


def test_a_relative_out_in_a_job_on_several_nodes_is_refused(cluster):
    sub = cluster.submit(*TINY, "--out", "rel-out", submission_id="ekd-relative-out")
    logs = sub.stdout + sub.stderr
    assert "job 'ekd-relative-out' failed" in cluster.job_status("ekd-relative-out"), logs[-4000:]
    assert "inside this Ray job's temporary copy of its working dir" in logs and "give an absolute --out" in logs
    assert "Traceback" not in logs


def test_a_node_that_does_not_see_the_output_folder_is_refused_before_any_work(cluster, shared):
    out = shared / "out-unshared"
    hidden = cluster.add_worker(1, hide=shared)  # sees an empty tmpfs at the shared folder's path
    try:
        t0 = time.perf_counter()
        sub = cluster.submit(*TINY, "--out", str(out), submission_id="ekd-unshared")
        took = time.perf_counter() - t0
        logs = sub.stdout + sub.stderr
        assert "job 'ekd-unshared' failed" in cluster.job_status("ekd-unshared"), logs[-4000:]
        line = next(ln for ln in logs.splitlines() if "ensemble-kd: error:" in ln)
        assert "does not see the output folder" in line and str(out) in line, line
        assert "mount the same folder at that path on every node" in line
        assert took < 60, took
        print(f"a node that does not see the output folder: refused {took:.1f}s from submission")
        # before any work: no data store, no teacher, no shard
        assert not (out / "data").exists() and not (out / "teachers").exists() and not (out / "shards").exists()

        # A node that joins after the check: a worker there that cannot find what the driver wrote
        # names its node and the folder (and never prepares its own data store)
        probe = f"""
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from ensemble_kd.core.config import DataConfig
from ensemble_kd.storage.datastore import prepare, open_split
from ensemble_kd.training.state import load_state
from ensemble_kd.storage.shards import read_manifest
from ensemble_kd.storage.teacher_checkpoint import file_format
ray.init(address={cluster.gcs!r}, logging_level="ERROR", log_to_driver=False)
prepare(DataConfig(), "train", {str(out)!r})
node = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU") and
        {str(hidden.temp_dir)!r} in n.get("ObjectStoreSocketName", "")][0]
pin = NodeAffinitySchedulingStrategy(node, soft=False)
for f in (lambda: open_split(DataConfig(), "train", {str(out)!r}), lambda: load_state({str(out / "ray_results")!r}),
          lambda: read_manifest({str(shared / "out" / "shards" / "kar_mlp__train")!r}),
          lambda: file_format({str(shared / "out" / "teachers" / "kar_mlp.pt")!r})):
    try:
        ray.get(ray.remote(num_cpus=0.1, max_retries=0)(f).options(scheduling_strategy=pin).remote())
    except Exception as e:
        print("ERR", str(e.cause if hasattr(e, "cause") else e).splitlines()[0])
print("NODE", node[:12])
"""
        r = subprocess.run([sys.executable, "-c", probe], env=cluster.env, capture_output=True, text=True, timeout=180,
                           cwd=REPO)
        errs = [ln for ln in r.stdout.splitlines() if ln.startswith("ERR")]
        node = next(ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("NODE"))
        assert len(errs) == 4, r.stdout + r.stderr[-3000:]
        for e in errs:
            assert f"node {node}" in e and str(shared) in e and "mount the same folder" in e, e
            assert "delete" not in e
        assert not (Path(hidden.temp_dir) / "data").exists()
    finally:
        hidden.stop()
        cluster.nodes.remove(hidden)


def test_a_three_trial_sweep_on_two_nodes_loses_no_run_in_the_sqlite_store(cluster, shared):
    """bench/cluster_sweep.py's submission, once, on this module's cluster (its smoke test too)."""
    spec = importlib.util.spec_from_file_location("cluster_sweep", REPO / "bench" / "cluster_sweep.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    (row,) = bench.submissions(cluster, shared / "out", 1)  # the first test's teachers and shards reused
    assert row["succeeded"], row.get("log_tail")
    assert row["runs"] == {"FINISHED": 3}, row
