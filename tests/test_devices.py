"""Where each stage runs and what a restart reads back (issue 28, item 1), without a GPU: CUDA is
stood in for by the meta device or a patched ``torch.cuda``.

- a training state loads its RNG states on the CPU whatever device its tensors go to, and the
  RNGs take them back; no CUDA RNG is read or written by a process that has not used CUDA;
- the GPU fields alone say where a stage runs (``devices.stage_device``); ``device`` is checked
  against them at load;
- a Ray task that asks for no GPU sees none (CUDA_VISIBLE_DEVICES="", Ray's rule before 2.60);
- ``use_gpu_faiss`` with a faiss-cpu build is one error before any work;
- each epoch's history records the device and the peak accelerator memory.
"""
from __future__ import annotations

import os
import sys

import pytest
import ray
import ray.cloudpickle
import torch

from ensemble_kd.blocks.memory import NegativeSampler, faiss_gpu_problem
from ensemble_kd.core import raycluster
from ensemble_kd.core.files import atomic_torch_save
from ensemble_kd.core.config import ConfigError, EmbedConfig, load_config
from ensemble_kd.core.devices import stage_device
from ensemble_kd.orchestration.checks import check_config
from ensemble_kd.stages.embed import embed_task
from ensemble_kd.training import loop
from ensemble_kd.training import state

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the task bodies below travel to Ray by value


def _no_cuda_calls(monkeypatch, available: bool = True) -> None:
    """A process on a GPU machine that has not used CUDA: any RNG call would open a context."""
    def boom(*a, **k):
        raise AssertionError("a CUDA RNG call in a process that has not used CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", boom)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", boom)


def test_state_loads_rng_states_on_the_cpu_whatever_the_device(tmp_path):
    """``load_state(folder, device)`` used to map every tensor to ``device``, the RNG states too:
    torch.set_rng_state refuses a CUDA (here: meta) tensor and .numpy() cannot read one."""
    atomic_torch_save({"module": {"w": torch.ones(3)}, "rng": state.rng_state(), "epoch": 0}, tmp_path / state.STATE_FILE)
    st = state.load_state(tmp_path, "meta")
    assert st["module"]["w"].device.type == "meta"  # the weights go where they are asked to
    assert st["rng"]["torch"].device.type == "cpu" and st["rng"]["numpy"]["keys"].device.type == "cpu"
    state.set_rng_state(st["rng"])  # and the RNGs take them


def test_rng_states_leave_cuda_alone_in_a_process_that_never_used_it(monkeypatch):
    _no_cuda_calls(monkeypatch)
    s = state.rng_state()
    assert s["cuda"] is None
    s["cuda"] = [torch.zeros(16, dtype=torch.uint8)]  # a state saved by a GPU run, restored in a CPU trial
    state.set_rng_state(s)


def test_cuda_rng_states_are_restored_from_the_cpu_in_a_cuda_process(monkeypatch):
    got = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", got.extend)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.zeros(16, dtype=torch.uint8)])
    s = state.rng_state()
    state.set_rng_state(s)
    assert len(got) == 1 and got[0].device.type == "cpu"


def test_the_gpu_fields_say_where_a_stage_runs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert stage_device(0, "embed.gpus_per_actor") == torch.device("cpu")  # a GPU in sight is not a GPU asked for
    assert stage_device(0.5, "embed.gpus_per_actor") == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="embed.gpus_per_actor asks for a GPU"):
        stage_device(1, "embed.gpus_per_actor")


def test_device_is_checked_against_the_gpu_fields_at_load():
    assert load_config(None, {}).device == "auto"
    with pytest.raises(ConfigError, match=r"device: cuda, but teachers\.0\.use_gpu.*distill\.use_gpu"):
        load_config(None, {"device": "cuda"})  # used to train every stage on the CPU
    with pytest.raises(ConfigError, match="device: cpu, but distill.use_gpu"):
        load_config(None, {"device": "cpu", "distill.use_gpu": True})
    gpu = {"device": "cuda", "distill.use_gpu": True, "embed.gpus_per_actor": 1,
           **{f"teachers.{i}.use_gpu": True for i in range(3)}}
    assert load_config(None, gpu).device == "cuda"


