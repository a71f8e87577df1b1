"""The pipeline: the stages composed, for `ensemble-kd run` and each CLI verb.

    teachers stage -> TeacherSet -> embed stage -> ShardIndex -> (select stage -> SelectionRecord)
                                                              -> distill stage (or a sweep of it) -> StudentRun

Each function here takes the checked config, runs the stages it needs in order, handing each the
artifact of the one before, and returns the last artifact. The stages never call each other;
a CLI verb that starts mid-way (``ensemble-kd distill`` after ``ensemble-kd embed``) picks up the
earlier artifacts from the index files under ``<output_dir>/index/`` and checks them against the
config before any Ray work.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ray import tune

from ensemble_kd.storage import datastore
from ensemble_kd.training import tracking
from ensemble_kd.storage import mlflow_store
from ensemble_kd.training.state import last_of
from ensemble_kd.storage.artifacts import SelectionRecord, ShardIndex, StudentRun, TeacherRecord, TeacherSet, read_index
from ensemble_kd.orchestration.checks import check_config
from ensemble_kd.core.config import (AdversarialConfig, ConfigError, DataConfig, ExperimentConfig, ViewsConfig, load_config,
                                      to_dict)
from ensemble_kd.orchestration.export import export_after_run
from ensemble_kd.orchestration.plan import Trial, best_teacher, check_run_section, plan_trials
from ensemble_kd.core.plugins import load_plugins
from ensemble_kd.core.raycluster import clean_stale_checkpoints, joins_cluster, ray_session
from ensemble_kd.core import layout, owners, shared_folder
from ensemble_kd.orchestration.report import format_table, summarise, write_summary
from ensemble_kd.orchestration import resources
from ensemble_kd.storage.shards import Shard, check_manifest
from ensemble_kd.stages import distill as distill_stage
from ensemble_kd.stages import embed as embed_stage
from ensemble_kd.stages import select as select_stage
from ensemble_kd.stages import teachers as teachers_stage
from ensemble_kd.orchestration.sweep import SweepResult, TrialOutcome, record_finished, resume_point, run_trials, tune_sweep

Log = Callable[[str], None]


def tidy_output(cfg: ExperimentConfig, log: Log = print) -> None:
    """What killed commands left in the output folder, dealt with when the next command starts on
    it: MLflow runs still RUNNING whose process is gone are ended KILLED (not only on ``--resume``,
    which reopens its run as before), shard and data-store writers' temp folders and Ray Train checkpoint folders
    that no run will read are removed. Live commands' runs and files are never touched."""
    gone = owners.sweep_temp_dirs(cfg.shard_dir) + owners.sweep_temp_dirs(datastore.store_dir(cfg.output_dir))
    gone += clean_stale_checkpoints(layout.ray_results(cfg.output_dir))
    if gone:
        log(f"removed {len(gone)} folder(s) left by killed commands: {[str(g) for g in gone]}")
    if cfg.tracking.enabled:
        uri = mlflow_store.tracking_uri(cfg)
        db = mlflow_store.sqlite_path(uri)
        if db is None or db.exists():  # no store yet: nothing to end (and none is made here)
            tracking.end_orphaned_runs(uri, log)


def load(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
         resolve_tracking: bool = True) -> ExperimentConfig:
    """A config ready for the pipeline: the schema (file and overrides), the registry cross-checks
    and the run section's arms and sweep, every error naming the file and the field. With
    ``resolve_tracking`` (all but `config show`), ``tracking.uri`` is resolved here, once, in the
    driver (:func:`~ensemble_kd.storage.mlflow_store.tracking_uri`: the given one, else
    $MLFLOW_TRACKING_URI, else this output folder's SQLite file): every trial and worker gets it
    with the config, never from its own environment."""
    cfg = load_config(path, overrides)
    source = "<embedded default>" if path is None else str(path)
    load_plugins(cfg.plugins, source)  # before the cross-checks: they look the plugins' names up in the registries
    check_config(cfg, source)
    check_run_section(cfg, source)
    if resolve_tracking and not cfg.tracking.uri:
        cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, uri=mlflow_store.tracking_uri(cfg)))
    return cfg


