"""The online data path: the frozen teachers run in the worker on a fresh view every step."""
import shutil

import pytest
import torch

from ensemble_kd.core.config import AugmentConfig
from ensemble_kd.training.loop import build_module, build_optim
from ensemble_kd.training.online_data import OnlineData
from ensemble_kd.storage.teacher_checkpoint import load_teacher
from modalities import build_dataset
from tests.helpers import distill_cfg, run_distill

AUG = AugmentConfig(enabled=True, crop_padding=2, flip=True)


@pytest.fixture(scope="module")
def online(trained):
    _, paths = trained
    ds = build_dataset("uci-mfeat", "train")
    teachers = {n: load_teacher(paths[n], name=n) for n in ("pix_cnn", "kar_mlp")}
    return ds, teachers


def test_every_step_draws_a_fresh_view_that_the_teacher_sees(online):
    ds, teachers = online
    data = OnlineData(ds, "pix", teachers, AUG, seed=3)
    rows = torch.arange(32)
    a, b = data.batch(rows, torch.device("cpu"), 0, 0), data.batch(rows, torch.device("cpu"), 0, 1)
    assert not torch.equal(a["x"], b["x"])  # another step, another crop
    assert torch.equal(a["x"], data.batch(rows, torch.device("cpu"), 0, 0)["x"])  # replayable: a resumed run draws the same
    with torch.no_grad():
        emb, logits = teachers["pix_cnn"].model(a["x"])  # the teacher's outputs are on the student's very view
    torch.testing.assert_close(a["teacher_logits"]["pix_cnn"], logits)
    torch.testing.assert_close(a["teacher_emb"]["pix_cnn"], emb)
    # a view depends on the sample, not on its batch: a rank holding other rows draws the same view for a sample
    torch.testing.assert_close(data.batch(torch.arange(16, 48), torch.device("cpu"), 0, 0)["x"][:16], a["x"][16:])
    # vector modalities are not augmented
    v = data.batch(rows, torch.device("cpu"), 0, 0)
    x_kar = ds.get_batch(rows.numpy(), ["kar"])["inputs"]["kar"]
    with torch.no_grad():
        torch.testing.assert_close(v["teacher_logits"]["kar_mlp"], teachers["kar_mlp"].model(x_kar)[1])


def test_teachers_get_no_gradient_and_stay_out_of_the_optimiser(online, tmp_path):
    ds, teachers = online
    cfg = distill_cfg(tmp_path, **{"distill.teacher_outputs": "online",
                                   "distill.losses": [{"name": "ce"}, {"name": "kd", "kwargs": {"temperature": 4.0}}]})
    data = OnlineData(ds, "fou", teachers, AUG, seed=0)
    before = {n: {k: v.clone() for k, v in t.model.state_dict().items()} for n, t in teachers.items()}
    module = build_module(cfg, data, ds.num_classes, torch.device("cpu"))
    opt, _, _ = build_optim(cfg, [p for p in module.parameters() if p.requires_grad])
    teacher_params = {id(p) for t in teachers.values() for p in t.model.parameters()}
    assert not teacher_params & {id(p) for g in opt.param_groups for p in g["params"]}
    assert not teacher_params & {id(p) for p in module.parameters()}  # not in the module Ray Train wraps in DDP
    for step in range(3):
        parts = module(data.batch(torch.arange(step * 64, step * 64 + 64), torch.device("cpu"), 0, step))
        loss = sum(module.weights[n] * out.loss for n, out in parts.items())
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, t in teachers.items():
        assert all(not p.requires_grad and p.grad is None for p in t.model.parameters())
        assert not t.model.training
        for k, v in t.model.state_dict().items():
            assert torch.equal(v, before[n][k]), (n, k)  # BN statistics included: eval mode


