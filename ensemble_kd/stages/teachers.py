"""The teachers stage: train (or reuse) every configured teacher, or take a user's checkpoint,
and return the :class:`~ensemble_kd.storage.artifacts.TeacherSet`.

A teacher trains through the same loop as the students (:func:`ensemble_kd.training.loop.fit`, Ray Train:
DDP over ``num_workers``, ``use_gpu``, AMP, per-epoch checkpoints and resume, an MLflow run with
per-epoch metrics): a teacher-less run of the loop whose "student" is the teacher's encoder, with
CE (label smoothing), the teacher's optimiser and schedule (onecycle by default) and, with
``augment``, a fresh random crop every step (the loop's online data path). Teachers that need
training train concurrently, one Ray Train run each, as far as the cluster has room; the driver
only waits. A teacher is trained once per recipe: its checkpoint records the hash of the teacher
config and the dataset (``config_hash``), and a rerun with the same recipe reuses the file. A
teacher with ``checkpoint:`` set is loaded from that file (and verified), never trained.
"""
from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ensemble_kd.core import layout
from ensemble_kd.training import tracking
from ensemble_kd.storage import mlflow_store
from ensemble_kd.storage.artifacts import TeacherRecord, TeacherSet, write_index
from ensemble_kd.core.config import ConfigError, DataConfig, ExperimentConfig, TeacherConfig, to_dict, with_overrides
from ensemble_kd.core.progress import watch_progress
from ensemble_kd.training.state import module_part
from ensemble_kd.training.launch import fit
from ensemble_kd.training.loop import LoopConfig
from ensemble_kd.storage.teacher_checkpoint import (CheckpointError, file_format, inspect_teacher, read_checkpoint, save_teacher,
                                                    teacher_config_hash)
from ensemble_kd.storage.datastore import open_split
from modalities import build_encoder


OnReady = Callable[[str, TeacherRecord], None]


def teacher_run_config(cfg: ExperimentConfig, t: TeacherConfig) -> ExperimentConfig:
    """The loop's config for training teacher ``t``: no teachers, CE only, the teacher's recipe.
    The run name carries the recipe hash, so an interrupted training resumes (the same name) and
    a changed recipe starts afresh."""
    recipe = teacher_config_hash(t, cfg.data)
    over = {
        "distill": {
            "teachers": [], "student": {"arch": t.arch, "modality": t.modality, "arch_kwargs": dict(t.arch_kwargs)},
            "losses": [{"name": "ce", "kwargs": {"label_smoothing": t.label_smoothing}}],
            "epochs": t.epochs, "batch_size": t.batch_size, "seed": t.seed, "eval_every": t.eval_every,
            "optim": {"name": t.optimizer, "lr": t.lr, "momentum": t.momentum, "weight_decay": t.weight_decay,
                      "schedule": t.schedule, "decay_epochs": list(t.decay_epochs), "nesterov": t.optimizer == "sgd"},
            "num_workers": t.num_workers, "cpus_per_worker": t.cpus_per_worker, "use_gpu": t.use_gpu,
            "max_failures": cfg.distill.max_failures, "teacher_outputs": "online",
            "augment": {"enabled": t.augment, "crop_padding": t.crop_padding, "flip": t.flip},
            "run_name": f"teacher-{t.name}-{recipe[:12]}",
        },
        "run": {"arms": [], "seeds": [t.seed], "sweep": None},
        # teachers' runs apart from the students' (compare groups an experiment's runs by teacher set)
        "tracking.experiment": f"{mlflow_store.experiment_name(cfg)}-teachers",
    }
    return with_overrides(cfg, over, f"<teacher {t.name}>")


