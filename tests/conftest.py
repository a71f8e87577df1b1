"""Shared fixtures: one local Ray for the whole session, trained tiny teachers (helpers: tests/helpers.py)."""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import ray

from ensemble_kd.orchestration import pipeline
from ensemble_kd.core.raycluster import LOCAL_RAY_ENV_DEFAULTS, set_ray_env
from tests.helpers import distill_cfg, embed, out_with_teachers, tiny_config

set_ray_env()
for _k, _v in LOCAL_RAY_ENV_DEFAULTS.items():  # the session's Ray is local, like a command's own
    os.environ.setdefault(_k, _v)
os.environ.setdefault("TQDM_DISABLE", "1")  # bars are for people; tests read the logs


def pytest_xdist_auto_num_workers(config):
    """One test process more than there are cores, at most four: a test's time is mostly waiting for
    Ray and subprocesses to start, so two processes left a third of 2 cores idle."""
    return min(4, (os.cpu_count() or 1) + 1)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray: 2 cores here, so tests ask for fractional CPUs. Always shut down."""
    tmp = tempfile.mkdtemp(prefix="ekd-t-", dir="/tmp")
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=150 * 1024 * 1024, _temp_dir=tmp,
             log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def trained(ray_cluster, tmp_path_factory):
    """(config, checkpoint paths) of the tiny teachers, trained once per session (on Ray Train)."""
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_config(out)
    return cfg, pipeline.train_teachers(cfg, progress=False, log=lambda m: None).paths()


@pytest.fixture(scope="session")
def shard_cache(trained, tmp_path_factory):
    """A folder with the tiny teachers' shards (the embed recipe of helpers.distill_cfg), embedded
    once per session; modules copy them (helpers.out_with_teachers(shards_from=...))."""
    out = out_with_teachers(trained, tmp_path_factory, "shard-cache")
    embed(distill_cfg(out))
    return out
