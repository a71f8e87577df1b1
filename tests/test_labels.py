"""Labels on a subset (distill.labels): the stratified draw per seed, CE on the labelled rows only,
the teachers' ensemble prediction on the others (shard and online paths), the config and MLflow."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from ensemble_kd.orchestration.checks import check_config
from ensemble_kd.core.config import ConfigError, LabelsConfig, load_config
from ensemble_kd.training.data import DistillData
from ensemble_kd.blocks.labels import UNLABELLED, class_quotas, draw_labelled, ensemble_prediction
from ensemble_kd.losses import DistillInputs, LossContext, TeacherBank, build_loss
from ensemble_kd.training.online_data import OnlineData
from ensemble_kd.orchestration.plan import arm_config
from ensemble_kd.storage.shards import ShardKey, ShardWriter
from ensemble_kd.storage.teacher_checkpoint import Teacher
from ensemble_kd.storage.mlflow_store import tracking_uri
from ensemble_kd.training.tracking import start_distill_run
from modalities import build_dataset, build_encoder
from tests.helpers import distill_cfg, run_distill

C = 10


@pytest.fixture(scope="module")
def ds():
    return build_dataset("uci-mfeat", "train")


# --- the draw --------------------------------------------------------------------------------


def test_fifty_labels_are_five_per_class_and_differ_per_seed(ds):
    cfg = LabelsConfig(count=50)
    keep = {s: draw_labelled(ds.labels, cfg, s) for s in (0, 1)}
    for k in keep.values():
        assert k.sum() == 50
        assert np.bincount(ds.labels[k], minlength=C).tolist() == [5] * C  # uci-mfeat: 150 train samples per class
    assert np.array_equal(draw_labelled(ds.labels, cfg, 0), keep[0])  # deterministic
    assert not np.array_equal(keep[0], keep[1])  # a new subset per seed
    assert np.array_equal(draw_labelled(ds.labels, LabelsConfig(count=50, seed=7), 0),
                          draw_labelled(ds.labels, LabelsConfig(count=50, seed=7), 1))  # labels.seed fixes it
    assert draw_labelled(ds.labels, LabelsConfig(), 0).all()  # no subset: every sample


def test_fraction_and_unbalanced_classes_are_proportional():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    k = draw_labelled(labels, LabelsConfig(fraction=0.1), 3)
    assert np.bincount(labels[k]).tolist() == [6, 3, 1]
    # largest remainder by hand: 7 of (60, 30, 10) -> exact 4.2, 2.1, 0.7 -> floors 4, 2, 0 + 1 to class 2
    assert class_quotas([60, 30, 10], 7).tolist() == [4, 2, 1]
    assert class_quotas([5, 5, 5], 4).tolist() == [2, 1, 1]  # ties: the lower class first
    with pytest.raises(ValueError, match="distill.labels.count: 200 is more than the 100"):
        draw_labelled(labels, LabelsConfig(count=200), 0)


def test_config_refuses_both_and_bad_values_naming_the_field():
    with pytest.raises(ConfigError, match=r"distill.labels: .*count \(50\) and fraction \(0.1\) are exclusive"):
        load_config(None, {"distill.labels.count": 50, "distill.labels.fraction": 0.1})
    with pytest.raises(ConfigError, match=r"distill.labels.count: .*greater than or equal to 1"):
        load_config(None, {"distill.labels.count": 0})
    with pytest.raises(ConfigError, match=r"distill.labels.fraction: .*less than or equal to 1"):
        load_config(None, {"distill.labels.fraction": 1.5})


def test_a_label_subset_and_a_dfnd_selection_are_refused_together(tmp_path):
    cfg = load_config(None, {"distill.labels.count": 50, "distill.selection": str(tmp_path / "sel")})
    with pytest.raises(ConfigError, match=r"distill.labels: a label subset does not apply to a DFND selection"):
        check_config(cfg)


def test_an_arm_sets_its_labels_and_other_fields():
    cfg = load_config(None, {"distill.labels.count": 20})
    base = cfg.run.arms[0]
    few = next(a for a in cfg.run.arms if a.labels is not None)
    assert arm_config(cfg, base, "pix_cnn", 1).distill.labels.count == 20  # None: distill.labels
    assert arm_config(cfg, few, "pix_cnn", 1).distill.labels.count == 50
    over = load_config(None, {"run.arms": [{"name": "a", "teachers": "none", "losses": [{"name": "ce"}], "labels": {},
                                            "set": {"distill.epochs": 3}}]})
    c = arm_config(over, over.run.arms[0], None, 2)
    assert not c.distill.labels.subset and c.distill.epochs == 3 and c.distill.seed == 2


# --- CE on the labelled rows only ---------------------------------------------------------------


def _ce(labelled, labels, logits):
    bank = TeacherBank({}, {}, torch.zeros(4, dtype=torch.long), torch.arange(4))
    loss = build_loss("ce", LossContext(student_dim=3, num_classes=3, teacher_dims={}, bank=bank))
    x = DistillInputs(torch.zeros(len(labels), 3), logits, labels, torch.arange(len(labels)), labelled=labelled)
    return loss(x)


def test_ce_gradient_comes_from_the_labelled_rows_only():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, generator=g, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    labelled = torch.tensor([True, False, True, False, False, True])
    out = _ce(labelled, labels, logits)
    out.loss.backward()
    # by hand: d/dz of mean_{i labelled} CE_i = (softmax(z_i) - onehot(y_i)) / 3 on labelled rows, 0 elsewhere
    p = torch.softmax(logits.detach(), 1)
    want = torch.zeros(6, 3)
    for i in (0, 2, 5):
        want[i] = (p[i] - F.one_hot(labels[i], 3).float()) / 3
    torch.testing.assert_close(logits.grad, want)
    assert float(out.metrics["ce/labelled_rows"]) == 3
    # what unlabelled rows carry (pseudo-labels, or -1 without teachers) does not change the loss
    other = torch.tensor([0, UNLABELLED, 2, 1, UNLABELLED, 2])
    assert torch.equal(_ce(labelled, other, logits.detach()).loss, out.loss.detach())
    none = _ce(torch.zeros(6, dtype=torch.bool), other, logits.detach()).loss
    assert float(none) == 0.0  # a batch without a label: 0, not NaN


# --- what the unlabelled rows are labelled with -------------------------------------------------


def _write_shard(root, ds, teacher, logits):
    n = len(ds)
    key = ShardKey(teacher=teacher, checkpoint_sha256=teacher[0] * 64, dataset=ds.name, split="train",
                   dataset_fingerprint=ds.fingerprint(), views={"num_views": 1, "crop_padding": 0}, embedding_dtype="float32")
    with ShardWriter(root, key, 4, C) as w:
        w.write(sample_id=ds.sample_ids, label=ds.labels, view=np.zeros(n), aug_top=np.zeros(n), aug_left=np.zeros(n),
                aug_flip=np.zeros(n, bool), embedding=np.zeros((n, 4), np.float32), logits=logits)
        w.close(num_samples=n, dataset_name=ds.name)
    return root / key.dirname


def test_unlabelled_shard_rows_carry_the_teachers_ensemble_prediction(ds, tmp_path):
    n = len(ds)
    a, b = (ds.labels + 1) % C, (ds.labels + 2) % C
    la = np.zeros((n, C), np.float32)
    la[np.arange(n), a] = 2.0  # teacher A: p(a) = e^2 / (e^2 + 9) = 0.451
    lb = np.zeros((n, C), np.float32)
    lb[np.arange(n), b] = 3.0  # teacher B: p(b) = e^3 / (e^3 + 9) = 0.691; mean: p(b) 0.376 > p(a) 0.243
    dirs = {"ta": _write_shard(tmp_path, ds, "ta", la), "tb": _write_shard(tmp_path, ds, "tb", lb)}
    d = DistillData(ds, "fou", dirs, labels=LabelsConfig(count=50), seed=4)
    lab = d.labelled.numpy()
    assert np.array_equal(lab, draw_labelled(ds.labels, LabelsConfig(count=50), 4))  # one view: row = sample
    assert np.array_equal(d.labels.numpy()[lab], ds.labels[lab])  # ground truth where labelled
    assert np.array_equal(d.labels.numpy()[~lab], b[~lab])  # the ensemble's prediction elsewhere
    assert d.bank.labels is d.labels  # class-aware negatives (built from the bank) see the same labels
    rows = torch.arange(10, 74)
    batch = d.batch(rows, torch.device("cpu"))
    assert torch.equal(batch["labelled"], d.labelled[rows]) and torch.equal(batch["labels"], d.labels[rows])
    full = DistillData(ds, "fou", dirs)  # without a subset: nothing changes, no mask is handed on
    assert "labelled" not in full.batch(rows, torch.device("cpu")) and np.array_equal(full.labels.numpy(), ds.labels)


def test_without_teachers_unlabelled_rows_carry_no_label(ds):
    d = DistillData(ds, "fou", None, labels=LabelsConfig(fraction=0.1), seed=0)
    lab = d.labelled.numpy()
    assert lab.sum() == 150 and np.array_equal(d.labels.numpy()[lab], ds.labels[lab])
    assert (d.labels.numpy()[~lab] == UNLABELLED).all()


def test_ensemble_prediction_is_the_argmax_of_the_mean_probabilities():
    # one sure teacher against two fairly sure ones, where averaging logits and averaging probabilities disagree.
    # By hand: softmax(10, 0, 0) = (0.99991, 0.00005, 0.00005); softmax(0, 0, 3) = (0.0453, 0.0453, 0.9094).
    # Mean probabilities: class 0 (0.99991 + 2 * 0.0453) / 3 = 0.364, class 2 (0.00005 + 2 * 0.9094) / 3 = 0.606 -> 2;
    # mean logits would say (3.33, 0, 2) -> 0.
    sure, fair = torch.tensor([[10.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 3.0]])
    assert ensemble_prediction([sure, fair, fair]).tolist() == [2]
    assert ensemble_prediction([sure]).tolist() == [0]  # one teacher: its own prediction


def test_online_path_labels_unlabelled_rows_with_the_teachers_clean_prediction(ds):
    torch.manual_seed(0)
    model = build_encoder("mlp", ds.spec("kar"), C, hidden=[16]).eval().requires_grad_(False)
    t = Teacher("t", model, "mlp", "kar", ds.name, C, "h" * 64, None, None)
    d = OnlineData(ds, "fou", {"t": t}, load_config(None).distill.augment, seed=2, labels=LabelsConfig(count=30))
    with torch.no_grad():
        pred = model(torch.from_numpy(np.asarray(ds.get_batch(np.arange(len(ds)), ["kar"])["inputs"]["kar"])))[1].argmax(1)
    lab = d.labelled
    assert int(lab.sum()) == 30 and np.array_equal(lab.numpy(), draw_labelled(ds.labels, LabelsConfig(count=30), 2))
    assert torch.equal(d.bank.labels[~lab], pred[~lab]) and np.array_equal(d.bank.labels[lab].numpy(), ds.labels[lab.numpy()])
    b = d.batch(torch.arange(0, 40), torch.device("cpu"))
    assert torch.equal(b["labels"], d.bank.labels[:40]) and torch.equal(b["labelled"], lab[:40])


# --- MLflow -------------------------------------------------------------------------------------


def test_mlflow_records_the_label_setting(tmp_path):
    cfg = load_config(None, {"output_dir": str(tmp_path), "distill.labels.count": 50, "distill.seed": 3})
    rid = start_distill_run(cfg, "r1")
    r = MlflowClient(tracking_uri(cfg)).get_run(rid)
    assert r.data.tags["labels"] == "count=50" and r.data.tags["labels_seed"] == "3"
    assert r.data.params["distill.labels.count"] == "50" and r.data.params["distill.labels.fraction"] == "None"
    full = load_config(None, {"output_dir": str(tmp_path)})
    r2 = MlflowClient(tracking_uri(full)).get_run(start_distill_run(full, "r2"))
    assert r2.data.tags["labels"] == "all" and "labels_seed" not in r2.data.tags


# --- through the loop on Ray Train (one tiny run) -----------------------------------------------


def test_a_student_alone_with_fifty_labels_trains_on_them_and_says_so(ray_cluster, tmp_path):
    cfg = distill_cfg(tmp_path, **{"distill.teachers": [], "distill.losses": [{"name": "ce"}], "distill.epochs": 1,
                                   "distill.labels": {"count": 50}, "distill.seed": 1, "tracking.enabled": True})
    res = run_distill(cfg)
    r = MlflowClient(tracking_uri(cfg)).get_run(res.mlflow_run_id)
    assert r.info.status == "FINISHED" and r.data.tags["labels"] == "count=50" and r.data.tags["labels_seed"] == "1"
    # labelled rows per batch, averaged over the epoch's 23 batches of 64 (the last 28 of 1,500 rows dropped):
    # at most the 50 drawn, spread over the batches
    per_batch = r.data.metrics["ce/labelled_rows"]
    assert 40 <= per_batch * 23 <= 50
    assert 0.0 <= res.final_top1 <= 1.0
