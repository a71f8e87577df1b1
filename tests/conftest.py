"""Shared fixtures: one local Ray for the whole session, tiny configs, trained tiny teachers."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from ensemble_kd.raycluster import LOCAL_RAY_ENV_DEFAULTS, set_ray_env

set_ray_env()
for _k, _v in LOCAL_RAY_ENV_DEFAULTS.items():  # the session's Ray is local, like a command's own
    os.environ.setdefault(_k, _v)
os.environ.setdefault("TQDM_DISABLE", "1")  # bars are for people; tests read the logs


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray: 2 cores here, so tests ask for fractional CPUs. Always shut down."""
    import ray

    tmp = tempfile.mkdtemp(prefix="ekd-t-", dir="/tmp")
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=150 * 1024 * 1024, _temp_dir=tmp,
             log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def tiny_config(out: Path, **over):
    """Two small teachers on uci-mfeat (an image view and a vector view), few epochs."""
    from ensemble_kd.config import from_dict

    d = {
        "name": "tiny",
        "output_dir": str(out),
        "device": "cpu",
        "data": {"name": "uci-mfeat"},
        "teachers": [
            {"name": "pix_cnn", "arch": "cnn_small", "modality": "pix", "epochs": 6, "arch_kwargs": {"width": 8}},
            {"name": "kar_mlp", "arch": "mlp", "modality": "kar", "epochs": 2, "seed": 1, "arch_kwargs": {"hidden": [32]}},
        ],
        "embed": {"splits": ["train", "test"], "batch_size": 256, "num_cpus_per_actor": 0.5},
    }
    for k, v in over.items():
        cur = d
        parts = k.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = v
    return from_dict(d)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(config, checkpoint paths) of the tiny teachers, trained once per session."""
    from ensemble_kd.teachers import ensure_teachers

    out = tmp_path_factory.mktemp("run")
    cfg = tiny_config(out)
    paths = ensure_teachers(cfg, progress=False, log=lambda m: None)
    return cfg, paths


def spawn_processes(fn, args: tuple, nprocs: int, timeout_s: float) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` spawned processes (a real gloo group in the tests);
    fail the test, killing what is left, when they take longer than ``timeout_s``."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{nprocs}-process test timed out after {timeout_s:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def out_with_teachers(trained, tmp_path_factory, name: str) -> Path:
    """A fresh output dir holding copies of the session's trained teachers (reused, not retrained)."""
    cfg, _ = trained
    out = tmp_path_factory.mktemp(name)
    shutil.copytree(cfg.checkpoint_dir, out / "teachers")
    return out
