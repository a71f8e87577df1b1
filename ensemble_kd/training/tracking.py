"""MLflow tracking: one run per distillation, tags that make ensemble-vs-single a filter.

The store defaults to a SQLite file under the output folder (``sqlite:///<out>/mlflow.db``;
mlflow 3.17 refuses the plain file store); ``MLFLOW_TRACKING_URI`` or ``tracking.uri`` point it
at a server on a cluster. The database and the experiment are created once, in the driver,
before any run starts (two processes migrating a fresh SQLite file at once fail).

Per run: params = the flattened config; metrics = every numeric per-epoch value of the
history (step = epoch) plus ``final/test_top1``; tags = ``teacher_set`` (none / single /
ensemble), ``teachers``, ``teacher_modalities``, ``student_modality``, ``student_arch``,
``dataset``, ``method``, ``labels`` (all / count=50 / fraction=0.1) and ``labels_seed`` (from the config) and ``arm``, ``ekd.kind``, ``tune_trial``,
``sweep.<key>`` (from the :class:`RunContext` the run is part of), all written by :func:`run_tags`;
artifacts = the config YAML and the final student checkpoint. :func:`client` is the one way to get
an MLflow client.

One writer: while a command runs (:func:`writer_session`, entered by the pipeline's session), every
MLflow call of the job, from the driver, a Tune trial or rank 0 of a Ray Train loop on any node, is
made by one Ray actor pinned to the driver's node (:class:`_MlflowWriter`), one call at a time;
:func:`client` hands the other processes a stand-in that sends it their calls. SQLite's locking
is unreliable over a network filesystem (lost runs, "database is locked"), so the store sees one
process on one machine; a tracking server gets all its writes from there too. So nothing a
caller passes may be readable only where it runs: the config goes as text, the student
checkpoint lies in the shared output folder. The tracking URI is resolved once, in the driver, into
the config (``pipeline.load``), so a worker's own ``MLFLOW_TRACKING_URI`` never redirects its runs.
Without a writer (a library call, a test's bare Ray) each process uses its own client, as it did.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import math
import os
import re
import socket
import sqlite3
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import ray
import sqlalchemy
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ensemble_kd.storage.artifacts import summary_store
from ensemble_kd.losses import LOSSES
from ensemble_kd.losses.base import loss_options
from ensemble_kd.core.checkpoint import DiskFullError, disk_full_cause
from ensemble_kd.core.config import ConfigError, ExperimentConfig, flatten, to_yaml
from ensemble_kd.core.stats import paired_difference
from ensemble_kd.core.interrupts import reason_of as interrupt_reason
from ensemble_kd.core.raycluster import pid_alive
from ensemble_kd.core.shared_folder import in_ray_worker

class TrackingError(ConfigError):
    """An MLflow store or experiment that cannot be used; the message names it."""


RUN_NAME_TAG = "ekd.run_name"  # the Ray Train run name: a resumed run continues its MLflow run
MAX_PARAM_LEN = 500  # MLflow caps param values; long lists are cut (the config YAML is an artifact)


def tracking_uri(cfg: ExperimentConfig) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else a SQLite file under the output folder. A
    command's config has it resolved already, by its driver (``pipeline.load``)."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return folder_store(cfg)


def folder_store(cfg: ExperimentConfig) -> str:
    """The output folder's own store: ``sqlite:///<output_dir>/mlflow.db``."""
    return f"sqlite:///{Path(cfg.output_dir) / 'mlflow.db'}"


