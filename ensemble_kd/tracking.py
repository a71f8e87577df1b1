"""MLflow tracking: one run per distillation, tags that make ensemble-vs-single a filter.

The store defaults to a SQLite file under the output folder (``sqlite:///<out>/mlflow.db``;
mlflow 3.17 refuses the plain file store); ``MLFLOW_TRACKING_URI`` or ``tracking.uri`` point it
at a server on a cluster. The database and the experiment are created once, in the driver,
before any run starts (two processes migrating a fresh SQLite file at once fail).

Per run: params = the flattened config; metrics = every numeric per-epoch value of the
history (step = epoch) plus ``final/test_top1``; tags = ``teacher_set`` (none / single /
ensemble), ``teachers``, ``teacher_modalities``, ``student_modality``, ``student_arch``,
``dataset``, ``method``; artifacts = the config YAML and the final student checkpoint.
"""
from __future__ import annotations

import math
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from ensemble_kd.config import ExperimentConfig, flatten, to_yaml

class TrackingError(ValueError):
    """An MLflow store or experiment that cannot be used; the message names it."""


MAX_PARAM_LEN = 500  # MLflow caps param values; long lists are cut (the config YAML is an artifact)


def tracking_uri(cfg: ExperimentConfig) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else a SQLite file under the output folder."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(cfg.output_dir) / 'mlflow.db'}"


def experiment_name(cfg: ExperimentConfig) -> str:
    return cfg.tracking.experiment or cfg.name


def ensure_experiment(uri: str, name: str, artifact_root: Path | None = None) -> str:
    """Create (or find) the experiment once; returns its id. Creates the SQLite schema too."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    loc = None
    if uri.startswith("sqlite:///") and artifact_root is not None:
        loc = (artifact_root / name).resolve().as_uri()  # keep artifacts beside the database, not in the CWD
    return client.create_experiment(name, artifact_location=loc)


def run_tags(cfg: ExperimentConfig) -> dict[str, str]:
    """The tags that make comparisons a filter."""
    d = cfg.distill
    k = len(d.teachers)
    return {
        "teacher_set": "none" if k == 0 else "single" if k == 1 else "ensemble",
        "teachers": ",".join(d.teachers) or "none",
        "teacher_modalities": ",".join(sorted({cfg.teacher(n).modality for n in d.teachers})) or "none",
        "student_modality": d.student.modality,
        "student_arch": d.student.arch,
        "dataset": cfg.data.name,
        "method": "+".join(t.name for t in d.losses),
        "seed": str(d.seed),
    }


def _params(cfg: ExperimentConfig) -> dict[str, str]:
    return {k: str(v)[:MAX_PARAM_LEN] for k, v in flatten(cfg).items()}


RUN_NAME_TAG = "ekd.run_name"  # the Ray Train run name: a resumed run continues its MLflow run


def _numeric_metrics(h: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in h.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)) and k != "epoch"}


def start_distill_run(cfg: ExperimentConfig, run_name: str, extra_tags: dict[str, str] | None = None,
                      parent_run_id: str | None = None) -> str:
    """Create (or, for a resumed Ray Train run of the same name, reopen) the MLflow run of one
    distillation, with its params and tags, before training starts; returns the run id.

    Per-epoch metrics are then logged by the training loop (:func:`log_epoch`), so a trial that
    ASHA stops keeps the epochs it ran; :func:`finish_distill_run` adds the final metric and artifacts."""
    from mlflow.entities import Param, RunStatus
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    exp_id = ensure_experiment(uri, experiment_name(cfg), Path(cfg.output_dir) / "mlartifacts")
    client = MlflowClient(uri)
    tags = {**run_tags(cfg), **(extra_tags or {}), RUN_NAME_TAG: run_name}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    old = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1)
    if old:  # --resume, or a trial restarted by Tune: one MLflow run per distillation
        rid = old[0].info.run_id
        client.update_run(rid, status=RunStatus.to_string(RunStatus.RUNNING))
        for k, v in tags.items():
            client.set_tag(rid, k, v)
        return rid
    rid = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
    params = [Param(k, v) for k, v in _params(cfg).items()]
    for i in range(0, len(params), 100):  # log_batch takes at most 100 params a call
        client.log_batch(rid, params=params[i : i + 100])
    return rid


_CLIENTS: dict[str, Any] = {}


def log_epoch(uri: str, run_id: str, metrics: dict[str, Any]) -> None:
    """Log one epoch's numeric metrics (step = epoch). Called by rank 0 of the training loop."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = _CLIENTS.setdefault(uri, MlflowClient(uri))
    step = int(metrics.get("epoch", 0))
    client.log_batch(run_id, metrics=[Metric(k, v, 0, step) for k, v in _numeric_metrics(metrics).items()])