def data_splits(cfg: ExperimentConfig) -> Iterator[tuple[DataConfig, str]]:
    """Every (dataset, split) the config reads, in order: ``data``'s train and test splits,
    ``distill.eval_data``'s and ``select.teacher_data``'s test split, then ``data``'s val split
    where it has one (a carve, or a table's `val` rows: known once its train split is stored, so
    prepare each split before taking the next)."""
    out = [(cfg.data, "train"), (cfg.data, "test")]
    for extra in (cfg.distill.eval_data, cfg.select.teacher_data):
        if extra is not None and (extra, "test") not in out:
            out.append((extra, "test"))
    yield from out
    if datastore.has_val(cfg.data, cfg.output_dir):
        yield cfg.data, "val"


def prepare_data(cfg: ExperimentConfig, log: Log | None = None) -> list[tuple[DataConfig, str, Path]]:
    """The data store of every split the config reads (:mod:`ensemble_kd.storage.datastore`): written from
    the source where missing or stale, else reused with every file hashed; before any Ray work, so
    that workers only follow its pointers. Returns (dataset, split, folder) of each."""
    return [(d, s, datastore.prepare(d, s, cfg.output_dir, log).dir) for d, s in data_splits(cfg)]


def train_teachers(cfg: ExperimentConfig, retrain: bool = False, progress: bool = True, log: Log = print) -> TeacherSet:
    """The teachers stage on the config's teachers (Ray must be up: each teacher trains on Ray Train)."""
    return teachers_stage.run(cfg, retrain, progress, log)


def existing_teachers(cfg: ExperimentConfig, names: list[str] | tuple[str, ...] | None = None) -> TeacherSet:
    """The configured teachers' checkpoints already on disk (all, or ``names``), verified."""
    wanted = [t for t in cfg.teachers if names is None or t.name in names]
    return teachers_stage.existing(wanted, cfg.checkpoint_dir, cfg.data, cfg.output_dir)


def embed(cfg: ExperimentConfig, teachers: TeacherSet, progress: bool = True, log: Log = print) -> ShardIndex:
    """The embed stage on the config's data, splits and recipe (Ray must be up)."""
    return embed_stage.run(teachers, cfg.data, cfg.embed.splits, cfg.embed, cfg.output_dir, cfg.amp,
                           progress, log)


def teachers_and_shards(cfg: ExperimentConfig, progress: bool = True, log: Log = print
                        ) -> tuple[TeacherSet, ShardIndex | None]:
    """The teachers stage with the embed stage right behind it, teacher by teacher (Ray must be
    up): a teacher's shards are written as soon as that teacher is trained (or found), while slower
    teachers still train, so a small teacher's embedding overlaps a big one's training. On the
    online path there are no shards (None)."""
    if cfg.distill.teacher_outputs != "shards":  # the online path runs the teachers in its workers
        return train_teachers(cfg, progress=progress, log=log), None
    order = {t.name: i for i, t in enumerate(cfg.teachers)}
    pool = ThreadPoolExecutor(max_workers=max(1, len(cfg.teachers)), thread_name_prefix="embed")
    futures: list[Future[ShardIndex]] = []

    def ready(name: str, rec: TeacherRecord) -> None:
        futures.append(pool.submit(embed_stage.run, TeacherSet({name: rec}), cfg.data, cfg.embed.splits, cfg.embed,
                                   cfg.output_dir, cfg.amp, progress, log, None, order[name]))

    try:
        teachers = teachers_stage.run(cfg, progress=progress, log=log, on_ready=ready)
        parts = [f.result() for f in futures]
    finally:  # an error or Ctrl-C: no new embedding starts; the running ones end with Ray
        pool.shutdown(wait=False, cancel_futures=True)
    shards = ShardIndex(tuple(r for part in parts for r in part))
    embed_stage.record_index(cfg.output_dir, shards)
    return teachers, shards


