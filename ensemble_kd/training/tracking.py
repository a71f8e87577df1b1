"""A distillation's MLflow run from start to end: one run per distillation, tags that make
ensemble-vs-single a filter.

Per run: params = the flattened config; metrics = every numeric per-epoch value of the
history (step = epoch) plus ``final/test_top1``; tags = ``teacher_set`` (none / single /
ensemble), ``teachers``, ``teacher_modalities``, ``student_modality``, ``student_arch``,
``dataset``, ``method``, ``labels`` (all / count=50 / fraction=0.1) and ``labels_seed`` (from the
config) and ``arm``, ``ekd.kind``, ``tune_trial``, ``sweep.<key>`` (from the :class:`RunContext`
the run is part of), all written by :func:`run_tags`; artifacts = the config YAML and the final
student checkpoint. A run that did not finish ends FAILED or KILLED with its reason; one whose
process is gone is ended by the next command (:func:`end_orphaned_runs`).
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException

from ensemble_kd.core import layout, owners
from ensemble_kd.core.config import ExperimentConfig, flatten, to_yaml
from ensemble_kd.core.interrupts import reason_of as interrupt_reason
from ensemble_kd.storage.mlflow_store import (MAX_PARAM_LEN, RUN_NAME_TAG, TrackingError, client, ensure_experiment,
                                              experiment_name, recorded_config, tracking_uri)


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
    tags[OWNER_TAG] = owners.tag()  # the process that holds the run while it is RUNNING
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
    exp_id = ensure_experiment(uri, experiment_name(cfg), layout.mlartifacts(cfg.output_dir))
    run = client(uri).create_run(exp_id, run_name=name, tags={"ekd.kind": kind, OWNER_TAG: owners.tag(), **(tags or {})})
    return uri, exp_id, run.info.run_id


def reopen_parent_run(cfg: ExperimentConfig, run_id: str) -> tuple[str, str, str]:
    """The parent run of an interrupted run or sweep, RUNNING again for ``--resume`` (this process
    its owner, the interruption's ``stopped_reason`` gone); returns (uri, experiment id, run id)
    like :func:`start_parent_run`."""
    uri = tracking_uri(cfg)
    c = client(uri)
    try:
        run = c.get_run(run_id)
    except MlflowException:
        raise TrackingError(f"--resume: the interrupted run's parent MLflow run {run_id} is not in {uri}; "
                            "start over without --resume") from None
    c.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    c.set_tag(run_id, OWNER_TAG, owners.tag())
    if STOPPED_REASON_TAG in run.data.tags:
        c.delete_tag(run_id, STOPPED_REASON_TAG)
    return uri, run.info.experiment_id, run_id


def run_status(cfg: ExperimentConfig, run_name: str) -> str | None:
    """The status of the distillation run named ``run_name`` (FINISHED, KILLED, ...), or None."""
    uri = tracking_uri(cfg)
    exp = client(uri).get_experiment_by_name(experiment_name(cfg))
    if exp is None:
        return None
    old = client(uri).search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1)
    return old[0].info.status if old else None


def start_distill_run(cfg: ExperimentConfig, run_name: str, ctx: RunContext | None = None) -> str:
    """Create (or, for a resumed Ray Train run of the same name, reopen) the MLflow run of one
    distillation, with its params and tags, before training starts; returns the run id.

    Per-epoch metrics are then logged by the training loop (:func:`log_epochs`, batched every
    ``distill.metrics_flush_s``; every epoch in an ASHA sweep, so a trial it stops keeps the epochs
    it ran); :func:`finish_distill_run` adds the final metric and artifacts."""
    uri = tracking_uri(cfg)
    exp_id = ensure_experiment(uri, experiment_name(cfg), layout.mlartifacts(cfg.output_dir))
    c = client(uri)
    tags = run_tags(cfg, ctx, run_name)
    old = c.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1)
    if old:  # --resume, or a trial restarted by Tune: one MLflow run per distillation
        rid = old[0].info.run_id
        c.update_run(rid, status=RunStatus.to_string(RunStatus.RUNNING))
        if STOPPED_REASON_TAG in old[0].data.tags:  # it goes on: why it stopped last time no longer holds
            c.delete_tag(rid, STOPPED_REASON_TAG)
        for k, v in tags.items():
            c.set_tag(rid, k, v)
        return rid
    rid = c.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
    params = [Param(k, v) for k, v in _params(cfg).items()]
    for i in range(0, len(params), 100):  # log_batch takes at most 100 params a call
        c.log_batch(rid, params=params[i : i + 100])
    return rid


MAX_METRICS_PER_BATCH = 1000  # MLflow's limit on one log_batch call


def log_run_params(uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    """Params that only the run itself knows (where it ran, its peak memory), logged by rank 0 at
    its end. MLflow refuses to change a param: one the run already has (a resumed run's) is kept."""
    c = client(uri)
    have = c.get_run(run_id).data.params
    new = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items() if k not in have]
    if new:
        c.log_batch(run_id, params=new)


def log_epochs(uri: str, run_id: str, epochs: Sequence[Mapping[str, Any]]) -> None:
    """Log the numeric metrics of several epochs (step = each one's ``epoch``) in as few calls as
    MLflow allows. Called by rank 0 of the training loop."""
    batch = [Metric(k, v, 0, int(m.get("epoch", 0))) for m in epochs for k, v in _numeric_metrics(m).items()]
    c = client(uri)
    for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
        c.log_batch(run_id, metrics=batch[i:i + MAX_METRICS_PER_BATCH])


def finish_distill_run(cfg: ExperimentConfig, run_id: str, final_top1: float | None, epochs: int,
                       student_path: Path | None, status: str = "FINISHED", final_val_top1: float | None = None) -> None:
    """Final metrics (at step ``epochs``: test top-1, and val top-1 where there is a validation
    split), the config YAML and the student checkpoint as artifacts, then the run's end status."""
    c = client(tracking_uri(cfg))
    try:
        finals = {"final/test_top1": final_top1, "final/val_top1": final_val_top1}
        if final_top1 is not None:
            c.log_batch(run_id, metrics=[Metric(k, float(v), 0, epochs) for k, v in finals.items() if v is not None])
        c.log_text(run_id, to_yaml(recorded_config(cfg)), "config.yaml")  # text: the writer may be on another node
        if student_path is not None and Path(student_path).exists():
            c.log_artifact(run_id, str(student_path), artifact_path="student")
        c.set_terminated(run_id, status)
    except BaseException:
        c.set_terminated(run_id, "FAILED")
        raise


STOPPED_REASON_TAG = "stopped_reason"
OWNER_TAG = "ekd.owner"  # "<host>:<pid>" of the process that holds a RUNNING run (see end_orphaned_runs)


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
    ended = []
    for exp in c.search_experiments():
        for r in c.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=10_000):
            who = r.data.tags.get(OWNER_TAG, "")
            if not owners.gone(who):
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
