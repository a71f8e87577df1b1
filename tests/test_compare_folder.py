"""`ensemble-kd compare --out DIR` without --config reads the experiment of the folder (its
summary.json), not the embedded default's; without a summary it lists what the store holds.
Real MLflow SQLite stores throughout: one written by `ensemble-kd run` on a tiny non-default
config, others by the tracking functions a distillation uses."""
import json
import shutil

import pytest

from ensemble_kd.cli import main
from ensemble_kd.core.config import load_config, to_yaml
from ensemble_kd.storage.mlflow_store import experiment_name
from ensemble_kd.training.tracking import RunContext, finish_distill_run, start_distill_run
from tests.helpers import out_with_teachers, tiny_config

# one module fixture (a tiny run) per suite, not one per xdist worker
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_compare_folder")]

DEFAULT_EXPERIMENT = experiment_name(load_config(None))  # what compare looked for before


@pytest.fixture(scope="module")
def made(ray_cluster, trained, tmp_path_factory):
    """An output folder made by `ensemble-kd run` on a config that is not the default: its own
    name (so its own experiment), two arms, one seed."""
    out = out_with_teachers(trained, tmp_path_factory, "compare-folder")
    cfg = tiny_config(out, **{
        "name": "tiny-compare",
        "distill.teachers": ["pix_cnn", "kar_mlp"],
        "distill.student": {"arch": "mlp", "modality": "fou", "arch_kwargs": {"hidden": [32]}},
        "distill.losses": [{"name": "ce"}, {"name": "kd"}], "distill.epochs": 1, "distill.cpus_per_worker": 0.5,
        "run.seeds": [0], "run.export": False,
        "run.arms": [{"name": "student-ce", "teachers": "none", "losses": [{"name": "ce"}]},
                     {"name": "kd-ensemble", "teachers": "all"}],
        "tune.cpus_per_trial": 0.5, "tune.max_concurrent_trials": 2})
    p = out / "tiny-compare.yaml"
    p.write_text(to_yaml(cfg))
    assert main(["run", "--config", str(p), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["experiment"] == "tiny-compare" != DEFAULT_EXPERIMENT
    return out, summary


def _distillation(out, experiment: str, arm: str, seed: int, top1: float) -> None:
    """One finished distillation run in the MLflow store under ``out``, as the loop records it."""
    cfg = load_config(None, {"output_dir": str(out), "tracking.experiment": experiment, "distill.seed": seed})
    rid = start_distill_run(cfg, f"{experiment}-{arm}-{seed}", RunContext(arm=arm, kind="arm"))
    finish_distill_run(cfg, rid, top1, 15, None)


def test_compare_out_reads_the_experiment_of_the_folders_summary(made, capsys):
    out, s = made
    capsys.readouterr()
    assert main(["compare", "--out", str(out), "--group-by", "arm"]) == 0
    text = capsys.readouterr().out
    assert f"experiment tiny-compare at sqlite:///{out / 'mlflow.db'}" in text and str(out / "summary.json") in text
    lines = text.splitlines()[2:]
    assert lines[-1].startswith("selection: on the test split")  # the tiny job has no validation split
    rows = {line.split()[0]: line for line in lines[:-1]}
    assert set(rows) == {"student-ce", "kd-ensemble"}
    for arm, row in rows.items():  # the runs `run` summarised: the same top-1
        assert f"{s['arms'][arm]['mean_top1']:.4f} +- 0.0000" in row and row.split()[2] == "1"
    assert main(["compare", "--out", str(out), "--json"]) == 0  # --json: only the JSON on stdout
    res = json.loads(capsys.readouterr().out)
    assert res["experiment"] == "tiny-compare" and set(res["groups"]) == {"none", "ensemble"}


def test_experiment_and_config_still_win_over_the_folder(made, tmp_path, capsys):
    out, _ = made
    _distillation(out, "other", "kd-single", 0, 0.5)  # a second experiment in the same store
    assert main(["compare", "--out", str(out), "--group-by", "arm", "--experiment", "other"]) == 0
    text = capsys.readouterr().out
    assert "experiment other at" in text and "kd-single" in text and "student-ce" not in text
    assert "summary.json" not in text  # not where the experiment came from
    other = tmp_path / "other.yaml"
    other.write_text(to_yaml(load_config(None, {"name": "other"})))
    assert main(["compare", "--config", str(other), "--out", str(out), "--group-by", "arm", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["experiment"] == "other"
    # the default config named on the command line: its experiment is not in this store, and the
    # error lists the ones that are
    assert main(["compare", "--out", str(out), "--set", f"name={DEFAULT_EXPERIMENT}"]) == 2
    err = capsys.readouterr().err
    assert f"no MLflow experiment {DEFAULT_EXPERIMENT!r}" in err and "'tiny-compare'" in err and "--experiment NAME" in err


def test_a_moved_folder_reads_its_own_store(made, tmp_path, capsys):
    """summary.json records the store's absolute path; a folder moved elsewhere still compares
    from the mlflow.db beside it."""
    out, _ = made
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(out / "mlflow.db", moved / "mlflow.db")
    s = json.loads((out / "summary.json").read_text())
    s["mlflow_tracking_uri"] = f"sqlite:///{tmp_path / 'gone' / 'mlflow.db'}"
    (moved / "summary.json").write_text(json.dumps(s))
    assert main(["compare", "--out", str(moved), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tracking_uri"] == f"sqlite:///{moved / 'mlflow.db'}" and res["experiment"] == "tiny-compare"
    assert set(res["groups"]) == {"none", "ensemble"}
    assert not (tmp_path / "gone").exists()


def test_without_a_summary_the_experiments_of_the_store_are_listed(tmp_path, capsys):
    _distillation(tmp_path, "alpha", "student-ce", 0, 0.6)
    _distillation(tmp_path, "alpha", "student-ce", 1, 0.7)
    _distillation(tmp_path, "beta", "kd-ensemble", 0, 0.8)
    assert main(["compare", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} has no summary.json" in err
    assert "'alpha' (2 distillation runs)" in err and "'beta' (1 distillation run)" in err
    assert f"ensemble-kd compare --out {tmp_path} --experiment alpha" in err
    assert main(["compare", "--out", str(tmp_path), "--experiment", "beta", "--group-by", "arm"]) == 0
    assert "kd-ensemble" in capsys.readouterr().out


def test_without_a_summary_the_stores_one_experiment_is_read(tmp_path, capsys):
    _distillation(tmp_path, "solo", "kd-ensemble", 0, 0.8)
    assert main(["compare", "--out", str(tmp_path), "--group-by", "arm"]) == 0
    text = capsys.readouterr().out
    assert "experiment solo at" in text and "the only experiment with distillation runs" in text
    assert "kd-ensemble" in text and "0.8000 +- 0.0000" in text


def test_a_folder_without_runs_or_with_an_untracked_summary_says_so(tmp_path, capsys):
    assert main(["compare", "--out", str(tmp_path / "empty")]) == 2
    assert "holds no distillation runs: nothing to compare" in capsys.readouterr().err
    untracked = tmp_path / "untracked"
    untracked.mkdir()
    (untracked / "summary.json").write_text(json.dumps({"experiment": "x", "mlflow_tracking_uri": None,
                                                        "parent_run_id": None}))
    assert main(["compare", "--out", str(untracked)]) == 2
    err = capsys.readouterr().err
    assert "tracking off" in err and str(untracked / "summary.json") in err
    (untracked / "summary.json").write_text("{not json")
    assert main(["compare", "--out", str(untracked)]) == 2
    assert "is unreadable" in capsys.readouterr().err
