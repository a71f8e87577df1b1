"""MLflow for real: a SQLite store in a temp folder, runs from real distillations, compare."""
import json

import pytest
from mlflow.tracking import MlflowClient

from ensemble_kd.cli import main
from ensemble_kd.core.config import to_yaml
from ensemble_kd.storage.mlflow_store import TrackingError, tracking_uri
from ensemble_kd.orchestration.compare import compare, sweep_point
from tests.helpers import distill_cfg, embed, out_with_teachers, run_distill

ARMS = {
    "ensemble": {"distill.teachers": ["pix_cnn", "kar_mlp"], "distill.losses": [{"name": "ce"}, {"name": "kd"}]},
    "single": {"distill.teachers": ["kar_mlp"], "distill.losses": [{"name": "ce"}, {"name": "kd"}]},
    "none": {"distill.teachers": [], "distill.losses": [{"name": "ce"}]},
}


def cfg_for(out, arm, seed=0):
    return distill_cfg(out, **{**ARMS[arm], "distill.epochs": 2, "distill.seed": seed, "tracking.enabled": True,
                               "tracking.experiment": "arms"})


@pytest.fixture(scope="module")
def tracked(ray_cluster, trained, shard_cache, tmp_path_factory):
    """Three arms (two seeds of the ensemble) distilled and logged to one SQLite MLflow store."""
    out = out_with_teachers(trained, tmp_path_factory, "tracked", shards_from=shard_cache)
    c0 = cfg_for(out, "ensemble")
    embed(c0)
    runs = {}
    for arm, seed in (("ensemble", 0), ("ensemble", 1), ("single", 0), ("none", 0)):
        runs[(arm, seed)] = run_distill(cfg_for(out, arm, seed))
    return out, c0, runs


def test_runs_land_with_params_metrics_tags_artifacts(tracked):
    out, cfg, runs = tracked
    uri = tracking_uri(cfg)
    assert uri == f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(uri)
    r = client.get_run(runs[("ensemble", 0)].mlflow_run_id)
    assert r.info.status == "FINISHED"
    assert r.data.params["distill.epochs"] == "2" and r.data.params["distill.teachers.1"] == "kar_mlp"
    assert r.data.tags["teacher_set"] == "ensemble" and r.data.tags["teachers"] == "pix_cnn,kar_mlp"
    assert r.data.tags["teacher_modalities"] == "kar,pix" and r.data.tags["student_modality"] == "fou"
    assert r.data.tags["method"] == "ce+kd" and r.data.tags["dataset"] == "uci-mfeat"
    hist = client.get_metric_history(r.info.run_id, "test_top1")
    assert [m.step for m in hist] == [1, 2]
    assert [m.value for m in hist] == [h["test_top1"] for h in runs[("ensemble", 0)].history]
    assert len(client.get_metric_history(r.info.run_id, "loss/kd")) == 2 and "lr" in r.data.metrics
    arts = {a.path for a in client.list_artifacts(r.info.run_id)} | {a.path for a in client.list_artifacts(r.info.run_id, "student")}
    assert "config.yaml" in arts and "student/student.pt" in arts
    assert client.get_run(runs[("none", 0)].mlflow_run_id).data.tags["teacher_set"] == "none"


def test_epochs_sent_in_batches_all_reach_mlflow(tracked):
    """With a long metrics_flush_s the loop sends at checkpoints and at the end only: every epoch,
    at its own step, still lands (epoch 1 with the checkpoint of epoch 2, epoch 3 at the end)."""
    out, _, _ = tracked
    cfg = distill_cfg(out, **{**ARMS["single"], "distill.epochs": 3, "distill.checkpoint_every": 2,
                              "distill.metrics_flush_s": 3600, "tracking.enabled": True, "tracking.experiment": "batched"})
    r = run_distill(cfg)
    client = MlflowClient(tracking_uri(cfg))
    assert [m.step for m in client.get_metric_history(r.mlflow_run_id, "loss/kd")] == [1, 2, 3]
    assert [m.value for m in client.get_metric_history(r.mlflow_run_id, "test_top1")] == [h["test_top1"] for h in r.history]


def test_compare_groups_by_teacher_set_and_other_tags(tracked, capsys):
    out, cfg, runs = tracked
    res = compare(tracking_uri(cfg), "arms")
    g = res["groups"]
    assert {k: v["runs"] for k, v in g.items()} == {"ensemble": 2, "none": 1, "single": 1}
    ens = [runs[("ensemble", s)].final_top1 for s in (0, 1)]
    assert g["ensemble"]["mean_top1"] == pytest.approx(sum(ens) / 2) and g["ensemble"]["best_top1"] == max(ens)
    by_method = compare(tracking_uri(cfg), "arms", group_by="method")["groups"]
    assert {k: v["runs"] for k, v in by_method.items()} == {"ce": 1, "ce+kd": 3}
    p = out / "c.yaml"
    p.write_text(to_yaml(cfg))
    assert main(["compare", "--config", str(p), "--experiment", "arms", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["groups"]["single"]["runs"] == 1
    assert main(["compare", "--config", str(p), "--experiment", "arms"]) == 0
    assert "ensemble" in capsys.readouterr().out
    with pytest.raises(TrackingError, match="no MLflow experiment 'nope'.*arms"):
        compare(tracking_uri(cfg), "nope")


def test_sweep_point_reads_params_and_falls_back_to_the_loss_defaults():
    assert sweep_point({"distill.losses.0.name": "ce"}) is None
    given = {"distill.losses.0.name": "kd", "distill.losses.1.name": "crd",
             "distill.losses.1.kwargs.tau": "0.2", "distill.losses.1.kwargs.num_negatives": "4096"}
    assert sweep_point(given) == {"tau": 0.2, "num_negatives": 4096}
    assert isinstance(sweep_point(given)["num_negatives"], int)  # the default's type: N is a count
    assert sweep_point({"distill.losses.0.name": "crd"}) == {"tau": 0.07, "num_negatives": 16384}
    assert sweep_point({"distill.losses.2.name": "gacd"})["tau"] == 0.1
