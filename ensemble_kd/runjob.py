"""``ensemble-kd run``: the main job, end to end on one config.

1. train (or reuse) the teachers; 2. write (or reuse) their shards through Ray actors;
3. distil the student in every arm of ``run.arms`` over every seed of ``run.seeds``, plus the
small grid ``run.sweep`` on one arm, all as Ray Tune trials (each a Ray Train distillation and an
MLflow run nested under one parent run); 4. print the table and write ``summary.json`` and
``summary.png`` under the output folder.

Without arms, step 3 is the one ``distill`` run (what ``ensemble-kd distill`` does).
"""
from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ensemble_kd.checkpoint import atomic_write
from ensemble_kd.config import ArmConfig, ExperimentConfig, arm_config, to_dict

SUMMARY = "summary.json"
PLOT = "summary.png"


def best_teacher(teachers: dict[str, dict[str, Any]]) -> str | None:
    """The single teacher with the best test top-1 (ties: the first configured)."""
    scored = [(s["test_top1"], -i, n) for i, (n, s) in enumerate(teachers.items()) if s.get("test_top1") is not None]
    return max(scored)[2] if scored else None


def plan_trials(cfg: ExperimentConfig, best: str | None) -> list[dict[str, Any]]:
    """One Tune trial spec per (arm, seed), then one per sweep grid point: {base, overrides, tags, label}."""
    from ensemble_kd.tracking import run_tags

    trials = []
    arms = {a.name: a for a in cfg.run.arms}
    for arm in cfg.run.arms:
        for seed in cfg.run.seeds:
            c = arm_config(cfg, arm, best, seed)
            trials.append({"base": to_dict(c), "overrides": {}, "label": f"{arm.name}/seed{seed}",
                           "tags": {"arm": arm.name, "ekd.kind": "arm"}})
    sw = cfg.run.sweep
    if sw is not None:
        seed = cfg.run.seeds[0] if sw.seed is None else sw.seed
        c = arm_config(cfg, arms[sw.arm], best, seed)
        keys = list(sw.space)
        for values in itertools.product(*(sw.space[k]["grid"] for k in keys)):
            over = dict(zip(keys, values))
            short = " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in over.items())
            trials.append({"base": to_dict(c), "overrides": over, "label": f"sweep {sw.arm} {short}",
                           "tags": {"arm": f"sweep:{sw.arm}", "ekd.kind": "sweep", "method": run_tags(c)["method"]}})
    return trials


def effective_arms(cfg: ExperimentConfig) -> tuple[ArmConfig, ...]:
    """``run.arms``, or without any, the one ``distill`` run as an arm named 'distill'."""
    if cfg.run.arms:
        return cfg.run.arms
    return (ArmConfig(name="distill", teachers=tuple(cfg.distill.teachers), losses=cfg.distill.losses),)


def summarise(cfg: ExperimentConfig, teachers: dict[str, dict[str, Any]], best: str | None, trials, uri: str | None,
              parent: str | None, seconds: float) -> dict[str, Any]:
    """summary.json: teachers, arms (mean +- std over seeds), sweep points, where MLflow is."""
    from ensemble_kd.tracking import experiment_name, mean_std, run_tags

    arms: dict[str, Any] = {}
    by_name = {a.name: a for a in effective_arms(cfg)}
    for t in trials:
        arm = t.tags.get("arm", "")
        if t.tags.get("ekd.kind") != "arm" or "test_top1" not in t.metrics:
            continue
        a = arms.setdefault(arm, {"values": [], "seeds": []})
        a["values"].append(float(t.metrics["test_top1"]))
        a["seeds"].append(int(t.seed))
    out_arms = {}
    for name in by_name:  # in the config's order
        if name not in arms:
            continue
        c = arm_config(cfg, by_name[name], best, arms[name]["seeds"][0])
        tags = run_tags(c)
        mean, std = mean_std(arms[name]["values"])
        order = sorted(range(len(arms[name]["seeds"])), key=lambda i: arms[name]["seeds"][i])
        out_arms[name] = {"teacher_set": tags["teacher_set"], "teachers": list(c.distill.teachers), "method": tags["method"],
                          "mean_top1": mean, "std_top1": std, "seeds": [arms[name]["seeds"][i] for i in order],
                          "top1": [arms[name]["values"][i] for i in order]}
    sweep = []
    for t in trials:
        if t.tags.get("ekd.kind") == "sweep" and "test_top1" in t.metrics:
            p = {"overrides": t.overrides, "top1": float(t.metrics["test_top1"])}
            for k, v in t.overrides.items():
                if k.endswith(".tau") or k.endswith(".num_negatives"):
                    p[k.rsplit(".", 1)[-1]] = v
            sweep.append(p)
    return {
        "experiment": experiment_name(cfg), "mlflow_tracking_uri": uri, "parent_run_id": parent,
        "dataset": cfg.data.name, "student": {"arch": cfg.distill.student.arch, "modality": cfg.distill.student.modality},
        "epochs": cfg.distill.epochs, "teachers": {n: {"modality": s["modality"], "arch": s["arch"], "test_top1": s["test_top1"]}
                                                   for n, s in teachers.items()},
        "best_single_teacher": best, "arms": out_arms,
        "sweep": {"arm": cfg.run.sweep.arm, "points": sweep} if cfg.run.sweep is not None else None,
        "seconds": seconds,
    }


