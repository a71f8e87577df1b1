"""Paired statistics over seeds (mean difference, 95% t interval, seeds improved) against
hand-computed numbers; the summary and `compare` show unfinished runs apart, never averaged in."""
import json

import pytest
from mlflow.tracking import MlflowClient

from ensemble_kd.storage.artifacts import TeacherRecord, TeacherSet
from ensemble_kd.cli import main
from ensemble_kd.core.config import load_config, to_yaml, with_overrides
from ensemble_kd.orchestration.plan import Trial, arm_config
from ensemble_kd.orchestration.report import format_table, summarise, write_summary
from ensemble_kd.core.stats import format_paired, paired_difference
from ensemble_kd.orchestration.sweep import TrialOutcome
from ensemble_kd.storage.mlflow_store import tracking_uri
from ensemble_kd.training.tracking import RunContext, finish_distill_run, log_epochs, start_distill_run
from ensemble_kd.orchestration.compare import compare


def test_paired_difference_against_hand_computed_numbers():
    a = {0: 0.80, 1: 0.82, 2: 0.85, 3: 0.90}  # seed 3 has no partner: not paired
    b = {0: 0.78, 1: 0.81, 2: 0.80}
    p = paired_difference(a, b)
    # d = (0.02, 0.01, 0.05): mean 0.026667, sd sqrt((0.00667^2 + 0.01667^2 + 0.02333^2) / 2) = 0.020817,
    # t_{0.975, 2} = 4.302653 (a t table), half-width 4.302653 * 0.020817 / sqrt(3) = 0.051713
    assert p["n"] == 3 and p["seeds"] == [0, 1, 2] and p["interval"] == "t"
    assert p["mean_diff"] == pytest.approx(0.026667, abs=1e-6) and p["std_diff"] == pytest.approx(0.020817, abs=1e-6)
    assert p["ci95"] == pytest.approx([0.026667 - 0.051713, 0.026667 + 0.051713], abs=2e-6)
    assert (p["improved"], p["worse"], p["tied"]) == (3, 0, 0)
    q = paired_difference({0: 0.5, 1: 0.6}, {0: 0.5, 1: 0.7})
    # d = (0, -0.1): mean -0.05, sd 0.070711, t_{0.975, 1} = 12.706205, half-width 12.706205 * 0.070711 / sqrt(2) = 0.635310
    assert q["ci95"] == pytest.approx([-0.05 - 0.635310, -0.05 + 0.635310], abs=2e-6)
    assert (q["improved"], q["worse"], q["tied"]) == (0, 1, 1)
    one = paired_difference({0: 0.9}, {0: 0.8, 1: 0.7})
    assert one["n"] == 1 and one["ci95"] is None and one["mean_diff"] == pytest.approx(0.1)
    assert paired_difference({0: 0.9}, {1: 0.8}) is None
    assert format_paired(p) == "+0.0267 [-0.0250, +0.0784] 3/3" and format_paired(None) == "-"


# --- the summary of `ensemble-kd run` ------------------------------------------------------------

# arm -> top-1 per seed (0, 1, 2); the numbers are made up, the differences are what is checked
TOP1 = {"student-ce": [0.82, 0.83, 0.81], "kd-single": [0.83, 0.83, 0.83], "crd+kd-single": [0.84, 0.82, 0.83],
        "kd-ensemble": [0.83, 0.84, 0.82], "crd+kd-ensemble": [0.85, 0.84, 0.83],
        "student-ce-50": [0.55, 0.56, 0.54], "kd-ensemble-50": [0.80, 0.82, 0.81], "crd+kd-ensemble-50": [0.81, 0.83, 0.80]}


