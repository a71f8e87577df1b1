"""A validation split (data.val_fraction, or a table's own `val` rows) and selection on it: the
carve is stratified, seeded and recorded in the data store; Tune, compare and export --arm choose
on val top-1 where it exists and on test top-1 (saying so) where it does not."""

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from ensemble_kd.core.config import ConfigError, DataConfig, from_dict, to_dict
from ensemble_kd.orchestration import export, report
from ensemble_kd.orchestration.plan import Trial
from ensemble_kd.orchestration.sweep import SweepResult, TrialOutcome, _record_best, selection_metric, tune_sweep
from ensemble_kd.storage import datastore
from ensemble_kd.storage.artifacts import TeacherSet
from ensemble_kd.training import tracking
from ensemble_kd.storage import mlflow_store
from ensemble_kd.storage.mlflow_store import RUN_NAME_TAG
from ensemble_kd.orchestration.compare import compare
from modalities import build_dataset
from modalities.datasets.base import DatasetError
from tests.helpers import distill_cfg


# ---------------------------------------------------------------- the carve


def _carved(out, seed=3, fraction=0.2):
    d = DataConfig(val_fraction=fraction, val_seed=seed)
    return datastore.prepare(d, "train", out), datastore.prepare(d, "val", out)


def test_carve_is_stratified_seeded_deterministic_and_recorded(tmp_path):
    full = datastore.prepare(DataConfig(), "train", tmp_path / "a")
    train, val = _carved(tmp_path / "a")
    assert (len(full), len(train), len(val)) == (1500, 1200, 300)
    # a partition of the full train split, in its order, 20% of each class (150 rows a class in uci-mfeat)
    assert np.intersect1d(train.sample_ids, val.sample_ids).size == 0
    assert np.array_equal(np.sort(np.concatenate([train.sample_ids, val.sample_ids])), np.sort(full.sample_ids))
    assert (np.diff(full.positions_of(val.sample_ids)) > 0).all() and (np.diff(full.positions_of(train.sample_ids)) > 0).all()
    assert np.bincount(val.labels).tolist() == [30] * 10
    # the rows keep their data: a val row is the full split's row with that sample id
    pos = full.positions_of(val.sample_ids[:5])
    assert np.array_equal(val.get_batch(np.arange(5), ["fou"])["inputs"]["fou"].numpy(),
                          full.get_batch(pos, ["fou"])["inputs"]["fou"].numpy())
    # the same seed in another folder: the same rows and the same content-addressed folders
    train2, val2 = _carved(tmp_path / "b")
    assert np.array_equal(val2.sample_ids, val.sample_ids) and val2.dir.name == val.dir.name
    assert train2.dir.name == train.dir.name != full.dir.name  # keyed apart from the full split
    # another seed: other rows, still 30 a class
    _, val3 = _carved(tmp_path / "c", seed=4)
    assert not np.array_equal(val3.sample_ids, val.sample_ids) and np.bincount(val3.labels).tolist() == [30] * 10
    # recorded: the manifest (and the pointer) say how it was carved and from what
    carve = json.loads((val.dir / "manifest.json").read_text())["source"]["carve"]
    assert (carve["fraction"], carve["seed"], carve["val_rows"], carve["train_rows"]) == (0.2, 3, 300, 1200)
    assert carve["base"] == {"dir": full.dir.name, "fingerprint": full.fingerprint(), "rows": 1500}
    assert carve["val_sample_ids_sha256"] == hashlib.sha256(val.sample_ids.astype(np.int64).tobytes()).hexdigest()
    pointers = [json.loads(p.read_text()) for p in (tmp_path / "a" / "data").glob("uci-mfeat__val__*.json")]
    assert [p["carve"] for p in pointers] == [carve] and pointers[0]["dir"] == val.dir.name
    assert datastore.has_val(DataConfig(val_fraction=0.2, val_seed=3), tmp_path / "a")
    assert val.source_splits == ("train", "test", "val")


def test_without_a_carve_the_store_and_recipe_are_as_before(tmp_path):
    d = DataConfig()
    assert "val_carve" not in datastore.recipe(d, "train")  # the same pointer as before val_fraction existed
    assert datastore.recipe(d, "test") == datastore.recipe(DataConfig(val_fraction=0.3), "test")  # test is never carved
    assert not datastore.has_val(d, tmp_path)
    assert datastore.prepare(d, "train", tmp_path).source_splits == ("train", "test")


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5])
def test_a_bad_val_fraction_is_refused_naming_the_field(value):
    with pytest.raises(ConfigError) as e:
        from_dict({"data": {"val_fraction": value}})
    line = next(ln for ln in str(e.value).splitlines() if "val_fraction" in ln)
    assert line.strip().startswith("data.val_fraction:")