def write_summary(out: Path, summary: dict[str, Any]) -> tuple[Path, Path | None]:
    """summary.json (temp name, then rename) and its plot."""
    from ensemble_kd.plots import plot_comparison

    out.mkdir(parents=True, exist_ok=True)
    plot = None
    if summary["arms"]:
        groups = {n: {"values": a["top1"], "teacher_set": a["teacher_set"]} for n, a in summary["arms"].items()}
        pts = [p for p in (summary.get("sweep") or {}).get("points", []) if "tau" in p and "num_negatives" in p]
        plot = plot_comparison(groups, pts, out / PLOT, title=f"{summary['dataset']}: student "
                               f"{summary['student']['arch']} on {summary['student']['modality']}")
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


def run_main(cfg: ExperimentConfig, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole job; returns the summary (also written to <output_dir>/summary.json)."""
    from ensemble_kd.embed import run_embed
    from ensemble_kd.raycluster import ray_session
    from ensemble_kd.teachers import ensure_teachers, teacher_summary
    from ensemble_kd.tracking import tracking_uri

    t0 = time.perf_counter()
    out = Path(cfg.output_dir)
    log(f"ensemble-kd run: {cfg.name} on {cfg.data.name}, outputs under {out}")
    paths = ensure_teachers(cfg, progress=progress, log=log)
    teachers = teacher_summary(paths)
    best = best_teacher(teachers)
    uri = tracking_uri(cfg) if cfg.tracking.enabled else None
    parent, trials = None, []
    with ray_session(cfg.ray):
        shards = run_embed(cfg, paths, progress=progress, log=log)
        log(f"{len(shards)} shards under {cfg.shard_dir} ({sum(r.reused for r in shards)} reused); "
            f"inspect them with: ensemble-kd shards inspect {cfg.shard_dir}")
        if cfg.run.arms:
            from ray import tune

            from ensemble_kd.tune import run_trials

            specs = plan_trials(cfg, best)
            n_arm = len(cfg.run.arms) * len(cfg.run.seeds)
            log(f"run: {len(cfg.run.arms)} arms x {len(cfg.run.seeds)} seeds = {n_arm} distillations"
                + (f" + {len(specs) - n_arm} sweep trials on {cfg.run.sweep.arm}" if cfg.run.sweep else "")
                + f" (best single teacher: {best}), as Ray Tune trials")
            res = run_trials(cfg, {"trial": tune.grid_search(specs)}, name=f"{cfg.name}-run-{time.strftime('%Y%m%d-%H%M%S')}",
                             num_trials=len(specs), scheduler="fifo", parent_tags={"ekd.kind": "run"}, log=log)
            parent, trials = res.parent_run_id, res.trials
            failed = [t for t in trials if t.status == "ERROR"]
            if failed:
                log(f"run: {len(failed)} trial(s) failed: {[t.tags.get('arm') for t in failed]}; see the Tune folder")
        else:
            from ensemble_kd.train import run_distill
            from ensemble_kd.tune import TrialOutcome

            r = run_distill(cfg, log=log)
            trials = [TrialOutcome("", {}, {"arm": "distill", "ekd.kind": "arm"}, {"test_top1": r.final_top1},
                                   len(r.history), "TERMINATED", cfg.distill.seed)]
    summary = summarise(cfg, teachers, best, trials, uri, parent, time.perf_counter() - t0)
    path, plot = write_summary(out, summary)
    if parent is not None:  # the table and the plot belong to the job's parent run too
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        for f in (path, plot):
            if f is not None:
                client.log_artifact(parent, str(f))
    log("")
    for line in format_table(summary):
        log(line)
    log(f"\nsummary: {path}" + (f"; plot: {plot}" if plot else ""))
    if uri:
        from ensemble_kd.tracking import experiment_name

        log(f"MLflow: experiment {experiment_name(cfg)!r} at {uri}; compare with: ensemble-kd compare --out {cfg.output_dir} "
            f"--group-by arm; open the UI with: mlflow ui --backend-store-uri {uri}")
    log(f"done in {time.perf_counter() - t0:.1f}s")
    return summary
