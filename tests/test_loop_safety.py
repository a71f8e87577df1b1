"""The loop's own safety: a training state that loads without code execution (a crafted file is
refused), a NaN/inf run that stops FAILED before it saves, restarts in both execution modes
(one process in local mode; a Ray Train worker group), and the checkpoint cadence."""
import os
import pickle
import sys

import pytest
import ray.cloudpickle
import torch
from mlflow.tracking import MlflowClient

from ensemble_kd.training.state import STATE_FILE, StateFileError
from ensemble_kd.training.loop import LoopCallback, NonFiniteError
from ensemble_kd.storage.mlflow_store import tracking_uri
from tests.helpers import distill_cfg, embed, out_with_teachers, run_distill

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the callbacks below travel to Ray tasks by value


@pytest.fixture(scope="module")
def shards(ray_cluster, trained, shard_cache, tmp_path_factory):
    out = out_with_teachers(trained, tmp_path_factory, "safety", shards_from=shard_cache)
    embed(distill_cfg(out))
    return str(out)


class _Shell:
    """What an attacker would plant: unpickling it runs a command."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_state_loads_weights_only_and_a_crafted_state_is_refused_not_run(shards, tmp_path):
    cfg = distill_cfg(shards, **{"distill.epochs": 1, "distill.run_name": "crafted"})
    res = run_distill(cfg)
    state = torch.load(os.path.join(res.checkpoint_dir, STATE_FILE), weights_only=True)  # no code needed to load it
    assert state["epoch"] == 0 and isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)
    assert {"setup_s", "steps_s", "eval_s"} <= set(state["timings"])
    marker = tmp_path / "pwned"
    with open(os.path.join(res.checkpoint_dir, STATE_FILE), "wb") as f:
        pickle.dump({"module": _Shell(str(marker))}, f)
    resumed = distill_cfg(shards, **{"distill.epochs": 2, "distill.run_name": "crafted"})
    with pytest.raises(StateFileError, match="not a weights-only ensemble-kd state"):
        run_distill(resumed)
    assert not marker.exists()


def test_a_diverging_run_stops_failed_naming_epoch_step_and_part_before_saving(shards):
    # a finite but absurd learning rate: the weights overflow within the first steps
    cfg = distill_cfg(shards, **{"distill.epochs": 3, "distill.optim": {"lr": 1e30, "schedule": "constant"},
                                 "distill.run_name": "diverge", "tracking.enabled": True,
                                 "tracking.experiment": "diverge"})
    with pytest.raises(NonFiniteError, match=r"became non-finite (at|during) epoch 1"):
        run_distill(cfg)
    assert not (os.path.exists(os.path.join(shards, "ray_results", "diverge", STATE_FILE)))  # nothing saved
    c = MlflowClient(tracking_uri(cfg))
    run = c.search_runs([c.get_experiment_by_name("diverge").experiment_id])[0]
    assert run.info.status == "FAILED"


class _FailOnce(LoopCallback):
    def __init__(self, marker: str, hard: bool) -> None:
        self.marker, self.hard = marker, hard

    def on_epoch_start(self, epoch: int, rank: int) -> None:
        if epoch == 2 and rank == 0 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            if self.hard:
                os._exit(1)  # the process dies (OOM kill, lost node)
            raise RuntimeError("a transient fault")


def _metrics(history):
    return [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in history]


@pytest.fixture(scope="module")
def uninterrupted(shards):
    """The per-epoch metrics of an uninterrupted 3-epoch run in local mode."""
    return _metrics(run_distill(distill_cfg(shards, **{"distill.epochs": 3, "distill.run_name": "whole"})).history)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["local-error", "worker-group"])
def test_restart_continues_from_the_last_checkpoint_in_both_modes(shards, tmp_path, mode, uninterrupted):
    """local-error: the one-process loop raises and restarts in place; worker-group: Ray Train
    restarts a killed worker (the local-mode process death is tests/test_distill.py's). Either
    way every epoch's metrics equal an uninterrupted run's, and that run is a local one: the two
    modes give the same metrics for the same seed and config."""
    marker = str(tmp_path / "failed")
    over = {"distill.epochs": 3, "distill.max_failures": 1, "distill.local_mode": mode != "worker-group"}
    res = run_distill(distill_cfg(shards, **over), loop_callbacks=[_FailOnce(marker, hard=mode == "worker-group")])
    assert os.path.exists(marker)
    assert [h["epoch"] for h in res.history] == [1, 2, 3]
    assert _metrics(res.history) == uninterrupted


class _SeeSaved(LoopCallback):
    """Records, at each epoch's start, which epoch the run's saved state holds (-1: none yet)."""

    def __init__(self, run_dir: str, log: str) -> None:
        self.run_dir, self.log = run_dir, log

    def on_epoch_start(self, epoch: int, rank: int) -> None:
        path = os.path.join(self.run_dir, STATE_FILE)
        saved = torch.load(path, weights_only=True)["epoch"] if os.path.exists(path) else -1
        with open(self.log, "a") as f:
            f.write(f"{epoch}:{saved}\n")


def test_checkpoint_every_k_epochs_and_at_the_end_and_resume_from_the_last(shards, tmp_path):
    run_dir, log = os.path.join(shards, "ray_results", "cadence"), str(tmp_path / "seen")
    cfg = distill_cfg(shards, **{"distill.epochs": 3, "distill.checkpoint_every": 2, "distill.run_name": "cadence"})
    res = run_distill(cfg, loop_callbacks=[_SeeSaved(run_dir, log)])
    # epoch 1 (index 0) is not saved; epoch 2 is (every 2); epoch 3 is the end
    assert open(log).read().split() == ["0:-1", "1:-1", "2:1"]
    assert torch.load(os.path.join(res.checkpoint_dir, STATE_FILE), weights_only=True)["epoch"] == 2
    longer = run_distill(distill_cfg(shards, **{"distill.epochs": 5, "distill.checkpoint_every": 2,
                                                "distill.run_name": "cadence"}))
    assert [h["epoch"] for h in longer.history] == [1, 2, 3, 4, 5]
    assert longer.history[:3] == res.history  # epochs 1-3 came from the saved state, not a rerun