def test_a_carve_that_leaves_val_or_a_class_empty_is_one_line_naming_the_field(tmp_path):
    with pytest.raises(DatasetError) as e:  # 150 rows a class: 0.001 of each rounds to none
        datastore.prepare(DataConfig(val_fraction=0.001), "val", tmp_path)
    assert str(e.value).startswith("data.val_fraction:") and "\n" not in str(e.value)


# ---------------------------------------------------------------- a table's own val rows


def _table(path, splits):
    n = len(splits)
    rng = np.random.default_rng(0)
    t = pa.table({"sample_id": pa.array(np.arange(n) * 7 + 1), "label": pa.array(np.arange(n) % 3),
                  "split": pa.array(splits),
                  "vec": pa.FixedSizeListArray.from_arrays(pa.array(rng.normal(size=n * 4).astype(np.float32)), 4)})
    pq.write_table(t, path)
    return path


def test_a_table_with_val_rows_serves_them_as_the_validation_split(tmp_path):
    splits = ["train"] * 12 + ["test"] * 6 + ["val"] * 6
    p = str(_table(tmp_path / "t.parquet", splits))
    val = build_dataset("table", "val", p)
    assert val.sample_ids.tolist() == [(18 + i) * 7 + 1 for i in range(6)] and len(build_dataset("table", "train", p)) == 12
    d = DataConfig(name="table", root=p)
    assert datastore.prepare(d, "train", tmp_path / "out").source_splits == ("train", "test", "val")
    assert datastore.has_val(d, tmp_path / "out")
    assert datastore.prepare(d, "val", tmp_path / "out").sample_ids.tolist() == val.sample_ids.tolist()
    # its own val rows and a carve from train: refused, naming the field
    with pytest.raises(DatasetError, match=r"^data\.val_fraction: .*`val` rows of its own"):
        datastore.prepare(DataConfig(name="table", root=p, val_fraction=0.25), "train", tmp_path / "out")


def test_a_table_split_is_train_test_or_val_only(tmp_path):
    p = str(_table(tmp_path / "t.parquet", ["train"] * 6 + ["test"] * 3 + ["validation"]))
    with pytest.raises(DatasetError, match=r"row 9 \(sample_id 64\): split 'validation' is not 'train', 'test' or 'val'"):
        build_dataset("table", "train", p)
    q = str(_table(tmp_path / "q.parquet", ["train"] * 6 + ["test"] * 3))  # no val rows: no val split
    assert not datastore.has_val(DataConfig(name="table", root=q), tmp_path / "out")
    with pytest.raises(DatasetError, match="has no 'val' rows"):
        build_dataset("table", "val", q)
    with pytest.raises(ValueError, match="unknown split 'val'"):  # the other datasets have no val split of their own
        build_dataset("uci-mfeat", "val")


# ---------------------------------------------------------------- selection, on crafted results


def _outcome(cfg, label, test, val=None, seed=0, arm="ce"):
    base = json.loads(json.dumps(cfg))
    base["distill"]["seed"] = seed
    metrics = {"test_top1": test, "epoch": 1, **({"val_top1": val} if val is not None else {})}
    return TrialOutcome(label, Trial(label, base, tracking.RunContext(arm=arm, kind="arm")), metrics, 1, "TERMINATED")


def _cfg(tmp_path, **over):
    return distill_cfg(tmp_path, **{"distill.teachers": [], "distill.losses": [{"name": "ce"}], "distill.epochs": 1,
                                    "run.arms": [{"name": "ce", "teachers": "none"}], "run.seeds": [0, 1],
                                    "run.sweep": None, **over})


def test_tune_picks_the_best_trial_on_val_and_reports_its_test_top1(tmp_path):
    cfg = _cfg(tmp_path)
    d = to_dict(cfg)
    trials = [_outcome(d, "a", test=0.90, val=0.70), _outcome(d, "b", test=0.80, val=0.75)]  # they disagree
    assert selection_metric(cfg, True) == "val_top1" and selection_metric(cfg, False) == "test_top1"
    res = SweepResult(None, "x", None, trials)
    _record_best(res, cfg, selection_metric(cfg, True))
    assert res.best.trial.label == "b" and res.metric == "val_top1"
    res = SweepResult(None, "x", None, trials)
    _record_best(res, cfg, selection_metric(cfg, False))  # no validation split: test, as before
    assert res.best.trial.label == "a" and res.metric == "test_top1"
    other = _cfg(tmp_path, **{"tune.metric": "loss/total", "tune.mode": "min"})
    assert selection_metric(other, True) == "loss/total"  # a metric the user named is kept


