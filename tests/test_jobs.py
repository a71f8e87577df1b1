"""`jobs/` for real: every config validates, and the embedded default has no copy there. The tiny job
submitted with `ray job submit --working-dir .` to a cluster of several nodes: tests/test_cluster.py."""
from pathlib import Path

import pytest

from ensemble_kd.core.config import load_config
from ensemble_kd.orchestration.pipeline import load

JOBS = Path(__file__).resolve().parents[1] / "jobs"


@pytest.mark.parametrize("path", sorted((JOBS / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_job_config_validates(path, monkeypatch):
    """As a job submitted to a cluster sees them (RAY_ADDRESS set: the GPU nodes' faiss, not this
    machine's, serves a GPU config's FAISS)."""
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    cfg = load(path)  # schema, registry cross-checks and the run section's arms and sweep
    assert cfg.teachers or cfg.distill.teachers == ()


def test_the_default_config_lives_in_one_place():
    """The embedded default (what the entrypoint runs without --config) has no copy under jobs/."""
    default = load_config(None)
    copies = [p.name for p in (JOBS / "configs").glob("*.yaml") if load_config(p) == default]
    assert copies == []
