"""Teacher checkpoints: training records accuracy, content hashes are checked, reuse works."""
import json
import shutil

import pytest
import torch

from ensemble_kd.orchestration.pipeline import train_teachers
from ensemble_kd.storage.teacher_checkpoint import CheckpointError, load_teacher, read_checkpoint
from tests.helpers import tiny_config


def test_checkpoint_carries_what_it_needs(trained):
    cfg, paths = trained
    ck = read_checkpoint(paths["pix_cnn"])
    for k in ("arch", "modality", "dataset", "config", "content_hash", "state_dict", "test_top1", "num_classes"):
        assert k in ck
    assert ck["arch"] == "cnn_small" and ck["modality"] == "pix" and ck["dataset"]["name"] == "uci-mfeat"
    assert 0.3 < ck["test_top1"] <= 1.0  # a few epochs already far above chance (0.1)


def test_loaded_teacher_is_frozen(trained):
    _, paths = trained
    t = load_teacher(paths["kar_mlp"])
    assert not t.model.training
    assert all(not p.requires_grad for p in t.model.parameters())
    emb, logits = t.model(torch.randn(4, 64))
    assert emb.shape == (4, t.embed_dim) and logits.shape == (4, 10) and not logits.requires_grad


def test_rerun_reuses_and_changed_config_retrains(trained, tmp_path):
    cfg, paths = trained
    logs = []
    again = train_teachers(cfg, progress=False, log=logs.append)
    assert again.paths() == paths and all("reused" in m for m in logs), logs
    out = tmp_path / "copy"
    shutil.copytree(cfg.checkpoint_dir, out / "teachers")
    cfg2 = tiny_config(out, teachers=[dict(name="kar_mlp", arch="mlp", modality="kar", epochs=1, arch_kwargs={"hidden": [32]})])
    logs = []
    train_teachers(cfg2, progress=False, log=logs.append)
    assert any("another config" in m for m in logs), logs


def test_user_checkpoint_by_path(trained, tmp_path):
    _, paths = trained
    mine = tmp_path / "my_teacher.pt"
    shutil.copy(paths["pix_cnn"], mine)
    cfg = tiny_config(tmp_path / "o", teachers=[{"name": "mine", "checkpoint": str(mine), "modality": "pix"}])
    logs = []
    got = train_teachers(cfg, progress=False, log=logs.append)
    assert got.paths() == {"mine": mine} and "using checkpoint" in logs[0]
    assert not (tmp_path / "o" / "teachers").exists()  # nothing trained


def test_tampered_weights_are_refused(trained, tmp_path):
    _, paths = trained
    ck = torch.load(paths["kar_mlp"], weights_only=True)
    k = next(iter(ck["state_dict"]))
    ck["state_dict"][k] = ck["state_dict"][k] + 1
    bad = tmp_path / "bad.pt"
    torch.save(ck, bad)
    with pytest.raises(CheckpointError, match=r"bad.pt: content hash mismatch"):
        load_teacher(bad)


def test_truncated_and_foreign_files_are_refused(trained, tmp_path):
    _, paths = trained
    data = paths["kar_mlp"].read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut.pt is unreadable"):
        read_checkpoint(cut)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not an ensemble-kd teacher checkpoint"):
        read_checkpoint(other)
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "missing.pt")


def test_retrain_starts_from_scratch_not_from_the_last_state(trained, tmp_path):
    """--retrain trains again: the recipe's run folder (where an interrupted run would resume) is
    cleared first, so the teacher is not just reloaded from its finished state."""
    cfg, _ = trained
    out = tmp_path / "copy"
    shutil.copytree(cfg.output_dir, out, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts", "tune", "shards"))
    (run,) = list((out / "ray_results").glob("teacher-kar_mlp-*"))  # the session's finished training of kar_mlp
    st = torch.load(run / "state.pt", weights_only=True)
    st["history"][0]["marker"] = "carried over"  # a resumed run would keep its history
    torch.save(st, run / "state.pt")
    same = tiny_config(out, teachers=[dict(name="kar_mlp", arch="mlp", modality="kar", epochs=2, seed=1,
                                           arch_kwargs={"hidden": [32]})])
    train_teachers(same, retrain=True, progress=False, log=lambda m: None)
    new = torch.load(run / "state.pt", weights_only=True)
    assert [h["epoch"] for h in new["history"]] == [1, 2] and "marker" not in new["history"][0]


def test_each_teacher_is_announced_when_ready_and_its_shards_follow(trained, tmp_path):
    """teachers.run calls on_ready for a reused teacher at once and for a trained one when its
    training ends; teachers_and_shards writes each teacher's shards behind it, the same shards
    (keys, rows) as the embed stage alone, and one index with all of them."""
    from ensemble_kd.orchestration.pipeline import embed, teachers_and_shards
    from ensemble_kd.stages import teachers as teachers_stage

    cfg, paths = trained
    out = tmp_path / "out"
    (out / "teachers").mkdir(parents=True)
    shutil.copy(paths["pix_cnn"], out / "teachers" / "pix_cnn.pt")  # reused; kar_mlp trains
    cfg2 = tiny_config(out)
    heard = []
    ts = teachers_stage.run(cfg2, progress=False, log=lambda m: None, on_ready=lambda n, rec: heard.append((n, rec)))
    assert [n for n, _ in heard] == ["pix_cnn", "kar_mlp"]  # the reused one before the one that had to train
    assert {n: rec for n, rec in heard} == dict(ts.items())

    logs = []
    teachers, shards = teachers_and_shards(cfg2, progress=False, log=logs.append)  # both reused now
    assert dict(teachers.items()) == dict(ts.items())
    assert sorted((r.teacher, r.split) for r in shards) == sorted(
        (n, s) for n in ("pix_cnn", "kar_mlp") for s in ("train", "test"))
    again = embed(cfg2, teachers, progress=False, log=logs.append)  # the stage alone finds every shard written
    assert all(r.reused for r in again) and {r.dir for r in again} == {r.dir for r in shards}
    index = json.loads((out / "index" / "shards.json").read_text())
    assert len(index["shards"]) == 4