def _outcomes(cfg, best):
    out = []
    for arm in cfg.run.arms:
        for seed in cfg.run.seeds:
            t = Trial(f"{arm.name}/seed{seed}", {"distill": {"seed": seed, "epochs": 15}}, RunContext(arm=arm.name, kind="arm"))
            out.append(TrialOutcome("", t, {"test_top1": TOP1[arm.name][seed]}, 15, "TERMINATED"))
    # seed 3 of two arms did not finish: an error after 4 epochs (its last top-1 was reported) and a stop
    t3 = Trial("kd-ensemble-50/seed3", {"distill": {"seed": 3, "epochs": 15}}, RunContext(arm="kd-ensemble-50", kind="arm"))
    out.append(TrialOutcome("", t3, {"test_top1": 0.10}, 4, "ERROR"))
    t4 = Trial("student-ce-50/seed3", {"distill": {"seed": 3, "epochs": 15}}, RunContext(arm="student-ce-50", kind="arm"))
    out.append(TrialOutcome("", t4, {"test_top1": 0.30, "epoch": 7}, 7, "STOPPED"))
    return out


@pytest.fixture()
def summary():
    cfg = load_config(None, {"run.seeds": [0, 1, 2]})
    teachers = TeacherSet({n: TeacherRecord(n, f"/t/{n}.pt", "mlp", m, "h", acc) for n, m, acc in
                           (("pix_cnn", "pix", 0.98), ("kar_mlp", "kar", 0.978), ("fac_mlp", "fac", 0.992))})
    return summarise(cfg, teachers, "fac_mlp", _outcomes(cfg, "fac_mlp"), None, None, 1.0)


def test_summary_pairs_each_arm_with_its_baselines(summary):
    arms = summary["arms"]
    assert list(arms) == list(TOP1)
    assert arms["student-ce"]["labels"] == "all" and arms["kd-ensemble-50"]["labels"] == "count=50"
    # the student alone of the same labels, KD from the same teachers with the same labels
    assert arms["crd+kd-ensemble"]["vs_student"]["baseline"] == "student-ce"
    assert arms["crd+kd-ensemble"]["vs_kd"]["baseline"] == "kd-ensemble"
    assert arms["crd+kd-single"]["vs_kd"]["baseline"] == "kd-single"
    assert arms["crd+kd-ensemble-50"]["vs_student"]["baseline"] == "student-ce-50"
    assert arms["crd+kd-ensemble-50"]["vs_kd"]["baseline"] == "kd-ensemble-50"
    assert arms["student-ce"]["vs_student"] is None and arms["kd-ensemble"]["vs_kd"] is None
    # crd+kd-ensemble-50 - student-ce-50 = (0.26, 0.27, 0.26): mean 0.263333, sd 0.005774,
    # half-width 4.302653 * 0.005774 / sqrt(3) = 0.014342
    v = arms["crd+kd-ensemble-50"]["vs_student"]
    assert v["mean_diff"] == pytest.approx(0.263333, abs=1e-6) and v["improved"] == 3 and v["n"] == 3
    assert v["ci95"] == pytest.approx([0.263333 - 0.014342, 0.263333 + 0.014342], abs=2e-6)
    assert summary["reference"] == {"arm": "student-ce", "mean_top1": pytest.approx(0.82), "labels": "all"}
    assert arms["crd+kd-ensemble-50"]["of_reference"] == pytest.approx(0.813333 / 0.82, abs=1e-6)
    assert summary["interval"] == "95% t interval"


def test_unfinished_trials_are_shown_apart_never_averaged(summary, tmp_path):
    arms = summary["arms"]
    assert arms["kd-ensemble-50"]["seeds"] == [0, 1, 2] and arms["kd-ensemble-50"]["mean_top1"] == pytest.approx(0.81)
    assert arms["student-ce-50"]["top1"] == TOP1["student-ce-50"]
    assert {(u["trial"], u["status"], u["epochs"], u["last_test_top1"]) for u in summary["unfinished"]} == {
        ("kd-ensemble-50/seed3", "ERROR", 4, 0.10), ("student-ce-50/seed3", "STOPPED", 7, 0.30)}
    text = "\n".join(format_table(summary))
    assert "did not finish (shown apart, not averaged)" in text and "kd-ensemble-50/seed3" in text and "ERROR" in text
    assert "+0.2633 [+0.2490, +0.2777] 3/3 (student-ce-50)" in text  # the paired line of crd+kd-ensemble-50
    path, plot = write_summary(tmp_path, summary)
    assert json.loads(path.read_text())["unfinished"][0]["status"] in ("ERROR", "STOPPED")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- compare on an MLflow store -----------------------------------------------------------------