def finish_distill_run(cfg: ExperimentConfig, run_id: str, final_top1: float | None, epochs: int,
                       student_path: Path | None, status: str = "FINISHED") -> None:
    """Final metric (at step ``epochs``), the config YAML and the student checkpoint as artifacts,
    then the run's end status."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(cfg))
    try:
        if final_top1 is not None:
            client.log_batch(run_id, metrics=[Metric("final/test_top1", float(final_top1), 0, epochs)])
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "config.yaml"
            p.write_text(to_yaml(cfg))
            client.log_artifact(run_id, str(p))
        if student_path is not None and Path(student_path).exists():
            client.log_artifact(run_id, str(student_path), artifact_path="student")
        client.set_terminated(run_id, status)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise


def fail_distill_run(cfg: ExperimentConfig, run_id: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri(cfg)).set_terminated(run_id, "FAILED")


def end_unfinished_children(uri: str, experiment_id: str, parent_run_id: str, status: str = "KILLED",
                            reason: str = "stopped early by the Tune scheduler") -> list[str]:
    """Children of a sweep left RUNNING (trials that ASHA stopped are killed mid-epoch, before
    their own code could end the run) get ``status`` and a ``stopped_reason`` tag."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' "
                              "and attributes.status = 'RUNNING'", max_results=10_000)
    for r in runs:
        client.set_tag(r.info.run_id, "stopped_reason", reason)
        client.set_terminated(r.info.run_id, status)
    return [r.info.run_id for r in runs]


def crd_point(params: dict[str, str]) -> dict[str, float] | None:
    """(tau, num_negatives) of a run's contrastive loss term (crd or gacd) from its flattened params;
    an option the config left out takes the loss builder's default (what the run actually used)."""
    import inspect
    import re

    from ensemble_kd.losses import LOSSES

    for k, v in params.items():
        m = re.fullmatch(r"distill\.losses\.(\d+)\.name", k)
        if m and v in ("crd", "gacd"):
            i = m.group(1)
            defaults = {p.name: p.default for p in inspect.signature(LOSSES.get(v)).parameters.values()}
            tau = params.get(f"distill.losses.{i}.kwargs.tau", defaults["tau"])
            n = params.get(f"distill.losses.{i}.kwargs.num_negatives", defaults["num_negatives"])
            return {"tau": float(tau), "num_negatives": int(float(n))}
    return None


def mean_std(vals: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of top-1 over runs, e.g. seeds."""
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def compare(uri: str, experiment: str, group_by: str = "teacher_set") -> dict[str, Any]:
    """Mean +- std (sample std over the runs, e.g. seeds) of the final test top-1 per value of tag
    ``group_by``, the best run of each, and ``sweep``: the runs' CRD (tau, N, top-1) points where
    tau or N vary across the experiment (for the plot)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        known = [e.name for e in client.search_experiments()]
        raise TrackingError(f"no MLflow experiment {experiment!r} at {uri}; experiments: {known}")
    groups: dict[str, list[Any]] = {}
    points = []
    for r in client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'", max_results=50_000):
        top1 = r.data.metrics.get("final/test_top1")
        if top1 is None:
            continue
        groups.setdefault(r.data.tags.get(group_by, "(untagged)"), []).append((top1, r))
        pt = crd_point(r.data.params)
        if pt is not None:
            points.append({**pt, "top1": top1})
    rows = {}
    for g, runs in sorted(groups.items()):
        vals = [v for v, _ in runs]
        best_v, best = max(runs, key=lambda x: x[0])
        sets = {r.data.tags.get("teacher_set") for _, r in runs}
        mean, std = mean_std(vals)
        rows[g] = {
            "runs": len(vals),
            "mean_top1": mean,
            "std_top1": std,
            "best_top1": best_v,
            "values": vals,
            "teacher_set": sets.pop() if len(sets) == 1 else None,
            "best_run": {"run_id": best.info.run_id, "run_name": best.info.run_name, "method": best.data.tags.get("method"),
                         "teachers": best.data.tags.get("teachers")},
        }
    varied = len({p["tau"] for p in points}) > 1 or len({p["num_negatives"] for p in points}) > 1
    sweep = _mean_points(points) if varied else []
    return {"tracking_uri": uri, "experiment": experiment, "group_by": group_by, "groups": rows, "sweep": sweep}


def _mean_points(points: list[dict[str, float]]) -> list[dict[str, float]]:
    """Average the top-1 of runs at the same (tau, N)."""
    acc: dict[tuple[float, int], list[float]] = {}
    for p in points:
        acc.setdefault((p["tau"], p["num_negatives"]), []).append(p["top1"])
    return [{"tau": t, "num_negatives": n, "top1": statistics.fmean(v), "runs": len(v)} for (t, n), v in sorted(acc.items())]
