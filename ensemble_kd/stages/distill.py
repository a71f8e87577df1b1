"""The distill stage: one distillation on Ray Train, from the teachers' train shards to a student.

Inputs: the config (the loop reads all of it), the train shard folder of every distill teacher
(from the embed stage's :class:`~ensemble_kd.artifacts.ShardIndex`) and the
:class:`~ensemble_kd.tracking.RunContext` the run is part of. It opens the MLflow run, starts a
``TorchTrainer`` running :func:`~ensemble_kd.loop.train_loop_per_worker`, and on success writes the
student checkpoint and returns a :class:`~ensemble_kd.artifacts.StudentRun` (also recorded in
``<output_dir>/index/distill.json``, which ``--resume`` reads). A Tune trial calls this same
function.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ensemble_kd import tracking
from ensemble_kd.artifacts import StudentRun, index_path, read_index, write_index
from ensemble_kd.checkpoint import atomic_torch_save
from ensemble_kd.config import ConfigError, ExperimentConfig, to_dict
from ensemble_kd.loop import STATE_FILE, LoopCallback, LoopConfig, train_loop_per_worker
from ensemble_kd.selection import check_selection, load_selection
from ensemble_kd.shards import read_manifest

STUDENT_FORMAT = "ensemble-kd/student"


def run_name(cfg: ExperimentConfig, resume: bool) -> str:
    """distill.run_name; else, with ``resume``, the last run's (index/distill.json); else a fresh one."""
    if cfg.distill.run_name:
        return cfg.distill.run_name
    if resume:
        if not index_path(cfg.output_dir, "distill").exists():
            raise ConfigError(f"--resume: no earlier distillation run under {cfg.output_dir} "
                              f"(no {index_path(cfg.output_dir, 'distill')})")
        return read_index(cfg.output_dir, "distill", "distill")["run_name"]
    return f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def check_inputs(cfg: ExperimentConfig, train_shards: Mapping[str, str]) -> None:
    """Refuse missing shards of a distill teacher, and a selection made on other shards, before
    any worker starts."""
    missing = [n for n in cfg.distill.teachers if n not in train_shards]
    if missing:
        raise ConfigError(f"distill: no train shard given for teachers {missing}: run `ensemble-kd embed` first")
    if cfg.distill.selection:  # DFND
        check_selection(load_selection(cfg.distill.selection), {n: read_manifest(p) for n, p in train_shards.items()})


def _trainer(cfg: ExperimentConfig, name: str, loop: LoopConfig, callbacks: Sequence[Any]) -> TorchTrainer:
    d = cfg.distill
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop.to_dict(),
        scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu,
                                     resources_per_worker={"CPU": d.cpus_per_worker, **({"GPU": 1} if d.use_gpu else {})}),
        run_config=RunConfig(name=name, storage_path=str(Path(cfg.output_dir) / "ray_results"),
                             failure_config=FailureConfig(max_failures=d.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=list(callbacks),
                             logging_config=LoggingConfig(log_level=cfg.ray.train_log_level)),
    )


def _save_student(cfg: ExperimentConfig, name: str, checkpoint) -> tuple[Path, list[dict[str, Any]]]:
    """The student's weights out of the last training state, as students/<run>/student.pt."""
    d = cfg.distill
    with checkpoint.as_directory() as cdir:
        st = torch.load(Path(cdir) / STATE_FILE, map_location="cpu", weights_only=False)
    student = {k[len("student."):]: v for k, v in st["module"].items() if k.startswith("student.")}
    spath = Path(cfg.output_dir) / "students" / name / "student.pt"
    atomic_torch_save({"format": STUDENT_FORMAT, "arch": d.student.arch, "modality": d.student.modality,
                       "arch_kwargs": dict(d.student.arch_kwargs), "state_dict": student, "history": st["history"],
                       "config": st["config"]}, spath)
    return spath, st["history"]


def run(cfg: ExperimentConfig, train_shards: Mapping[str, str], ctx: tracking.RunContext | None = None,
        resume: bool = False, callbacks: Sequence[Any] = (), loop_callbacks: Sequence[LoopCallback] = (),
        verbose: bool = True, log: Callable[[str], None] = print) -> StudentRun:
    """Distil the configured student on Ray Train (Ray must be initialised).

    ``train_shards``: teacher -> train shard folder, for every distill teacher. With tracking on,
    the MLflow run is opened before training (tagged from ``ctx``), rank 0 logs every epoch into
    it, and it is closed FINISHED with the artifacts (or FAILED). ``callbacks``: Ray Train user
    callbacks (a Tune trial passes ``TuneReportCallback``); ``loop_callbacks``: the loop's own
    (:class:`~ensemble_kd.loop.LoopCallback`); ``verbose``: a ``[distill]`` line per epoch."""
    d = cfg.distill
    check_inputs(cfg, train_shards)
    shards = {n: str(train_shards[n]) for n in d.teachers}  # exactly the distill teachers' shards
    name = run_name(cfg, resume)
    write_index(cfg.output_dir, "distill", StudentRun(name).to_dict())
    log(f"distill: run {name}: student {d.student.arch} on {d.student.modality}, teachers {list(d.teachers) or 'none'}, "
        f"losses {[t.name for t in d.losses]}, {d.num_workers} worker(s)")
    mlflow_run = None
    if cfg.tracking.enabled:
        mlflow_run = {"uri": tracking.tracking_uri(cfg), "run_id": tracking.start_distill_run(cfg, name, ctx)}
    loop = LoopConfig(to_dict(cfg), shards, mlflow_run, verbose, tuple(loop_callbacks))
    try:
        result = _trainer(cfg, name, loop, callbacks).fit()
        if result.error is not None:
            raise result.error
    except BaseException:
        if mlflow_run:
            tracking.fail_distill_run(cfg, mlflow_run["run_id"])
        raise
    spath, hist = _save_student(cfg, name, result.checkpoint)
    top1 = next((h["test_top1"] for h in reversed(hist) if "test_top1" in h), None)
    if mlflow_run:
        tracking.finish_distill_run(cfg, mlflow_run["run_id"], top1, len(hist), spath)
        log(f"distill: MLflow run {mlflow_run['run_id']} in experiment {tracking.experiment_name(cfg)!r} at {mlflow_run['uri']}")
    log(f"distill: run {name} done: test top-1 {top1:.4f}; student at {spath}")
    res = StudentRun(name, str(spath), top1, len(hist), result.checkpoint.path, mlflow_run and mlflow_run["run_id"], hist)
    write_index(cfg.output_dir, "distill", res.to_dict())
    return res
