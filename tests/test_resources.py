"""What a config asks of Ray, checked against the cluster before any work.

Before this, nothing compared a config's requests with the cluster: the CIFAR job configs ask
``distill.num_workers: 4`` with a GPU each, and on a smaller cluster Ray Train gave up after its
60 s start timeout (after the teachers had trained) or a one-worker task waited forever. The pure
checks run on resource dicts shaped as ``ray.cluster_resources()`` and ``ray.nodes()`` give them;
one test asks the session's real Ray, one runs the command."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ensemble_kd.core.config import ConfigError, load_config, with_overrides
from ensemble_kd.orchestration.resources import STAGES, Request, check_cluster, check_resources, requests
from ensemble_kd.orchestration.sweep import trial_resources

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "jobs" / "configs" / "tiny-uci-mfeat.yaml"
CIFAR = sorted((REPO / "jobs" / "configs").glob("cifar100-*.yaml"))


def tiny(**over):
    return load_config(TINY, over)


def refused(cfg, stages, totals, nodes=None) -> str:
    with pytest.raises(ConfigError) as e:
        check_resources(cfg, stages, totals, [totals] if nodes is None else nodes)
    return str(e.value)


def one_gpu_box(cpus: float = 4):
    totals = {"CPU": float(cpus), "GPU": 1.0, "memory": 64e9}
    return totals, [dict(totals)]


# ---- every stage's request ----------------------------------------------------------------------

def test_distill_workers_with_gpus_beyond_the_cluster_name_the_field():
    cfg = tiny(**{"distill.num_workers": 4, "distill.use_gpu": True})
    assert refused(cfg, {"distill"}, {"CPU": 8.0, "GPU": 1.0}) == \
        "distill.num_workers=4 with use_gpu needs 4 GPUs; the cluster has 1"
    assert refused(cfg, {"distill"}, {"CPU": 8.0}) == "distill.num_workers=4 with use_gpu needs 4 GPUs; the cluster has 0"


def test_distill_workers_beyond_the_cluster_cpus():
    cfg = tiny(**{"distill.num_workers": 4, "distill.cpus_per_worker": 2})
    assert refused(cfg, {"distill"}, {"CPU": 4.0}) == \
        "distill.num_workers=4 with cpus_per_worker=2 needs 8 CPUs; the cluster has 4"


def test_a_teacher_on_gpu_on_a_cpu_cluster_names_the_teacher():
    cfg = tiny(**{"teachers.kar_mlp.use_gpu": True})
    assert refused(cfg, {"teachers"}, {"CPU": 2.0}) == \
        "teachers.kar_mlp.num_workers=1 with use_gpu needs 1 GPU; the cluster has 0"
    cfg = tiny(**{"teachers.pix_cnn.num_workers": 3, "teachers.pix_cnn.cpus_per_worker": 1})
    assert refused(cfg, {"teachers"}, {"CPU": 2.0}) == \
        "teachers.pix_cnn.num_workers=3 with cpus_per_worker=1 needs 3 CPUs; the cluster has 2"


def test_a_worker_bigger_than_every_node_names_the_largest_node():
    """8 CPUs in all, but a 6-CPU worker fits on no 4-CPU node: Ray would wait for it forever."""
    cfg = tiny(**{"distill.cpus_per_worker": 6, "distill.use_gpu": True})
    nodes = [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}]
    assert refused(cfg, {"distill"}, {"CPU": 8.0, "GPU": 2.0}, nodes) == (
        "distill.cpus_per_worker=6 with use_gpu needs 6 CPUs and 1 GPU on one node for the distillation; "
        "the largest node has 4 CPUs and 1 GPU")
    # the largest node by GPUs, where the worker needs one: a big CPU-only node does not count
    nodes = [{"CPU": 32.0}, {"CPU": 4.0, "GPU": 1.0}]
    msg = refused(cfg, {"distill"}, {"CPU": 36.0, "GPU": 1.0}, nodes)
    assert msg.endswith("the largest node has 4 CPUs and 1 GPU")


def test_workers_the_nodes_cannot_hold_at_once():
    """Enough CPUs and GPUs in all and each worker fits a node, but the small node holds none: a
    worker group that can never start."""
    cfg = tiny(**{"distill.num_workers": 2, "distill.cpus_per_worker": 2, "distill.use_gpu": True})
    nodes = [{"CPU": 3.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}]
    assert refused(cfg, {"distill"}, {"CPU": 4.0, "GPU": 2.0}, nodes) == (
        "distill.num_workers=2 needs 2 workers of 2 CPUs + 1 GPU each at once for the distillation; "
        "the cluster's 2 nodes hold 1 such workers")
    check_resources(cfg, {"distill"}, {"CPU": 4.0, "GPU": 2.0}, [{"CPU": 2.0, "GPU": 1.0}] * 2)


def test_requests_that_fit_exactly_pass():
    cfg = tiny(**{"distill.num_workers": 4, "distill.cpus_per_worker": 4, "distill.use_gpu": True,
                  "tune.cpus_per_trial": 1})
    # a multi-worker Tune trial: its own process (tune.cpus_per_trial) beside its 4 workers
    totals = {"CPU": 17.0, "GPU": 4.0}
    check_resources(cfg, STAGES, totals, [{"CPU": 9.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 2.0}])
    assert refused(cfg, {"tune"}, {"CPU": 16.5, "GPU": 4.0}) == \
        "distill.num_workers=4 with cpus_per_worker=4 and tune.cpus_per_trial=1 needs 17 CPUs; the cluster has 16.5"
    check_resources(cfg, {"distill"}, {"CPU": 16.0, "GPU": 4.0}, [])  # the distill stage has no trial process
    big_driver = tiny(**{"distill.num_workers": 2, "tune.cpus_per_trial": 6})
    assert refused(big_driver, {"tune"}, {"CPU": 8.0}, [{"CPU": 4.0}, {"CPU": 4.0}]) == (
        "tune.cpus_per_trial=6 needs 6 CPUs on one node for a Tune trial's own process; the largest node has 4 CPUs")
    # fractional CPUs adding up to the totals (Ray's 1e-4 units, not float sums, decide)
    check_resources(tiny(**{"distill.num_workers": 3, "distill.cpus_per_worker": 0.1}), {"distill"}, {"CPU": 0.3}, [])


def test_tune_trials_ask_what_the_sweep_gives_them():
    """The tune request is sweep.trial_resources (what Tune is given) plus the workers a
    multi-worker trial's TorchTrainer asks for."""
    local = tiny(**{"distill.use_gpu": True, "distill.cpus_per_worker": 2})
    (r,) = requests(local, {"tune"})
    assert trial_resources(local) == {"CPU": r.cpus, "GPU": r.gpus} and r.bundles == 1 and r.driver_cpus == 0
    for over in ({"distill.num_workers": 2}, {"distill.local_mode": False}):
        cfg = tiny(**{**over, "tune.cpus_per_trial": 0.5})
        (r,) = requests(cfg, {"tune"})
        assert trial_resources(cfg) == {"CPU": r.driver_cpus} == {"CPU": 0.5}
        assert (r.bundles, r.cpus) == (cfg.distill.num_workers, cfg.distill.cpus_per_worker)


