"""Helpers shared by the tests (fixtures live in conftest.py). Test modules import from here,
never from each other."""
from __future__ import annotations

import math
import shutil
import time
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from ensemble_kd.cli import main
from ensemble_kd.orchestration import pipeline
from ensemble_kd.storage.artifacts import ShardIndex, TeacherSet
from ensemble_kd.orchestration.checks import check_config
from ensemble_kd.core.config import DataConfig, ExperimentConfig, TeacherConfig, from_dict
from ensemble_kd.orchestration.plan import check_run_section
from ensemble_kd.stages import distill as distill_stage
from ensemble_kd.stages.teachers import record

REPDISTILLER_MODELS = Path(__file__).parent / "fixtures" / "repdistiller" / "models.pt"
CRD = {"name": "crd", "weight": 0.8, "kwargs": {"num_negatives": 256, "per_sample": False, "feat_dim": 32}}


def tiny_config(out: Path, **over) -> ExperimentConfig:
    """Two small teachers on uci-mfeat (an image view and a vector view), few epochs; checked
    against the registries as the CLI checks a config."""
    d = {
        "name": "tiny",
        "output_dir": str(out),
        "device": "cpu",
        "data": {"name": "uci-mfeat"},
        "teachers": [
            {"name": "pix_cnn", "arch": "cnn_small", "modality": "pix", "epochs": 6, "arch_kwargs": {"width": 8}},
            {"name": "kar_mlp", "arch": "mlp", "modality": "kar", "epochs": 2, "seed": 1, "arch_kwargs": {"hidden": [32]}},
        ],
        "embed": {"splits": ["train", "test"], "batch_size": 256, "cpus_per_actor": 0.5},
    }
    for k, v in over.items():
        cur = d
        parts = k.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = v
    cfg = check_config(from_dict(d))
    check_run_section(cfg)
    return cfg


def distill_cfg(out, **over) -> ExperimentConfig:
    """tiny_config with a CE + KD + CRD student MLP on `fou`, 2 epochs, train shards only, no MLflow."""
    d = {
        "distill.teachers": ["pix_cnn", "kar_mlp"],
        "distill.student": {"arch": "mlp", "modality": "fou", "arch_kwargs": {"hidden": [64]}},
        "distill.losses": [{"name": "ce"}, {"name": "kd", "kwargs": {"temperature": 4.0}}, CRD],
        "distill.epochs": 2,
        "distill.batch_size": 64,
        "distill.cpus_per_worker": 0.5,
        "distill.optim": {"lr": 0.05, "schedule": "cosine"},
        "embed.splits": ["train"],
        "tracking.enabled": False,  # MLflow is exercised in test_tracking.py
    }
    d.update(over)
    return tiny_config(out, **d)


def run_distill(cfg: ExperimentConfig, **kw):
    """The distill stage on the train shards the embed stage recorded under cfg.output_dir (or, on
    the online path, on the teachers' checkpoints there)."""
    kw.setdefault("log", lambda m: None)
    return distill_stage.run(cfg, **pipeline.distill_inputs(cfg), **kw)


def teacher_set(paths: dict[str, Path]) -> TeacherSet:
    """The TeacherSet of checkpoint files (name -> path)."""
    return TeacherSet({n: record(TeacherConfig(name=n, checkpoint=str(p)), p, DataConfig(), Path(p).parent.parent)
                       for n, p in paths.items()})


def embed(cfg: ExperimentConfig, paths: dict[str, Path] | None = None, log=lambda m: None) -> ShardIndex:
    """The embed stage on ``cfg`` for the given checkpoints (default: the config's own), Ray up."""
    ts = teacher_set(paths) if paths is not None else pipeline.existing_teachers(cfg)
    return pipeline.embed(cfg, ts, progress=False, log=log)


def by_key(index: ShardIndex) -> dict[tuple[str, str], object]:
    """(teacher, split) -> shard record."""
    return {(r.teacher, r.split): r for r in index}


def out_with_teachers(trained, tmp_path_factory, name: str, shards_from: Path | None = None) -> Path:
    """A fresh output dir holding copies of the session's trained teachers (reused, not retrained)
    and, with ``shards_from`` (the ``shard_cache`` fixture), of their shards: the embed stage then
    finds them and only records them in this folder's index (no actor starts)."""
    cfg, _ = trained
    out = tmp_path_factory.mktemp(name)
    shutil.copytree(cfg.checkpoint_dir, out / "teachers")
    if shards_from is not None:
        shutil.copytree(Path(shards_from) / "shards", out / "shards")
    return out


def spawn_processes(fn, args: tuple, nprocs: int, timeout_s: float) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` spawned processes (a real gloo group in the tests);
    fail the test, killing what is left, when they take longer than ``timeout_s``."""
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


@cache
def repdistiller_models() -> dict[str, Any]:
    """The RepDistiller reference outputs (tests/fixtures/repdistiller/README.md); data, no code."""
    return torch.load(REPDISTILLER_MODELS, weights_only=True)


def repdistiller_state(arch: str) -> dict[str, torch.Tensor]:
    """The fixture's weights for ``arch``, made by its fill rule: one generator seeded once, keys in
    the reference order, every draw in float32."""
    ref = repdistiller_models()
    g = torch.Generator().manual_seed(int(ref["seed"]))
    out = {}
    for key, shape in ref["archs"][arch]["keys_shapes"]:
        shape = tuple(shape)
        if key.endswith("num_batches_tracked"):
            out[key] = torch.zeros(shape, dtype=torch.long)
        elif key.endswith("running_var"):
            out[key] = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith("running_mean"):
            out[key] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) >= 2:
            out[key] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        elif key.endswith(".weight"):
            out[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[key] = 0.1 * torch.randn(shape, generator=g)
    return out


def wait_for_cpus(total: float, timeout_s: float = 30.0) -> None:
    """Wait until the session Ray's free CPUs are back to ``total`` (a failed stage's cancelled tasks
    end asynchronously), then assert they are."""
    import ray

    deadline = time.time() + timeout_s
    while ray.available_resources().get("CPU", 0.0) < total and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0.0) == total, (ray.available_resources(), total)


def refused_here(capsys, *argv: str) -> str:
    """``ensemble-kd ARGV`` in this process: must be refused (exit 2) with one stderr line; its message."""
    code = main(list(argv))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ensemble-kd: error: "), (code, err)
    return lines[0][len("ensemble-kd: error: "):]
