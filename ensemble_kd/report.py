"""The summary of `ensemble-kd run`: teachers, each arm's top-1 over seeds, the sweep's points,
as ``summary.json``, ``summary.png`` and the printed table."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ensemble_kd.artifacts import TeacherSet
from ensemble_kd.checkpoint import atomic_write
from ensemble_kd.config import ExperimentConfig
from ensemble_kd.plan import arm_config, effective_arms
from ensemble_kd.plots import plot_comparison
from ensemble_kd.sweep import TrialOutcome
from ensemble_kd.tracking import experiment_name, mean_std, method_name, sweep_axes, teacher_set

SUMMARY = "summary.json"
PLOT = "summary.png"


def _arm_rows(cfg: ExperimentConfig, trials: Sequence[TrialOutcome], best: str | None) -> dict[str, Any]:
    """Each arm (in the config's order): teacher set, method, mean +- std of top-1 over seeds."""
    acc: dict[str, dict[str, list]] = {}
    for t in trials:
        if t.trial.context.kind != "arm" or "test_top1" not in t.metrics:
            continue
        a = acc.setdefault(t.trial.context.arm or "", {"values": [], "seeds": []})
        a["values"].append(float(t.metrics["test_top1"]))
        a["seeds"].append(t.seed)
    rows = {}
    for arm in effective_arms(cfg):
        if arm.name not in acc:
            continue
        values, seeds = acc[arm.name]["values"], acc[arm.name]["seeds"]
        c = arm_config(cfg, arm, best, seeds[0])
        mean, std = mean_std(values)
        order = sorted(range(len(seeds)), key=lambda i: seeds[i])
        rows[arm.name] = {"teacher_set": teacher_set(c), "teachers": list(c.distill.teachers), "method": method_name(c),
                          "mean_top1": mean, "std_top1": std, "seeds": [seeds[i] for i in order],
                          "top1": [values[i] for i in order]}
    return rows


def _sweep_points(trials: Sequence[TrialOutcome]) -> list[dict[str, Any]]:
    """Each sweep trial's overrides (also under their last key component: ``tau``) and top-1."""
    points = []
    for t in trials:
        if t.trial.context.kind == "sweep" and "test_top1" in t.metrics:
            points.append({"overrides": t.overrides, "top1": float(t.metrics["test_top1"]),
                           **{k.rsplit(".", 1)[-1]: v for k, v in t.overrides.items()}})
    return points


def _sweep(cfg: ExperimentConfig, trials: Sequence[TrialOutcome], best: str | None) -> dict[str, Any] | None:
    sw = cfg.run.sweep
    if sw is None:
        return None
    arm = next(a for a in cfg.run.arms if a.name == sw.arm)
    axes = sweep_axes([t.name for t in arm_config(cfg, arm, best, cfg.run.seeds[0]).distill.losses])
    return {"arm": sw.arm, "axes": list(axes or ()), "points": _sweep_points(trials)}


def summarise(cfg: ExperimentConfig, teachers: TeacherSet, best: str | None, trials: Sequence[TrialOutcome],
              uri: str | None, parent: str | None, seconds: float) -> dict[str, Any]:
    """summary.json: teachers, arms (mean +- std over seeds), sweep points, where MLflow is."""
    return {
        "experiment": experiment_name(cfg), "mlflow_tracking_uri": uri, "parent_run_id": parent,
        "dataset": cfg.data.name, "student": {"arch": cfg.distill.student.arch, "modality": cfg.distill.student.modality},
        "epochs": cfg.distill.epochs,
        "teachers": {n: {"modality": t.modality, "arch": t.arch, "test_top1": t.test_top1} for n, t in teachers.items()},
        "best_single_teacher": best, "arms": _arm_rows(cfg, trials, best),
        "sweep": _sweep(cfg, trials, best),
        "seconds": seconds,
    }


def write_summary(out: Path, summary: dict[str, Any]) -> tuple[Path, Path | None]:
    """summary.json (temp name, then rename) and its plot."""
    out.mkdir(parents=True, exist_ok=True)
    plot = None
    if summary["arms"]:
        groups = {n: {"values": a["top1"], "teacher_set": a["teacher_set"]} for n, a in summary["arms"].items()}
        sw = summary.get("sweep") or {}
        axes = tuple(sw.get("axes") or ())
        pts = [p for p in sw.get("points", []) if len(axes) == 2 and all(a in p for a in axes)]
        plot = plot_comparison(groups, pts, out / PLOT, title=f"{summary['dataset']}: student "
                               f"{summary['student']['arch']} on {summary['student']['modality']}", axes=axes or None)
        summary = {**summary, "plot": str(plot)}
    path = atomic_write(out / SUMMARY, lambda f: f.write(json.dumps(summary, indent=2).encode()))
    return path, plot


def format_table(summary: dict[str, Any]) -> list[str]:
    lines = [f"{'teacher':<16} {'arch':<11} {'modality':<9} test top-1"]
    for n, t in summary["teachers"].items():
        star = "  (best single)" if n == summary["best_single_teacher"] else ""
        lines.append(f"{n:<16} {t['arch']:<11} {t['modality']:<9} {t['test_top1']:.4f}{star}")
    if summary["arms"]:
        s = summary["student"]
        lines += ["", f"student {s['arch']} on {s['modality']}, {summary['epochs']} epochs; top-1 mean +- std over seeds",
                  f"{'arm':<18} {'set':<9} {'method':<12} {'teachers':<26} {'top-1':<17} seeds"]
        for n, a in summary["arms"].items():
            lines.append(f"{n:<18} {a['teacher_set']:<9} {a['method']:<12} {','.join(a['teachers']) or '-':<26} "
                         f"{a['mean_top1']:.4f} +- {a['std_top1']:.4f} {len(a['seeds'])}")
    sw = summary.get("sweep")
    if sw and sw["points"]:
        lines += ["", f"sweep on {sw['arm']}:"]
        for p in sorted(sw["points"], key=lambda p: -p["top1"]):
            lines.append("  " + " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in p["overrides"].items()) + f"  top-1 {p['top1']:.4f}")
    return lines
