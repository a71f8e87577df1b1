"""Launching the training loop: :func:`fit` runs a config as one named run and returns its final state.

A run goes to Ray Train (``TorchTrainer``, ``distill.num_workers`` workers, DDP, ``max_failures``
restarts from the last checkpoint), or, for a single worker with ``distill.local_mode``, runs in
one Ray process that holds the worker's resources (a Ray task, or the Tune trial's own process):
Ray Train's local mode done by hand, with no controller or worker group to start, restarted from
its state file after an error. The epochs themselves are :mod:`ensemble_kd.training.loop`'s.
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from ensemble_kd.core import layout
from ensemble_kd.core.config import ExperimentConfig
from ensemble_kd.core.interrupts import ray_train_fit
from ensemble_kd.core.raycluster import quiet_train_reports
from ensemble_kd.core.shared_folder import in_ray_worker
from ensemble_kd.storage.datastore import has_val, prepare
from ensemble_kd.training.loop import LoopConfig, NonFiniteError, _LocalSession, _run, train_loop_per_worker
from ensemble_kd.training.state import StateFileError, load_state


@dataclass
class Fitted:
    """A finished run of the loop: its final training state and the folder that holds it."""

    state: dict[str, Any]  # module weights, optimiser, history, config, timings (as save_state writes them)
    path: str  # the folder of that state (a Ray Train checkpoint folder, or the run's folder in local mode)


def runs_locally(cfg: ExperimentConfig, callbacks: Sequence[Any] = ()) -> bool:
    """Whether :func:`fit` runs this config in Ray Train's local mode: one worker, ``local_mode`` on,
    and no Ray Train callbacks (local mode calls none)."""
    return cfg.distill.local_mode and cfg.distill.num_workers == 1 and not callbacks


def store_ready(cfg: ExperimentConfig) -> None:
    """In the driver (a library call that skipped the pipeline), the data store the workers will
    open: a worker never prepares it (:func:`~ensemble_kd.storage.datastore.open_split`). Reused
    at once where the pipeline prepared it."""
    if not in_ray_worker():
        for data, split in ((cfg.data, "train"), (cfg.distill.eval_data or cfg.data, "test")):
            prepare(data, split, cfg.output_dir)
        if has_val(cfg.data, cfg.output_dir):
            prepare(cfg.data, "val", cfg.output_dir)


def fit(cfg: ExperimentConfig, lc: LoopConfig, name: str, callbacks: Sequence[Any] = (), here: bool = False,
        submitted: Callable[[], None] | None = None) -> Fitted:
    """Run the loop as the run ``name`` under ``<output_dir>/ray_results`` (a reused name resumes
    it) and return its final state; raises the training error, if any. ``distill.num_workers`` workers (DDP) with ``use_gpu`` on Ray Train, ``max_failures`` restarts
    from the last checkpoint; ``callbacks``: Ray Train user callbacks. A single-worker run with
    ``distill.local_mode`` (:func:`runs_locally`) runs in one process instead: a Ray task holding
    the worker's resources, or, with ``here``, this process (the caller is such a Ray process
    already: a Tune trial). No controller or worker group starts; the loop keeps its state in the
    run's folder, an error restarts it from there (``max_failures`` times; a killed task too, by
    Ray's task retries), and per-epoch reports reach the caller through the loop callbacks
    (``lc.callbacks``). ``submitted``: called once the run has asked Ray for its resources."""
    d = cfg.distill
    submitted = submitted or (lambda: None)
    store_ready(cfg)
    run_dir = layout.run_dir(cfg.output_dir, name)
    lc = dataclasses.replace(lc, run_dir=str(run_dir))
    if runs_locally(cfg, callbacks):
        lc = dataclasses.replace(lc, local=True)
        if here:
            submitted()
            _fit_local(cfg, lc)
        else:
            ref = _local_task(cfg).remote(cfg, lc)
            submitted()
            ray.get(ref)
        return Fitted(load_state(run_dir), str(run_dir))
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    quiet_train_reports(cfg.ray.train_log_level)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=lc.to_dict(),
        scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu,
                                     resources_per_worker={"CPU": d.cpus_per_worker, **({"GPU": d.gpus_per_worker} if d.use_gpu else {})}),
        run_config=RunConfig(name=name, storage_path=str(layout.ray_results(cfg.output_dir)),
                             failure_config=FailureConfig(max_failures=d.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=list(callbacks),
                             logging_config=LoggingConfig(log_level=cfg.ray.train_log_level)),
    )
    submitted()  # (the controller asks for the workers' resources as fit starts)
    with ray_train_fit():  # Ray Train takes SIGINT over during fit: a Ctrl-C still ends as Interrupted
        result = trainer.fit()
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as cdir:
        return Fitted(load_state(Path(cdir)), result.checkpoint.path)


def _local_task(cfg: ExperimentConfig) -> Any:
    """:func:`_fit_local` as a Ray task holding the worker's resources. A killed task restarts from
    its state (``max_failures``). With a GPU, a fresh process per run: CUDA fixes a process's devices
    when first used, and a pooled one could next run a task that asked for none (or another GPU)."""
    d = cfg.distill
    return ray.remote(max_calls=1 if d.use_gpu else 0)(_fit_local).options(
        num_cpus=d.cpus_per_worker, num_gpus=d.gpus_per_worker if d.use_gpu else 0, max_retries=d.max_failures)


def _fit_local(cfg: ExperimentConfig, lc: LoopConfig) -> None:
    """The loop in this process, restarted from its last saved state after an error, up to
    ``max_failures`` times; a non-finite loss, an unreadable state or a bad value is final."""
    for attempt in range(cfg.distill.max_failures + 1):
        try:
            _run(cfg, lc, _LocalSession(cfg))
            return
        except (NonFiniteError, StateFileError, ValueError, TypeError):
            raise  # the same input fails the same way again
        except Exception as e:
            if attempt == cfg.distill.max_failures:
                raise
            print(f"[{lc.label}] attempt {attempt + 1} failed ({type(e).__name__}: {e}); restarting from the last "
                  f"saved state ({attempt + 1}/{cfg.distill.max_failures} restarts)", file=sys.stderr, flush=True)  # a warning