def check_existing_shards(cfg: ExperimentConfig, teachers: TeacherSet) -> None:
    """Before `embed` starts Ray: refuse a shard already on disk whose manifest does not match
    this config (a teacher retrained, a hash edited), naming both sides. Damaged bytes are not
    refused here: the embed stage rewrites such a shard."""
    for _name, _split, key, _n in embed_stage.plan_shards(teachers, cfg.data, cfg.embed.splits, cfg.embed, cfg.output_dir):
        if (cfg.shard_dir / key.dirname).exists():
            check_manifest(cfg.shard_dir / key.dirname, key)


def train_shards(cfg: ExperimentConfig, teachers: TeacherSet | None = None) -> dict[str, str]:
    """Train shard folder of every distill teacher, from the embed stage's index, each checked to
    be the shard of this config's teacher checkpoint, data and view recipe (both sides named)."""
    names = list(cfg.distill.teachers)
    if not names:
        return {}
    ts = (teachers or existing_teachers(cfg, names)).subset(names)
    try:
        index = ShardIndex.from_dict(read_index(cfg.output_dir, "shards", "embed"))
    except (KeyError, TypeError) as e:
        raise ConfigError(f"the shard index under {cfg.output_dir} is malformed ({e}): run `ensemble-kd embed` again") from None
    dirs = index.dirs("train", names)
    for name, _split, key, _n in embed_stage.plan_shards(ts, cfg.data, ["train"], cfg.embed, cfg.output_dir):
        check_manifest(dirs[name], key)  # a stale index (teacher retrained, recipe changed) is refused here
        Shard(dirs[name])  # and damaged bytes (sha256 of every part), before any Ray work
    return dirs


def select(cfg: ExperimentConfig, progress: bool = True, log: Log = print) -> SelectionRecord:
    """DFND: embed the pool (train split) and the teachers' own test split, then select (Ray must be up)."""
    teacher_data = select_stage.require_teacher_data(cfg.select)
    names = list(cfg.distill.teachers or [t.name for t in cfg.teachers])  # they score the pool; distill then learns from them
    ts = existing_teachers(cfg, names)
    pool = embed_stage.run(ts, cfg.data, ["train"], cfg.embed, cfg.output_dir, cfg.amp, progress, log)
    clean = dataclasses.replace(cfg.embed, views=ViewsConfig(), adversarial=AdversarialConfig())  # one clean view
    test = embed_stage.run(ts, teacher_data, ["test"], clean, cfg.output_dir, cfg.amp, progress,
                           log, index=None)
    return select_stage.run(pool.dirs("train", names), test.dirs("test", names), cfg.select, cfg.output_dir, log)


def distill_inputs(cfg: ExperimentConfig, teachers: TeacherSet | None = None,
                   shards: ShardIndex | None = None) -> dict[str, dict[str, str]]:
    """What the distill stage's data path needs of the distill teachers: their train shards (the
    shard path; from ``shards``, else the embed stage's index) or their checkpoints (online)."""
    names = list(cfg.distill.teachers)
    if cfg.distill.teacher_outputs == "online":
        ts = teachers.subset(names) if teachers is not None else existing_teachers(cfg, names)
        return {"train_shards": {}, "teachers": {n: asdict(t) for n, t in ts.items()}}
    return {"train_shards": shards.dirs("train", names) if shards is not None else train_shards(cfg, teachers),
            "teachers": {}}


def distill(cfg: ExperimentConfig, resume: bool = False, log: Log = print,
            inputs: dict[str, dict[str, str]] | None = None) -> StudentRun:
    """The distill stage on the shards the embed stage recorded, or on the teachers' checkpoints
    (the online path) (Ray must be up). ``inputs``: :func:`distill_inputs`, when the caller
    checked them before starting Ray."""
    return distill_stage.run(cfg, resume=resume, log=log, **(inputs if inputs is not None else distill_inputs(cfg)))


