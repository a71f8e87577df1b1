"""Starting and stopping Ray the same way everywhere (CLI, jobs, tests)."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import ray

from ensemble_kd.core import owners
from ensemble_kd.core.config import RayConfig
from ensemble_kd.core.console import CONSOLE, route_worker_output
from ensemble_kd.core.errors import project_error
from ensemble_kd.core.interrupts import is_ours
from ensemble_kd.core.plugins import ENV_VAR as PLUGINS_ENV_VAR, env_plugins, load_plugins

HIDE_GPUS = {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1"}
"""Ray before 2.60 set CUDA_VISIBLE_DEVICES="" in a task or actor that asked for no GPU; 2.60 leaves
the variable alone (ray-project/ray#54868) unless this is in the worker's environment (read before
each task), so a CPU task on a GPU node saw every GPU, and a CUDA call in it took memory on a GPU
that Ray had given to another task. In the driver's environment before a local Ray starts (its
workers inherit it: :data:`RAY_ENV_DEFAULTS`), in the job's ``env_vars`` and set again by the
job's worker setup hook (:func:`setup_worker`), so a worker of a cluster started without it has it."""

# Quiet, quick local clusters: no usage reports, no token auth on a private local cluster, and
# no ~2 s health-check stall on every ray.train.report on small machines.
RAY_ENV_DEFAULTS = {
    **HIDE_GPUS,
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    "RAY_DEDUP_LOGS": "1",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    # Ray Train V2 patches print() on workers into its structured log, which the driver then shows a
    # second time: every per-epoch line appeared twice.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # Tune's legacy reporter honours verbose=0 (no banner, no status tables): the job prints its
    # own line per trial.
    "RAY_AIR_NEW_OUTPUT": "0",
    # Tune's own SIGINT handler stops the experiment and returns normally (the command then went
    # on as if it had finished); without it Ctrl-C raises in the driver (ensemble_kd.core.interrupts).
    "TUNE_DISABLE_SIGINT_HANDLER": "1",
    # Tune's CSV and TensorBoard loggers write every trial's every report into the Tune folder from
    # the driver (with the JSON one, about 2.5 s of the driver's CPU per run of the default, beside
    # the trials); the metrics live in MLflow. sweep.run_trials adds the JSON logger back.
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
}


class _DropStateApiNoise:
    """Ray Train V2's placement-group cleaner polls the state API, which lives in the dashboard;
    a local Ray started without the dashboard (as here) makes it warn on every poll. Only that
    one message is dropped: every other Ray warning still reaches the driver."""

    def filter(self, record) -> bool:  # noqa: ANN001 - logging.Filter protocol
        return "Failed to query Ray Train Controller actor state" not in record.getMessage()


def quiet_ray_worker() -> None:
    """Part of :func:`setup_worker`, every worker's first step (see :class:`_DropStateApiNoise`)."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").addFilter(_DropStateApiNoise())


def quiet_worker_libraries() -> None:
    """Part of :func:`setup_worker`: MLflow's INFO lines (a trial's "View run ... at" on a tracking
    server, schema notes) would reach the driver's console through the worker's stderr, which is
    for warnings and errors (:mod:`ensemble_kd.core.console`); MLflow reads its level when it is
    imported, after this hook. A level the user set in the environment is kept."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def setup_worker() -> None:
    """The ``worker_process_setup_hook`` of every Ray job :func:`ray_session` starts or joins: Ray
    runs it in each worker process of the job (tasks, actors, Ray Train workers, Tune trials)
    before any of the job's code, so the plugin modules named in ``EKD_PLUGINS`` register their
    datasets, encoders and losses there as they did in the driver (:mod:`ensemble_kd.core.plugins`).
    Registries are per process: without this a worker would not know a plugin's names."""
    quiet_ray_worker()
    quiet_worker_libraries()
    os.environ.update(HIDE_GPUS)  # a task that asks for no GPU sees none (HIDE_GPUS)
    load_plugins(env_plugins())


def job_runtime_env(plugins: Sequence[str] = ()) -> dict:
    """The job-level ``runtime_env`` that runs :func:`setup_worker` in every worker process, with
    the plugin modules in its environment. For a Ray this process did not start (a notebook, a
    test's session Ray), pass it to ``ray.init(runtime_env=...)`` yourself."""
    env: dict = {"worker_process_setup_hook": "ensemble_kd.core.raycluster.setup_worker", "env_vars": dict(HIDE_GPUS)}
    if plugins:
        env["env_vars"][PLUGINS_ENV_VAR] = ",".join(plugins)
    return env


# Only for a Ray this process starts itself (one machine): Ray Train's preemption watcher (an extra
# actor process per fit, polling for node drains that a local machine never has) costs about a
# second of CPU per trial on 2 cores and prints a core-worker error line each time.
LOCAL_RAY_ENV_DEFAULTS = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def quiet_train_reports(level: str) -> None:
    """Ray Train V2 logs each ``ray.train.report`` at INFO on a logger named after its source file,
    outside ``ray.train``, so ``LoggingConfig(log_level=...)`` does not reach it; give it the same
    level (called on each worker). The logger lives in a private module, so its import is guarded
    here, where a Ray without it is handled. ``ray.train`` itself gets the level too: in local mode
    (no worker group, so no ``LoggingConfig``) it logs every report and model move at INFO."""
    logging.getLogger("ray.train").setLevel(level)
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(level)


