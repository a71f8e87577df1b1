"""Ray Tune for real: trials are Ray Train distillations on the session's local Ray, each an MLflow
run (SQLite in a temp folder) nested under the sweep's parent run."""

import pytest
from mlflow.tracking import MlflowClient
from ray import tune

from ensemble_kd.orchestration import pipeline
from ensemble_kd.core.config import ConfigError
from ensemble_kd.orchestration.sweep import domain, search_space
from ensemble_kd.storage.mlflow_store import tracking_uri
from ensemble_kd.orchestration.compare import compare
from tests.helpers import distill_cfg, embed, out_with_teachers

CRD = {"name": "crd", "weight": 0.8, "kwargs": {"num_negatives": 128, "per_sample": False, "feat_dim": 16}}


def sweep_cfg(out, **over):
    d = {"distill.teachers": ["kar_mlp"], "distill.losses": [{"name": "ce"}, {"name": "kd"}, CRD],
         "distill.epochs": 2, "tracking.enabled": True, "tracking.experiment": "sweep",
         "tune.cpus_per_trial": 1, "tune.scheduler": "fifo",
         "tune.space": {"distill.losses.crd.kwargs.tau": {"grid": [0.05, 0.2]}}}
    d.update(over)
    return distill_cfg(out, **d)


@pytest.fixture(scope="module")
def out(ray_cluster, trained, shard_cache, tmp_path_factory):
    out = out_with_teachers(trained, tmp_path_factory, "tune", shards_from=shard_cache)
    c = sweep_cfg(out)
    embed(c)
    return out


def test_two_trial_grid_lands_two_finished_nested_runs(out):
    cfg = sweep_cfg(out)
    lines = []
    res = pipeline.sweep(cfg, log=lines.append)
    assert len(res.trials) == 2 and all(t.status == "TERMINATED" for t in res.trials)
    assert sorted(t.overrides["distill.losses.crd.kwargs.tau"] for t in res.trials) == [0.05, 0.2]
    assert res.best is not None and res.best.metrics["test_top1"] == max(t.metrics["test_top1"] for t in res.trials)
    assert sum("[tune " in ln for ln in lines) == 2 and "best" in lines[-1]

    client = MlflowClient(tracking_uri(cfg))
    exp = client.get_experiment_by_name("sweep")
    kids = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{res.parent_run_id}'")
    assert len(kids) == 2 and {r.info.status for r in kids} == {"FINISHED"}
    taus = sorted(r.data.params["distill.losses.2.kwargs.tau"] for r in kids)
    assert taus == ["0.05", "0.2"]
    for r in kids:
        assert r.data.tags["teacher_set"] == "single" and r.data.tags["method"] == "ce+kd+crd"
        assert r.data.tags["sweep.distill.losses.crd.kwargs.tau"] == r.data.params["distill.losses.2.kwargs.tau"]
        hist = client.get_metric_history(r.info.run_id, "test_top1")
        assert [m.step for m in hist] == [1, 2]  # logged per epoch from the trial's worker
        assert len(client.get_metric_history(r.info.run_id, "loss/crd")) == 2
        assert "final/test_top1" in r.data.metrics
    parent = client.get_run(res.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["best/test_top1"] == res.best.metrics["test_top1"]
    # the table groups the sweep's trials (the parent has no final metric and is left out)
    assert compare(tracking_uri(cfg), "sweep", group_by="method")["groups"]["ce+kd+crd"]["runs"] == 2


def test_asha_stops_a_hopeless_trial_and_its_run_is_ended(out):
    # lr 1e-6 cannot learn in one epoch; run one trial at a time, so the good one sets the rung first
    cfg = sweep_cfg(out, **{"distill.epochs": 3, "distill.losses": [{"name": "ce"}], "distill.teachers": [],
                            "tune.scheduler": "asha", "tune.grace_period": 1, "tune.max_concurrent_trials": 1,
                            "tune.space": {"distill.optim.lr": {"grid": [0.05, 1e-6]}},
                            "tracking.experiment": "asha"})
    res = pipeline.sweep(cfg, log=lambda m: None)
    by_lr = {t.overrides["distill.optim.lr"]: t for t in res.trials}
    assert by_lr[0.05].status == "TERMINATED" and by_lr[0.05].epochs == 3
    assert by_lr[1e-6].status == "STOPPED" and by_lr[1e-6].epochs < 3
    client = MlflowClient(tracking_uri(cfg))
    exp = client.get_experiment_by_name("asha")
    kids = {r.data.params["distill.optim.lr"]: r for r in
            client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{res.parent_run_id}'")}
    assert kids["0.05"].info.status == "FINISHED"
    assert kids["1e-06"].info.status == "KILLED" and kids["1e-06"].data.tags["stopped_reason"].startswith("stopped early")
    # its workers may finish an epoch or two before the stop reaches them: at least what Tune saw is logged
    assert len(client.get_metric_history(kids["1e-06"].info.run_id, "test_top1")) >= by_lr[1e-6].epochs
    assert res.killed_runs == [kids["1e-06"].info.run_id]


def test_search_space_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"tune.space.distill.optim.lr: expected one of"):
        domain("distill.optim.lr", {"between": [0, 1]})
    with pytest.raises(ConfigError, match=r"tune.space.x.uniform: expected \[low, high\]"):
        domain("x", {"uniform": [1, 0]})
    with pytest.raises(ConfigError, match=r"no option\(s\) \['tauu'\]"):
        search_space(sweep_cfg(tmp_path, **{"tune.space": {"distill.losses.crd.kwargs.tauu": {"grid": [1]}}}))
    with pytest.raises(ConfigError, match=r"distill.losses has no item 'vid'"):
        search_space(sweep_cfg(tmp_path, **{"tune.space": {"distill.losses.vid.kwargs.tau": {"grid": [1]}}}))
    with pytest.raises(ConfigError, match="tune.space is empty"):
        search_space(sweep_cfg(tmp_path, **{"tune.space": {}}))

    assert domain("k", {"grid": [1, 2]}, "random").__class__ is type(tune.choice([1, 2]))
