"""Distillation on a real local Ray Train: 1 and 2 workers, memory consistency, resume, accuracy."""
import os
import shutil

import pytest
import torch

from ensemble_kd.orchestration import pipeline
from ensemble_kd.core.config import ConfigError
from ensemble_kd.training.loop import LoopCallback
from ensemble_kd.storage.shards import ShardMismatchError
from tests.helpers import distill_cfg, embed, out_with_teachers, run_distill

@pytest.fixture(scope="module")
def shards(ray_cluster, trained, shard_cache, tmp_path_factory):
    """An output dir of its own (the session's teachers copied in), with the train shards."""
    out = out_with_teachers(trained, tmp_path_factory, "distill", shards_from=shard_cache)
    embed(distill_cfg(out))
    return str(out)


def test_one_worker_ce_kd_crd_beats_chance(shards):
    cfg = distill_cfg(shards, **{"distill.epochs": 6})
    res = run_distill(cfg, log=lambda m: None)
    assert len(res.history) == 6 and res.final_top1 > 0.6  # chance is 0.1
    last = res.history[-1]
    for k in ("loss/ce", "loss/kd", "loss/crd", "loss/total", "lr", "test_top1"):
        assert k in last and torch.isfinite(torch.tensor(float(last[k])))
    assert res.history[-1]["loss/total"] < res.history[0]["loss/total"]
    st = torch.load(res.student_path, weights_only=True)
    assert st["arch"] == "mlp" and st["modality"] == "fou" and st["state_dict"]


def test_two_workers_keep_memory_identical(shards):
    cfg = distill_cfg(shards, **{"distill.num_workers": 2, "distill.epochs": 1})
    res = run_distill(cfg, log=lambda m: None)
    sums = res.history[-1]["buffer_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]


def test_resume_equals_uninterrupted(shards):
    full = run_distill(distill_cfg(shards, **{"distill.epochs": 2}), log=lambda m: None)
    name = "resume-test"
    part = run_distill(distill_cfg(shards, **{"distill.epochs": 1, "distill.run_name": name}), log=lambda m: None)
    assert len(part.history) == 1
    logs = []
    resumed = run_distill(distill_cfg(shards, **{"distill.epochs": 2, "distill.run_name": name}), log=logs.append)
    assert len(resumed.history) == 2
    assert resumed.history[0] == part.history[0]  # epoch 1 came from the checkpoint, not a rerun
    assert resumed.history[1]["lr"] == full.history[1]["lr"]
    a = torch.load(full.student_path, weights_only=True)["state_dict"]
    b = torch.load(resumed.student_path, weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert resumed.history[-1]["test_top1"] == full.history[-1]["test_top1"]


@pytest.mark.slow
def test_killed_worker_restarts_from_last_checkpoint(shards, tmp_path):
    marker = tmp_path / "killed"

    class KillOnce(LoopCallback):  # local: pickled by value to the worker
        def on_epoch_start(self, epoch: int, rank: int) -> None:
            if epoch == 2 and rank == 0 and not marker.exists():
                marker.write_text("killed")  # once: the restarted group carries on
                os._exit(1)  # a hard worker death, as an OOM kill or a lost node would be

    cfg = distill_cfg(shards, **{"distill.epochs": 3, "distill.max_failures": 1})
    res = run_distill(cfg, loop_callbacks=[KillOnce()])
    assert marker.exists()  # the worker really died once
    assert [h["epoch"] for h in res.history] == [1, 2, 3]  # epochs 1-2 came from the checkpoint, 3 after restart
    full = run_distill(cfg, log=lambda m: None)
    assert res.history[-1]["test_top1"] == full.history[-1]["test_top1"]


def test_ce_only_baseline_needs_no_shards(shards):
    cfg = distill_cfg(shards, **{"distill.teachers": [], "distill.losses": [{"name": "ce"}], "distill.epochs": 3})
    res = run_distill(cfg, log=lambda m: None)
    assert res.final_top1 > 0.5 and "loss/kd" not in res.history[-1]


def test_bad_distill_configs_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"distill.losses.0.name: unknown loss 'crdd'.*crd"):
        distill_cfg(tmp_path, **{"distill.losses": [{"name": "crdd"}]})
    with pytest.raises(ConfigError, match=r"distill.teachers: 'zzz' is not a configured teacher"):
        distill_cfg(tmp_path, **{"distill.teachers": ["zzz"]})
    with pytest.raises(ConfigError, match=r"loss 'kd' needs teachers"):
        distill_cfg(tmp_path, **{"distill.teachers": [], "distill.losses": [{"name": "kd"}]})
    with pytest.raises(ConfigError, match=r"each loss may appear once"):
        distill_cfg(tmp_path, **{"distill.losses": [{"name": "ce"}, {"name": "ce"}]})
    with pytest.raises(ConfigError, match=r"distill.student.modality"):
        distill_cfg(tmp_path, **{"distill.student": {"arch": "mlp", "modality": "rgb"}})


def test_missing_checkpoint_or_shard_says_what_to_run(trained, tmp_path):
    cfg = distill_cfg(tmp_path)
    with pytest.raises(ConfigError, match="run `ensemble-kd teachers train` first"):
        pipeline.train_shards(cfg)
    shutil.copytree(trained[0].checkpoint_dir, cfg.checkpoint_dir)
    with pytest.raises(ConfigError, match=r"no shards index at .*index/shards.json: run `ensemble-kd embed` first"):
        pipeline.train_shards(cfg)


def test_a_stale_shard_index_is_refused_before_any_worker(shards, tmp_path):
    """The shard index is a pointer: a shard recorded for another view recipe is refused with both
    sides named, not trained on."""
    cfg = distill_cfg(shards, **{"embed.views": {"num_views": 2}})
    with pytest.raises(ShardMismatchError, match=r"views: manifest has .*num_views': 1.*this run expects .*num_views': 2"):
        pipeline.train_shards(cfg)
