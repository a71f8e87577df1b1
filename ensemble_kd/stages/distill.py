"""The distill stage: one distillation on Ray Train, from the teachers to a student.

Inputs: the config (the loop reads all of it); for every distill teacher, its train shard folder
(the shard path: from the embed stage's :class:`~ensemble_kd.storage.artifacts.ShardIndex`) or its
checkpoint file (the online path: from the teachers stage's
:class:`~ensemble_kd.storage.artifacts.TeacherSet`); and the :class:`~ensemble_kd.training.tracking.RunContext`
the run is part of. It opens the MLflow run, runs the loop on Ray Train
(:func:`~ensemble_kd.training.loop.fit`), and on success writes the
student checkpoint and returns a :class:`~ensemble_kd.storage.artifacts.StudentRun` (also recorded in
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

from ensemble_kd.core import layout
from ensemble_kd.training import tracking
from ensemble_kd.storage import mlflow_store
from ensemble_kd.storage.artifacts import StudentRun, index_path, read_index, write_index
from ensemble_kd.core.files import atomic_torch_save
from ensemble_kd.core.config import ConfigError, ExperimentConfig, to_dict
from ensemble_kd.training.state import last_of, module_part
from ensemble_kd.training.launch import fit
from ensemble_kd.training.loop import LoopCallback, LoopConfig
from ensemble_kd.blocks.selection import check_selection, load_selection
from ensemble_kd.storage.shards import read_manifest

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


def check_inputs(cfg: ExperimentConfig, train_shards: Mapping[str, str], teachers: Mapping[str, Any]) -> None:
    """Refuse what the data path cannot start without (a distill teacher's train shard on the shard
    path, its checkpoint on the online path; a selection made on other shards), before any worker
    starts."""
    online = cfg.distill.teacher_outputs == "online"
    given = teachers if online else train_shards
    missing = [n for n in cfg.distill.teachers if n not in given]
    if missing:
        what, hint = ("checkpoint", "ensemble-kd teachers train") if online else ("train shard", "ensemble-kd embed")
        raise ConfigError(f"distill: no {what} given for teachers {missing}: run `{hint}` first")
    if cfg.distill.selection and not online:  # DFND
        check_selection(load_selection(cfg.distill.selection), {n: read_manifest(p) for n, p in train_shards.items()})


def teacher_hashes(shards: Mapping[str, str], teachers: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """teacher -> content hash of the weights the run learns from: the one recorded in its shard's
    manifest (shard path) or in its teacher record (online path; checked again when the worker loads it)."""
    out = {n: read_manifest(d)["key"]["checkpoint_sha256"] for n, d in shards.items()}
    out.update({n: r["content_hash"] for n, r in teachers.items()})
    return out


def _save_student(cfg: ExperimentConfig, name: str, st: dict[str, Any]) -> Path:
    """The student's weights out of the last training state, as students/<run>/student.pt."""
    d = cfg.distill
    spath = layout.student(cfg.output_dir, name)
    atomic_torch_save({"format": STUDENT_FORMAT, "arch": d.student.arch, "modality": d.student.modality,
                       "arch_kwargs": dict(d.student.arch_kwargs), "state_dict": module_part(st), "history": st["history"],
                       "config": st["config"]}, spath)
    return spath


def finished_history(cfg: ExperimentConfig, name: str) -> list[dict[str, Any]] | None:
    """The history of the run ``name`` if it already ran every epoch and was recorded (its student
    file written, its MLflow run FINISHED), else None. A Tune trial that ``--resume`` runs again
    after it had finished (Tune saves its record of the experiment at most every 10 s) reports
    this instead of touching anything."""
    spath = layout.student(cfg.output_dir, name)
    if not spath.is_file():
        return None
    try:
        hist = torch.load(spath, map_location="cpu", weights_only=True)["history"]
    except Exception:  # noqa: BLE001 - not a whole student file: the run finishes it again
        return None
    if len(hist) < cfg.distill.epochs or (cfg.tracking.enabled and tracking.run_status(cfg, name) != "FINISHED"):
        return None
    return hist