def set_ray_env() -> None:
    for k, v in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)


def short_temp_dir() -> str:
    """Ray's socket paths must stay under ~107 bytes: keep its temp dir short. It is claimed by this
    process (:mod:`ensemble_kd.core.owners`) until the command ends, so a killed command's dir is
    swept by the next one."""
    base = os.environ.get("EKD_RAY_TMPDIR", "/tmp")
    owners.sweep(base, "ekd-ray-*")
    tmp = tempfile.mkdtemp(prefix="ekd-ray-", dir=base)
    owners.claim(Path(tmp))
    return tmp


def clean_stale_checkpoints(results: str | Path) -> list[Path]:
    """Ray Train checkpoint folders under ``results`` (``<output_dir>/ray_results``) that no run
    will read: a ``checkpoint_*`` folder that its run's ``checkpoint_manager_snapshot.json`` does
    not name and that is older than the snapshot (a copy a killed driver left half done, or an
    evicted one whose deletion was cut short). A checkpoint being written now is newer than its
    snapshot and stays."""
    gone = []
    for snap in Path(results).glob("*/checkpoint_manager_snapshot.json"):
        try:
            text, t = snap.read_text(), snap.stat().st_mtime
        except OSError:
            continue
        for d in snap.parent.glob("checkpoint_*"):
            with contextlib.suppress(OSError):
                if d.is_dir() and d.name not in text and d.stat().st_mtime < t:
                    shutil.rmtree(d, ignore_errors=True)
                    gone.append(d)
    return gone


def joins_cluster(cfg: RayConfig | None = None) -> bool:
    """Whether :func:`ray_session` will use a Ray it did not start (an address, ``ray job submit``'s
    RAY_ADDRESS, or a Ray already initialised here) rather than start this machine's own."""
    return ray.is_initialized() or bool((cfg or RayConfig()).address or os.environ.get("RAY_ADDRESS"))


@contextlib.contextmanager
def ray_session(cfg: RayConfig | None = None, plugins: Sequence[str] = ()) -> Iterator[bool]:
    """Connect to Ray, or start a local one if none is running; shut down only what it started.

    Yields True when this call started Ray. Inside ``ray job submit`` (RAY_ADDRESS set) it joins
    the cluster. ``plugins`` (``cfg.plugins``): modules every worker process of the job imports
    first (:func:`job_runtime_env`); on a cluster they must be importable on every node. A Ray
    already initialised in this process is used as it is: its job's runtime env decides.
    """
    set_ray_env()
    if ray.is_initialized():
        yield False
        return
    cfg = cfg or RayConfig()
    sigterm = signal.getsignal(signal.SIGTERM)
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    tmp = None
    ok = False  # finished, stopped by Ctrl-C/SIGTERM, or refused by a project error: the session's files go;
    unroute = None  # after any other failure (a bug, a crash) its logs stay
    CONSOLE.adopt_loggers()  # Ray's driver logger (its start line, Tune's): into the command's log (ensemble_kd.core.console)
    try:
        if address:
            ray.init(address=address, log_to_driver=True, **({"runtime_env": job_runtime_env(plugins)} if plugins else {}))
        else:
            tmp = short_temp_dir()
            for k, v in LOCAL_RAY_ENV_DEFAULTS.items():
                os.environ.setdefault(k, v)
            kwargs = {"include_dashboard": False, "_temp_dir": tmp, "log_to_driver": True,
                      "runtime_env": job_runtime_env(plugins)}
            if cfg.num_cpus is not None:
                kwargs["num_cpus"] = cfg.num_cpus
            if cfg.object_store_memory is not None:
                kwargs["object_store_memory"] = cfg.object_store_memory
            ray.init(**kwargs)
        if is_ours(sigterm):  # ray.init sets SIGTERM to sys.exit(15): keep ours (exit 143, runs KILLED)
            signal.signal(signal.SIGTERM, sigterm)
        unroute = route_worker_output()  # the workers' lines: to the log file, not in colour with pids on the console
        yield True
        ok = True
    except KeyboardInterrupt:
        ok = True
        raise
    except BaseException as e:
        ok = project_error(e) is not None  # a refused input: the command's log has the traceback
        raise
    finally:
        ray.shutdown()
        if unroute is not None:
            unroute()  # after the shutdown, which drains the workers' last lines through it
        if tmp is not None:  # keep /tmp bounded
            if ok and not os.environ.get("EKD_KEEP_RAY_LOGS"):
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                owners.release(Path(tmp))  # kept on purpose: not a stale dir
                CONSOLE.warn(f"Ray's logs of this run: {tmp}/session_latest/logs")
