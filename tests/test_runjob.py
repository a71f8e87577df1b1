"""`ensemble-kd run` with arms, seeds and a sweep at a tiny size, then `compare` on its MLflow store."""
import json
import statistics

import pytest
from mlflow.tracking import MlflowClient

from ensemble_kd.cli import main
from ensemble_kd.core.config import ConfigError, to_yaml
from tests.helpers import out_with_teachers, tiny_config

CRD = {"name": "crd", "weight": 0.8, "kwargs": {"num_negatives": 128, "feat_dim": 16, "per_sample": False}}


def run_cfg(out, **over):
    d = {"distill.teachers": ["pix_cnn", "kar_mlp"],
         "distill.student": {"arch": "mlp", "modality": "fou", "arch_kwargs": {"hidden": [32]}},
         "distill.losses": [{"name": "ce"}, {"name": "kd"}, CRD], "distill.epochs": 2, "distill.cpus_per_worker": 0.5,
         "run.seeds": [0, 1],
         "run.arms": [{"name": "student-ce", "teachers": "none", "losses": [{"name": "ce"}]},
                      {"name": "crd+kd-single", "teachers": "best"}],
         "run.sweep": {"arm": "crd+kd-single", "space": {"distill.losses.crd.kwargs.tau": {"grid": [0.05, 0.2]}}},
         "tune.cpus_per_trial": 0.5, "tune.max_concurrent_trials": 2}
    d.update(over)
    return tiny_config(out, **d)


@pytest.fixture(scope="module")
def ran(ray_cluster, trained, tmp_path_factory):
    out = out_with_teachers(trained, tmp_path_factory, "runjob")
    c = run_cfg(out)
    p = out / "run.yaml"
    p.write_text(to_yaml(c))
    return out, p


def test_run_writes_summary_table_and_plot(ran, capsys):
    out, p = ran
    assert main(["run", "--config", str(p), "--no-progress"]) == 0
    text = capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    assert set(s["teachers"]) == {"pix_cnn", "kar_mlp"} and s["teachers"]["kar_mlp"]["modality"] == "kar"
    best = max(s["teachers"], key=lambda n: s["teachers"][n]["test_top1"])  # the two tiny teachers differ
    assert s["best_single_teacher"] == best
    assert list(s["arms"]) == ["student-ce", "crd+kd-single"]
    ce, crd = s["arms"]["student-ce"], s["arms"]["crd+kd-single"]
    assert ce["teacher_set"] == "none" and ce["method"] == "ce" and ce["seeds"] == [0, 1]
    assert crd["teacher_set"] == "single" and crd["teachers"] == [best] and crd["method"] == "ce+kd+crd"
    for a in (ce, crd):
        assert all(0.0 <= v <= 1.0 for v in a["top1"]) and len(a["top1"]) == 2
        assert a["mean_top1"] == pytest.approx(statistics.fmean(a["top1"]))
        assert a["std_top1"] == pytest.approx(statistics.stdev(a["top1"]))
    assert sorted(pt["tau"] for pt in s["sweep"]["points"]) == [0.05, 0.2]
    assert s["mlflow_tracking_uri"] == f"sqlite:///{out / 'mlflow.db'}" and s["experiment"] == "tiny"
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "crd+kd-single" in text and "+-" in text and "sweep on crd+kd-single" in text
    assert "mlflow ui --backend-store-uri" in text and text.count("[tune ") == 6
    exported = out / "exports" / "crd+kd-single"  # the end of `run`: the headline (last) arm's best student, exported
    assert sorted(f.name for f in exported.iterdir()) == [f"crd+kd-single.{x}" for x in ("model_card.md", "onnx", "torchscript.pt")]
    assert f"this run: test top-1 {max(crd['top1']):.4f}" in (exported / "crd+kd-single.model_card.md").read_text()

    client = MlflowClient(s["mlflow_tracking_uri"])
    exp = client.get_experiment_by_name("tiny")
    kids = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{s['parent_run_id']}'")
    assert len(kids) == 6 and {r.info.status for r in kids} == {"FINISHED"}
    arms = sorted(r.data.tags["arm"] for r in kids)
    assert arms == ["crd+kd-single"] * 2 + ["student-ce"] * 2 + ["sweep:crd+kd-single"] * 2
    by_arm_seed = {(r.data.tags["arm"], r.data.tags["seed"]): r.data.metrics["final/test_top1"] for r in kids}
    assert [by_arm_seed[("student-ce", str(sd))] for sd in (0, 1)] == ce["top1"]
    assert {a.path for a in client.list_artifacts(s["parent_run_id"])} == {"summary.json", "summary.png"}

    # compare reads the same store: grouped by arm, JSON and a plot with the tau points
    png = out / "cmp.png"
    assert main(["compare", "--config", str(p), "--group-by", "arm", "--json", "--plot", str(png)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["groups"]["student-ce"]["runs"] == 2
    assert res["groups"]["crd+kd-single"]["mean_top1"] == pytest.approx(crd["mean_top1"])
    assert {pt["tau"] for pt in res["sweep"]} == {0.05, 0.07, 0.2}  # the arm's default tau and the sweep's
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bad_arms_and_sweep_are_refused_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"run.arms.0 \(a\): .*'zzz' is not a configured teacher"):
        run_cfg(tmp_path, **{"run.arms": [{"name": "a", "teachers": ["zzz"]}], "run.sweep": None})
    with pytest.raises(ConfigError, match=r"run.arms.0 \(a\): .*loss 'kd' needs teachers"):
        run_cfg(tmp_path, **{"run.arms": [{"name": "a", "teachers": "none", "losses": [{"name": "kd"}]}], "run.sweep": None})
    with pytest.raises(ConfigError, match=r"run.sweep.arm: 'nope' is not an arm"):
        run_cfg(tmp_path, **{"run.sweep": {"arm": "nope", "space": {"distill.optim.lr": {"grid": [0.1]}}}})
    with pytest.raises(ConfigError, match=r"run.sweep.space.distill.optim.lr: must be \{grid: \[values\]\}"):
        run_cfg(tmp_path, **{"run.sweep": {"arm": "crd+kd-single", "space": {"distill.optim.lr": {"uniform": [0, 1]}}}})
    with pytest.raises(ConfigError, match=r"run.arms: arm names must be unique"):
        run_cfg(tmp_path, **{"run.arms": [{"name": "a"}, {"name": "a"}], "run.sweep": None})
