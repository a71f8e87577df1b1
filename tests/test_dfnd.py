"""DFND (Chen et al., CVPR 2021): confident selection, the selection artifact, the noisy
adaptation loss, and a tiny end-to-end select -> distill on a real local Ray."""
import json
import math
import shutil

import numpy as np
import pytest
import torch

from ensemble_kd.config import ConfigError, from_dict
from ensemble_kd.data import DistillData, eval_dataset
from ensemble_kd.losses import DistillInputs, LossContext, TeacherBank, build_loss
from ensemble_kd.losses.dfnd import DFNDLoss, initial_q, noisy_adaptation_loss
from ensemble_kd import pipeline
from ensemble_kd.selection import (
    SelectionError, check_selection, keep_count, load_selection, select_confident, write_selection,
)
from modalities import build_dataset
from tests.helpers import run_distill, tiny_config

# 8 pool rows, 3 classes, 2 teachers: a fixed input for the golden selection tests
T1 = torch.tensor([[4.0, 0.0, 0.0], [2.0, 1.0, 0.0], [0.0, 3.0, 0.0], [5.0, 0.0, 0.2],
                   [0.0, 0.0, 5.0], [1.0, 1.2, 0.0], [3.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
T2 = torch.tensor([[3.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 2.0, 0.0], [4.0, 0.1, 0.0],
                   [0.0, 1.0, 4.0], [0.0, 2.0, 0.0], [2.5, 0.0, 0.0], [0.0, 0.5, 1.0]])


def _expected(logits, fraction, per_class):
    """Independent reference: numpy softmax average, explicit loops and sorting."""
    ps = []
    for t in logits:
        x = t.numpy().astype(np.float64)
        e = np.exp(x - x.max(1, keepdims=True))
        ps.append(e / e.sum(1, keepdims=True))
    p = sum(ps) / len(ps)
    conf, lab = p.max(1), p.argmax(1)
    groups = [[r for r in range(len(p)) if lab[r] == c] for c in range(p.shape[1])] if per_class else [list(range(len(p)))]
    keep = []
    for g in groups:
        g = sorted(g, key=lambda r: (-conf[r], r))
        keep += g[: math.ceil(fraction * len(g) - 1e-9)]
    keep = sorted(keep)
    return keep, [int(lab[r]) for r in keep], [float(conf[r]) for r in keep]


@pytest.mark.parametrize("per_class", [True, False])
def test_select_confident_golden(per_class):
    got = select_confident([T1, T2], 0.5, per_class=per_class)
    rows, labels, conf = _expected([T1, T2], 0.5, per_class)
    assert got.rows.tolist() == rows
    assert got.pseudo_labels.tolist() == labels
    np.testing.assert_allclose(got.confidences.numpy(), conf, rtol=1e-6)


def test_per_class_and_global_differ_and_balance():
    pc = select_confident([T1, T2], 0.5, per_class=True)
    gl = select_confident([T1, T2], 0.5, per_class=False)
    assert pc.rows.tolist() != gl.rows.tolist()  # the fixed input tells them apart
    n = torch.bincount(pc.pool_pseudo_labels, minlength=3)
    kept = torch.bincount(pc.pseudo_labels, minlength=3)
    assert kept.tolist() == [keep_count(int(k), 0.5) for k in n]  # every pseudo-class keeps its share
    assert keep_count(10, 0.3) == 3 and keep_count(3, 0.5) == 2 and keep_count(0, 0.5) == 0
    assert select_confident({"a": T1}, 1.0).rows.tolist() == list(range(8))
    with pytest.raises(ValueError, match="fraction"):
        select_confident([T1], 0.0)


def test_initial_q_diagonal_and_rows():
    a = [0.9, 0.5, 0.7, 0.2]
    Q = DFNDLoss(_ctx(C=4), class_accuracy=a).Q.detach().double()
    torch.testing.assert_close(Q.diagonal(), torch.tensor(a, dtype=torch.float64), rtol=0, atol=1e-6)
    for i in range(4):
        off = [Q[i, j].item() for j in range(4) if j != i]
        np.testing.assert_allclose(off, [(1 - a[i]) / 3] * 3, atol=1e-6)
    torch.testing.assert_close(Q.sum(1), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="dfnd: class_accuracy must have 4"):
        initial_q([0.5] * 3, 4)
    with pytest.raises(ValueError, match=r"dfnd: class_accuracy values must be in \[0, 1\]"):
        initial_q([1.5, 0.5, 0.5, 0.5], 4)


def test_q_stays_row_stochastic_under_large_steps():
    torch.manual_seed(0)
    loss = DFNDLoss(_ctx(C=5), class_accuracy=[0.8] * 5)
    q0 = loss.Q.detach().clone()
    opt = torch.optim.SGD(loss.parameters(), lr=500.0)
    for _ in range(25):
        logits, labels = torch.randn(16, 5) * 3, torch.randint(0, 5, (16,))
        x = DistillInputs(torch.zeros(16, 2), logits, labels, torch.arange(16))
        opt.zero_grad()
        loss(x).loss.backward()
        opt.step()
    Q = loss.Q.detach()
    assert not torch.allclose(Q, q0, atol=1e-3)  # it did train
    assert bool((Q >= 0).all()) and torch.isfinite(Q).all()
    torch.testing.assert_close(Q.sum(1), torch.ones(5), rtol=0, atol=1e-5)


def test_noisy_adaptation_loss_golden():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(4, 3, generator=g)
    y = torch.tensor([0, 2, 1, 2])
    Q = torch.softmax(torch.randn(3, 3, generator=g), dim=1)
    S, Qn = s.double().numpy(), Q.double().numpy()
    total = 0.0
    for b in range(4):  # the paper's formula, by hand
        z = sum(math.exp(S[b, k]) for k in range(3))
        p = [math.exp(S[b, i]) / z for i in range(3)]
        q = [sum(p[i] * Qn[i, j] for i in range(3)) for j in range(3)]
        total += -math.log(q[int(y[b])])
    expected = total / 4
    assert abs(float(noisy_adaptation_loss(s, y, Q)) - expected) < 1e-5
    # with Q = I it is the plain cross-entropy
    torch.testing.assert_close(noisy_adaptation_loss(s, y, torch.eye(3)), torch.nn.functional.cross_entropy(s, y))


def _ctx(C=3, bank=None, selection=None):
    bank = bank or TeacherBank({"t": torch.zeros(4, 2)}, {"t": torch.zeros(4, C)}, torch.zeros(4, dtype=torch.int64),
                               torch.arange(4))
    return LossContext(student_dim=2, num_classes=C, teacher_dims={"t": 2}, bank=bank, selection=selection)


def _diag(m):
    return m.Q.detach().diagonal()


def test_builder_sources_of_class_accuracy(tmp_path):
    """a_i from the option, else the selection at the path option, else the run's selection
    (LossContext.selection, its manifest); the first one given wins."""
    m = build_loss("dfnd", _ctx(), class_accuracy=[0.9, 0.6, 0.3])
    torch.testing.assert_close(_diag(m), torch.tensor([0.9, 0.6, 0.3]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="dfnd: needs the teachers' per-class accuracy"):
        build_loss("dfnd", _ctx())
    path = _write(tmp_path, acc=[0.5, 0.7, 0.8])
    m = build_loss("dfnd", _ctx(), selection=str(path))
    torch.testing.assert_close(_diag(m), torch.tensor([0.5, 0.7, 0.8]), rtol=0, atol=1e-6)
    run = _ctx(selection={"class_accuracy": [0.4, 0.2, 0.6], "num_classes": 3})  # the run's selection manifest
    torch.testing.assert_close(_diag(build_loss("dfnd", run)), torch.tensor([0.4, 0.2, 0.6]), rtol=0, atol=1e-6)
    torch.testing.assert_close(_diag(build_loss("dfnd", run, selection=str(path))), torch.tensor([0.5, 0.7, 0.8]),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(_diag(build_loss("dfnd", run, selection=str(path), class_accuracy=[0.9, 0.6, 0.3])),
                               torch.tensor([0.9, 0.6, 0.3]), rtol=0, atol=1e-6)


def test_metric_is_the_mean_of_q_diagonal():
    m = build_loss("dfnd", _ctx(), class_accuracy=[0.9, 0.6, 0.3])
    x = DistillInputs(torch.zeros(2, 2), torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]), torch.tensor([0, 2]),
                      torch.arange(2))
    out = m(x)
    assert set(out.metrics) == {"dfnd/q_diag_mean"} and not out.metrics["dfnd/q_diag_mean"].requires_grad
    assert out.metrics["dfnd/q_diag_mean"].item() == pytest.approx((0.9 + 0.6 + 0.3) / 3, abs=1e-6)  # Q0_ii = a_i


def _write(root, acc=(0.9, 0.8, 0.7)):
    sel = select_confident([T1, T2], 0.5)
    manifest = {"num_classes": 3, "num_rows": len(sel.rows), "pool_rows": 8, "class_accuracy": list(acc),
                "dataset": {"name": "pool", "split": "train", "fingerprint": "f" * 64}, "views": {"num_views": 1},
                "source_shards": {"t": {"shard_id": "abc", "dir": "t__train__abc"}}}
    path, reused = write_selection(root, {"k": list(acc)}, (sel.rows + 100).numpy(), sel, manifest)
    assert not reused
    return path


def test_selection_round_trip_and_corruption_refused(tmp_path):
    path = _write(tmp_path)
    s = load_selection(path)
    ref = select_confident([T1, T2], 0.5)
    assert s.rows.tolist() == ref.rows.tolist() and s.pseudo_labels.tolist() == ref.pseudo_labels.tolist()
    assert s.sample_ids.tolist() == (ref.rows + 100).tolist()
    assert not list(tmp_path.glob(".*"))  # no temp directory left behind
    # reuse: same key -> same directory, verified
    assert write_selection(tmp_path, {"k": [0.9, 0.8, 0.7]}, (ref.rows + 100).numpy(), ref, {})[1]
    # a shard of another teacher checkpoint is refused, both sides named
    sm = {"dataset": {"name": "pool", "split": "train", "fingerprint": "f" * 64}, "views": {"num_views": 1},
          "num_rows": 8, "shard_id": "zzz"}
    with pytest.raises(SelectionError, match="scored on shard abc, this run's shard is zzz"):
        check_selection(s, {"t": sm})
    check_selection(s, {"t": {**sm, "shard_id": "abc"}}, torch.arange(8) + 100)
    with pytest.raises(SelectionError, match="sample_id"):
        check_selection(s, {"t": {**sm, "shard_id": "abc"}}, torch.arange(8))
    # a truncated table
    f = path / "selection.arrow"
    f.write_bytes(f.read_bytes()[:-20])
    with pytest.raises(SelectionError, match=str(f)):
        load_selection(path)
    # an edited manifest
    path2 = _write(tmp_path / "b")
    mf = path2 / "manifest.json"
    m = json.loads(mf.read_text())
    m["key"]["k"] = [0.1, 0.1, 0.1]
    mf.write_text(json.dumps(m))
    with pytest.raises(SelectionError, match=str(mf)):
        load_selection(path2)
    with pytest.raises(SelectionError, match=str(tmp_path / "nope")):
        load_selection(tmp_path / "nope")


def test_config_fields_are_validated(tmp_path):
    base = {"distill.teachers": ["pix_cnn"], "distill.student": {"arch": "mlp", "modality": "fou"}}
    with pytest.raises(ConfigError, match="select.fraction"):
        tiny_config(tmp_path, **base, **{"select.fraction": 0.0})
    with pytest.raises(ConfigError, match="distill.eval_data: dataset 'digits' has no modality 'fou'"):
        tiny_config(tmp_path, **base, **{"distill.eval_data": {"name": "digits"}})
    with pytest.raises(ConfigError, match="select.teacher_data: dataset 'digits' has no modality 'pix'"):
        tiny_config(tmp_path, **base, **{"select.teacher_data": {"name": "digits"}})
    with pytest.raises(ConfigError, match="distill.selection: training on a selection needs distill.teachers"):
        tiny_config(tmp_path, **{"distill.selection": "x"})
    with pytest.raises(ConfigError, match="select.teacher_data: required"):
        pipeline.select(tiny_config(tmp_path, **base))


def test_eval_dataset_checks_shapes():
    d = {"data": {"name": "digits"}, "distill": {"student": {"arch": "cnn_small", "modality": "image"},
                                                  "eval_data": {"name": "mnist-5k"}}}
    cfg = from_dict(d)
    with pytest.raises(ValueError, match=r"distill.eval_data: 'mnist-5k' gives .* \(1, 28, 28\)"):
        eval_dataset(cfg, build_dataset("digits", "train"))
    d["data"]["kwargs"] = {"image_size": 28}
    ds = eval_dataset(from_dict(d), build_dataset("digits", "train", image_size=28))
    assert ds.name == "mnist-5k" and ds.split == "test"


def test_select_then_distill_end_to_end(ray_cluster, trained, tmp_path):
    """Pool = uci-mfeat's train split scored by the pix teacher; the student (fou view) learns
    only the selected rows with [dfnd, kd, crd] for one epoch."""
    cfg0, _ = trained
    shutil.copytree(cfg0.checkpoint_dir, tmp_path / "teachers")
    over = {
        "distill.teachers": ["pix_cnn"],
        "distill.student": {"arch": "mlp", "modality": "fou", "arch_kwargs": {"hidden": [32]}},
        "distill.losses": [{"name": "dfnd"}, {"name": "kd"},
                           {"name": "crd", "weight": 0.8, "kwargs": {"num_negatives": 64, "per_sample": False, "feat_dim": 16}}],
        "distill.epochs": 1, "distill.batch_size": 64, "distill.cpus_per_worker": 0.5,
        "embed.splits": ["train"], "tracking.enabled": False,
        "select.teacher_data": {"name": "uci-mfeat"}, "select.fraction": 0.4,
    }
    cfg = tiny_config(tmp_path, **over)
    res = pipeline.select(cfg, progress=False, log=lambda m: None)
    m = res.manifest
    assert not res.reused and m["pool_rows"] == 1500 and m["teachers"] == ["pix_cnn"]
    assert m["num_rows"] == sum(m["counts_per_class"]) == sum(keep_count(n, 0.4) for n in m["pool_counts_per_class"])
    assert len(m["class_accuracy"]) == 10 and all(0 <= a <= 1 for a in m["class_accuracy"])
    assert m["diagnostics"]["pseudo_label_accuracy_selected"] >= m["diagnostics"]["pseudo_label_accuracy_pool"]
    assert pipeline.select(cfg, progress=False, log=lambda m: None).reused  # content-addressed: reused

    dcfg = tiny_config(tmp_path, **over, **{"distill.selection": str(res.dir)})
    shards = pipeline.train_shards(dcfg)
    sel = load_selection(res.dir)
    data = DistillData(build_dataset("uci-mfeat", "train"), "fou", shards, selection=str(res.dir))
    assert len(data) == len(sel) == m["num_rows"] < 1500
    assert torch.equal(data.labels, sel.pseudo_labels) and torch.equal(data.bank.sample_ids, sel.sample_ids)
    assert data.bank.num_rows == len(sel) and data.bank.logits["pix_cnn"].shape == (len(sel), 10)

    out = run_distill(dcfg)
    last = out.history[-1]
    assert len(out.history) == 1 and all(math.isfinite(last[k]) for k in ("loss/dfnd", "loss/kd", "loss/crd", "test_top1"))
    st = torch.load(out.student_path, weights_only=False)
    assert st["config"]["distill"]["selection"] == str(res.dir)
    state = torch.load(next((tmp_path / "ray_results").rglob("state.pt")), weights_only=False)["module"]
    mem = [v for k, v in state.items() if k.endswith("memory.memory")]
    assert mem and all(v.shape[0] == len(sel) for v in mem)  # CRD's memory holds exactly the selected rows
    q = torch.softmax(state["losses.dfnd.w"], dim=1)
    torch.testing.assert_close(q.sum(1), torch.ones(10), rtol=0, atol=1e-5)

    # a corrupt selection is refused by the driver, before any worker starts, naming its file
    bad = tmp_path / "bad-selection"
    shutil.copytree(res.dir, bad)
    (bad / "selection.arrow").write_bytes(b"not arrow")
    with pytest.raises(SelectionError, match=str(bad / "selection.arrow")):
        run_distill(tiny_config(tmp_path, **over, **{"distill.selection": str(bad)}))