def _visible() -> tuple[str | None, bool]:
    return os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.is_initialized()


def test_a_task_that_asks_for_no_gpu_sees_none(ray_cluster):
    """Ray 2.60 stopped hiding the GPUs from such tasks; the workers' environment brings the old
    rule back (raycluster.HIDE_GPUS): CUDA_VISIBLE_DEVICES is "" in the task, as in an embed task
    with gpus_per_actor 0, and nothing there has opened CUDA."""
    assert ray.get(ray.remote(num_gpus=0)(_visible).remote()) == ("", False)
    assert ray.get(embed_task(EmbedConfig(), body=_visible).remote()) == ("", False)
    assert raycluster.job_runtime_env()["env_vars"]["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] == "1"


def test_the_worker_setup_hook_hides_gpus_from_cpu_tasks(monkeypatch):
    monkeypatch.delenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", raising=False)
    raycluster.setup_worker()
    assert os.environ["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] == "1"


@pytest.mark.skipif(faiss_gpu_problem(here=False) is None, reason="a GPU build of faiss is installed")
def test_use_gpu_faiss_with_a_cpu_faiss_is_an_error_before_work(monkeypatch):
    """Refused by the sampler wherever it is built, and before any work by a run on this machine's
    own Ray (whose workers share this faiss); a job on a cluster leaves it to the GPU nodes."""
    from ensemble_kd.orchestration import checks

    monkeypatch.setattr(checks, "joins_cluster", lambda cfg=None: False)  # this test process's Ray aside
    labels = torch.arange(40) % 4
    with pytest.raises(ValueError, match="use_gpu_faiss is set, but this faiss .* is a CPU build"):
        NegativeSampler(torch.randn(40, 8), labels, mode="hard", num_negatives=8, hard_pool=4, use_gpu=True)
    over = {"distill.use_gpu": True, "distill.losses.crd.kwargs.use_gpu_faiss": True,
            "distill.losses.crd.kwargs.negatives": "hard"}
    with pytest.raises(ConfigError, match=r"distill\.losses\.2\.kwargs\.use_gpu_faiss: this faiss .* CPU build"):
        check_config(load_config(None, over))
    with pytest.raises(ConfigError, match="needs a GPU in the run's workers; set distill.use_gpu"):
        check_config(load_config(None, {"distill.losses.crd.kwargs.use_gpu_faiss": True}))
    monkeypatch.setattr(checks, "joins_cluster", lambda cfg=None: True)  # a job on a cluster
    check_config(load_config(None, over))


def test_each_epoch_records_its_device_and_peak_accelerator_memory(monkeypatch):
    assert loop.device_record(torch.device("cpu")) == {"device": "cpu", "peak_accel_mem_mb": 0.0}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**20)
    assert loop.device_record(torch.device("cuda", 0)) == {"device": "cuda:0", "peak_accel_mem_mb": 3.0}


def test_an_exact_mode_bank_too_big_for_the_device_is_gathered_on_the_host_in_chunks(monkeypatch):
    """The exact-mode bank lives on the device when it fits in BANK_DEVICE_SHARE of its memory;
    a bigger one stays on the host, its rows gathered there in chunks (the same rows)."""
    import numpy as np

    from ensemble_kd.core.rows import PartedRows
    from ensemble_kd.losses import crd

    class Props:
        total_memory = 4 * 2**30

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    gpu = torch.device("cuda", 0)
    assert crd.fits_on(gpu, 2**30) and not crd.fits_on(gpu, 2**30 + 1)  # a quarter of 4 GiB
    assert crd.fits_on(torch.device("cpu"), 2**40)
    parts = [np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32) for n in (7, 5, 9)]
    bank = PartedRows(parts)
    rows = torch.tensor([[0, 20, 7], [11, 3, 12]])  # (2, 3): rows from every part
    monkeypatch.setattr(crd, "HOST_GATHER_ROWS", 2)  # several chunks
    got = crd.host_gather(bank, rows)  # (2, 3, 8)
    assert got.shape == (2, 3, 8) and torch.equal(got, torch.from_numpy(np.concatenate(parts))[rows])