def test_trials_that_share_a_gpu_ask_for_their_share():
    """distill.gpus_per_worker: 0.5 lets two single-worker trials train on one GPU (Tune is given the
    share, the cluster check counts it), where the whole GPU each would run them one at a time."""
    cfg = tiny(**{"distill.use_gpu": True, "distill.gpus_per_worker": 0.5, "distill.cpus_per_worker": 0.5})
    (r,) = requests(cfg, {"tune"})
    assert trial_resources(cfg) == {"CPU": 0.5, "GPU": 0.5} and r.gpus == 0.5
    check_resources(cfg, {"tune"}, {"CPU": 2.0, "GPU": 1.0}, [{"CPU": 2.0, "GPU": 1.0}])
    assert trial_resources(tiny(**{"distill.use_gpu": True}))["GPU"] == 1.0
    with pytest.raises(ConfigError, match="gpus_per_worker"):
        tiny(**{"distill.gpus_per_worker": 1.5})


def test_teachers_given_as_a_checkpoint_ask_nothing(tmp_path):
    """A teacher loaded from its file never trains: nothing of its num_workers or use_gpu is asked."""
    ck = tmp_path / "pix.pt"
    cfg = tiny(**{"teachers.pix_cnn.use_gpu": True, "teachers.pix_cnn.num_workers": 8,
                  "teachers.pix_cnn.checkpoint": str(ck)})
    assert [r.field for r in requests(cfg, {"teachers"})] == ["teachers.kar_mlp.num_workers"]
    check_resources(cfg, {"teachers"}, {"CPU": 2.0}, [{"CPU": 2.0}])