def _train_one(cfg: ExperimentConfig, t: TeacherConfig, path: Path, progress: bool, log: Callable[[str], None],
               turn: tuple[threading.Event, threading.Event], position: int = 0) -> None:
    """Train teacher ``t`` through the loop (:func:`~ensemble_kd.training.loop.fit`: a single worker in a Ray
    task in Ray Train's local mode, several as a Ray Train run) and write its checkpoint to ``path``.
    ``turn``: (wait for this event before asking Ray for resources, set this one after);
    ``progress``: its live line is a bar (at line ``position``), else a line every 30 s. The loop's
    per-epoch lines go to the worker's stdout, which reaches the command's log file."""
    tcfg = teacher_run_config(cfg, t)
    name = tcfg.distill.run_name
    log(f"teacher {t.name}: training {t.arch} on {t.modality} for {t.epochs} epochs on Ray Train ({name})")
    t0 = time.perf_counter()
    mlflow_run = None
    if cfg.tracking.enabled:
        ctx = tracking.RunContext(arm=f"teacher:{t.name}", kind="teacher")
        mlflow_run = {"uri": mlflow_store.tracking_uri(tcfg), "run_id": tracking.start_distill_run(tcfg, name, ctx)}
    try:
        lc = LoopConfig(to_dict(tcfg), mlflow=mlflow_run, verbose=True, label=f"teacher {t.name}")
        turn[0].wait()
        with watch_progress(f"teacher {t.name}", layout.run_dir(cfg.output_dir, name), t.epochs, log,
                            progress, position):
            st = fit(tcfg, lc, name, submitted=turn[1].set).state
    except BaseException:
        if mlflow_run:
            tracking.fail_distill_run(tcfg, mlflow_run["run_id"])
        raise
    train = open_split(cfg.data, "train", cfg.output_dir)
    spec = train.spec(t.modality)
    model = build_encoder(t.arch, spec, train.num_classes, **t.arch_kwargs)
    model.load_state_dict(module_part(st))
    hist = st["history"]
    top1 = next((h["test_top1"] for h in reversed(hist) if "test_top1" in h), None)
    save_teacher(path, model, t, cfg.data, spec, train.num_classes,
                 {"test_top1": top1, "train_seconds": time.perf_counter() - t0, "epochs": len(hist)})
    if mlflow_run:
        tracking.finish_distill_run(tcfg, mlflow_run["run_id"], top1, len(hist), path)
    log(f"teacher {t.name}: test top-1 {top1:.4f} in {time.perf_counter() - t0:.1f}s ({path})")


def checkpoint_path(t: TeacherConfig, checkpoint_dir: str | Path) -> Path:
    """Where a teacher's checkpoint is: its own file if given, else ``<checkpoint_dir>/<name>.pt``."""
    return Path(t.checkpoint) if t.checkpoint else Path(checkpoint_dir) / f"{t.name}.pt"


def record(t: TeacherConfig, path: str | Path, data: DataConfig, output_dir: str | Path) -> TeacherRecord:
    """The record of teacher ``t``'s file, verified: an ensemble-kd checkpoint describes itself; a
    RepDistiller checkpoint or a plain state_dict is checked (keys and shapes) against the entry's
    arch on the dataset's input and classes (its stored split under ``output_dir``), and hashed by its bytes."""
    if file_format(path) == "ensemble-kd":
        info, kwargs = inspect_teacher(path), {}
    else:
        ds = open_split(data, "train", output_dir)
        kwargs = dict(t.arch_kwargs)
        info = inspect_teacher(path, arch=t.arch, modality=t.modality, spec=ds.spec(t.modality),
                               num_classes=ds.num_classes, arch_kwargs=kwargs)
    return TeacherRecord(name=t.name, path=str(path), arch=info["arch"], modality=info["modality"],
                         content_hash=info["content_hash"], test_top1=info["test_top1"], dataset=info.get("dataset"),
                         format=info["format"], arch_kwargs=kwargs)


def existing(teachers: Sequence[TeacherConfig], checkpoint_dir: str | Path, data: DataConfig,
             output_dir: str | Path | None = None) -> TeacherSet:
    """The teacher set of checkpoints already on disk, verified, refusing a missing one before any
    Ray work starts (what `embed`, `select` and `distill` use: they never train). ``output_dir``: where
    the data store is (default: the checkpoint folder's parent)."""
    out = {}
    output_dir = Path(checkpoint_dir).parent if output_dir is None else output_dir
    for t in teachers:
        p = checkpoint_path(t, checkpoint_dir)
        if not p.exists():
            raise ConfigError(f"teacher {t.name!r} has no checkpoint at {p}: run `ensemble-kd teachers train` first "
                              "(or set the teacher's checkpoint)")
        out[t.name] = record(t, p, data, output_dir)
    return TeacherSet(out)


def _reusable(t: TeacherConfig, data: DataConfig, path: Path, log: Callable[[str], None]) -> bool:
    """True when ``path`` holds a readable checkpoint trained with this exact recipe."""
    if not path.exists():
        return False
    try:
        ck = read_checkpoint(path)
    except CheckpointError as e:
        log(f"teacher {t.name}: retraining, existing checkpoint unusable: {e}")
        return False
    if ck.get("config_hash") != teacher_config_hash(t, data):
        log(f"teacher {t.name}: retraining, {path} was trained with another config")
        return False
    log(f"teacher {t.name}: reused {path} (test top-1 {ck.get('test_top1', float('nan')):.4f})")
    return True