def recorded_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config as a run records it (params, config.yaml): the output folder's own store, which
    the driver resolved into ``tracking.uri``, left implicit again, so that a run's config.yaml
    used with another ``--out`` tracks into that folder, not into this one."""
    if cfg.tracking.uri is not None and cfg.tracking.uri == folder_store(cfg):
        return dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, uri=None))
    return cfg


def experiment_name(cfg: ExperimentConfig) -> str:
    return cfg.tracking.experiment or cfg.name


ARTIFACTS_DIR = "mlartifacts"  # an output folder's own store keeps its artifacts beside the database
BESIDE_STORE_TAG = "ekd.artifacts_beside_store"  # on an experiment whose artifacts live in <store's folder>/mlartifacts


def ensure_experiment(uri: str, name: str, artifact_root: Path | None = None) -> str:
    """Create (or find) the experiment once; returns its id. Creates the SQLite schema too. With a
    SQLite store its artifacts go to ``<artifact_root>/<name>`` (MLflow records that location as an
    absolute URI); when that is beside the database (the output folder's own store) the experiment
    is tagged so, and :func:`relocate_artifacts` follows the folder when it is moved or copied."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    loc, tags = None, None
    if uri.startswith("sqlite:///") and artifact_root is not None:
        loc = (artifact_root / name).resolve().as_uri()  # keep artifacts beside the database, not in the CWD
        db = sqlite_path(uri)
        if db is not None and Path(artifact_root).resolve() == (db.parent / ARTIFACTS_DIR).resolve():
            tags = {BESIDE_STORE_TAG: "true"}
    try:
        return c.create_experiment(name, artifact_location=loc, tags=tags)
    except MlflowException:
        exp = c.get_experiment_by_name(name)  # a concurrent command created it first
        if exp is None:
            raise
        return exp.experiment_id


_last_store: list[str | None] = [None]  # the tracking URI this process used last


def client(uri: str) -> MlflowClient:
    """The MLflow client of a tracking URI. While a command's writer is up (:func:`writer_session`),
    in the driver and in every Ray worker process of its job, a stand-in whose method calls run in
    the writer (:class:`_WriterClient`); else this process's own (:func:`_local_client`)."""
    handle = _writer()
    if handle is not None:
        return _WriterClient(uri)  # type: ignore[return-value]  # MlflowClient's methods, run in the writer
    return _local_client(uri)


def _local_client(uri: str) -> MlflowClient:
    """This process's MLflow client of a tracking URI (one per URI and process); a local SQLite store is made
    ready first (:func:`ensure_sqlite_store`) and, when its folder was moved or copied, its artifact
    locations follow it (:func:`relocate_artifacts`).

    MLflow caches each run's artifact repository (where its files go) by run id alone, for the whole
    process; a copied folder's store has the same run ids as the original, and a moved one's
    runs' locations are rewritten under MLflow's feet. So when a process turns to another store
    (a command after one on the original folder, in the same process or a pooled Ray worker),
    that cache is emptied: repositories are made again from the store now in use."""
    if _last_store[0] != uri:
        _forget_artifact_repos()
        _last_store[0] = uri
    return _client(uri)


WRITER_NAME = "ekd-mlflow-writer"  # the writer's actor name, in the job's namespace (every process of the job sees it)
_session_writer: list[Any] = [None]  # the driver's handle on the writer of the session it runs (writer_session)
_worker_writers: dict[str, Any] = {}  # a worker's handle on its job's writer, by Ray job id (found once)
_in_writer = [False]  # True in the writer's own process: its calls are the real ones


class _MlflowWriter:
    """The one process that writes to MLflow while a command runs (a Ray actor on the driver's
    node, ``num_cpus=0``, one call at a time in the order they arrive): it owns the real clients."""

    def __init__(self) -> None:
        _in_writer[0] = True

    def call(self, uri: str, method: str, args: tuple, kwargs: dict) -> Any:
        return getattr(_local_client(uri), method)(*args, **kwargs)

    def info(self) -> dict[str, Any]:
        """Where it runs, for which job, and how many real clients it made (for checks and tests)."""
        ctx = ray.get_runtime_context()
        return {"pid": os.getpid(), "node_id": ctx.get_node_id(), "job_id": ctx.get_job_id(),
                "clients": _client.cache_info().currsize}


def _writer() -> Any:
    """The handle on the writer this process sends its MLflow calls to, or None: the driver's own
    while its :func:`writer_session` is up; in a Ray worker, its job's writer (looked up by name once
    per process and job; a job without one is asked again next time, it may start one later)."""
    if _in_writer[0]:
        return None
    if _session_writer[0] is not None:
        return _session_writer[0]
    if not in_ray_worker():
        return None
    job = ray.get_runtime_context().get_job_id()
    handle = _worker_writers.get(job)
    if handle is None:
        try:
            handle = ray.get_actor(WRITER_NAME)
        except ValueError:  # no writer in this job
            return None
        _worker_writers[job] = handle
    return handle


def _call_writer(uri: str, method: str, args: tuple, kwargs: dict) -> Any:
    """``client(uri).<method>(*args, **kwargs)`` run by the writer; what it raises is raised here
    as itself (an ``MlflowException`` stays one). A handle on a writer that is gone (an earlier
    session's, in a pooled worker of a long-lived Ray) is dropped and the call goes to the job's
    writer now; with none, to this process's own client, as without a writer."""
    from ray.exceptions import RayActorError, RayTaskError

    handle = _writer()
    for _attempt in range(2):
        if handle is None:
            return getattr(_local_client(uri), method)(*args, **kwargs)
        try:
            return ray.get(handle.call.remote(uri, method, args, kwargs))
        except RayTaskError as e:
            if not isinstance(e.cause, BaseException):
                raise
            raise e.cause from None  # the writer's exception itself, not Ray's wrapper around it
        except RayActorError:
            stale = handle
            for job, h in list(_worker_writers.items()):
                if h == stale:
                    del _worker_writers[job]
            handle = _writer()
            if handle == stale:  # this session's writer died: nothing to send the call to
                raise
    raise RuntimeError(f"MLflow {method} on {uri}: the writer died twice")


class _WriterClient:
    """Stands in for the ``MlflowClient`` of ``uri`` while a writer is up: each method call is
    made by the writer (:func:`_call_writer`). Arguments and results cross processes (pickled),
    so a path given to it must be one the writer's node sees (the shared output folder)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_") or not callable(getattr(MlflowClient, name, None)):
            raise AttributeError(f"{name!r}: only MlflowClient's methods go to the MLflow writer")
        uri = self.uri

        def method(*args: Any, **kwargs: Any) -> Any:
            return _call_writer(uri, name, args, kwargs)

        method.__name__ = name
        return method

    def __repr__(self) -> str:
        return f"<MLflow client of {self.uri} in the writer>"


@contextlib.contextmanager
def writer_session(enabled: bool = True) -> Iterator[Any]:
    """The job's MLflow writer for the ``with`` block (Ray up, called in the driver): a
    :class:`_MlflowWriter` actor pinned to this node, named :data:`WRITER_NAME`, killed at the end;
    yields its handle (None when not ``enabled``, or Ray is not up). Inside a session of this
    process already, or when the job has a writer, that one is used and left alone."""
    if not enabled or not ray.is_initialized() or _session_writer[0] is not None:
        yield _session_writer[0]
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    actor = ray.remote(num_cpus=0, max_concurrency=1, max_restarts=0)(_MlflowWriter)
    try:
        handle = actor.options(name=WRITER_NAME, scheduling_strategy=NodeAffinitySchedulingStrategy(
            node_id=here, soft=False)).remote()
        owned = True
    except ValueError:  # the name is taken: this job has a writer already (or a job sharing its namespace has)
        handle, owned = ray.get_actor(WRITER_NAME), False
        theirs = ray.get(handle.info.remote())["job_id"]
        if theirs != ray.get_runtime_context().get_job_id():
            raise TrackingError(f"another Ray job ({theirs}) in this job's namespace holds the MLflow writer "
                                f"{WRITER_NAME!r}: run each command in a namespace of its own (Ray's default)") from None
    _session_writer[0] = handle
    try:
        yield handle
    finally:
        _session_writer[0] = None
        if owned:
            _stop_writer(handle)


def _stop_writer(handle: Any, timeout_s: float = 10.0) -> None:
    """Kill the writer and wait (at most ``timeout_s``) until its name is free for the next session."""
    with contextlib.suppress(Exception):
        ray.kill(handle, no_restart=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if ray.get_actor(WRITER_NAME) != handle:
                return
        except ValueError:
            return
        time.sleep(0.05)


def _forget_artifact_repos() -> None:
    from mlflow.tracking._tracking_service import utils  # the cache has no public handle (MLflow 3.17)

    cache = getattr(utils, "_artifact_repos_cache", None)
    if cache is not None:
        cache.clear()


@functools.lru_cache(maxsize=None)
def _client(uri: str) -> MlflowClient:
    path = sqlite_path(uri)
    if path is not None:
        ensure_sqlite_store(path)
        relocate_artifacts(path)
    return MlflowClient(uri)


def _artifact_dir(location: str | None) -> Path | None:
    """The local folder of an artifact location (``file://`` URI or plain absolute path), else None."""
    if not location:
        return None
    if location.startswith("file:"):
        return Path(url2pathname(urlparse(location).path))
    return Path(location) if location.startswith("/") else None


def _misplaced(db: sqlite3.Connection, here: Path) -> list[tuple[str, str, str, bool]]:
    """(experiment id, old location, new location, tagged) of each experiment of this store whose
    artifacts belong beside the database, in ``here`` (``<store's folder>/mlartifacts``), but whose
    recorded location is ``<another folder>/mlartifacts/<name>``: the folder was moved or copied.
    Beside the database: tagged so when created (:func:`ensure_experiment`), or, for experiments made
    before the tag, their artifact folder came along (``here/<name>`` exists)."""
    tagged = {str(r[0]) for r in db.execute("SELECT experiment_id FROM experiment_tags WHERE key = ? AND value = 'true'",
                                            (BESIDE_STORE_TAG,))}
    out = []
    for eid, name, loc in db.execute("SELECT experiment_id, name, artifact_location FROM experiments"):
        old = _artifact_dir(loc)
        new = (here / name).resolve()
        try:
            tail = new.relative_to(here.resolve()).parts
        except ValueError:  # a name that leaves the folder ("..")
            continue
        if old is None or old == new or not tail or old.parts[-len(tail) - 1:] != (ARTIFACTS_DIR, *tail):
            continue  # where it belongs, or not of the form this package creates (MLflow's Default, a user's)
        if str(eid) in tagged or new.is_dir():
            out.append((str(eid), loc, new.as_uri() if loc.startswith("file:") else str(new), str(eid) in tagged))
    return out


def relocate_artifacts(path: Path) -> list[str]:
    """Point the artifact locations of a moved or copied output folder's store at the folder it is
    in now; returns the ids of the experiments changed.

    MLflow fixes an experiment's artifact location when the experiment is created, as an absolute
    URI, and copies it into every run (``runs.artifact_uri``) and logged model
    (``logged_models.artifact_location``); it has no relative location for a database store, and an
    ``mlflow-artifacts:`` one needs a tracking server (MLflow 3.17, checked). So after ``mv out
    out2`` new runs would log their artifacts into ``out`` again, and old ones be read from there.
    Each experiment this package made beside the database (``<out>/mlartifacts/<name>``,
    :func:`_misplaced`) whose location names another folder is rewritten here, under the store's
    lock and in one transaction: the experiment's location, and the same prefix in its runs' and
    logged models' locations (their artifacts moved with the folder). A store whose experiments
    are where they belong (every store that was not moved) is only read. A copied folder's store
    is rewritten to point at the copy; the original is not touched."""
    here = path.parent / ARTIFACTS_DIR
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
            if not _misplaced(db, here):
                return []
        with _file_lock(path.with_name(path.name + ".lock")), contextlib.closing(sqlite3.connect(path, timeout=30)) as db:
            with db:  # one transaction
                moved = _misplaced(db, here)
                for eid, old, new, tagged in moved:
                    db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?", (new, eid))
                    for table, key, col in (("runs", "run_uuid", "artifact_uri"),
                                            ("logged_models", "model_id", "artifact_location")):
                        rows = db.execute(f"SELECT {key}, {col} FROM {table} WHERE experiment_id = ?", (eid,)).fetchall()
                        db.executemany(f"UPDATE {table} SET {col} = ? WHERE {key} = ?",
                                       [(new + v[len(old):], k) for k, v in rows
                                        if v is not None and (v == old or v.startswith(old + "/"))])
                    if not tagged:
                        db.execute("INSERT OR REPLACE INTO experiment_tags (key, value, experiment_id) VALUES (?, 'true', ?)",
                                   (BESIDE_STORE_TAG, eid))
    except sqlite3.Error as e:
        cause = disk_full_cause(e)
        if cause is not None:
            raise DiskFullError(f"the disk is full: cannot update the MLflow store {path} ({cause})") from None
        raise TrackingError(f"cannot update the artifact locations of the MLflow store {path} (moved from another "
                            f"folder): {e}") from None
    if moved:
        print(f"ensemble-kd: MLflow store {path} was moved or copied from another folder: the artifact locations of "
              f"{len(moved)} experiment(s) now point at {here} (they named {moved[0][1]})", file=sys.stderr)
    return [m[0] for m in moved]


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (None for any other store)."""
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri[len("sqlite:///"):].split("?", 1)[0]  # sqlite:////abs/file -> /abs/file; sqlite:///rel -> rel
    return None if rest in ("", ":memory:") else Path(rest)


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive ``flock`` on ``path`` (created if needed), held for the ``with`` block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_sqlite_store(path: Path) -> None:
    """Make the SQLite MLflow store at ``path`` ready, safe under concurrency and full disks.

    Behind an exclusive lock (``<path>.lock``), so two commands starting at once on a new output
    folder do not both run MLflow's schema migration on one file (one of them lost its run to an
    alembic error): a missing store is created in a temp file in the same folder, migrated to
    MLflow's head schema there and renamed into place, so ``path`` is either absent or whole. A
    store left half-created by an earlier version (a full disk during the migration) has no runs:
    it is moved aside to ``<path>.broken-<time>`` and made again, with a line on stderr; a store
    with runs at another schema is refused with what to do. A full disk is one error naming the file.
    """
    with _file_lock(path.with_name(path.name + ".lock")):
        if path.exists():
            problem = _store_problem(path)
            if problem is None:
                return
            if _has_runs(path):
                raise TrackingError(f"MLflow store {path} cannot be used: {problem}. Back it up, then run "
                                    f"`mlflow db upgrade sqlite:///{path}`, or move it away to start a new store")
            aside = path.with_name(f"{path.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(path, aside)
            print(f"ensemble-kd: MLflow store {path} was half-created ({problem}) and holds no runs: moved it to "
                  f"{aside} and made a new one", file=sys.stderr)
        _create_sqlite_store(path)


def _create_sqlite_store(path: Path) -> None:
    from mlflow.store.db.utils import _initialize_tables  # the schema MLflow itself creates on first use

    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")  # SQLite creates it (umask mode, as MLflow would)
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp}")
    try:
        _initialize_tables(engine)
        engine.dispose()
        os.replace(tmp, path)
    except BaseException as e:
        engine.dispose()
        for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
            with contextlib.suppress(OSError):
                os.unlink(leftover)
        cause = disk_full_cause(e)
        if cause is not None:
            raise DiskFullError(f"the disk is full: cannot create the MLflow store {path} ({cause})") from None
        if isinstance(e, sqlalchemy.exc.SQLAlchemyError):  # e.g. SQLite's "disk I/O error" at a file-size limit
            raise TrackingError(f"cannot create the MLflow store {path}: {getattr(e, 'orig', None) or e} "
                                "(nothing was left behind; is the disk full?)") from None
        raise


def _store_problem(path: Path) -> str | None:
    """None when the SQLite file at ``path`` is an MLflow store at this MLflow's head schema;
    else what is wrong with it."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            rows = db.execute("SELECT version_num FROM alembic_version").fetchall()
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as e:
        return f"unreadable as an MLflow database: {e}"
    head = _get_latest_schema_revision()
    if [r[0] for r in rows] != [head]:
        return f"its schema revision is {[r[0] for r in rows] or 'not recorded'}, this MLflow's is {head!r}"
    if not {"experiments", "runs", "metrics", "params", "tags"} <= tables:
        return "tables are missing"
    return None


def _has_runs(path: Path) -> bool:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            return db.execute("SELECT count(*) FROM runs").fetchone()[0] > 0
    except sqlite3.Error:
        return False  # no readable runs table: nothing to lose


@dataclass(frozen=True)
class RunContext:
    """What a distillation is part of (an arm of `ensemble-kd run`, a sweep's trial, a parent run):
    the typed state that becomes MLflow tags in :func:`run_tags`, and nowhere else."""

    arm: str | None = None  # arm name; "sweep:<arm>" for the points of run.sweep
    kind: str | None = None  # "arm" | "sweep" | None (a plain `ensemble-kd distill`)
    overrides: Mapping[str, Any] = field(default_factory=dict)  # a sweep point's dotted overrides
    method: str | None = None  # overrides the config's method tag (a sweep point keeps its arm's)
    trial_id: str | None = None  # Ray Tune's trial id
    parent_run_id: str | None = None  # the MLflow run this one is nested under
    teacher_hashes: Mapping[str, str] = field(default_factory=dict)  # teacher -> checkpoint content hash

    def replace(self, **changes: Any) -> RunContext:
        return RunContext(**{**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return {"arm": self.arm, "kind": self.kind, "overrides": dict(self.overrides), "method": self.method,
                "trial_id": self.trial_id, "parent_run_id": self.parent_run_id, "teacher_hashes": dict(self.teacher_hashes)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> RunContext:
        return cls(**dict(d or {}))


def method_name(cfg: ExperimentConfig) -> str:
    """The method tag: the loss terms joined with '+' (``ce+kd+crd``)."""
    return "+".join(t.name for t in cfg.distill.losses)


def teacher_set(cfg: ExperimentConfig) -> str:
    k = len(cfg.distill.teachers)
    return "none" if k == 0 else "single" if k == 1 else "ensemble"


def label_setting(cfg: ExperimentConfig) -> str:
    """The ``labels`` tag: ``all``, ``count=<n>`` or ``fraction=<f>`` (distill.labels)."""
    lb = cfg.distill.labels
    return f"count={lb.count}" if lb.count is not None else f"fraction={lb.fraction:g}" if lb.fraction is not None else "all"


def run_tags(cfg: ExperimentConfig, ctx: RunContext | None = None, run_name: str | None = None) -> dict[str, str]:
    """Every tag of a distillation's MLflow run: the config's (what makes comparisons a filter),
    then the context's (arm, kind, trial, sweep point, parent)."""
    d = cfg.distill
    ctx = ctx or RunContext()
    tags = {
        "teacher_set": teacher_set(cfg),
        "teachers": ",".join(d.teachers) or "none",
        "teacher_modalities": ",".join(sorted({cfg.teacher(n).modality for n in d.teachers})) or "none",
        "student_modality": d.student.modality,
        "student_arch": d.student.arch,
        "dataset": cfg.data.name,
        "method": ctx.method or method_name(cfg),
        "seed": str(d.seed),
        "labels": label_setting(cfg),
    }
    if d.labels.subset:  # with the setting and the train labels, this seed fixes the labelled samples
        tags["labels_seed"] = str(d.seed if d.labels.seed is None else d.labels.seed)
    if ctx.arm is not None:
        tags["arm"] = ctx.arm
    if ctx.kind is not None:
        tags["ekd.kind"] = ctx.kind
    if ctx.trial_id is not None:
        tags["tune_trial"] = ctx.trial_id
    tags.update({f"sweep.{k}": str(v) for k, v in ctx.overrides.items()})
    tags.update({f"teacher_sha256.{n}": h for n, h in ctx.teacher_hashes.items()})  # which weights, exactly
    if ctx.parent_run_id:
        tags["mlflow.parentRunId"] = ctx.parent_run_id
    if run_name is not None:
        tags[RUN_NAME_TAG] = run_name
    tags[OWNER_TAG] = owner()  # the process that holds the run while it is RUNNING
    return tags


def _params(cfg: ExperimentConfig) -> dict[str, str]:
    return {k: str(v)[:MAX_PARAM_LEN] for k, v in flatten(recorded_config(cfg)).items()}



def _numeric_metrics(h: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in h.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)) and k != "epoch"}


def start_parent_run(cfg: ExperimentConfig, name: str, kind: str, tags: Mapping[str, str] | None = None
                     ) -> tuple[str, str, str]:
    """The parent run of a sweep or of `ensemble-kd run` (``ekd.kind`` = ``kind``), created with the
    experiment before any trial; returns (uri, experiment id, run id)."""
    uri = tracking_uri(cfg)
    exp_id = ensure_experiment(uri, experiment_name(cfg), Path(cfg.output_dir) / "mlartifacts")
    run = client(uri).create_run(exp_id, run_name=name, tags={"ekd.kind": kind, OWNER_TAG: owner(), **(tags or {})})
    return uri, exp_id, run.info.run_id


def start_distill_run(cfg: ExperimentConfig, run_name: str, ctx: RunContext | None = None) -> str:
    """Create (or, for a resumed Ray Train run of the same name, reopen) the MLflow run of one
    distillation, with its params and tags, before training starts; returns the run id.

    Per-epoch metrics are then logged by the training loop (:func:`log_epochs`, batched every
    ``distill.metrics_flush_s``; every epoch in an ASHA sweep, so a trial it stops keeps the epochs
    it ran); :func:`finish_distill_run` adds the final metric and artifacts."""
    uri = tracking_uri(cfg)
    exp_id = ensure_experiment(uri, experiment_name(cfg), Path(cfg.output_dir) / "mlartifacts")
    c = client(uri)
    tags = run_tags(cfg, ctx, run_name)
    old = c.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1)
    if old:  # --resume, or a trial restarted by Tune: one MLflow run per distillation
        rid = old[0].info.run_id
        c.update_run(rid, status=RunStatus.to_string(RunStatus.RUNNING))
        for k, v in tags.items():
            c.set_tag(rid, k, v)
        return rid
    rid = c.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
    params = [Param(k, v) for k, v in _params(cfg).items()]
    for i in range(0, len(params), 100):  # log_batch takes at most 100 params a call
        c.log_batch(rid, params=params[i : i + 100])
    return rid


MAX_METRICS_PER_BATCH = 1000  # MLflow's limit on one log_batch call


def log_epochs(uri: str, run_id: str, epochs: Sequence[Mapping[str, Any]]) -> None:
    """Log the numeric metrics of several epochs (step = each one's ``epoch``) in as few calls as
    MLflow allows. Called by rank 0 of the training loop."""
    batch = [Metric(k, v, 0, int(m.get("epoch", 0))) for m in epochs for k, v in _numeric_metrics(m).items()]
    c = client(uri)
    for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
        c.log_batch(run_id, metrics=batch[i:i + MAX_METRICS_PER_BATCH])


def finish_distill_run(cfg: ExperimentConfig, run_id: str, final_top1: float | None, epochs: int,
                       student_path: Path | None, status: str = "FINISHED") -> None:
    """Final metric (at step ``epochs``), the config YAML and the student checkpoint as artifacts,
    then the run's end status."""
    c = client(tracking_uri(cfg))
    try:
        if final_top1 is not None:
            c.log_batch(run_id, metrics=[Metric("final/test_top1", float(final_top1), 0, epochs)])
        c.log_text(run_id, to_yaml(recorded_config(cfg)), "config.yaml")  # text: the writer may be on another node
        if student_path is not None and Path(student_path).exists():
            c.log_artifact(run_id, str(student_path), artifact_path="student")
        c.set_terminated(run_id, status)
    except BaseException:
        c.set_terminated(run_id, "FAILED")
        raise


STOPPED_REASON_TAG = "stopped_reason"
OWNER_TAG = "ekd.owner"  # "<host>:<pid>" of the process that holds a RUNNING run (see end_orphaned_runs)


def owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def fail_distill_run(cfg: ExperimentConfig, run_id: str, error: BaseException | None = None) -> None:
    """End a distillation's run that did not finish: KILLED with ``stopped_reason`` = "interrupted
    (SIGINT)" when ``error`` (default: the exception being handled) is Ctrl-C/SIGTERM, else FAILED."""
    end_stopped_run(tracking_uri(cfg), run_id, error if error is not None else sys.exc_info()[1])


def end_stopped_run(uri: str, run_id: str, error: BaseException | None) -> None:
    """KILLED with the interrupt as ``stopped_reason`` when ``error`` is one, else FAILED."""
    c = client(uri)
    reason = interrupt_reason(error)
    if reason is not None:
        c.set_tag(run_id, STOPPED_REASON_TAG, reason)
    c.set_terminated(run_id, "KILLED" if reason is not None else "FAILED")


def end_orphaned_runs(uri: str, log: Callable[[str], None] = print) -> list[str]:
    """Runs left RUNNING by a process of this host that is gone (a driver or trial killed with
    SIGKILL, a crashed machine never comes back here) are ended KILLED, ``stopped_reason`` saying so.
    Runs of live processes and of other hosts are left alone; ``--resume`` reopens a run as before."""
    c = client(uri)
    host = socket.gethostname()
    ended = []
    for exp in c.search_experiments():
        for r in c.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=10_000):
            who = r.data.tags.get(OWNER_TAG, "")
            h, _, pid = who.rpartition(":")
            if h != host or not pid.isdigit() or pid_alive(int(pid)):
                continue
            c.set_tag(r.info.run_id, STOPPED_REASON_TAG, f"its process ({who}) ended without closing the run (killed)")
            c.set_terminated(r.info.run_id, "KILLED")
            ended.append(r.info.run_id)
    if ended:
        log(f"MLflow: ended {len(ended)} run(s) left RUNNING by killed processes as KILLED: {ended}")
    return ended