def test_stages_a_command_does_not_run_ask_nothing():
    cfg = tiny(**{"distill.num_workers": 4, "distill.use_gpu": True, "teachers.pix_cnn.use_gpu": True})
    assert [r.field for r in requests(cfg, {"embed"})] == ["embed.cpus_per_actor"]
    assert requests(cfg, set()) == []
    check_resources(cfg, {"embed"}, {"CPU": 2.0}, [{"CPU": 2.0}])  # `ensemble-kd embed` on a CPU machine
    assert "teachers.pix_cnn" in refused(cfg, {"teachers"}, {"CPU": 2.0})
    assert refused(cfg, STAGES, {"CPU": 2.0}).startswith("teachers.pix_cnn")  # in the order the stages ask
    with pytest.raises(ValueError, match="unknown stage"):
        requests(cfg, {"train"})


def test_embed_tasks_with_a_fraction_of_a_gpu():
    cfg = tiny(**{"embed.gpus_per_actor": 0.25, "embed.cpus_per_actor": 2})
    (r,) = requests(cfg, {"embed"})
    assert r == Request("embed.gpus_per_actor", 2.0, 0.25, 1, "an embed task")
    check_resources(cfg, {"embed"}, *one_gpu_box())  # a quarter of the one GPU is there
    assert refused(cfg, {"embed"}, {"CPU": 8.0}) == "embed.gpus_per_actor=0.25 needs 0.25 GPU; the cluster has 0"
    # a teacher's W tasks are independent: one at a time is enough, whatever workers_per_teacher says
    check_resources(with_overrides(cfg, {"embed.workers_per_teacher": 8}), {"embed"}, {"CPU": 2.0, "GPU": 0.25}, [])
    big = with_overrides(cfg, {"embed.cpus_per_actor": 6})
    nodes = [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0}]
    assert refused(big, {"embed"}, {"CPU": 8.0, "GPU": 1.0}, nodes) == (
        "embed.gpus_per_actor=0.25 needs 6 CPUs and 0.25 GPU on one node for an embed task; "
        "the largest node has 4 CPUs and 1 GPU")
    assert refused(with_overrides(cfg, {"embed.gpus_per_actor": 0}), {"embed"}, {"CPU": 1.0}) == \
        "embed.cpus_per_actor=2 needs 2 CPUs; the cluster has 1"


# ---- the CIFAR job configs on one GPU -----------------------------------------------------------

def one_gpu_overrides(path: Path) -> dict:
    """The `--set` overrides of the config's own comment line that says how to run it on one GPU."""
    (line,) = [ln for ln in path.read_text().splitlines()
               if ln.startswith("#") and f"ensemble-kd run --config jobs/configs/{path.name} " in ln]
    args = shlex.split(line.lstrip("#"))
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    return {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in sets)}


@pytest.mark.parametrize("path", CIFAR, ids=lambda p: p.name)
def test_cifar_job_configs_say_how_to_run_on_one_gpu(path):
    assert CIFAR, "no CIFAR job configs found"
    over = one_gpu_overrides(path)
    assert "distill.num_workers" in over
    head = path.read_text().split("\nname:")[0]
    assert re.search(r"\d+ GPUs and \d+ CPUs per trial", head), "the comment says what the config asks"
    cfg = load_config(path)
    assert refused(cfg, STAGES, *one_gpu_box()).startswith("distill.num_workers=")  # as shipped: several GPUs
    check_resources(load_config(path, over), STAGES, *one_gpu_box())


# ---- a real Ray, and the command ------------------------------------------------------------------

def test_check_cluster_refuses_a_gpu_on_this_gpu_less_ray(ray_cluster):
    """The session's local Ray (no GPU here): a distillation on a GPU is refused, naming the field."""
    import ray

    assert not ray.cluster_resources().get("GPU")
    check_cluster(tiny(), STAGES)  # the tiny job fits
    with pytest.raises(ConfigError, match=r"^distill\.num_workers=1 with use_gpu needs 1 GPU; the cluster has 0$"):
        check_cluster(tiny(**{"distill.use_gpu": True}), {"distill"})


def test_run_refuses_four_gpu_workers_before_any_teacher_trains(tmp_path):
    """`ensemble-kd run` asking 4 GPU workers of a GPU-less machine: exit 2 with one line naming the
    field and the GPUs, within seconds of Ray's start, before any teacher trains (before, the
    teachers trained and then Ray Train waited its 60 s for a worker group that could never start)."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "ensemble_kd.cli", "run", "--config", str(TINY), "--out", str(out),
                        "--set", "distill.num_workers=4", "--set", "distill.use_gpu=true"],
                       capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    seconds = time.perf_counter() - t0
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[0].startswith("ensemble-kd: error: distill.num_workers=4 with use_gpu needs 4 GPUs; the cluster has 0")
    assert not list((out / "teachers").glob("*.pt")) and not (out / "ray_results").exists()
    print(f"refused in {seconds:.1f}s")
    assert seconds < 60, seconds  # the command's start and Ray's; no training, no worker-group timeout
