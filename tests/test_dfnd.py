"""DFND (Chen et al., CVPR 2021): confident selection, the selection artifact, the noisy
adaptation loss, and a tiny end-to-end select -> distill on a real local Ray."""
import json
import math
import shutil

import numpy as np
import pytest
import torch

from ensemble_kd.core.config import ConfigError, from_dict
from ensemble_kd.training.data import DistillData, eval_dataset
from ensemble_kd.losses import DistillInputs, LossContext, TeacherBank, build_loss
from ensemble_kd.losses.base import optimizer_param_groups
from ensemble_kd.losses.dfnd import DFNDLoss, initial_q, noise_matrix, noisy_adaptation_loss
from ensemble_kd.orchestration import pipeline
from ensemble_kd.blocks.selection import (
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
    loss = DFNDLoss(_ctx(C=5), class_accuracy=[0.8, 0.5, 0.9, 0.7, 0.6])
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
    torch.testing.assert_close(Q.diagonal(), torch.tensor([0.8, 0.5, 0.9, 0.7, 0.6]), rtol=0, atol=1e-7)  # fixed


def test_noise_matrix_hand_computed():
    """Q_ii = a_i, row i's other entries (1 - a_i) * softmax(v_i) in column order, worked by hand."""
    a = torch.tensor([0.9, 0.6, 0.3], dtype=torch.float64)
    v = torch.tensor([[0.0, math.log(3.0)], [math.log(2.0), 0.0], [0.0, 0.0]], dtype=torch.float64)
    want = torch.tensor([[0.9, 0.1 * 0.25, 0.1 * 0.75],
                         [0.4 * 2 / 3, 0.6, 0.4 / 3],
                         [0.35, 0.35, 0.3]], dtype=torch.float64)
    torch.testing.assert_close(noise_matrix(v, a), want, rtol=0, atol=1e-12)


def test_noise_matrix_is_the_references_noisy():
    """The reference's noisy(): per row, cat([s_i[:i], acc_i, s_i[i:]]) with s = softmax(v) * (1 - acc),
    written out here as it is there (with one accuracy per class), on random v."""
    g = torch.Generator().manual_seed(5)
    C = 6
    v = torch.randn(C, C - 1, generator=g, dtype=torch.float64)
    a = torch.rand(C, generator=g, dtype=torch.float64)
    soft = torch.softmax(v, dim=1) * (1 - a)[:, None]
    rows = [torch.cat([soft[i][:i], a[i:i + 1], soft[i][i:]]) for i in range(C)]
    torch.testing.assert_close(noise_matrix(v, a), torch.stack(rows), rtol=0, atol=1e-12)
    # the reference's scalar teacher_acc: one float for every class
    torch.testing.assert_close(initial_q(0.75, 4).diagonal(), torch.full((4,), 0.75))


def _optim_setup(schedule="constant"):
    """A student and the dfnd loss in one module, the optimiser the loop builds for them."""
    from ensemble_kd.training.loop import DistillModule, build_optim

    torch.manual_seed(0)
    student = torch.nn.Linear(4, 3)
    loss = DFNDLoss(_ctx(C=3), class_accuracy=[0.9, 0.6, 0.3])
    module = DistillModule(student, {"dfnd": loss}, {"dfnd": 1.0})
    cfg = from_dict({"distill": {"optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
                                           "schedule": schedule}, "epochs": 2}})
    opt, sched, _ = build_optim(cfg, optimizer_param_groups(module, module.losses.values()), steps_per_epoch=10)
    return student, loss, opt, sched


def test_q_has_its_own_optimiser_group_and_a_fixed_diagonal():
    student, loss, opt, _ = _optim_setup()
    assert len(opt.param_groups) == 2
    g0, g1 = opt.param_groups
    assert g1["params"] == [loss.v] and g1["lr"] == 1e-3 and g1["weight_decay"] == 0.0  # its own settings
    assert all(p is not loss.v for p in g0["params"]) and len(g0["params"]) == 2  # the student's weight and bias
    assert g0["lr"] == 0.05 and g0["weight_decay"] == 5e-4
    a = torch.tensor([0.9, 0.6, 0.3])
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
    v_before = loss.v.detach().clone()
    opt.zero_grad()
    out = loss(DistillInputs(torch.zeros(32, 2), student(x), y, torch.arange(32)))
    out.loss.backward()
    grad = loss.v.grad.clone()
    assert grad.abs().max() > 0
    opt.step()
    # the first SGD step (momentum buffer = the gradient, no weight decay): v - lr * grad
    torch.testing.assert_close(loss.v.detach(), v_before - 1e-3 * grad, rtol=0, atol=1e-9)
    for _ in range(30):
        opt.zero_grad()
        loss(DistillInputs(torch.zeros(32, 2), student(x), y, torch.arange(32))).loss.backward()
        opt.step()
    Q = loss.Q.detach()
    torch.testing.assert_close(Q.diagonal(), a, rtol=0, atol=1e-7)  # the teacher's per-class accuracy, unchanged
    off = ~torch.eye(3, dtype=torch.bool)
    assert (Q[off] - initial_q(a.tolist(), 3)[off]).abs().max() > 1e-4  # the off-diagonals moved
    torch.testing.assert_close(Q.sum(1), torch.ones(3), rtol=0, atol=1e-6)
    assert "class_accuracy" in dict(loss.named_buffers()) and "v" in dict(loss.named_parameters())


