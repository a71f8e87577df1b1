"""`ensemble-kd export`: a student trained here in-process (plain torch, no Ray), saved by the
distill stage's own writer, exported as TorchScript, ONNX and an MLflow model in a real SQLite store;
each export's logits are checked against the eager encoder built from the checkpoint by hand."""
import argparse
import json
import os

import mlflow
import numpy as np
import onnxruntime
import pytest
import torch
from mlflow import MlflowClient
from mlflow import pyfunc

from ensemble_kd.training import tracking
from ensemble_kd.cli import main
from ensemble_kd.core.config import ConfigError, to_dict, to_yaml
from ensemble_kd.orchestration.export import ExportError, best_of_arm, export_student, find_run
from ensemble_kd.stages.distill import _save_student
from modalities import ENCODERS, Encoder, build_dataset, build_encoder
from tests.helpers import tiny_config

STUDENT = {"arch": "mlp", "modality": "fou", "arch_kwargs": {"hidden": [32]}}
HASHES = {"pix_cnn": "a" * 64, "kar_mlp": "b" * 64}


def student_cfg(out, seed=0, arm="crd+kd-ensemble", **over):
    return tiny_config(out, **{"distill.teachers": ["pix_cnn", "kar_mlp"], "distill.student": STUDENT,
                               "distill.losses": [{"name": "ce"}, {"name": "kd", "kwargs": {"temperature": 4.0}}],
                               "distill.seed": seed, "distill.epochs": 3, "tracking.experiment": "exp",
                               "run.arms": [{"name": "student-ce", "teachers": "none", "losses": [{"name": "ce"}]},
                                            {"name": arm, "teachers": "all"}], **over})


