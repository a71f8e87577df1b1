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
    return f"sqlite:///{(Path(cfg.output_dir).resolve() / 'mlflow.db')}"


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


def log_distill_run(cfg: ExperimentConfig, history: list[dict[str, Any]], student_path: Path | None,
                    run_name: str, extra_tags: dict[str, str] | None = None, parent_run_id: str | None = None) -> str:
    """Record one finished distillation in MLflow; returns the MLflow run id."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    exp_id = ensure_experiment(uri, experiment_name(cfg), Path(cfg.output_dir) / "mlartifacts")
    client = MlflowClient(uri)
    tags = {**run_tags(cfg), **(extra_tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    rid = run.info.run_id
    try:
        from mlflow.entities import Metric, Param

        params = [Param(k, v) for k, v in _params(cfg).items()]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params a call
            client.log_batch(rid, params=params[i : i + 100])
        metrics = []
        for h in history:
            step = int(h.get("epoch", 0))
            for k, v in h.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)) and k != "epoch":
                    metrics.append(Metric(k, float(v), 0, step))
        final = next((h["test_top1"] for h in reversed(history) if "test_top1" in h), None)
        if final is not None:
            metrics.append(Metric("final/test_top1", float(final), 0, len(history)))
        for i in range(0, len(metrics), 1000):
            client.log_batch(rid, metrics=metrics[i : i + 1000])
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "config.yaml"
            p.write_text(to_yaml(cfg))
            client.log_artifact(rid, str(p))
        if student_path is not None and Path(student_path).exists():
            client.log_artifact(rid, str(student_path), artifact_path="student")
        client.set_terminated(rid, "FINISHED")
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise
    return rid


def compare(uri: str, experiment: str, group_by: str = "teacher_set") -> dict[str, Any]:
    """Mean +- std of final test top-1 per value of tag ``group_by``, and the best run of each."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        known = [e.name for e in client.search_experiments()]
        raise TrackingError(f"no MLflow experiment {experiment!r} at {uri}; experiments: {known}")
    groups: dict[str, list[Any]] = {}
    for r in client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'", max_results=50_000):
        top1 = r.data.metrics.get("final/test_top1")
        if top1 is None:
            continue
        groups.setdefault(r.data.tags.get(group_by, "(untagged)"), []).append((top1, r))
    rows = {}
    for g, runs in sorted(groups.items()):
        vals = [v for v, _ in runs]
        best_v, best = max(runs, key=lambda x: x[0])
        rows[g] = {
            "runs": len(vals),
            "mean_top1": statistics.fmean(vals),
            "std_top1": statistics.pstdev(vals) if len(vals) > 1 else 0.0,
            "best_top1": best_v,
            "best_run": {"run_id": best.info.run_id, "run_name": best.info.run_name, "method": best.data.tags.get("method"),
                         "teachers": best.data.tags.get("teachers")},
        }
    return {"tracking_uri": uri, "experiment": experiment, "group_by": group_by, "groups": rows}
