"""Comparing finished distillations in an MLflow store: `ensemble-kd compare` and the sweep plot.

Groups the runs of an experiment by a tag (``teacher_set`` by default), mean +- std of the final
test top-1 per group, the best run of each (on val top-1 where there is a validation split), the
paired difference to a baseline group over shared seeds, and the runs' points on their loss's
sweep axes. ``report.py`` builds the same rows from Tune's trials with :func:`mean_std` and
:func:`sweep_axes` from here.
"""
from __future__ import annotations

import json
import re
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ensemble_kd.core import layout
from ensemble_kd.core.stats import paired_difference
from ensemble_kd.losses import LOSSES
from ensemble_kd.losses.base import loss_options
from ensemble_kd.storage.artifacts import summary_store
from ensemble_kd.storage.mlflow_store import RUN_NAME_TAG, TrackingError, client, sqlite_path


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
    ``group_by``, the best run of each (chosen on val top-1 where the runs have a validation split:
    ``selection``), and ``sweep``: the runs' points on their loss's sweep axes
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
    selection = "val" if rows and all(r["selection"] == "val" for r in rows.values()) else "test"
    return {"tracking_uri": uri, "experiment": experiment, "group_by": group_by, "baseline": baseline, "groups": rows,
            "unfinished": unfinished, "sweep": sweep, "selection": selection}




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
    path = layout.summary(out)
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
        return uri, with_runs[0], f"the only experiment with distillation runs at {uri} ({out} has no {layout.SUMMARY})"
    if not with_runs:
        raise TrackingError(f"{out} has no {layout.SUMMARY} to name its experiment, and the MLflow store at {uri} holds no "
                            f"distillation runs: nothing to compare (a `ensemble-kd run` or `distill` with --out {out} "
                            f"writes them; --uri URI reads another store)")
    raise TrackingError(f"{out} has no {layout.SUMMARY} to name its experiment, and the MLflow store at {uri} holds "
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
    """One group's row: count, mean +- std, best run, its label setting and each seed's latest top-1.
    The best run is chosen on val top-1 where every run has one (a validation split; ``selection``
    says which), and reported with its test top-1 (``best_top1``)."""
    vals = [v for v, _ in runs]
    on_val = all("final/val_top1" in r.data.metrics for _, r in runs)
    best_v, best = max(runs, key=lambda x: x[1].data.metrics["final/val_top1"] if on_val else x[0])
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
        **({"best_val_top1": best.data.metrics["final/val_top1"],
            "mean_val_top1": statistics.fmean(r.data.metrics["final/val_top1"] for _, r in runs)} if on_val else {}),
        "selection": "val" if on_val else "test",
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
