"""The MLflow store: where tracking goes, made safe for many processes and nodes.

The store defaults to a SQLite file under the output folder (``sqlite:///<out>/mlflow.db``;
mlflow 3.17 refuses the plain file store); ``MLFLOW_TRACKING_URI`` or ``tracking.uri`` point it
at a server on a cluster. The database and the experiment are created once, in the driver,
before any run starts (two processes migrating a fresh SQLite file at once fail). A store moved
with its folder points its artifacts at the new folder (:func:`relocate_artifacts`).

One writer: while a command runs (:func:`writer_session`, entered by the pipeline's session), every
MLflow call of the job, from the driver, a Tune trial or rank 0 of a Ray Train loop on any node, is
made by one Ray actor pinned to the driver's node (:class:`_MlflowWriter`), one call at a time;
:func:`client` hands the other processes a stand-in that sends it their calls. So nothing a
caller passes may be readable only where it runs: the config goes as text, the student
checkpoint lies in the shared output folder. The tracking URI is resolved once, in the driver, into
the config (``pipeline.load``). Without a writer (a library call, a test's bare Ray) each process
uses its own client. :func:`client` is the one way to get an MLflow client.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import os
import sqlite3
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import ray
import sqlalchemy
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ensemble_kd.core import layout
from ensemble_kd.core.config import ConfigError, ExperimentConfig
from ensemble_kd.core.files import DiskFullError, disk_full_cause
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
    return f"sqlite:///{layout.mlflow_db(cfg.output_dir)}"


def recorded_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config as a run records it (params, config.yaml): the output folder's own store, which
    the driver resolved into ``tracking.uri``, left implicit again, so that a run's config.yaml
    used with another ``--out`` tracks into that folder, not into this one."""
    if cfg.tracking.uri is not None and cfg.tracking.uri == folder_store(cfg):
        return dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, uri=None))
    return cfg


def experiment_name(cfg: ExperimentConfig) -> str:
    return cfg.tracking.experiment or cfg.name


ARTIFACTS_DIR = layout.MLARTIFACTS  # an output folder's own store keeps its artifacts beside the database
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