def end_unfinished_children(uri: str, experiment_id: str, parent_run_id: str, status: str = "KILLED",
                            reason: str = "stopped early by the Tune scheduler") -> list[str]:
    """Children of a sweep left RUNNING (trials that ASHA stopped are killed mid-epoch, before
    their own code could end the run; every trial when the sweep is interrupted, with ``reason``
    "interrupted (SIGINT)") get ``status`` and a ``stopped_reason`` tag."""
    c = client(uri)
    runs = c.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' "
                              "and attributes.status = 'RUNNING'", max_results=10_000)
    for r in runs:
        c.set_tag(r.info.run_id, STOPPED_REASON_TAG, reason)
        c.set_terminated(r.info.run_id, status)
    return [r.info.run_id for r in runs]


def sweep_axes(losses: list[str] | tuple[str, ...]) -> tuple[str, ...] | None:
    """The ``sweep_axes`` registry metadata of the first of these losses that declares some
    (CRD's and GACD's: tau and num_negatives)."""
    for name in losses:
        axes = LOSSES.meta(name).get("sweep_axes") if name in LOSSES else None
        if axes:
            return tuple(axes)
    return None


def sweep_point(params: dict[str, str]) -> dict[str, float] | None:
    """The values of a run's sweep axes (of its first loss term that declares ``sweep_axes``) from
    its flattened params; an option the config left out takes the loss's default (what the run
    actually used), cast to the default's type."""
    for k, v in params.items():
        m = re.fullmatch(r"distill\.losses\.(\d+)\.name", k)
        axes = sweep_axes([v]) if m else None
        if axes:
            defaults = loss_options(v)
            return {a: type(defaults[a])(float(params.get(f"distill.losses.{m.group(1)}.kwargs.{a}", defaults[a])))
                    for a in axes}
    return None


