"""The summary of `ensemble-kd run`: teachers, each arm's top-1 over seeds, the sweep's points,
as ``summary.json``, ``summary.png`` and the printed table."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ensemble_kd.core import layout
from ensemble_kd.storage.artifacts import TeacherSet
from ensemble_kd.core.files import atomic_write
from ensemble_kd.core.config import ExperimentConfig
from ensemble_kd.orchestration.plan import arm_config, effective_arms
from ensemble_kd.orchestration.plots import plot_comparison
from ensemble_kd.orchestration.sweep import TrialOutcome, failure
from ensemble_kd.core.stats import INTERVAL, format_paired, paired_difference
from ensemble_kd.storage.mlflow_store import experiment_name
from ensemble_kd.training.tracking import label_setting, method_name, teacher_set
from ensemble_kd.orchestration.compare import mean_std, sweep_axes

SUMMARY = layout.SUMMARY
PLOT = layout.PLOT


def _arm_rows(cfg: ExperimentConfig, trials: Sequence[TrialOutcome], best: str | None) -> dict[str, Any]:
    """Each arm (in the config's order): teacher set, labels, method, mean +- std of top-1 over the
    seeds that finished (TERMINATED); a trial that did not is left to :func:`_unfinished`."""
    acc: dict[str, dict[int, float]] = {}
    val: dict[str, dict[int, float]] = {}  # where there is a validation split: what selection read
    for t in trials:
        if t.trial.context.kind == "arm" and _finished(t):
            acc.setdefault(t.trial.context.arm or "", {})[t.seed] = float(t.metrics["test_top1"])
            if isinstance(t.metrics.get("val_top1"), (int, float)):
                val.setdefault(t.trial.context.arm or "", {})[t.seed] = float(t.metrics["val_top1"])
    rows = {}
    for arm in effective_arms(cfg):
        if arm.name not in acc:
            continue
        by_seed = dict(sorted(acc[arm.name].items()))
        c = arm_config(cfg, arm, best, next(iter(by_seed)))
        mean, std = mean_std(list(by_seed.values()))
        rows[arm.name] = {"teacher_set": teacher_set(c), "teachers": list(c.distill.teachers), "method": method_name(c),
                          "labels": label_setting(c), "mean_top1": mean, "std_top1": std, "seeds": list(by_seed),
                          "top1": list(by_seed.values())}
        if set(val.get(arm.name, {})) == set(by_seed):  # only with a validation split: no key otherwise
            vals = [val[arm.name][sd] for sd in by_seed]
            vmean, vstd = mean_std(vals)
            rows[arm.name].update({"mean_val_top1": vmean, "std_val_top1": vstd, "val_top1": vals})
        missing = sorted({t.seed for t in trials if t.trial.context.kind == "arm" and t.trial.context.arm == arm.name}
                         - set(by_seed))
        if missing:  # some seeds did not finish (listed under `unfinished`): only then is the key there
            rows[arm.name]["unfinished_seeds"] = missing
    return rows


def _finished(t: TrialOutcome) -> bool:
    """Ran every epoch and reported a top-1: the only trials averaged."""
    return t.status == "TERMINATED" and "test_top1" in t.metrics


def reason(t: TrialOutcome) -> str:
    """Why a trial did not finish, in one line: a failed trial's error (the project's own message
    out of Ray's wrappers, else its type and first line), else what stopped it."""
    if t.status == "ERROR":
        return failure(t.error)
    if t.status == "STOPPED":
        return f"stopped after {t.epochs} of {t.trial.epochs} epochs"
    return "reported no test top-1"


def _unfinished(trials: Sequence[TrialOutcome]) -> list[dict[str, Any]]:
    """Trials that did not finish (ERROR, STOPPED, no top-1), shown apart and never averaged in,
    each with its ``reason`` (one line)."""
    return [{"trial": t.trial.label, "arm": t.trial.context.arm, "seed": t.seed, "status": t.status, "epochs": t.epochs,
             "last_test_top1": t.metrics.get("test_top1"), "reason": reason(t)} for t in trials if not _finished(t)]


def _failed(cfg: ExperimentConfig, trials: Sequence[TrialOutcome]) -> dict[str, Any]:
    """What has no finished trial at all, with why (keys only where something failed):
    ``failed_arms`` (arm -> one line) and ``failed_sweep`` (one line). Such a run exits 1."""
    out: dict[str, Any] = {}
    arms: dict[str, str] = {}
    for arm in cfg.run.arms:
        mine = [t for t in trials if t.trial.context.kind == "arm" and t.trial.context.arm == arm.name]
        if mine and not any(_finished(t) for t in mine):
            arms[arm.name] = _why_none(mine)
    if arms:
        out["failed_arms"] = arms
    sweep = [t for t in trials if t.trial.context.kind == "sweep"]
    if sweep and not any(_finished(t) for t in sweep):
        out["failed_sweep"] = _why_none(sweep)
    return out


def _why_none(trials: Sequence[TrialOutcome]) -> str:
    """``all 2 trials did not finish: <the first one's reason>`` (and how many other reasons)."""
    reasons = [reason(t) for t in trials]
    other = len(set(reasons)) - 1
    return ((f"all {len(trials)} trials did not finish: " if len(trials) > 1 else "its trial did not finish: ") + reasons[0]
            + (f" (and {other} other reason{'s' if other > 1 else ''}: see `unfinished`)" if other else ""))


def _baseline(rows: dict[str, Any], name: str, fits) -> str | None:
    """The first other arm (config order) that ``fits`` this arm's row, with the same label setting."""
    me = rows[name]
    return next((n for n, r in rows.items() if n != name and r["labels"] == me["labels"] and fits(r, me)), None)


BASELINES = {
    # the student alone: no teacher, same labels
    "vs_student": lambda r, me: r["teacher_set"] == "none",
    # KD with the same teacher set: exactly CE + KD, the same teachers, same labels
    "vs_kd": lambda r, me: r["method"] == "ce+kd" and r["teachers"] == me["teachers"] and bool(me["teachers"]),
}


def _add_paired(rows: dict[str, Any]) -> dict[str, Any] | None:
    """Each arm's paired differences (same seed, same labelled subset) to its baselines
    (:data:`BASELINES`), and its top-1 as a fraction of the reference: the first fully labelled
    arm without teachers (returned)."""
    for name, row in rows.items():
        for key, fits in BASELINES.items():
            base = _baseline(rows, name, fits)
            p = paired_difference(dict(zip(row["seeds"], row["top1"])),
                                  dict(zip(rows[base]["seeds"], rows[base]["top1"]))) if base else None
            row[key] = {"baseline": base, **p} if p else None
    ref = next((n for n, r in rows.items() if r["teacher_set"] == "none" and r["labels"] == "all"), None)
    for row in rows.values():
        row["of_reference"] = row["mean_top1"] / rows[ref]["mean_top1"] if ref and rows[ref]["mean_top1"] else None
    return {"arm": ref, "mean_top1": rows[ref]["mean_top1"], "labels": "all"} if ref else None


def _sweep_points(trials: Sequence[TrialOutcome]) -> list[dict[str, Any]]:
    """Each sweep trial's overrides (also under their last key component: ``tau``) and top-1."""
    points = []
    for t in trials:
        if t.trial.context.kind == "sweep" and _finished(t):
            points.append({"overrides": t.overrides, "top1": float(t.metrics["test_top1"]),
                           **({"val_top1": float(t.metrics["val_top1"])} if "val_top1" in t.metrics else {}),
                           **{k.rsplit(".", 1)[-1]: v for k, v in t.overrides.items()}})
    return points


def _sweep(cfg: ExperimentConfig, trials: Sequence[TrialOutcome], best: str | None) -> dict[str, Any] | None:
    sw = cfg.run.sweep
    if sw is None:
        return None
    arm = next(a for a in cfg.run.arms if a.name == sw.arm)
    axes = sweep_axes([t.name for t in arm_config(cfg, arm, best, cfg.run.seeds[0]).distill.losses])
    return {"arm": sw.arm, "axes": list(axes or ()), "points": _sweep_points(trials)}


def selection_line(selection: str) -> str:
    """The one console line that says which split chose the best runs (``summary.json``'s ``selection``)."""
    if selection == "val":
        return ("selection: on the validation split (val_top1: Tune, compare's best run, export --arm); "
                "test top-1 is reported for what was chosen")
    return ("selection: on the test split (no validation split; data.val_fraction, or a table's `val` rows, "
            "gives one)")


def summarise(cfg: ExperimentConfig, teachers: TeacherSet, best: str | None, trials: Sequence[TrialOutcome],
              uri: str | None, parent: str | None, seconds: float, selection: str | None = None) -> dict[str, Any]:
    """summary.json: teachers, arms (mean +- std over seeds, paired differences to their baselines),
    the reference line, sweep points, the trials that did not finish (apart), where MLflow is, and
    ``selection``: the split that chose the best runs, ``val`` or ``test`` (default: val where a
    trial reported val top-1)."""
    if selection is None:
        selection = "val" if any("val_top1" in t.metrics for t in trials) else "test"
    arms = _arm_rows(cfg, trials, best)
    reference = _add_paired(arms)
    return {
        "experiment": experiment_name(cfg), "mlflow_tracking_uri": uri, "parent_run_id": parent,
        "dataset": cfg.data.name, "student": {"arch": cfg.distill.student.arch, "modality": cfg.distill.student.modality},
        "epochs": cfg.distill.epochs,
        "teachers": {n: {"modality": t.modality, "arch": t.arch, "test_top1": t.test_top1} for n, t in teachers.items()},
        "best_single_teacher": best, "arms": arms, "reference": reference, "interval": f"95% {INTERVAL} interval",
        "unfinished": _unfinished(trials), "sweep": _sweep(cfg, trials, best),
        "seconds": seconds, "selection": selection, **_failed(cfg, trials),
    }


def write_summary(out: Path, summary: dict[str, Any]) -> tuple[Path, Path | None]:
    """summary.json (temp name, then rename) and its plot."""
    out.mkdir(parents=True, exist_ok=True)
    plot = None
    if summary["arms"]:
        groups = {n: {"values": a["top1"], "teacher_set": a["teacher_set"], "labels": a.get("labels", "all")}
                  for n, a in summary["arms"].items()}
        paired = {n: a["vs_student"] for n, a in summary["arms"].items() if a.get("vs_student")}
        ref = summary.get("reference")
        sw = summary.get("sweep") or {}
        axes = tuple(sw.get("axes") or ())
        pts = [p for p in sw.get("points", []) if len(axes) == 2 and all(a in p for a in axes)]
        plot = plot_comparison(groups, pts, out / PLOT, title=f"{summary['dataset']}: student "
                               f"{summary['student']['arch']} on {summary['student']['modality']}", axes=axes or None,
                               reference=(f"{ref['arm']} (all labels)", ref["mean_top1"]) if ref else None,
                               paired=paired, paired_title="paired difference to the student alone, same labels")
        summary = {**summary, "plot": str(plot)}
    path = atomic_write(out / SUMMARY, lambda f: f.write(json.dumps(summary, indent=2).encode()))
    return path, plot


def format_table(summary: dict[str, Any]) -> list[str]:
    """The printed summary: teachers, arms, paired differences, the trials that did not finish, the sweep."""
    lines = [f"{'teacher':<16} {'arch':<11} {'modality':<9} test top-1"]
    for n, t in summary["teachers"].items():
        star = "  (best single)" if n == summary["best_single_teacher"] else ""
        lines.append(f"{n:<16} {t['arch']:<11} {t['modality']:<9} {t['test_top1']:.4f}{star}")
    if summary["arms"]:
        lines += _arm_lines(summary) + _paired_lines(summary["arms"])
    if summary.get("unfinished"):
        lines += ["", "did not finish (shown apart, not averaged):"]
        for u in summary["unfinished"]:
            last = u.get("last_test_top1")
            lines.append(f"  {u['trial']:<28} {u['status']:<10} after {u['epochs']} epochs"
                         + (f", last top-1 {last:.4f}" if isinstance(last, (int, float)) else "")
                         + (f": {u['reason']}" if u.get("reason") else ""))
    failed = dict(summary.get("failed_arms") or {})
    if summary.get("failed_sweep"):
        failed[f"sweep on {(summary.get('sweep') or {}).get('arm')}"] = summary["failed_sweep"]
    if failed:
        lines += ["", "FAILED: no finished trial, nothing averaged (the command exits 1):"]
        lines += [f"  {n}: {why}" for n, why in failed.items()]
    sw = summary.get("sweep")
    if sw and sw["points"]:
        lines += ["", f"sweep on {sw['arm']}:"]
        for p in sorted(sw["points"], key=lambda p: -p.get("val_top1", p["top1"])):  # in the order selection ranks them
            lines.append("  " + " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in p["overrides"].items()) + f"  top-1 {p['top1']:.4f}"
                         + (f"  val top-1 {p['val_top1']:.4f}" if "val_top1" in p else ""))
    return lines + ["", selection_line(summary.get("selection", "test"))]


def _arm_lines(summary: dict[str, Any]) -> list[str]:
    s = summary["student"]
    lines = ["", f"student {s['arch']} on {s['modality']}, {summary['epochs']} epochs; top-1 mean +- std over the seeds that finished",
             f"{'arm':<20} {'labels':<11} {'set':<9} {'method':<12} {'teachers':<26} {'top-1':<17} {'seeds':<5} of ref"]
    for n, a in summary["arms"].items():
        ref = f"{a['of_reference']:.1%}" if a.get("of_reference") else "-"
        seeds = str(len(a["seeds"])) + (f"/{len(a['seeds']) + len(a['unfinished_seeds'])}" if a.get("unfinished_seeds") else "")
        lines.append(f"{n:<20} {a.get('labels', 'all'):<11} {a['teacher_set']:<9} {a['method']:<12} "
                     f"{','.join(a['teachers']) or '-':<26} {a['mean_top1']:.4f} +- {a['std_top1']:.4f} {seeds:<5} {ref}"
                     + (f"  val {a['mean_val_top1']:.4f} +- {a['std_val_top1']:.4f}" if "mean_val_top1" in a else "")
                     + (f"  (seeds {', '.join(map(str, a['unfinished_seeds']))} did not finish: below)"
                        if a.get("unfinished_seeds") else ""))
    if summary.get("reference"):
        lines.append(f"(of ref: the arm's mean top-1 as a fraction of {summary['reference']['arm']}'s, the student alone "
                     "with every label)")
    return lines


def _paired_lines(arms: dict[str, Any]) -> list[str]:
    """Each arm against the student alone and against KD from the same teachers (same labels)."""
    if not any(a.get("vs_student") or a.get("vs_kd") for a in arms.values()):
        return []
    lines = ["", f"paired differences over seeds (same seed, same labelled subset): mean [95% {INTERVAL} interval] "
                 "seeds improved/pairs",
             f"{'arm':<20} {'vs the student alone':<46} vs KD from the same teachers"]
    for n, a in arms.items():
        cols = [f"{format_paired(p)} ({p['baseline']})" if p else "-" for p in (a.get("vs_student"), a.get("vs_kd"))]
        lines.append(f"{n:<20} {cols[0]:<46} {cols[1]}")
    return lines
