"""``ensemble-kd`` command line.

    ensemble-kd run [--config FILE] [--out DIR] [--resume]  the main job (teachers -> shards -> distilled student)
    ensemble-kd teachers train [--config FILE]        train (or reuse) the teacher checkpoints
    ensemble-kd embed [--config FILE]                 teachers -> Arrow shards (Ray tasks, one or more per teacher)
    ensemble-kd select [--config FILE]                DFND: keep the pool rows the teachers are sure of
    ensemble-kd distill [--config FILE] [--resume]    distil the student (Ray Train, CE + KD + CRD ...)
    ensemble-kd tune [--config FILE] [--resume]       Ray Tune sweep over tune.space (ASHA, grid/random)
    ensemble-kd compare [--experiment NAME] [--baseline GROUP] [--json] [--plot FILE]  ensemble-vs-single table from MLflow
    ensemble-kd export [--run NAME|PATH | --arm ARM] [--dest DIR]  the student as TorchScript, ONNX, MLflow model
    ensemble-kd data prepare [--config FILE]          write the dataset's memory-mapped Arrow store (else: on first use)
    ensemble-kd shards inspect DIR [--verify]         JSON summary of shards
    ensemble-kd list datasets|encoders|losses [--config FILE]  registered names (with the config's plugins), their options
    ensemble-kd config show|docs [--config FILE] [--markdown]  the resolved config / every field by YAML path (type, default, doc)

Every command that takes ``--config`` uses the embedded default (uci-mfeat) without one, and
takes ``--set key=value`` overrides with dotted keys (``--set teachers.0.epochs=5``).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import signal
import sys
import threading
import time
import traceback
import typing
from pathlib import Path
from typing import Any

import yaml

from ensemble_kd.core import layout
from ensemble_kd.core import config, interrupts
from ensemble_kd.core.files import DiskFullError, disk_full_cause
from ensemble_kd.core.console import CONSOLE, NORMAL, QUIET, VERBOSE, Log
from ensemble_kd.core.progress import PROGRESS_FILE, watch_progress
from ensemble_kd.core.errors import project_error
from ensemble_kd.core import config_docs
from ensemble_kd.core.config import ConfigError, ExperimentConfig
from ensemble_kd.losses import LOSSES
from ensemble_kd.losses.base import loss_options
from ensemble_kd.core.plugins import load_plugins
from ensemble_kd.storage.shards import inspect as inspect_shards
from modalities import DATASETS, ENCODERS
from modalities.datasets.base import class_names


def _overrides(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for p in pairs:
        if "=" not in p:
            raise ConfigError(f"--set needs key=value, got {p!r}")
        k, v = p.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError as e:  # one line, not YAML's multi-line report with carets
            col = f" at column {e.problem_mark.column + 1}" if getattr(e, "problem_mark", None) else ""
            raise ConfigError(f"--set {p}: the value {v!r} is not valid YAML "
                              f"({getattr(e, 'problem', None) or type(e).__name__}{col})") from None
    return out


def _config(args: argparse.Namespace, resolve_tracking: bool = True) -> ExperimentConfig:
    over = _overrides(args.set or [])
    if getattr(args, "out", None):
        over["output_dir"] = args.out
    cfg = _pipeline().load(args.config, over, resolve_tracking)
    if _command(args) in LOGGED:  # the config names the output folder: the command's log file goes there
        CONSOLE.open_log(cfg.output_dir, getattr(args, "argv", None))
    return cfg


def _folder_config(args: argparse.Namespace) -> ExperimentConfig:
    """The config of a verb that works in the output folder, after tidying what killed commands
    left there (runs still RUNNING, temp and stale checkpoint folders: ``pipeline.tidy_output``)."""
    cfg = _config(args)
    _pipeline().tidy_output(cfg, _log)
    return cfg


def _pipeline():
    """The pipeline module, imported on first use: it pulls in Ray, Ray Train/Tune, MLflow and
    torch (seconds of imports), which `list`, `config` and `--help` do not need."""
    from ensemble_kd.orchestration import pipeline

    CONSOLE.adopt_loggers()  # MLflow and Ray give their loggers console handlers on import: route them to ours
    return pipeline


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (default: the embedded uci-mfeat default)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (dotted key), repeatable")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (plain lines; bars are only ever drawn "
                   "on a terminal)")
    _add_verbosity(p)


def _add_verbosity(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("-v", "--verbose", action="store_true", help="also show the per-epoch lines, the libraries' INFO "
                   "lines and an error's traceback (all are in the command's log file anyway)")
    g.add_argument("-q", "--quiet", action="store_true", help="show only the table and the paths (and errors)")


_log = Log(CONSOLE)
"""What the commands and stages say: a call is a step (the console unless ``-q``, and the log file);
``_log.result`` the table and the paths (always shown); ``_log.detail`` details (``-v``). One
write per line, whole, from any thread (:mod:`ensemble_kd.core.console`)."""

LOGGED = {"run", "teachers-train", "embed", "select", "distill", "tune", "export"}
"""The commands that keep a log file (``<output_dir>/logs/<command>-<time>.log``): those that run
work on Ray, and export. ``data prepare``, ``compare`` and the listing commands write none."""


def _command(args: argparse.Namespace) -> str:
    """``run``, ``teachers-train``, ``data-prepare``, ...: the command's name in its log file's."""
    return "-".join(str(x) for x in (getattr(args, "command", None), getattr(args, "action", None)) if x)


def _progress(args: argparse.Namespace) -> bool:
    """Bars (the teachers' and the embed stage's): on a terminal, not with ``--no-progress`` or
    ``-q``. A pipe or a file gets plain lines instead (bars redraw with carriage returns)."""
    return not getattr(args, "no_progress", False) and CONSOLE.interactive and CONSOLE.level >= NORMAL


def cmd_teachers_train(args: argparse.Namespace) -> int:
    p = _pipeline()
    cfg = _folder_config(args)
    with p.session(cfg, stages={"teachers"}):  # each teacher trains as a Ray Train run
        ts = p.train_teachers(cfg, retrain=args.retrain, progress=_progress(args), log=_log)
    _log.result(json.dumps({n: {k: v for k, v in dataclasses.asdict(t).items() if k != "name"} for n, t in ts.items()}, indent=2))
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    p = _pipeline()
    cfg = _folder_config(args)
    teachers = p.existing_teachers(cfg)
    p.check_existing_shards(cfg, teachers)  # a mismatched shard is refused before Ray starts
    with p.session(cfg, mlflow=False, stages={"embed"}):
        shards = p.embed(cfg, teachers, progress=_progress(args), log=_log)
    _log.result(f"shards under {Path(cfg.output_dir) / 'shards'}: {len(shards)} ({sum(r.reused for r in shards)} reused)")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    """DFND: score the pool (`data`) with the teachers, keep the confident rows, write the selection."""
    p = _pipeline()
    cfg = _folder_config(args)
    with p.session(cfg, mlflow=False, stages={"embed"}):  # the pool and the teachers' test split, by embed tasks
        res = p.select(cfg, progress=_progress(args), log=_log)
    m = res.manifest
    _log(f"kept {m['num_rows']} of {m['pool_rows']} pool rows; per pseudo-class (kept/pool):")
    _log("  " + "  ".join(f"{c}:{k}/{n}" for c, (k, n) in enumerate(zip(m["counts_per_class"], m["pool_counts_per_class"]))))
    _log("teacher accuracy a_i on " + f"{m['teacher_data']['name']} test: " + " ".join(f"{a:.3f}" for a in m["class_accuracy"])
         + f" (top-1 {m['teacher_test_top1']['ensemble']:.4f})")
    dg = m["diagnostics"]
    if dg["pseudo_label_accuracy_selected"] is not None:
        _log(f"pseudo-label accuracy against the pool's own labels (diagnostic only, never used to select): "
             f"{dg['pseudo_label_accuracy_selected']:.4f} on the kept rows, {dg['pseudo_label_accuracy_pool']:.4f} on the whole pool")
    _log.result(f"selection: {res.dir}")
    _log.result(f"train on it with: ensemble-kd distill ... --set distill.selection={res.dir}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """The main job; exit 1 when an arm (or the sweep) has no finished trial (the table and
    summary.json say why); partial success (some seeds failed) is shown in the table, exit 0."""
    summary = _pipeline().run(_folder_config(args), progress=_progress(args), log=_log, resume=args.resume)
    failed = [f"arm {arm!r} has no finished trial; {why}" for arm, why in (summary.get("failed_arms") or {}).items()]
    if summary.get("failed_sweep"):
        failed.append(f"the sweep on {(summary.get('sweep') or {}).get('arm')!r} has no finished trial; {summary['failed_sweep']}")
    if failed:
        CONSOLE.error("ensemble-kd: error: " + "; ".join(failed) + (f" (the rest: {layout.summary(summary['output_dir'])})"
                                                                     if summary.get("output_dir") else ""))
        return 1
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    p = _pipeline()
    from ensemble_kd.orchestration.report import selection_line  # (the pipeline has imported it: no cost)

    cfg = _folder_config(args)
    resume = p.resume_point(cfg, "sweep") if args.resume else None  # nothing to resume: one line, before any work
    inputs = p.distill_inputs(cfg)  # shards and checkpoints verified before Ray starts
    with p.session(cfg, stages={"tune"}):
        res = p.sweep(cfg, log=_log, inputs=inputs, resume=resume)
    _log.result(f"\n{len(res.trials)} trials in {res.seconds:.1f}s: "
                + ", ".join(f"{s} {sum(t.status == s for t in res.trials)}" for s in ("TERMINATED", "STOPPED", "ERROR")))
    if res.best is not None:
        test = res.best.metrics.get("test_top1") if res.metric != "test_top1" else None  # what was chosen, on test
        _log.result(f"best {res.metric} = {res.best.metrics[res.metric]:.4f}"
                    + (f" (test_top1 {test:.4f})" if isinstance(test, (int, float)) else "") + " with "
                    + ", ".join(f"{k}={v}" for k, v in res.best.overrides.items()))
    _log.result(selection_line("val" if res.metric == "val_top1" else "test"))
    if res.tracking_uri:
        _log.result(f"MLflow: parent run {res.parent_run_id} in experiment {res.experiment!r} at {res.tracking_uri}; "
                    f"open the UI with: mlflow ui --backend-store-uri {res.tracking_uri}")
    failed = [t for t in res.trials if t.status == "ERROR"]  # (the scheduler's STOPPED ones are counted above)
    if failed:
        _log.result("failed:")
        for t in failed:
            _log.result(f"  {t.trial.label or t.trial_id or '-'} {', '.join(f'{k}={v}' for k, v in t.overrides.items())}: "
                        f"{t.status} after {t.epochs} epochs: {_reason(t)}")
    if res.trials and not any(t.status == "TERMINATED" for t in res.trials):
        if all(t.status == "ERROR" for t in res.trials) and project_error(res.trials[0].error) is not None:
            raise res.trials[0].error  # every trial failed on the project's own error: it is the command's (exit 2)
        CONSOLE.error(f"ensemble-kd: error: the sweep has no finished trial ({len(res.trials)} of {len(res.trials)} did not "
                      f"finish): {_reason(res.trials[0])}")
        return 1
    return 0


def _reason(t) -> str:
    from ensemble_kd.orchestration.report import reason

    return reason(t)


def cmd_distill(args: argparse.Namespace) -> int:
    p = _pipeline()
    cfg = _folder_config(args)
    inputs = p.distill_inputs(cfg)  # shards and checkpoints verified before Ray starts
    with p.session(cfg, stages={"distill"}), watch_progress("distill", _newest_run(layout.ray_results(cfg.output_dir)),
                                                            cfg.distill.epochs, _log, _progress(args)):
        res = p.distill(cfg, resume=args.resume, log=_log, inputs=inputs)
    _log.result(f"history: {len(res.history)} epochs; Ray Train checkpoints under {layout.run_dir(cfg.output_dir, res.run_name)}")
    return 0


def _newest_run(results: Path):
    """A finder of the run a command's one distillation writes under ``results`` (named inside
    the distill stage): the folder whose progress file changed last since now."""
    since = time.time()

    def find() -> Path | None:
        files = []
        for f in results.glob(f"*/{PROGRESS_FILE}"):
            try:
                if f.stat().st_mtime >= since:
                    files.append((f.stat().st_mtime, f.parent))
            except OSError:
                continue
        return max(files)[1] if files else None

    return find


def cmd_compare(args: argparse.Namespace) -> int:
    # here, not at the top, for the reason _pipeline() gives (MLflow and matplotlib)
    from ensemble_kd.orchestration.plots import plot_comparison
    from ensemble_kd.core.stats import format_paired
    from ensemble_kd.orchestration.report import selection_line
    from ensemble_kd.storage.mlflow_store import experiment_name, tracking_uri
    from ensemble_kd.orchestration.compare import compare, folder_experiment

    cfg = _folder_config(args)
    uri = args.uri or tracking_uri(cfg)
    named = {"name", "tracking", "tracking.experiment"} & set(_overrides(args.set or []))
    if args.experiment or args.config or named:  # given: they win over what the folder says
        experiment, source = args.experiment or experiment_name(cfg), None
    else:  # the embedded default's name would miss a folder made by another config: ask the folder
        uri, experiment, source = folder_experiment(cfg.output_dir, uri, keep_uri=bool(args.uri))
    res = compare(uri, experiment, args.group_by, baseline=args.baseline)
    if args.plot:
        groups = {g: {"values": r["values"], "teacher_set": r.get("teacher_set"), "labels": r.get("labels") or "all"}
                  for g, r in res["groups"].items()}
        axes = [k for k in res["sweep"][0] if k not in ("top1", "runs")] if res["sweep"] else None
        res["plot"] = str(plot_comparison(groups, res["sweep"], args.plot, title=f"{res['experiment']} by {args.group_by}",
                                          axes=axes, paired={g: r.get("paired") for g, r in res["groups"].items()},
                                          paired_title=f"paired difference to {args.baseline}"))
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"experiment {res['experiment']} at {uri}, grouped by {args.group_by}"
          + (f" (experiment: {source}; --experiment NAME picks another)" if source else ""))
    base = f"  vs {args.baseline}: mean [95% t interval] improved/pairs" if args.baseline else ""
    print(f"{args.group_by:<24} {'labels':<11} {'runs':>4}  {'top-1 mean +- std':<18} best run{base}")
    for g, r in res["groups"].items():
        b = r["best_run"]
        vs = ("  " + format_paired(r.get("paired"))) if args.baseline else ""
        print(f"{g:<24} {r.get('labels') or 'mixed':<11} {r['runs']:>4}  {r['mean_top1']:.4f} +- {r['std_top1']:.4f}  "
              f"{r['best_top1']:.4f} {b['run_name']} ({b['method']}){vs}")
    if res["unfinished"]:
        print("did not finish (shown apart, not averaged):")
        for u in res["unfinished"]:
            last = u["last_test_top1"]
            print(f"  {u['group']:<24} seed {u['seed']}  {u['status']:<9} {u['run_name']}"
                  + (f"  last top-1 {last:.4f}" if last is not None else ""))
    print(selection_line(res["selection"]))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    # here, not at the top, for the reason _pipeline() gives (torch, MLflow, ONNX)
    from ensemble_kd.orchestration import export
    from ensemble_kd.storage.mlflow_store import experiment_name, tracking_uri

    cfg = _config(args)
    out = Path(cfg.output_dir)
    uri = tracking_uri(cfg) if cfg.tracking.enabled else None
    if args.run:
        src = export.find_run(out, args.run, uri)
    elif args.arm or export.headline_arm(cfg):
        src = export.best_of_arm(out, args.arm or export.headline_arm(cfg), uri, experiment_name(cfg))
    else:
        src = export.last_run(out, uri)
    res = export.export_student(src, args.dest, log=_log)
    print(json.dumps(res.to_dict(), indent=2))
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    """Each split the config reads (``pipeline.prepare_data``, one split at a time): ``written``,
    or ``reused`` where the store already held it (every file's sha256 checked); under a dataset's
    first split, its class names where it has them (``classes: cat=0, dog=1``, from the manifest)."""
    p = _pipeline()
    from ensemble_kd.storage import datastore

    cfg = _config(args)
    named: list[Any] = []  # the datasets whose classes were shown
    for data, split in p.data_splits(cfg):
        said: list[str] = []  # prepare says something only when it writes (or rewrites) the split

        def log(msg: str, said: list[str] = said) -> None:
            said.append(msg)
            _log(msg)

        ds = datastore.prepare(data, split, cfg.output_dir, log)
        print(f"{data.name}/{split}: {ds.dir} ({'written' if said else 'reused'})")
        if ds.classes and data not in named:
            named.append(data)
            print(f"  classes: {class_names(ds.classes)}")
    return 0


def cmd_shards_inspect(args: argparse.Namespace) -> int:
    """DIR: a shard, a folder of shards, or an output folder (its ``shards/``)."""
    from ensemble_kd.storage.shards import MANIFEST

    d = Path(args.dir)
    if not (d / MANIFEST).is_file() and layout.shards(d).is_dir():
        d = layout.shards(d)
    print(json.dumps(inspect_shards(d, verify=args.verify), indent=2))
    return 0


def _load_plugins_of(args: argparse.Namespace) -> None:
    """With ``--config``/``--set``: import that config's plugins (schema checked, no cross-checks),
    so that `list` sees what they register as a run would."""
    if args.config or args.set:
        load_plugins(config.load_config(args.config, _overrides(args.set or [])).plugins, args.config or "<embedded default>")


def cmd_list(args: argparse.Namespace) -> int:
    _load_plugins_of(args)
    reg = {"datasets": DATASETS, "encoders": ENCODERS, "losses": LOSSES}[args.what]
    for name in reg.names():
        meta = {k: v for k, v in reg.meta(name).items() if k != "test_shape" and not callable(v)}  # (modalities_of)
        print(f"{name:<16} {json.dumps(meta, default=str)}")
        if args.what == "datasets":  # what it is and the options its builder takes (data.kwargs)
            print(f"{'':<16} {_dataset_summary(DATASETS.get(name))}")
        elif args.what == "losses":  # its options (distill.losses[].kwargs), one a line
            for line in _loss_option_lines(name):
                print(f"{'':<16} {line}")
    return 0


def _loss_option_lines(name: str) -> list[str]:
    """``options (distill.losses[].kwargs):``, then ``  temperature: float (> 0) = 4.0`` per option of
    loss ``name``: its constructor's keyword-only options, their annotated types and defaults."""
    try:
        hints = typing.get_type_hints(LOSSES.get(name).__init__, include_extras=True)
    except Exception:  # noqa: BLE001 - a plugin's annotation that does not resolve: no type shown
        hints = {}
    opts = loss_options(name)
    return ["options (distill.losses[].kwargs): none" if not opts else "options (distill.losses[].kwargs):"] + [
        f"  {k}: {config_docs.type_name(hints[k]) if k in hints else 'any'} = {config_docs.yaml_value(v)}"
        for k, v in opts.items()]


def _dataset_summary(builder) -> str:
    """The first line of the builder module's docstring (the dataset's user doc) and its options."""
    doc = (inspect.getdoc(inspect.getmodule(builder)) or "").strip().split("\n\n")[0]  # the first paragraph
    opts = [f"{k}={p.default!r}" if p.default is not inspect.Parameter.empty else k
            for k, p in inspect.signature(builder).parameters.items() if k not in ("split", "root")]
    return " ".join(doc.split()) + (f" Options (data.kwargs): {', '.join(opts)}." if opts else "")


def cmd_config(args: argparse.Namespace) -> int:
    if args.markdown and args.action != "docs":
        raise ConfigError("--markdown goes with `ensemble-kd config docs` (it writes docs/config.md)")
    if args.action == "show":  # tracking.uri as given, not this command's; paths (output_dir, ...) as given too
        cfg = _config(args, resolve_tracking=False)
        print(yaml.safe_dump(_as_given(config.to_dict(cfg), _given(args)), sort_keys=False), end="")
        return 0
    print(config_docs.markdown() if args.markdown else config_docs.text(), end="")  # the schema's: plugins add no fields
    return 0


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The config as written: the file (or the embedded default) with the ``--set`` overrides, before
    the schema makes paths absolute (the loaded config needs them so: Ray workers run elsewhere)."""
    from importlib import resources

    text = (Path(args.config).read_text() if args.config
            else (resources.files("ensemble_kd") / "configs" / "default.yaml").read_text())
    return config.apply_overrides(yaml.safe_load(text) or {}, _overrides(args.set or []))


def _as_given(resolved: Any, given: Any) -> Any:
    """``resolved`` (a loaded config as a dict) with each path the schema made absolute put back as
    it was given (``output_dir: outputs``), so that the printed config means the same wherever it is
    loaded again, as the file it came from does."""
    if isinstance(resolved, dict) and isinstance(given, dict):
        return {k: _as_given(v, given[k]) if k in given else v for k, v in resolved.items()}
    if isinstance(resolved, list) and isinstance(given, list) and len(resolved) == len(given):
        return [_as_given(v, g) for v, g in zip(resolved, given)]
    if isinstance(resolved, str) and isinstance(given, str) and resolved != given \
            and resolved == str(Path(given).expanduser().resolve()):
        return given
    return resolved


def _verb(sub, name: str, help: str, func, config: bool = True) -> argparse.ArgumentParser:
    """One sub-command; with ``config``, the config arguments and ``--out``."""
    p = sub.add_parser(name, help=help)
    if config:
        _add_config_args(p)
        p.add_argument("--out", help="output folder (overrides output_dir)")
    else:
        _add_verbosity(p)
    p.set_defaults(func=func)
    return p


def _version() -> str:
    """The installed package's version (its metadata), else the source tree's."""
    from importlib import metadata

    try:
        return metadata.version("ensemble-kd")
    except metadata.PackageNotFoundError:
        from ensemble_kd import __version__

        return __version__


def _resume_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true", help=f"continue the last `{p.prog.split()[-1]}` here that did not "
                   "finish: its finished trials kept, the others from their last saved epoch (nothing to resume: exit 2)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ensemble-kd", description="Ensemble and cross-modal knowledge distillation on Ray.")
    ap.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = ap.add_subparsers(dest="command", required=True)
    _resume_flag(_verb(sub, "run", "the main job on a config (default: embedded uci-mfeat): teachers -> shards -> student", cmd_run))
    t = sub.add_parser("teachers", help="teacher checkpoints").add_subparsers(dest="action", required=True)
    p = _verb(t, "train", "train (or reuse) every teacher of the config", cmd_teachers_train)
    p.add_argument("--retrain", action="store_true", help="train even where an up-to-date checkpoint exists")
    _verb(sub, "embed", "write teacher embeddings and logits to Arrow shards (Ray tasks: each teacher's rows over embed.workers_per_teacher)", cmd_embed)
    _verb(sub, "select", "DFND: keep the pool rows the teachers are most confident on, with their pseudo-labels", cmd_select)
    p = _verb(sub, "distill", "distil the configured student from the teachers' shards (Ray Train)", cmd_distill)
    p.add_argument("--resume", action="store_true", help="continue the last run from its last epoch checkpoint")
    p = _verb(sub, "compare", "ensemble-vs-single (or any tag) table of the MLflow runs of an experiment", cmd_compare)
    p.add_argument("--experiment", help="MLflow experiment (default: with --config, the config's name; else the one "
                   "the output folder's summary.json names, else the store's only experiment with distillation runs)")
    p.add_argument("--uri", help="MLflow tracking URI (default: the config's store, or the one the output folder's "
                   "summary.json names)")
    p.add_argument("--group-by", default="teacher_set", help="tag to group by (teacher_set, method, teachers, ...)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument("--plot", metavar="FILE", help="also write a PNG: top-1 by group, and against CRD tau and N where they vary")
    p.add_argument("--baseline", metavar="GROUP", help="paired differences of every group to this one (e.g. an arm, with "
                   "--group-by arm), seed by seed: mean, 95%% t interval, seeds improved")
    p = _verb(sub, "export", "the student of a run (or the best of an arm) as TorchScript, ONNX and an MLflow model, "
                             "each checked against the checkpoint, with a model card", cmd_export)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--run", help="run name (students/NAME/student.pt under the output folder) or a student.pt path")
    g.add_argument("--arm", help="the arm whose best finished run to export (default: run.export_arm, else the last arm; "
                                 "without arms: the last distillation)")
    p.add_argument("--dest", help="folder for the files (default: <output_dir>/exports/<arm or run>)")
    _resume_flag(_verb(sub, "tune", "Ray Tune sweep over the config's tune.space (each trial a Ray Train distillation)", cmd_tune))
    d = sub.add_parser("data", help="the data store").add_subparsers(dest="action", required=True)
    _verb(d, "prepare", "write every split the config reads as a memory-mapped Arrow table under <output_dir>/data "
                        "(every other verb does this on first use)", cmd_data_prepare)
    s = sub.add_parser("shards", help="shard tools").add_subparsers(dest="action", required=True)
    p = _verb(s, "inspect", "print a JSON summary of the shards under DIR", cmd_shards_inspect, config=False)
    p.add_argument("dir")
    p.add_argument("--verify", action="store_true", help="also check every part's sha256")
    p = _verb(sub, "list", "registered datasets, encoders or losses", cmd_list, config=False)
    p.add_argument("what", choices=["datasets", "encoders", "losses"])
    p.add_argument("--config", help="also list what this config's plugins register")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (dotted key), repeatable")
    p = sub.add_parser("config", help="show the resolved config, or every field's documentation by its YAML path")
    p.add_argument("action", choices=["show", "docs"])
    p.add_argument("--markdown", action="store_true", help="docs: as the markdown of docs/config.md "
                   f"(`{config_docs.REGENERATE}`)")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)
    return ap


def error_line(e: BaseException, log_path: Path | None = None) -> tuple[str, int] | None:
    """The one line (and exit code) for an error that is the project's own, wherever it was raised
    (:func:`ensemble_kd.core.errors.project_error` finds it inside Ray's task, Ray Train and Tune
    wrappers), or a full disk (exit 1); None for anything else (a bug: it keeps its traceback).
    ``log_path``: the command's log file, named as where the full traceback is."""
    pe = project_error(e)
    # (not disk_full_cause(e) on a DiskFullError from a worker: Ray's wrapper is an instance of it too,
    # and its message is the remote traceback)
    full = str(pe) if isinstance(pe, DiskFullError) else disk_full_cause(e) if pe is None else None
    if pe is None and full is None:
        return None
    if full is not None:  # shards, checkpoints, MLflow's SQLite
        msg, code = full if full.startswith("the disk is full") else f"the disk is full: {full}", 1
    else:
        msg, code = str(pe), 2
    return f"ensemble-kd: error: {msg}" + (f" (full traceback: {log_path})" if log_path else ""), code


def main(argv: list[str] | None = None) -> int:
    """The command line. Its own errors (:class:`~ensemble_kd.core.errors.ProjectError`: a bad config, a
    refused file, a NaN loss, raised here or in any Ray worker) end as one line on stderr, exit 2
    (a full disk: 1), their traceback in the command's log file (and on the console with ``-v``);
    any other exception is a bug and keeps its traceback."""
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    level = QUIET if getattr(args, "quiet", False) else VERBOSE if getattr(args, "verbose", False) else NORMAL
    CONSOLE.start(_command(args), level)
    main_thread = threading.current_thread() is threading.main_thread()
    before = {s: signal.getsignal(s) for s in interrupts.SIGNALS} if main_thread else {}
    if main_thread:
        interrupts.install()  # Ctrl-C/SIGTERM unwind through every finally: runs KILLED, Ray shut down
    try:
        code = int(args.func(args) or 0)
        if CONSOLE.log_path is not None:
            CONSOLE.result(f"log: {CONSOLE.log_path}", err=True)  # stderr: stdout may be JSON (teachers train, export)
        return code
    except KeyboardInterrupt as e:
        stop = e if isinstance(e, interrupts.Interrupted) else interrupts.Interrupted(signal.SIGINT)
        CONSOLE.error(f"ensemble-kd: {stop.reason}: stopped; what was complete is kept (a rerun reuses it, "
                      "`--resume` continues it: `ensemble-kd run --resume`, `tune --resume`, `distill --resume`)"
                      + (f"; log: {CONSOLE.log_path}" if CONSOLE.log_path else ""))
        return stop.exit_code
    except Exception as e:
        line = error_line(e, CONSOLE.log_path)
        if line is None:  # a bug: its traceback, on the console as Python prints it, and in the log
            CONSOLE.to_file("".join(traceback.format_exception(type(e), e, e.__traceback__)).rstrip())
            if CONSOLE.log_path is not None:
                CONSOLE.error(f"ensemble-kd: unexpected error; this command's log: {CONSOLE.log_path}")
            raise
        CONSOLE.traceback(e)  # the log file (with -v, the console too): the remote traceback is in a Ray error's
        CONSOLE.error(line[0])
        return line[1]
    finally:
        for s, h in before.items():  # a caller's own handlers (tests call main in-process)
            signal.signal(s, h)
        CONSOLE.finish()


if __name__ == "__main__":
    sys.exit(main())