def sweep(cfg: ExperimentConfig, log: Log = print, inputs: dict[str, dict[str, str]] | None = None,
          resume: dict[str, Any] | None = None) -> SweepResult:
    """``ensemble-kd tune``: the distill stage as Ray Tune trials over ``tune.space`` (Ray must be up;
    ``inputs`` as for :func:`distill`); ``resume``: ``tune --resume``'s :func:`resume_point`, checked
    before Ray started."""
    return tune_sweep(cfg, inputs if inputs is not None else distill_inputs(cfg), log, resume)


def _distill_arms(cfg: ExperimentConfig, teachers: TeacherSet, shards: ShardIndex | None, best: str | None,
                  log: Log, resume: dict[str, Any] | None = None) -> tuple[str | None, list[TrialOutcome]]:
    """Every arm x seed (and the sweep) as Ray Tune trials; without arms, the one distill run.
    ``shards``: the embed stage's (the shard path), None on the online path; ``resume``: what
    ``run --resume`` continues (:func:`_resume_point`)."""
    inputs = {"train_shards": shards.dirs("train", list(teachers)) if shards is not None else {},
              "teachers": {n: asdict(t) for n, t in teachers.items()}}  # every teacher an arm may use
    if not cfg.run.arms:
        r = distill_stage.run(cfg, log=log, resume=resume is not None, **inputs)
        t = Trial("distill", to_dict(cfg), tracking.RunContext(arm="distill", kind="arm"))
        v = last_of(r.history, "val_top1")  # where there is a validation split
        return None, [TrialOutcome("", t, {"test_top1": r.final_top1, **({"val_top1": v} if v is not None else {})},
                                   r.epochs, "TERMINATED")]
    trials = plan_trials(cfg, best)
    n_arm = len(cfg.run.arms) * len(cfg.run.seeds)
    log(f"run: {len(cfg.run.arms)} arms x {len(cfg.run.seeds)} seeds = {n_arm} distillations"
        + (f" + {len(trials) - n_arm} sweep trials on {cfg.run.sweep.arm}" if cfg.run.sweep else "")
        + f" (best single teacher: {best}), as Ray Tune trials")
    res = run_trials(cfg, inputs, {"trial": tune.grid_search([t.to_dict() for t in trials])},
                     name=resume["experiment"] if resume else f"{cfg.name}-run-{time.strftime('%Y%m%d-%H%M%S')}",
                     num_trials=len(trials), scheduler="fifo", kind="run", log=log, resume=resume)
    failed = [t for t in res.trials if t.status == "ERROR"]
    if failed:
        log(f"run: {len(failed)} trial(s) failed: {[t.trial.label for t in failed]}; see the Tune folder")
    return res.parent_run_id, res.trials


def _prepare_store(uri: str | None) -> Future[Any]:
    """The MLflow client of ``uri``, its SQLite store created (about 2 s of schema migrations),
    made in a thread, so that it overlaps Ray's start (None: no tracking)."""
    fut: Future[Any] = Future()
    if not uri:
        fut.set_result(None)
        return fut

    def work() -> None:
        try:
            fut.set_result(mlflow_store.client(uri))
        except BaseException as e:  # handed to the caller by fut.result()
            fut.set_exception(e)

    threading.Thread(target=work, name="mlflow-store", daemon=True).start()
    return fut


