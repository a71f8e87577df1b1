"""Many trials, several nodes, one SQLite MLflow store: is any run lost?

Starts a local cluster of a CPU-less head and two 1-CPU worker nodes (tests/cluster.py: each node
its own `ray start` process group), then submits the tiny job with one arm over three seeds (a
3-trial Tune sweep) ``--repeats`` times with `ray job submit --working-dir .`, all into one output
folder and its default SQLite store (teachers and shards reused after the first). After each
submission it counts the store's runs: every distillation FINISHED, none missing. Also runs the
same job once on a single 2-CPU node, for the time ratio.

    python3 bench/cluster_sweep.py                 # 5 submissions on 3 nodes, 1 on one node
    python3 bench/cluster_sweep.py --repeats 1 --no-single
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.cluster import LocalCluster  # noqa: E402 - the repo's own cluster harness

SEEDS = [0, 1, 2]
JOB = ["python", "jobs/entrypoint.py", "--config", "jobs/configs/tiny-uci-mfeat.yaml", "--no-progress",
       "--set", "run.export=false", "--set", f"run.seeds={SEEDS}",
       "--set", "run.arms=[{name: crd+kd-ensemble, teachers: all}]"]


def count_runs(out: Path) -> dict[str, int]:
    """The distillations of the folder's last job (its summary's parent run) by status, read from
    the store."""
    summary = json.loads((out / "summary.json").read_text())
    c = MlflowClient(summary["mlflow_tracking_uri"])
    exp = c.get_experiment_by_name(summary["experiment"])
    runs = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'",
                         max_results=10_000)
    by: dict[str, int] = {}
    for r in runs:
        by[r.info.status] = by.get(r.info.status, 0) + 1
    return by


def submissions(cluster: LocalCluster, out: Path, repeats: int, tag: str = "sweep") -> list[dict]:
    """``repeats`` submissions of the 3-trial job into ``out``; each one's seconds, job status and
    the store's run counts after it."""
    rows = []
    for i in range(repeats):
        sid = f"ekd-{tag}-{i}-{int(time.time())}"
        t0 = time.perf_counter()
        sub = cluster.submit(*JOB, "--out", str(out), submission_id=sid)
        took = time.perf_counter() - t0
        status = cluster.job_status(sid)
        ok = f"job '{sid}' succeeded" in status
        rows.append({"submission": i, "seconds": round(took, 1), "succeeded": ok, "runs": count_runs(out) if ok else None,
                     **({} if ok else {"log_tail": (sub.stdout + sub.stderr)[-2000:]})})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="submissions on the 3-node cluster")
    ap.add_argument("--no-single", action="store_true", help="skip the same job on one 2-CPU node")
    a = ap.parse_args(argv)
    res: dict = {}
    with tempfile.TemporaryDirectory(prefix="ekd-sweep-") as tmp:
        with LocalCluster(head_cpus=0) as c:
            c.add_worker(1, wait=False)
            c.add_worker(1)
            res["three_nodes"] = submissions(c, Path(tmp) / "out3", a.repeats)
        if not a.no_single:
            with LocalCluster(head_cpus=2) as c:
                c.wait_for_nodes(1)
                res["one_node"] = submissions(c, Path(tmp) / "out1", 1, "single")
    three = res["three_nodes"]
    expected = {"FINISHED": len(SEEDS)}
    res["all_finished"] = all(r["succeeded"] and r["runs"] == expected for r in three)
    res["expected_per_submission"] = expected
    if not a.no_single:
        res["first_submission_ratio_3nodes_over_1node"] = round(three[0]["seconds"] / res["one_node"][0]["seconds"], 2)
    print(json.dumps(res, indent=2))
    return 0 if res["all_finished"] else 1


if __name__ == "__main__":
    sys.exit(main())