def _train_all(cfg: ExperimentConfig, todo: list[tuple[TeacherConfig, Path]], progress: bool,
               log: Callable[[str], None], on_ready: OnReady | None = None) -> dict[str, TeacherRecord]:
    """Train the teachers concurrently, as far as the cluster has room: one driver thread per
    teacher, which only waits on its run (a single-worker teacher runs in a Ray task of its
    worker's resources in Ray Train's local mode: no controller or worker group to start, which on a
    small machine costs more than a small teacher's training; a multi-worker teacher is a Ray Train
    run with DDP). ``on_ready`` hears of each teacher from its thread as soon as it is trained;
    ``progress``: live bars (else live lines every 30 s). Returns the trained teachers' records."""
    if cfg.tracking.enabled:  # the store and the experiment once, here: concurrent first writers race
        mlflow_store.ensure_experiment(mlflow_store.tracking_uri(cfg), f"{mlflow_store.experiment_name(cfg)}-teachers",
                                   layout.mlartifacts(cfg.output_dir))

    order = {t.name: i for i, t in enumerate(cfg.teachers)}  # each bar's line: the embed stage's bars use the same

    def one(t: TeacherConfig, path: Path, turn: tuple[threading.Event, threading.Event]) -> TeacherRecord:
        try:
            _train_one(cfg, t, path, progress, log, turn, order.get(t.name, 0))
        finally:
            turn[1].set()  # an early failure does not hold the next teacher back
        rec = record(t, path, cfg.data, cfg.output_dir)
        if on_ready is not None:
            on_ready(t.name, rec)
        return rec

    # Each asks Ray for its resources in the config's order (put the longest first): when the
    # cluster has no room for all, they start in that order, not in the threads' race.
    events = [threading.Event() for _ in range(len(todo) + 1)]
    events[0].set()
    with ThreadPoolExecutor(max_workers=len(todo), thread_name_prefix="teacher") as pool:
        futures = [pool.submit(one, t, path, (events[i], events[i + 1])) for i, (t, path) in enumerate(todo)]
        return {t.name: f.result() for (t, _), f in zip(todo, futures)}


def run(cfg: ExperimentConfig, retrain: bool = False, progress: bool = True,
        log: Callable[[str], None] = print, on_ready: OnReady | None = None) -> TeacherSet:
    """Train every configured teacher that has no up-to-date checkpoint (concurrently, each on Ray
    Train; Ray must be up), reuse the others, take given checkpoints as they are; record the set in
    ``<output_dir>/index/teachers.json``. ``progress``: a live bar per teacher while it trains
    (else a live line every 30 s; the per-epoch lines go to the command's log). ``on_ready(name,
    record)``: called once per teacher as soon as it can be used (a reused or given one at once, a
    trained one from its thread when its training ends), so that a caller can start on it while
    slower teachers still train."""
    todo: list[tuple[TeacherConfig, Path]] = []
    recs: dict[str, TeacherRecord] = {}  # each teacher's record, made once
    for t in cfg.teachers:
        path = checkpoint_path(t, layout.teachers(cfg.output_dir))
        if t.checkpoint:
            rec = record(t, path, cfg.data, cfg.output_dir)
            log(f"teacher {t.name}: using checkpoint {path} ({rec.format}: {rec.arch} on {rec.modality}, "
                f"test top-1 {rec.test_top1})")
        elif retrain or not _reusable(t, cfg.data, path, log):
            todo.append((t, path))
            continue
        else:
            rec = record(t, path, cfg.data, cfg.output_dir)
        recs[t.name] = rec
        if on_ready is not None:
            on_ready(t.name, rec)
    if todo:
        if retrain:  # from scratch: the runs of these recipes must not resume from their last state
            for t, _ in todo:
                shutil.rmtree(layout.run_dir(cfg.output_dir, teacher_run_config(cfg, t).distill.run_name),
                              ignore_errors=True)
        recs.update(_train_all(cfg, todo, progress, log, on_ready))
    ts = TeacherSet({t.name: recs[t.name] for t in cfg.teachers})
    write_index(cfg.output_dir, "teachers", ts.to_dict())
    return ts