def test_weight_decay_does_not_pull_q():
    """A zero gradient step: the student's weights shrink by the weight decay, lr * wd, while v (its
    own group, weight_decay 0) stays where it is; in the student's group it would have shrunk too."""
    student, loss, opt, _ = _optim_setup()
    with torch.no_grad():
        loss.v.copy_(torch.tensor([[1.0, -2.0], [0.5, 0.0], [-1.0, 3.0]]))
    v0, w0 = loss.v.detach().clone(), student.weight.detach().clone()
    for p in (loss.v, student.weight, student.bias):
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(loss.v.detach(), v0, rtol=0, atol=0)
    torch.testing.assert_close(student.weight.detach(), w0 * (1 - 0.05 * 5e-4), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(student.weight.detach(), w0, rtol=0, atol=1e-6)  # it did shrink
    control = torch.optim.SGD([loss.v], lr=0.05, momentum=0.9, weight_decay=5e-4)  # the old behaviour
    control.step()
    assert not torch.equal(loss.v.detach(), v0)


def test_group_lr_under_onecycle_and_declared_params_checked():
    _, _, opt, _ = _optim_setup("onecycle")
    # OneCycleLR starts each group at its own peak / 25 (div_factor): 0.05 / 25 and 1e-3 / 25
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 / 25) and opt.param_groups[1]["lr"] == pytest.approx(1e-3 / 25)
    from ensemble_kd.training.loop import DistillModule

    loss = DFNDLoss(_ctx(C=3), class_accuracy=[0.9, 0.6, 0.3])
    module = DistillModule(torch.nn.Linear(4, 3), {"dfnd": loss}, {"dfnd": 1.0})
    with pytest.raises(ValueError, match="DFNDLoss.param_groups: .*declared twice"):
        optimizer_param_groups(module, [loss, loss])
    stranger = DFNDLoss(_ctx(C=3), class_accuracy=[0.9, 0.6, 0.3])  # not part of the module
    with pytest.raises(ValueError, match="not a trainable parameter of the module"):
        optimizer_param_groups(module, [stranger])
    with pytest.raises(ValueError, match="dfnd: q_lr must be > 0"):
        DFNDLoss(_ctx(C=3), class_accuracy=[0.9, 0.6, 0.3], q_lr=0.0)


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
    st = torch.load(out.student_path, weights_only=True)
    assert st["config"]["distill"]["selection"] == str(res.dir)
    state = torch.load(next((tmp_path / "ray_results").rglob("state.pt")), weights_only=True)["module"]
    mem = [v for k, v in state.items() if k.endswith("memory.memory")]
    assert mem and all(v.shape[0] == len(sel) for v in mem)  # CRD's memory holds exactly the selected rows
    q = noise_matrix(state["losses.dfnd.v"], state["losses.dfnd.class_accuracy"])
    torch.testing.assert_close(q.sum(1), torch.ones(10), rtol=0, atol=1e-5)
    torch.testing.assert_close(q.diagonal(), torch.tensor(m["class_accuracy"], dtype=q.dtype), rtol=0, atol=1e-6)
    groups = torch.load(next((tmp_path / "ray_results").rglob("state.pt")), weights_only=True)["optimizer"]["param_groups"]
    assert len(groups) == 2 and groups[1]["weight_decay"] == 0.0 and len(groups[1]["params"]) == 1  # Q's own group

    # a corrupt selection is refused by the driver, before any worker starts, naming its file
    bad = tmp_path / "bad-selection"
    shutil.copytree(res.dir, bad)
    (bad / "selection.arrow").write_bytes(b"not arrow")
    with pytest.raises(SelectionError, match=str(bad / "selection.arrow")):
        run_distill(tiny_config(tmp_path, **over, **{"distill.selection": str(bad)}))