def train_student(cfg, name, epochs=3):
    """A few epochs of plain CE on the student's modality (in-process, no Ray), saved as the distill
    stage saves it; returns (path, test top-1)."""
    d = cfg.distill
    train, test = build_dataset("uci-mfeat", "train"), build_dataset("uci-mfeat", "test")
    torch.manual_seed(d.seed)
    enc = build_encoder(d.student.arch, train.spec(d.student.modality), train.num_classes, **d.student.arch_kwargs)
    opt = torch.optim.SGD(enc.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        for idx in torch.randperm(len(train)).split(128):
            b = train.get_batch(idx.numpy(), [d.student.modality])
            loss = torch.nn.functional.cross_entropy(enc(b["inputs"][d.student.modality])[1], b["label"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    enc.eval()
    b = test.get_batch(np.arange(len(test)), [d.student.modality])
    with torch.no_grad():
        top1 = float((enc(b["inputs"][d.student.modality])[1].argmax(1) == b["label"]).float().mean())
    state = {"module": {f"student.{k}": v for k, v in enc.state_dict().items()},
             "history": [{"epoch": e + 1, "test_top1": top1} for e in range(epochs)], "config": to_dict(cfg)}
    return _save_student(cfg, name, state), top1


def tracked_run(cfg, name, arm, parent, path, top1):
    """The MLflow run the distill stage would have made for this student, with the pipeline's tags."""
    ctx = tracking.RunContext(arm=arm, kind="arm", parent_run_id=parent, teacher_hashes=HASHES)
    rid = tracking.start_distill_run(cfg, name, ctx)
    tracking.finish_distill_run(cfg, rid, top1, 3, path)
    return rid


def reference_logits(path, rows=64):
    """The checkpoint's logits, independently: the encoder built from the file's fields, eager."""
    ck = torch.load(path, weights_only=True)
    test = build_dataset("uci-mfeat", "test")
    enc = build_encoder(ck["arch"], test.spec(ck["modality"]), test.num_classes, **ck["arch_kwargs"])
    enc.load_state_dict(ck["state_dict"])
    x = test.get_batch(np.arange(rows), [ck["modality"]])["inputs"][ck["modality"]]
    with torch.no_grad():
        return x, enc.eval()(x)[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An output folder as `ensemble-kd run` leaves it: two seeds of the headline arm (different
    top-1), one of the student alone, their MLflow runs under a parent, and summary.json."""
    out = tmp_path_factory.mktemp("export")
    cfg = student_cfg(out)
    uri, exp_id, parent = tracking.start_parent_run(cfg, "job", "run")
    runs = {}
    for arm, seed, epochs in (("crd+kd-ensemble", 0, 1), ("crd+kd-ensemble", 1, 4), ("student-ce", 0, 2)):
        c = student_cfg(out, seed=seed, **{"distill.epochs": epochs})
        name = f"{arm}-s{seed}"
        path, top1 = train_student(c, name, epochs)
        runs[(arm, seed)] = (name, path, top1, tracked_run(c, name, arm, parent, path, top1))
    ens = [runs[("crd+kd-ensemble", s)][2] for s in (0, 1)]
    summary = {"experiment": "exp", "mlflow_tracking_uri": uri, "parent_run_id": parent, "dataset": "uci-mfeat",
               "arms": {"crd+kd-ensemble": {"teacher_set": "ensemble", "teachers": ["pix_cnn", "kar_mlp"], "method": "ce+kd",
                                            "mean_top1": float(np.mean(ens)), "std_top1": float(np.std(ens, ddof=1)),
                                            "seeds": [0, 1], "top1": ens,
                                            "vs_student_ce": {"mean_diff": 0.01, "ci95": [-0.02, 0.04], "improved": 1}}}}
    (out / "summary.json").write_text(json.dumps(summary))
    return out, cfg, uri, runs


def test_exports_reproduce_the_checkpoint_logits(store):
    out, cfg, uri, runs = store
    name, path, top1, rid = runs[("crd+kd-ensemble", 1)]
    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    res = export_student(find_run(out, name), log=lambda m: None)
    assert res.model_uri is not None and res.mlflow_run_id == rid
    x, ref = reference_logits(path)
    x1, ref1 = x[:1], ref[:1]
    ts = torch.jit.load(res.torchscript)
    assert (ts(x) - ref).abs().max() <= 1e-4 and (ts(x1) - ref1).abs().max() <= 1e-4  # one output, any batch size
    sess = onnxruntime.InferenceSession(res.onnx, providers=["CPUExecutionProvider"])
    assert len(sess.get_inputs()) == 1 and [o.name for o in sess.get_outputs()] == ["logits"]
    for xb, rb in ((x, ref), (x1, ref1)):
        (got,) = sess.run(None, {sess.get_inputs()[0].name: xb.numpy()})
        assert np.abs(got - rb.numpy()).max() <= 1e-4
    assert set(res.max_abs_diff) == {"torchscript", "onnx", "mlflow"} and max(res.max_abs_diff.values()) <= 1e-4
    assert ref.argmax(1).eq(torch.as_tensor(build_dataset("uci-mfeat", "test").labels[:64])).float().mean() > 0.5  # trained

    assert {k: os.environ.get(k) for k in env} == env  # the export put MLflow's process-wide settings back

    # the MLflow model: in the run, with a tensor signature and an input example; pyfunc predicts the same
    client = MlflowClient(uri)
    model = client.get_logged_model(res.model_uri.rsplit("/", 1)[-1])
    assert model.source_run_id == rid and model.experiment_id == client.get_run(rid).info.experiment_id
    mlflow.set_tracking_uri(uri)
    try:
        m = pyfunc.load_model(res.model_uri)
        assert m.metadata.get_input_schema().inputs[0].shape == (-1, 76)
        assert m.metadata.get_output_schema().inputs[0].shape == (-1, 10)
        assert m.metadata.saved_input_example_info["type"] == "ndarray"
        for xb, rb in ((x, ref), (x1, ref1)):
            assert np.abs(np.asarray(m.predict(xb.numpy())) - rb.numpy()).max() <= 1e-4
    finally:
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    arts = {a.path for a in client.list_artifacts(rid, "export")}
    assert arts == {f"export/{name}.torchscript.pt", f"export/{name}.onnx", f"export/{name}.model_card.md"}
    assert client.get_run(rid).info.status == "FINISHED"


def test_model_card_names_teachers_data_method_and_metrics(store):
    out, cfg, uri, runs = store
    res = export_student(best_of_arm(out, "crd+kd-ensemble"), log=lambda m: None)
    card = open(res.card).read()
    ens = runs[("crd+kd-ensemble", 0)][2], runs[("crd+kd-ensemble", 1)][2]
    assert res.name == "crd+kd-ensemble" and res.run_name == "crd+kd-ensemble-s1"  # seed 1 trained longer: better
    assert runs[("crd+kd-ensemble", 1)][2] > runs[("crd+kd-ensemble", 0)][2]
    assert f"| pix_cnn | cnn_small | pix | `{'a' * 64}` | the run's MLflow tag |" in card
    assert f"| kar_mlp | mlp | kar | `{'b' * 64}` |" in card
    assert "modality `fou` of `uci-mfeat`" in card and "shape (batch, 76)" in card and "shape (batch, 10)" in card
    assert "| kd | 1.0 | {\"temperature\": 4.0} |" in card and "| ce | 1.0 | {} |" in card
    assert "every training row's label (no `distill.labels`)" in card
    assert f"test top-1 {ens[1]:.4f} after 4 epochs" in card and "4 epochs, batch size 64" in card
    assert f"over seeds [0, 1] (summary.json): mean {np.mean(ens):.4f} +- {np.std(ens, ddof=1):.4f} (sample std); " \
           f"per seed {ens[0]:.4f}, {ens[1]:.4f}" in card
    assert "over seeds [0, 1]" in card and 'vs_student_ce: {"mean_diff": 0.01, "ci95": [-0.02, 0.04], "improved": 1}' in card
    assert res.model_uri in card and "mlflow models serve" in card


def test_cli_exports_the_best_of_an_arm_to_dest(store, tmp_path, capsys):
    out, cfg, uri, runs = store
    p = tmp_path / "c.yaml"
    p.write_text(to_yaml(cfg))
    dest = tmp_path / "dest"
    assert main(["export", "--config", str(p), "--arm", "student-ce", "--dest", str(dest)]) == 0
    text = capsys.readouterr().out
    res = json.loads(text[text.index("\n{") + 1:])  # after the log line, the result as JSON
    assert res["run_name"] == "student-ce-s0" and res["dir"] == str(dest) and res["model_uri"].startswith("models:/")
    files = sorted(f.name for f in dest.iterdir())
    assert files == ["student-ce.model_card.md", "student-ce.onnx", "student-ce.torchscript.pt"]
    x, ref = reference_logits(runs[("student-ce", 0)][1])
    assert (torch.jit.load(str(dest / "student-ce.torchscript.pt"))(x) - ref).abs().max() <= 1e-4


def test_unknown_run_arm_and_wrong_files_are_refused_and_nothing_is_written(store, tmp_path, capsys):
    out, cfg, uri, runs = store
    p = tmp_path / "c.yaml"
    p.write_text(to_yaml(cfg))
    dest = tmp_path / "dest"
    assert main(["export", "--config", str(p), "--run", "nope", "--dest", str(dest)]) == 2
    err = capsys.readouterr().err
    assert "no run 'nope'" in err and "crd+kd-ensemble-s0" in err
    assert main(["export", "--config", str(p), "--arm", "nope", "--dest", str(dest)]) == 2
    err = capsys.readouterr().err
    assert "no finished run of arm 'nope'" in err and "['crd+kd-ensemble', 'student-ce']" in err
    teacherish = tmp_path / "t.pt"
    torch.save({"format": "ensemble-kd/teacher", "state_dict": {}}, teacherish)
    with pytest.raises(ExportError, match=r"t.pt is not an ensemble-kd student checkpoint \(format 'ensemble-kd/teacher'"):
        export_student(find_run(out, str(teacherish)), tmp_path / "dest")
    pickled = tmp_path / "p.pt"
    torch.save({"format": "ensemble-kd/student", "x": argparse.Namespace(a=1)}, pickled)  # needs code to unpickle
    with pytest.raises(ExportError, match=r"p.pt cannot be read .* with weights_only=True"):
        export_student(find_run(out, str(pickled)), tmp_path / "dest")
    assert not dest.exists() and [f.name for f in tmp_path.iterdir() if f.name.startswith(".")] == []
    with pytest.raises(ConfigError, match=r"run.export_arm: 'nope' is not an arm; arms: \['student-ce', 'crd\+kd-ensemble'\]"):
        student_cfg(tmp_path, **{"run.export_arm": "nope"})


class _BatchBranch(Encoder):
    """An encoder whose forward branches on the batch size in Python: a trace bakes in one branch."""

    def __init__(self, spec, num_classes):
        super().__init__()
        self.embed_dim, self.num_classes = spec.shape[0], num_classes
        self.fc = torch.nn.Linear(spec.shape[0], num_classes)

    def forward_impl(self, x, feats):
        logits = self.fc(x) if x.shape[0] <= 2 else -self.fc(x)  # (B, C)
        return x, logits


def test_an_export_that_differs_from_the_checkpoint_is_refused_and_nothing_is_published(store, tmp_path, monkeypatch):
    out, _, _, _ = store
    monkeypatch.setitem(ENCODERS._entries, "test-batch-branch", _BatchBranch)
    monkeypatch.setitem(ENCODERS._meta, "test-batch-branch", {"input_kinds": ("vector",)})
    cfg = student_cfg(tmp_path, **{"distill.student": {"arch": "test-batch-branch", "modality": "fou"}})
    path, _ = train_student(cfg, "branchy", epochs=1)
    dest = tmp_path / "dest"
    with pytest.raises(ExportError, match=r"TorchScript export of .*student.pt does not reproduce the checkpoint's logits: "
                                          r"max abs difference .* > 0.0001 on 64 test rows"):
        export_student(find_run(tmp_path, "branchy"), dest, log=lambda m: None)
    assert not dest.exists() and sorted(f.name for f in tmp_path.iterdir() if f.name.startswith(".")) == []


def test_an_image_student_exports_with_its_image_shape_and_without_a_store(tmp_path):
    cfg = student_cfg(tmp_path, **{"distill.student": {"arch": "cnn_small", "modality": "pix", "arch_kwargs": {"width": 8}}})
    path, _ = train_student(cfg, "img", epochs=1)
    logs = []
    res = export_student(find_run(tmp_path, "img"), log=logs.append)
    assert res.model_uri is None and "img has no MLflow run" in logs[0]  # no store under tmp_path: files only
    x, ref = reference_logits(path)
    assert x.shape[1:] == (1, 16, 15)
    assert (torch.jit.load(res.torchscript)(x) - ref).abs().max() <= 1e-4
    sess = onnxruntime.InferenceSession(res.onnx, providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[1:] == [1, 16, 15]
    assert np.abs(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0] - ref.numpy()).max() <= 1e-4
    assert "shape (batch, 1, 16, 15): modality `pix`" in open(res.card).read()