def _run(cfg, arm, seed, top1, status="FINISHED", labels=None):
    over = {"distill.seed": seed, **({"distill.labels.count": labels} if labels else {})}
    c = arm_config(cfg, next(a for a in cfg.run.arms if a.name == arm), "fac_mlp", seed)
    c = with_overrides(c, over)
    rid = start_distill_run(c, f"{arm}-{seed}-{status}", RunContext(arm=arm, kind="arm"))
    if status == "FINISHED":
        finish_distill_run(c, rid, top1, 15, None)
    elif status == "FAILED":
        log_epochs(tracking_uri(c), rid, [{"epoch": 3, "test_top1": top1}])
        finish_distill_run(c, rid, None, 3, None, status="FAILED")
    return rid  # "RUNNING": left as a killed driver leaves it


def test_compare_pairs_against_a_baseline_and_lists_unfinished_runs_apart(tmp_path, capsys):
    cfg = load_config(None, {"output_dir": str(tmp_path), "tracking.experiment": "cmp"})
    for seed, (s, k) in enumerate([(0.80, 0.83), (0.81, 0.82), (0.82, 0.86)]):
        _run(cfg, "student-ce", seed, s)
        _run(cfg, "kd-ensemble", seed, k)
    _run(cfg, "kd-ensemble", 3, 0.05, status="FAILED")  # NaN-like collapse: must not drag the mean down
    _run(cfg, "kd-ensemble", 4, None, status="RUNNING")  # a killed driver's run
    _run(cfg, "student-ce-50", 0, 0.55)
    uri = tracking_uri(cfg)
    res = compare(uri, "cmp", group_by="arm", baseline="student-ce")
    g = res["groups"]
    assert g["kd-ensemble"]["runs"] == 3 and g["kd-ensemble"]["mean_top1"] == pytest.approx(0.836667, abs=1e-6)
    # kd-ensemble - student-ce = (0.03, 0.01, 0.04): mean 0.026667, sd 0.015275, half-width 4.302653 * 0.015275 / sqrt(3) = 0.037946
    p = g["kd-ensemble"]["paired"]
    assert p["mean_diff"] == pytest.approx(0.026667, abs=1e-6) and p["improved"] == 3
    assert p["ci95"] == pytest.approx([0.026667 - 0.037946, 0.026667 + 0.037946], abs=2e-6)
    assert g["student-ce"]["paired"] is None and g["student-ce-50"]["labels"] == "count=50"
    assert {(u["group"], u["status"], u["seed"], u["last_test_top1"]) for u in res["unfinished"]} == {
        ("kd-ensemble", "FAILED", "3", 0.05), ("kd-ensemble", "RUNNING", "4", None)}
    # grouped by teacher set, the label settings are not mixed: the 50-label student is its own group
    by_set = compare(uri, "cmp")["groups"]
    assert set(by_set) == {"ensemble", "none [labels all]", "none [labels count=50]"}
    assert by_set["none [labels count=50]"]["values"] == [0.55]
    p_yaml = tmp_path / "c.yaml"
    p_yaml.write_text(to_yaml(cfg))
    assert main(["compare", "--config", str(p_yaml), "--group-by", "arm", "--baseline", "student-ce",
                 "--plot", str(tmp_path / "c.png")]) == 0
    text = capsys.readouterr().out
    assert "+0.0267 [-0.0113, +0.0646] 3/3" in text and "did not finish (shown apart, not averaged)" in text
    assert "FAILED" in text and "RUNNING" in text and (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["compare", "--config", str(p_yaml), "--group-by", "arm", "--baseline", "nope"]) == 2
    assert "not a group of finished runs" in capsys.readouterr().err
    assert MlflowClient(uri).get_experiment_by_name("cmp") is not None