def test_two_workers_on_the_online_path_keep_crd_memories_identical(ray_cluster, trained, tmp_path):
    """2 Ray Train workers (gloo), fresh views, CRD in reference mode (a teacher memory and a student
    memory per teacher): after an epoch of steps every memory is bit-identical on both workers."""
    cfg0, _ = trained
    shutil.copytree(cfg0.checkpoint_dir, tmp_path / "teachers")
    crd = {"name": "crd", "weight": 0.8, "kwargs": {"mode": "reference", "num_negatives": 128, "feat_dim": 16}}
    cfg = distill_cfg(tmp_path, **{"distill.teacher_outputs": "online", "distill.num_workers": 2, "distill.epochs": 1,
                                   "distill.losses": [{"name": "ce"}, {"name": "kd"}, crd]})
    res = run_distill(cfg)
    sums = res.history[0]["buffer_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    assert res.final_top1 > 0.3 and res.history[0]["loss/crd"] > 0  # chance is 0.1
    state = torch.load(next((tmp_path / "ray_results").rglob("state.pt")), weights_only=True)["module"]
    assert any(k.endswith("memory_t.memory") for k in state)  # the teacher side is a memory, not the shards


def test_a_repdistiller_format_teacher_feeds_both_paths(ray_cluster, trained, tmp_path):
    """A teacher brought as a RepDistiller checkpoint ({'epoch', 'model', 'accuracy'}): its file hash
    goes into the shard manifest and the MLflow tags, and it teaches on the shard and online paths."""
    import hashlib

    from mlflow.tracking import MlflowClient

    from ensemble_kd.orchestration import pipeline
    from ensemble_kd.storage.shards import read_manifest
    from tests.helpers import embed

    _, paths = trained
    sd = torch.load(paths["pix_cnn"], weights_only=True)["state_dict"]
    rep = tmp_path / "ckpt_epoch_6.pth"
    torch.save({"epoch": 6, "model": sd, "accuracy": 91.0}, rep)
    teachers = [{"name": "rep", "arch": "cnn_small", "arch_kwargs": {"width": 8}, "modality": "pix", "checkpoint": str(rep)}]
    over = {"teachers": teachers, "distill.teachers": ["rep"], "distill.epochs": 1, "tracking.enabled": True,
            "distill.losses": [{"name": "ce"}, {"name": "kd"}]}
    ts = pipeline.existing_teachers(distill_cfg(tmp_path, **over))
    sha = hashlib.sha256(rep.read_bytes()).hexdigest()
    assert ts["rep"].format == "repdistiller" and ts["rep"].content_hash == sha
    shards = embed(distill_cfg(tmp_path, **over))
    assert read_manifest(shards.dirs("train", ["rep"])["rep"])["key"]["checkpoint_sha256"] == sha
    for path in ("shards", "online"):
        res = run_distill(distill_cfg(tmp_path, **over, **{"distill.teacher_outputs": path}))
        assert res.final_top1 > 0.3
        tags = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(res.mlflow_run_id).data.tags
        assert tags["teacher_sha256.rep"] == sha


def test_a_feature_map_loss_on_the_shard_path_is_refused_at_config_time(tmp_path):
    from ensemble_kd.core.config import ConfigError

    with pytest.raises(ConfigError, match=r"distill.losses.1.name: loss 'at' reads feature maps.*teacher_outputs is 'shards'"):
        distill_cfg(tmp_path, **{"distill.losses": [{"name": "ce"}, {"name": "at"}]})
    ok = distill_cfg(tmp_path, **{"distill.losses": [{"name": "ce"}, {"name": "at"}], "distill.teacher_outputs": "online"})
    assert ok.distill.teacher_outputs == "online"


def test_a_crd_mode_that_needs_the_shards_embeddings_is_refused_on_the_online_path_at_config_time(tmp_path):
    from ensemble_kd.core.config import ConfigError

    for mode in ("exact", "relax"):  # both project the shards' stored teacher embeddings
        with pytest.raises(ConfigError, match=r"distill.losses.1: loss 'crd' .* needs the teachers' stored embeddings.*"
                                              r"set mode: reference"):
            distill_cfg(tmp_path, **{"distill.losses": [{"name": "ce"}, {"name": "crd", "kwargs": {"mode": mode}}],
                                     "distill.teacher_outputs": "online"})
    ok = distill_cfg(tmp_path, **{"distill.losses": [{"name": "ce"}, {"name": "crd", "kwargs": {"mode": "reference"}}],
                                  "distill.teacher_outputs": "online"})
    assert ok.distill.losses[1].kwargs["mode"] == "reference"
    shards = distill_cfg(tmp_path, **{"distill.losses": [{"name": "ce"}, {"name": "crd", "kwargs": {"mode": "exact"}}]})
    assert shards.distill.teacher_outputs == "shards"  # the shard path keeps them: accepted


def test_attention_transfer_reads_the_feature_maps_on_the_online_path(ray_cluster, trained, tmp_path):
    """A cnn_small student on the pixel view learns from the pix_cnn teacher's intermediate maps."""
    cfg0, _ = trained
    shutil.copytree(cfg0.checkpoint_dir, tmp_path / "teachers")
    cfg = distill_cfg(tmp_path, **{"distill.teacher_outputs": "online", "distill.teachers": ["pix_cnn"], "distill.epochs": 2,
                                   "distill.student": {"arch": "cnn_small", "modality": "pix", "arch_kwargs": {"width": 8}},
                                   "distill.losses": [{"name": "ce"}, {"name": "at", "weight": 100.0}]})
    res = run_distill(cfg)
    first, last = res.history[0]["loss/at"], res.history[-1]["loss/at"]
    assert 0 < last < first  # the student's attention maps move towards the teacher's