def mean_std(vals: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of top-1 over runs, e.g. seeds."""
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def compare(uri: str, experiment: str, group_by: str = "teacher_set", baseline: str | None = None) -> dict[str, Any]:
    """Mean +- std (sample std over the runs, e.g. seeds) of the final test top-1 per value of tag
    ``group_by``, the best run of each, and ``sweep``: the runs' points on their loss's sweep axes
    (CRD: tau, N) with top-1, where an axis varies across the experiment (for the plot).

    Only distillations that FINISHED with a final top-1 are averaged; every other one (FAILED,
    KILLED, still RUNNING, no final metric) is listed under ``unfinished``, never averaged in. A
    group whose runs differ in their ``labels`` tag is split, one group per label setting
    (``ensemble [labels count=50]``). With ``baseline`` (a group), every other group gets
    ``paired``: the paired difference to it over the seeds both have (:func:`ensemble_kd.core.stats.paired_difference`;
    each seed's latest finished run)."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise TrackingError(f"no MLflow experiment {experiment!r} at {uri}; {_experiments_line(uri)}")
    runs = [r for r in c.search_runs([exp.experiment_id], max_results=50_000) if RUN_NAME_TAG in r.data.tags]  # distillations
    done = [r for r in runs if r.info.status == "FINISHED" and "final/test_top1" in r.data.metrics]
    done_ids = {r.info.run_id for r in done}
    keys = _group_keys(runs, group_by)
    groups: dict[str, list[Any]] = {}
    points = []
    for r in done:
        top1 = r.data.metrics["final/test_top1"]
        groups.setdefault(keys[r.info.run_id], []).append((top1, r))
        pt = sweep_point(r.data.params)
        if pt is not None:
            points.append({**pt, "top1": top1})
    rows = {g: _group_row(runs_g) for g, runs_g in sorted(groups.items())}
    if baseline is not None:
        if baseline not in rows:
            raise TrackingError(f"--baseline {baseline!r} is not a group of finished runs grouped by {group_by!r}; "
                                f"groups: {list(rows)}")
        for g, row in rows.items():
            row["paired"] = None if g == baseline else paired_difference(row["by_seed"], rows[baseline]["by_seed"])
    unfinished = [{"run_id": r.info.run_id, "run_name": r.info.run_name, "status": r.info.status,
                   "group": keys[r.info.run_id], "seed": r.data.tags.get("seed"),
                   "last_test_top1": r.data.metrics.get("test_top1")}
                  for r in runs if r.info.run_id not in done_ids]
    axes = [k for k in points[0] if k != "top1"] if points else []
    varied = any(len({p.get(a) for p in points}) > 1 for a in axes)
    sweep = _mean_points(points, axes) if varied else []
    return {"tracking_uri": uri, "experiment": experiment, "group_by": group_by, "baseline": baseline, "groups": rows,
            "unfinished": unfinished, "sweep": sweep}


FOLDER_SUMMARY = "summary.json"  # report.SUMMARY (report imports this module, so it is not imported here)


def store_experiments(uri: str) -> dict[str, int]:
    """The active experiments of the store at ``uri``, name -> number of distillation runs in it
    (MLflow's own empty ``Default`` included, with 0), by name."""
    c = client(uri)
    return {e.name: sum(RUN_NAME_TAG in r.data.tags for r in c.search_runs([e.experiment_id], max_results=50_000))
            for e in sorted(c.search_experiments(), key=lambda e: e.name)}


def _experiments_line(uri: str, held: Mapping[str, int] | None = None) -> str:
    """What the store holds and how to pick, for an error message."""
    held = store_experiments(uri) if held is None else held
    listed = ", ".join(f"{n!r} ({k} distillation run{'s' * (k != 1)})" for n, k in held.items()) or "none"
    return f"experiments there: {listed}; pick one with --experiment NAME"


def folder_experiment(out: str | Path, uri: str, keep_uri: bool = False) -> tuple[str, str, str]:
    """The store and experiment that `ensemble-kd compare --out DIR` reads when neither
    ``--experiment`` nor ``--config`` names one: ``(uri, experiment, where it came from)``.

    ``<out>/summary.json`` (written by `ensemble-kd run`) names both: its ``experiment``, and its
    ``mlflow_tracking_uri`` unless ``keep_uri`` (``--uri`` given) or it is a SQLite file that is no
    longer there (a moved folder: then ``uri``, the folder's own store). Without a summary, the
    store at ``uri`` is read: its one experiment with distillation runs is taken; none is a
    :class:`TrackingError` that says so, several one that lists them and how to pick one."""
    out = Path(out)
    path = out / FOLDER_SUMMARY
    if path.is_file():
        try:
            summary = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise TrackingError(f"{path} is unreadable ({e}); name the experiment with --experiment NAME "
                                f"(or the config that wrote the folder with --config FILE)") from None
        name = summary.get("experiment") if isinstance(summary, dict) else None
        if not isinstance(name, str) or not name:
            raise TrackingError(f"{path} names no experiment (no 'experiment' key); name it with --experiment NAME "
                                f"(or the config that wrote the folder with --config FILE)")
        if summary.get("mlflow_tracking_uri") is None and summary.get("parent_run_id") is None:
            raise TrackingError(f"{path}: the run that wrote {out} had tracking off (tracking.enabled: false), so experiment "
                                f"{name!r} has no MLflow runs to compare; its table is in {path}")
        recorded = summary_store(summary, out)  # a store inside a moved or copied folder: this folder's
        db = sqlite_path(recorded) if recorded else None
        if recorded and not keep_uri and (db is None or db.is_file()):
            uri = recorded
        return uri, name, f"named by {path}"
    held = store_experiments(uri)
    with_runs = [n for n, k in held.items() if k]
    if len(with_runs) == 1:
        return uri, with_runs[0], f"the only experiment with distillation runs at {uri} ({out} has no {FOLDER_SUMMARY})"
    if not with_runs:
        raise TrackingError(f"{out} has no {FOLDER_SUMMARY} to name its experiment, and the MLflow store at {uri} holds no "
                            f"distillation runs: nothing to compare (a `ensemble-kd run` or `distill` with --out {out} "
                            f"writes them; --uri URI reads another store)")
    raise TrackingError(f"{out} has no {FOLDER_SUMMARY} to name its experiment, and the MLflow store at {uri} holds "
                        f"several; {_experiments_line(uri, held)} (e.g. ensemble-kd compare --out {out} "
                        f"--experiment {with_runs[0]})")


def _group_keys(runs: list[Any], group_by: str) -> dict[str, str]:
    """run id -> its group: the ``group_by`` tag's value, with the label setting added where runs of
    one value differ in their ``labels`` tag (runs from before the tag count as ``all``)."""
    value = {r.info.run_id: r.data.tags.get(group_by, "(untagged)") for r in runs}
    labels = {r.info.run_id: r.data.tags.get("labels", "all") for r in runs}
    mixed = {v for v in value.values() if len({labels[i] for i in value if value[i] == v}) > 1}
    return {i: f"{v} [labels {labels[i]}]" if v in mixed and group_by != "labels" else v for i, v in value.items()}


def _group_row(runs: list[tuple[float, Any]]) -> dict[str, Any]:
    """One group's row: count, mean +- std, best run, its label setting and each seed's latest top-1."""
    vals = [v for v, _ in runs]
    best_v, best = max(runs, key=lambda x: x[0])
    sets = {r.data.tags.get("teacher_set") for _, r in runs}
    labels = {r.data.tags.get("labels", "all") for _, r in runs}
    mean, std = mean_std(vals)
    by_seed: dict[str, tuple[int, float]] = {}
    for v, r in runs:  # a seed run twice (a rerun into the same store) pairs by its latest finished run
        sd = r.data.tags.get("seed")
        if sd is not None and (sd not in by_seed or r.info.start_time > by_seed[sd][0]):
            by_seed[sd] = (r.info.start_time, v)
    return {
        "runs": len(vals),
        "mean_top1": mean,
        "std_top1": std,
        "best_top1": best_v,
        "values": vals,
        "teacher_set": sets.pop() if len(sets) == 1 else None,
        "labels": labels.pop() if len(labels) == 1 else None,
        "by_seed": {sd: v for sd, (_, v) in sorted(by_seed.items(), key=lambda kv: _seed_order(kv[0]))},
        "best_run": {"run_id": best.info.run_id, "run_name": best.info.run_name, "method": best.data.tags.get("method"),
                     "teachers": best.data.tags.get("teachers")},
    }


def _seed_order(seed: str) -> tuple[int, Any]:
    return (0, int(seed)) if seed.lstrip("-").isdigit() else (1, seed)


def _mean_points(points: list[dict[str, float]], axes: list[str]) -> list[dict[str, float]]:
    """Average the top-1 of runs at the same point on the axes (runs of another loss's axes are left out)."""
    acc: dict[tuple, list[float]] = {}
    for p in points:
        if all(a in p for a in axes):
            acc.setdefault(tuple(p[a] for a in axes), []).append(p["top1"])
    return [{**dict(zip(axes, key)), "top1": statistics.fmean(v), "runs": len(v)} for key, v in sorted(acc.items())]