def run(cfg: ExperimentConfig, train_shards: Mapping[str, str] | None = None, ctx: tracking.RunContext | None = None,
        resume: bool = False, callbacks: Sequence[Any] = (), loop_callbacks: Sequence[LoopCallback] = (),
        verbose: bool = True, log: Callable[[str], None] = print,
        teachers: Mapping[str, Mapping[str, Any]] | None = None, here: bool = False, label: str = "distill") -> StudentRun:
    """Distil the configured student on Ray Train (Ray must be initialised).

    The teachers come as ``train_shards`` (teacher -> train shard folder; the shard path) or as
    ``teachers`` (teacher -> its TeacherRecord as a dict; the online path), for every distill teacher, as
    ``distill.teacher_outputs`` says. With tracking on,
    the MLflow run is opened before training (tagged from ``ctx``), rank 0 logs every epoch into
    it, and it is closed FINISHED with the artifacts (or FAILED). ``callbacks``: Ray Train user
    callbacks (a multi-worker Tune trial passes ``TuneReportCallback``); ``loop_callbacks``: the
    loop's own (:class:`~ensemble_kd.training.loop.LoopCallback`; a single-worker Tune trial reports through
    one); ``verbose``: a ``[distill]`` line per epoch; ``here``: this process already holds a
    worker's resources (a Tune trial), so a single-worker loop runs in it (see
    :func:`~ensemble_kd.training.loop.fit`); ``label``: what the per-epoch line starts with (a Tune trial's arm
    and seed)."""
    d = cfg.distill
    train_shards, teachers = dict(train_shards or {}), dict(teachers or {})
    check_inputs(cfg, train_shards, teachers)
    online = d.teacher_outputs == "online"
    shards = {} if online else {n: str(train_shards[n]) for n in d.teachers}  # exactly the distill teachers'
    ckpts = {n: dict(teachers[n]) for n in d.teachers} if online else {}
    name = run_name(cfg, resume)
    write_index(cfg.output_dir, "distill", StudentRun(name).to_dict())
    log(f"distill: run {name}: student {d.student.arch} on {d.student.modality}, teachers {list(d.teachers) or 'none'}, "
        f"losses {[t.name for t in d.losses]}, {d.num_workers} worker(s)")
    mlflow_run = None
    if cfg.tracking.enabled:
        ctx = (ctx or tracking.RunContext()).replace(teacher_hashes=teacher_hashes(shards, ckpts))
        mlflow_run = {"uri": mlflow_store.tracking_uri(cfg), "run_id": tracking.start_distill_run(cfg, name, ctx)}
    loop = LoopConfig(to_dict(cfg), shards, ckpts, mlflow_run, verbose, label, callbacks=tuple(loop_callbacks))
    try:
        fitted = fit(cfg, loop, name, callbacks, here=here)
    except BaseException as e:
        # SystemExit(0): Tune stopped the trial (ASHA); the sweep ends its run KILLED, with the scheduler's reason
        if mlflow_run and not (isinstance(e, SystemExit) and e.code in (0, None)):
            tracking.fail_distill_run(cfg, mlflow_run["run_id"])
        raise
    spath, hist = _save_student(cfg, name, fitted.state), fitted.state["history"]
    top1, val = last_of(hist, "test_top1"), last_of(hist, "val_top1")  # val: where there is a validation split
    if mlflow_run:
        tracking.finish_distill_run(cfg, mlflow_run["run_id"], top1, len(hist), spath, final_val_top1=val)
        log(f"distill: MLflow run {mlflow_run['run_id']} in experiment {mlflow_store.experiment_name(cfg)!r} at {mlflow_run['uri']}")
    log(f"distill: run {name} done: test top-1 {top1:.4f}" + (f", val top-1 {val:.4f}" if val is not None else "")
        + f"; student at {spath}")
    res = StudentRun(name, str(spath), top1, len(hist), fitted.path, mlflow_run and mlflow_run["run_id"], hist)
    write_index(cfg.output_dir, "distill", res.to_dict())
    return res