def test_summary_holds_val_and_test_and_says_which_selected(tmp_path):
    cfg = _cfg(tmp_path)
    d = to_dict(cfg)
    with_val = [_outcome(d, "ce/seed0", 0.8, 0.7, seed=0), _outcome(d, "ce/seed1", 0.9, 0.8, seed=1)]
    s = report.summarise(cfg, TeacherSet({}), None, with_val, None, None, 1.0, "val")
    arm = s["arms"]["ce"]
    assert s["selection"] == "val" and arm["top1"] == [0.8, 0.9] and arm["val_top1"] == [0.7, 0.8]
    assert arm["mean_val_top1"] == pytest.approx(0.75) and arm["mean_top1"] == pytest.approx(0.85)
    assert report.format_table(s)[-1].startswith("selection: on the validation split")
    no_val = [_outcome(d, "ce/seed0", 0.8, seed=0), _outcome(d, "ce/seed1", 0.9, seed=1)]
    s = report.summarise(cfg, TeacherSet({}), None, no_val, None, None, 1.0, "test")
    assert s["selection"] == "test" and not any("val" in k for k in s["arms"]["ce"])  # no val keys without val
    assert report.format_table(s)[-1].startswith("selection: on the test split")
    assert report.summarise(cfg, TeacherSet({}), None, no_val, None, None, 1.0)["selection"] == "test"  # inferred


def _store(tmp_path, with_val: bool):
    """An MLflow store with one parent and three finished runs of arm `ce`, whose val and test
    top-1 rank them differently; each with a student file."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = MlflowClient(uri)
    exp = c.create_experiment("sel")
    parent = c.create_run(exp).info.run_id
    for seed, test, val in ((0, 0.90, 0.60), (1, 0.70, 0.95), (2, 0.80, 0.70)):
        name = f"ce-{seed}"
        r = c.create_run(exp, tags={"mlflow.parentRunId": parent, RUN_NAME_TAG: name, "arm": "ce", "seed": str(seed),
                                    "teacher_set": "none", "method": "ce"}, run_name=name).info.run_id
        c.log_metric(r, "final/test_top1", test)
        if with_val:
            c.log_metric(r, "final/val_top1", val)
        c.set_terminated(r, "FINISHED")
        (tmp_path / "students" / name).mkdir(parents=True)
        (tmp_path / "students" / name / "student.pt").write_bytes(b"x")
    return uri


@pytest.mark.parametrize("with_val", [True, False])
def test_compare_and_export_choose_the_best_run_on_val_where_there_is_one(tmp_path, with_val):
    uri = _store(tmp_path, with_val)
    row = compare(uri, "sel", group_by="arm")["groups"]["ce"]
    src = export.best_of_arm(tmp_path, "ce", uri, "sel")
    if with_val:  # seed 1: best on val, worst on test; its test top-1 is what is reported
        assert row["best_run"]["run_name"] == "ce-1" and row["best_top1"] == 0.70 and row["selection"] == "val"
        assert row["best_val_top1"] == 0.95 and (src.run_name, src.selection) == ("ce-1", "val")
    else:
        assert row["best_run"]["run_name"] == "ce-0" and row["best_top1"] == 0.90 and row["selection"] == "test"
        assert "best_val_top1" not in row and (src.run_name, src.selection) == ("ce-0", "test")
    assert compare(uri, "sel", group_by="arm")["selection"] == ("val" if with_val else "test")


# ---------------------------------------------------------------- for real: a sweep with a carve


def test_a_sweep_with_a_carve_reports_and_selects_on_val(ray_cluster, tmp_path):
    cfg = _cfg(tmp_path, **{"data.val_fraction": 0.2, "tracking.enabled": True, "tracking.experiment": "valsweep",
                            "distill.epochs": 2, "tune.scheduler": "fifo", "tune.max_concurrent_trials": 2,
                            "tune.space": {"distill.optim.lr": {"grid": [0.05, 0.001]}}})
    lines = []
    res = tune_sweep(cfg, {"train_shards": {}, "teachers": {}}, log=lines.append)
    assert res.metric == "val_top1" and len(res.trials) == 2
    assert all(t.status == "TERMINATED" and {"val_top1", "test_top1"} <= set(t.metrics) for t in res.trials)
    assert res.best.metrics["val_top1"] == max(t.metrics["val_top1"] for t in res.trials)
    assert any("val_top1=" in ln for ln in lines)  # the progress lines show what selection reads
    c = MlflowClient(mlflow_store.tracking_uri(cfg))
    parent = c.get_run(res.parent_run_id).data.metrics
    assert parent["best/val_top1"] == res.best.metrics["val_top1"]
    assert parent["best/test_top1"] == res.best.metrics["test_top1"]
    got = compare(mlflow_store.tracking_uri(cfg), "valsweep", group_by="method")
    assert got["selection"] == "val" and got["groups"]["ce"]["runs"] == 2
    exp = c.get_experiment_by_name("valsweep")
    kids = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{res.parent_run_id}'")
    assert all(len(c.get_metric_history(r.info.run_id, "val_top1")) == 2 for r in kids)