@contextlib.contextmanager
def session(cfg: ExperimentConfig, mlflow: bool = True, log: Log = print,
            stages: resources.Stages = resources.STAGES) -> Iterator[None]:
    """Ray up for a command (``raycluster.ray_session``), the data store prepared
    (:func:`prepare_data`, so that workers only open it) and, for one that logs runs (``mlflow``), the
    MLflow store made meanwhile. On a Ray of this machine's own the data store comes first (a bad
    dataset fails before Ray starts); on a cluster it joins, after every node was shown to see the
    output folder (:func:`~ensemble_kd.core.shared_folder.check_cluster`), so that nothing is written
    where a node cannot read it."""
    joins = joins_cluster(cfg.ray)
    if not joins:
        prepare_data(cfg, log)
    store = _prepare_store(mlflow_store.tracking_uri(cfg) if mlflow and cfg.tracking.enabled else None)
    with ray_session(cfg.ray, cfg.plugins):
        resources.check_cluster(cfg, stages)  # what `stages` ask of Ray, refused now if it can never be given
        if joins:
            n = shared_folder.check_cluster(cfg.output_dir)
            if n:
                log(f"output folder {cfg.output_dir}: seen by all {n} nodes of the cluster")
            prepare_data(cfg, log)
        store.result()
        with mlflow_store.writer_session(mlflow and cfg.tracking.enabled):  # the one process that writes to MLflow
            yield


def _resume_point(cfg: ExperimentConfig) -> dict[str, Any]:
    """What ``run --resume`` continues, checked before any work: the last run's Tune experiment
    (:func:`~ensemble_kd.orchestration.sweep.resume_point`); without arms, the last distillation
    (``distill --resume``'s). Nothing to resume, or another config, is one line (exit 2)."""
    if cfg.run.arms:
        return resume_point(cfg, "run")
    return {"distill": distill_stage.run_name(cfg, True)}


def run(cfg: ExperimentConfig, progress: bool = True, log: Log = print, resume: bool = False) -> dict[str, Any]:
    """`ensemble-kd run`: teachers -> shards -> every arm x seed (+ sweep) -> summary; returns the
    summary (also written to <output_dir>/summary.json and .png). ``resume``: continue the last
    run that did not finish (its finished trials kept, the others from their last saved epoch)."""
    t0 = time.perf_counter()
    out = Path(cfg.output_dir)
    point = _resume_point(cfg) if resume else None
    log(f"ensemble-kd run: {cfg.name} on {cfg.data.name}, outputs under {out}")
    uri = mlflow_store.tracking_uri(cfg) if cfg.tracking.enabled else None
    stages = {"teachers", "tune" if cfg.run.arms else "distill"} | ({"embed"} if cfg.distill.teacher_outputs == "shards" else set())
    with session(cfg, log=log, stages=stages):
        teachers, shards = teachers_and_shards(cfg, progress, log)
        best = best_teacher(teachers)
        if shards is not None:
            log(f"{len(shards)} shards under {out / 'shards'} ({sum(r.reused for r in shards)} reused); "
                f"inspect them with: ensemble-kd shards inspect {out / 'shards'}")
        parent, trials = _distill_arms(cfg, teachers, shards, best, log, point)
    summary = summarise(cfg, teachers, best, trials, uri, parent, time.perf_counter() - t0,
                        "val" if datastore.has_val(cfg.data, cfg.output_dir) else "test")
    summary["output_dir"] = str(out)  # where it was written: a later command tells a moved folder by it
    path, plot = write_summary(out, summary)
    if cfg.run.arms:
        record_finished(cfg, "run")  # `run --resume` has nothing left to continue
    if parent is not None:  # the table and the plot belong to the job's parent run too
        for f in (path, plot):
            if f is not None:
                mlflow_store.client(uri).log_artifact(parent, str(f))
    show = getattr(log, "result", log)  # the table and the paths: shown even with -q (ensemble_kd.core.console.Log)
    show("")
    for line in format_table(summary):
        show(line)
    show(f"\nsummary: {path}" + (f"; plot: {plot}" if plot else ""))
    if cfg.run.export:  # the headline arm's best student as TorchScript, ONNX and an MLflow model
        export_after_run(cfg, summary, show)
    if uri:
        show(f"MLflow: experiment {mlflow_store.experiment_name(cfg)!r} at {uri}; compare with: ensemble-kd compare --out "
             f"{cfg.output_dir} --group-by arm; open the UI with: mlflow ui --backend-store-uri {uri}")
    show(f"done in {time.perf_counter() - t0:.1f}s")
    return summary
