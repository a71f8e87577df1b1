"""Ray Tune over any config field, each trial one Ray Train distillation, each trial one MLflow run.

Ray 2.60 (Train V2) runs Ray Train inside Tune as a *function trainable* (``Tuner(TorchTrainer)``
is gone). :func:`distill_trial` is that function: it rebuilds the trial's
:class:`~ensemble_kd.orchestration.plan.Trial` (config, overrides, run context) and calls the same distill stage
(:func:`ensemble_kd.stages.distill.run`) as ``ensemble-kd distill``, with the train shards the
driver resolved once. A single-worker trial (``distill.local_mode``) runs its loop inside the
trial's own process, which holds the worker's resources (Ray Train's local mode: no controller or
worker group to start per trial), and reports each epoch to Tune from a loop callback
(:class:`TuneEpochReport`); a multi-worker trial starts a ``TorchTrainer`` whose reports reach Tune
through ``ray.tune.integration.ray_train.TuneReportCallback``.

The driver (:func:`run_trials`) creates the MLflow experiment and a parent run before any trial
starts (two trials migrating a fresh SQLite file at once fail), every trial's run is nested under
it, and after the sweep the runs of trials that ASHA stopped (killed mid-epoch, so still RUNNING)
are ended as KILLED.

``--resume`` (``ensemble-kd run`` and ``tune``) continues the last run or sweep that did not finish:
``index/run.json`` (``index/tune.json``) names its Tune experiment, its parent MLflow run and its
config (:func:`resume_point` checks it before any work), and :func:`run_trials` restores the
experiment with Tune's own ``Tuner.restore``: finished trials keep their results, unfinished and
failed ones run again under their trial ids, so each distillation (``ray_results/<run>-<trial id>``)
goes on from its last saved epoch with its saved RNG states, and reaches what it would have.

Search spaces are written in the config as dotted keys (losses by name)::

    tune:
      space:
        distill.losses.crd.kwargs.tau: {grid: [0.05, 0.1, 0.2]}
        distill.losses.crd.kwargs.num_negatives: {choice: [1024, 4096, 16384]}
        distill.losses.kd.kwargs.temperature: {uniform: [2, 8]}
        distill.optim.lr: {loguniform: [0.01, 0.1]}
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.cloudpickle
import ray.tune
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.logger import JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from ensemble_kd.core import layout
from ensemble_kd.training import tracking
from ensemble_kd.storage import mlflow_store
from ensemble_kd.orchestration.checks import check_config
from ensemble_kd.core.config import ConfigError, ExperimentConfig, to_dict, with_overrides
from ensemble_kd.core.errors import is_ray_wrapper, project_error, wrapped
from ensemble_kd.storage.artifacts import index_path, read_index, write_index
from ensemble_kd.training.launch import runs_locally, store_ready
from ensemble_kd.training.loop import LoopCallback, reported
from ensemble_kd.core.interrupts import reason_of as interrupt_reason
from ensemble_kd.orchestration.plan import Trial
from ensemble_kd.stages import distill
from ensemble_kd.storage.datastore import has_val

SPEC_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


def domain(key: str, spec: Mapping[str, Any], search: str = "grid") -> Any:
    """One ``tune.space`` entry -> a Ray Tune domain (grid_search, choice, uniform, ...).
    With ``search="random"`` a grid list is sampled like a choice instead of expanded."""
    if not isinstance(spec, Mapping) or len(spec) != 1 or next(iter(spec)) not in SPEC_KINDS:
        raise ConfigError(f"tune.space.{key}: expected one of {{{'|'.join(SPEC_KINDS)}: ...}}, got {spec!r}")
    kind, arg = next(iter(spec.items()))
    if kind in ("grid", "choice"):
        if not isinstance(arg, list) or not arg:
            raise ConfigError(f"tune.space.{key}.{kind}: expected a non-empty list of values, got {arg!r}")
        return tune.grid_search(arg) if kind == "grid" and search == "grid" else tune.choice(arg)
    if not (isinstance(arg, list) and len(arg) == 2 and all(isinstance(v, (int, float)) for v in arg) and arg[0] < arg[1]):
        raise ConfigError(f"tune.space.{key}.{kind}: expected [low, high] with low < high, got {arg!r}")
    if kind == "loguniform" and arg[0] <= 0:
        raise ConfigError(f"tune.space.{key}.loguniform: bounds must be > 0, got {arg!r}")
    return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[kind](*arg)


def search_space(cfg: ExperimentConfig) -> dict[str, Any]:
    """``cfg.tune.space`` as Ray Tune domains, checked against the config: every key must apply."""
    if not cfg.tune.space:
        raise ConfigError("tune.space is empty: name at least one field to sweep (see `ensemble-kd config docs`)")
    space = {k: domain(k, v, cfg.tune.search) for k, v in cfg.tune.space.items()}
    probe = {k: (v["grid"][0] if "grid" in v else v["choice"][0] if "choice" in v else v[next(iter(v))][0])
             for k, v in cfg.tune.space.items()}
    check_config(with_overrides(cfg, probe, "<tune.space>"), "<tune.space>")  # a key that does not fit fails here, not in a trial
    return space


def trial_of(config: Mapping[str, Any]) -> Trial:
    """A Tune trial's :class:`Trial`: ``config["trial"]`` (one grid point of ``ensemble-kd run``),
    else the sweep's base config with the sampled ``config["overrides"]``."""
    if config.get("trial"):
        return Trial.from_dict(config["trial"])
    over = dict(config.get("overrides") or {})
    return Trial("", config["base"], tracking.RunContext(overrides=over), over)


class TuneEpochReport(LoopCallback):
    """Reports every epoch's metrics to Tune from the loop itself (a single-worker trial in local
    mode, where Ray Train calls no callbacks); Tune's scheduler (ASHA) decides on them. ``sent``:
    how many it reported (none: a resumed run that had no epoch left)."""

    def __init__(self) -> None:
        self.sent = 0

    def on_epoch_end(self, epoch: int, rank: int, metrics: dict[str, Any]) -> None:
        if rank == 0:
            ray.tune.report(reported(metrics))
            self.sent += 1


def distill_trial(config: dict[str, Any]) -> None:
    """The Tune function trainable: one distillation reporting every epoch to Tune."""
    trial_id = ray.tune.get_context().get_trial_id()
    t = trial_of(config)
    name = f"{config['run_prefix']}-{trial_id}"  # its run folder: where a resumed trial finds its last epoch
    over = {"distill.run_name": name}
    if config.get("early_stopping"):  # the scheduler may stop it after any epoch: each is sent as it ends
        over["distill.metrics_flush_s"] = 0.0
    cfg = with_overrides(t.config(), over, "<trial>")
    done = distill.finished_history(cfg, name)
    if done:  # --resume: it finished after Tune last saved the experiment's state; reported, not run again
        ray.tune.report(reported(done[-1]))
        return
    ctx = t.context.replace(trial_id=trial_id, parent_run_id=config.get("parent_run_id"))
    epochs = TuneEpochReport()
    report = {"loop_callbacks": [epochs]} if runs_locally(cfg) else {"callbacks": [TuneReportCallback()]}
    # the driver prints a line per trial; the loop's per-epoch lines (the trial's stdout) go to the command's log
    res = distill.run(cfg, config["train_shards"], ctx, verbose=True, log=lambda m: None, teachers=config["teachers"],
                      here=True, label=t.label or trial_id, **report)
    if runs_locally(cfg) and not epochs.sent and res.history:  # resumed with no epoch left: its last one for Tune
        ray.tune.report(reported(res.history[-1]))


def trial_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """What a trial's process holds: a single-worker trial runs its loop in it (the worker's CPUs
    and GPU); a multi-worker trial's process only drives its TorchTrainer (``tune.cpus_per_trial``)."""
    if runs_locally(cfg):
        return {"CPU": cfg.distill.cpus_per_worker, **({"GPU": cfg.distill.gpus_per_worker} if cfg.distill.use_gpu else {})}
    return {"CPU": cfg.tune.cpus_per_trial}


@dataclass
class TrialOutcome:
    """What the driver knows of one finished (or stopped) trial."""

    trial_id: str
    trial: Trial
    metrics: dict[str, Any]
    epochs: int
    status: str  # TERMINATED (ran to the end), STOPPED (by the scheduler), ERROR
    error: BaseException | None = None  # an ERROR trial's exception as Tune kept it (errors.project_error finds the cause)

    @property
    def overrides(self) -> dict[str, Any]:
        return dict(self.trial.overrides)

    @property
    def seed(self) -> int:
        return self.trial.seed


@dataclass
class SweepResult:
    parent_run_id: str | None
    experiment: str
    tracking_uri: str | None
    trials: list[TrialOutcome] = field(default_factory=list)
    best: TrialOutcome | None = None
    killed_runs: list[str] = field(default_factory=list)
    seconds: float = 0.0
    metric: str = "test_top1"  # what chose ``best`` (and ASHA's stops): :func:`selection_metric`


def trial_error(trial: Any) -> BaseException | None:
    """A failed trial's exception as Tune stored it (``Trial.handle_error`` runs before the
    ``on_trial_error`` callbacks): the pickled one in the trial's local folder (the copy in the
    experiment's storage comes later), else None."""
    path = getattr(trial, "pickled_error_file", None)
    try:
        if path and Path(path).is_file():
            return ray.cloudpickle.loads(Path(path).read_bytes())
        return trial.get_pickled_error()
    except Exception:  # noqa: BLE001 - a line without the reason rather than none
        return None


def failure(e: BaseException | None) -> str:
    """One line for a failed trial: the project's own message (a refused file, a NaN loss) out of
    Ray's wrappers, else the exception's type and first line (the log file has the traceback)."""
    if e is None:
        return "unknown error"
    pe = project_error(e)
    if pe is not None:
        return " ".join(str(pe).split())
    while is_ray_wrapper(e):  # Ray's message is the remote traceback (with a pid): name the cause instead
        inner = next(wrapped(e), None)
        if inner is None:
            break
        e = inner
    first = next((ln for ln in str(e).splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {first}".strip().rstrip(":") + " (its traceback: in the command's log)"


class _ProgressLines:
    """A Tune callback printing one line per finished trial with the best so far (people read it;
    Tune's own table is off); a failed trial's line says why (Tune's own traceback of it goes to
    the command's log only, ensemble_kd.core.console)."""

    def __init__(self, total: int, metric: str, mode: str, log: Callable[[str], None]) -> None:
        self.total, self.metric, self.mode, self.log = total, metric, mode, log
        self.done, self.best = 0, None
        self.t0 = time.perf_counter()

    def make(self) -> tune.Callback:
        outer = self

        class Lines(tune.Callback):
            def on_trial_complete(self, iteration, trials, trial, **info):
                outer.finished(trial, "done")

            def on_trial_error(self, iteration, trials, trial, **info):
                outer.finished(trial, "ERROR", failure(trial_error(trial)))

        return Lines()

    def _score(self, v: Any, label: str) -> None:
        if isinstance(v, (int, float)) and (self.best is None or (v > self.best[0] if self.mode == "max" else v < self.best[0])):
            self.best = (v, label)

    def restored(self, outcomes: list[TrialOutcome]) -> None:
        """A resumed experiment's trials that Tune recorded with every epoch (their lines were
        printed by the command they ran in) count as done and towards the best."""
        for o in outcomes:
            if o.status == "TERMINATED":
                self.done += 1
                self._score(o.metrics.get(self.metric), o.trial.label or o.trial_id)

    def finished(self, trial, what: str, why: str | None = None) -> None:
        self.done += 1
        r = trial.last_result or {}
        v = r.get(self.metric)
        t = trial_of(trial.config)
        label = t.label or trial.trial_id
        self._score(v, label)
        stopped = " (stopped early)" if what == "done" and r.get("epoch", 0) < t.epochs else ""
        val = f"{self.metric}={v:.4f}" if isinstance(v, (int, float)) else f"{self.metric}=n/a"
        best = f"best {self.best[0]:.4f} ({self.best[1]})" if self.best else "best n/a"
        self.log(f"[tune {self.done}/{self.total} {time.perf_counter() - self.t0:6.1f}s] {label}: {what}{stopped} "
                 f"after {r.get('epoch', 0)} epochs, {val}; {best}" + (f"; {why}" if why else ""))


def _scheduler(cfg: ExperimentConfig, scheduler: str) -> Any:
    tc = cfg.tune
    if scheduler == "asha":
        return ASHAScheduler(time_attr="epoch", max_t=cfg.distill.epochs, grace_period=min(tc.grace_period, cfg.distill.epochs),
                             reduction_factor=tc.reduction_factor,
                             stop_last_trials=False)  # a trial at max_t finishes itself: its run, student and artifacts
    return FIFOScheduler()


def _outcomes(grid: Any) -> list[TrialOutcome]:
    """What each Tune result says: TERMINATED (ran every epoch), STOPPED (by the scheduler), ERROR."""
    out = []
    for r in grid:
        m = dict(r.metrics or {})
        t = trial_of(r.config)
        epochs = int(m.get("epoch", 0))
        st = "ERROR" if r.error else "TERMINATED" if epochs >= t.epochs else "STOPPED"
        out.append(TrialOutcome(m.get("trial_id", ""), t, m, epochs, st, r.error or None))
    return out


RESUME_VERB = {"run": "run", "sweep": "tune"}  # kind -> the verb, also the name of its index file (index/run.json)


def _plain(d: Any) -> Any:
    return json.loads(json.dumps(d, default=str))


def _differences(then: Any, now: Any, key: str = "") -> list[str]:
    """Where two configs (plain JSON) differ: ``key: <then> then, <now> now``, one per field."""
    if isinstance(then, dict) and isinstance(now, dict):
        return [d for k in sorted(set(then) | set(now)) for d in _differences(then.get(k), now.get(k), f"{key}.{k}" if key else k)]
    return [] if then == now else [f"{key or '<config>'}: {then!r} then, {now!r} now"]


def record_trials(cfg: ExperimentConfig, kind: str, name: str, parent_run_id: str | None, finished: bool = False) -> None:
    """``index/run.json`` (``ensemble-kd run``) or ``index/tune.json`` (``tune``): the Tune experiment
    of the last run or sweep, its parent MLflow run and its config, for ``--resume``."""
    write_index(cfg.output_dir, RESUME_VERB[kind], {"experiment": name, "parent_run_id": parent_run_id,
                                                    "finished": finished, "config": _plain(to_dict(cfg))})


def record_finished(cfg: ExperimentConfig, kind: str) -> None:
    """The last run's (sweep's) record marked finished (its summary is written): ``--resume`` has nothing to continue."""
    if index_path(cfg.output_dir, RESUME_VERB[kind]).is_file():
        rec = read_index(cfg.output_dir, RESUME_VERB[kind], RESUME_VERB[kind])
        record_trials(cfg, kind, rec["experiment"], rec.get("parent_run_id"), finished=True)


def resume_point(cfg: ExperimentConfig, kind: str) -> dict[str, Any]:
    """What ``run --resume`` (``kind`` "run") or ``tune --resume`` ("sweep") continues: the last one's
    record (:func:`record_trials`), checked before any work: it exists, did not finish, Tune can
    restore its experiment, and it ran this same config. Each refusal is one line (exit 2)."""
    verb, out = RESUME_VERB[kind], Path(cfg.output_dir)
    head = f"{verb} --resume: nothing to resume"
    if not index_path(out, verb).is_file():
        raise ConfigError(f"{head}: no earlier `ensemble-kd {verb}` under {out} "
                          f"({index_path(out, verb)} is missing); start one without --resume")
    rec = read_index(out, verb, verb)
    if rec.get("finished"):
        raise ConfigError(f"{head}: the last {verb} under {out} ({rec['experiment']}) finished; "
                          f"without --resume a new one starts (reusing the teachers and shards)")
    exp = layout.tune(out) / rec["experiment"]
    if not tune.Tuner.can_restore(exp):
        raise ConfigError(f"{verb} --resume: Ray Tune cannot restore {exp} (no tuner.pkl there); start over without --resume")
    foreign = _not_ours(exp)
    if foreign is not None:
        raise ConfigError(f"{verb} --resume: refusing to restore {exp}: Ray Tune unpickles its files (code execution) and "
                          f"{foreign}; resume only an experiment this user wrote, or start over without --resume")
    diff = _differences(rec.get("config"), _plain(to_dict(cfg)))
    if diff:
        raise ConfigError(f"{verb} --resume: the config differs from the one {rec['experiment']} ran with ("
                          + "; ".join(diff[:3]) + (f"; {len(diff) - 3} more" if len(diff) > 3 else "")
                          + "): resume with the same config and --set, or start over without --resume")
    return rec


def _not_ours(exp: Path) -> str | None:
    """Why a Tune experiment folder could hold someone else's pickles (None: it cannot): a file or
    folder in it owned by another user or writable by anyone. Tune's restore unpickles its state."""
    for p in (exp, *exp.rglob("*")):
        st = p.lstat()
        if st.st_uid != os.getuid():
            return f"{p} is owned by uid {st.st_uid}, not this user ({os.getuid()})"
        if st.st_mode & 0o002:
            return f"{p} is writable by anyone"
    return None


def _tuner(cfg: ExperimentConfig, space: dict[str, Any], name: str, scheduler: str, num_samples: int,
           callbacks: list[Any], resume: bool, metric: str) -> tune.Tuner:
    """The Tune experiment ``name`` under <output_dir>/tune: a new one, or with ``resume`` Tune's
    restore of it: finished trials keep their results; unfinished and failed ones (an interrupted
    trial may have ended as failed) run again under their trial ids, so that each distillation
    goes on from its last saved epoch (a real failure fails again the same way). On restore Tune
    checks only the keys of ``space``: each trial keeps the config it was made with."""
    tc = cfg.tune
    trainable = tune.with_resources(distill_trial, trial_resources(cfg))
    if resume:
        quiet = logging.getLogger("ray.tune.analysis.experiment_analysis")  # its "Failed to fetch metrics" of
        level = quiet.level  # every trial that had reported nothing yet is not news on a resume
        quiet.setLevel(logging.ERROR)
        try:
            tuner = tune.Tuner.restore(str(layout.tune(cfg.output_dir) / name), trainable, resume_unfinished=True,
                                       resume_errored=True, param_space=space)
        finally:
            quiet.setLevel(level)
        local = getattr(tuner, "_local_tuner", None)  # Tune restores the first command's RunConfig with its pickled
        if local is not None:  # callbacks; this command's take their place (no public API: ray-project/ray#41364)
            local.get_run_config().callbacks = list(callbacks)
        return tuner
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(metric=metric, mode=tc.mode, scheduler=_scheduler(cfg, scheduler),
                                    num_samples=num_samples, max_concurrent_trials=tc.max_concurrent_trials,
                                    reuse_actors=True,  # a trial driver process serves the next trial: no new start
                                    trial_dirname_creator=lambda t: t.trial_id),
        run_config=tune.RunConfig(name=name, storage_path=str(layout.tune(cfg.output_dir)), verbose=0,
                                  callbacks=callbacks),  # JsonLoggerCallback: result.json, which Tune reads on a failed trial
    )


def _restored(tuner: tune.Tuner) -> list[TrialOutcome]:
    """The trials a restored experiment holds that had reported, as its state file last recorded
    them (Tune saves it at most every 10 s; none before its first)."""
    try:
        grid = tuner.get_results()
    except RuntimeError:  # no state file yet: Tune starts the experiment over
        return []
    return _outcomes(r for r in grid if r.config)  # (no config: the trial had reported nothing)


def _parent_run(cfg: ExperimentConfig, name: str, kind: str, tags: dict[str, str] | None,
                resume: Mapping[str, Any] | None) -> tuple[str | None, str | None, str | None]:
    """(uri, experiment id, run id) of the parent MLflow run (Nones without tracking): a new one,
    the experiment then recorded for ``--resume``; or, resuming, the interrupted one's, reopened."""
    uri, exp_id, parent = None, None, None
    if cfg.tracking.enabled:
        uri, exp_id, parent = (tracking.reopen_parent_run(cfg, resume["parent_run_id"]) if resume and resume.get("parent_run_id")
                               else tracking.start_parent_run(cfg, name, kind, tags))
    if not resume:
        record_trials(cfg, kind, name, parent)
    return uri, exp_id, parent


def run_trials(cfg: ExperimentConfig, inputs: Mapping[str, Mapping[str, str]], param_space: dict[str, Any], *, name: str,
               num_trials: int, scheduler: str = "fifo", num_samples: int = 1, kind: str = "sweep",
               parent_tags: dict[str, str] | None = None, log: Callable[[str], None] = print,
               resume: Mapping[str, Any] | None = None) -> SweepResult:
    """Run distillation trials on Ray Tune (Ray must be initialised).

    ``param_space`` is Tune's: ``{"overrides": {dotted key: domain}}`` (a sweep) or ``{"trial":
    grid_search([Trial.to_dict(), ...])}`` (the trials of ``ensemble-kd run``); ``inputs``:
    ``{"train_shards": teacher -> train shard folder, "teachers": teacher -> checkpoint file}`` for
    every teacher a trial may use (what its data path needs); ``num_trials`` is only for the progress lines. The MLflow experiment and the parent run (``ekd.kind`` = ``kind``) are
    created here, before any trial, and the experiment recorded for ``--resume``
    (:func:`record_trials`); after the sweep, runs of trials the scheduler stopped are ended
    KILLED. ``resume``: :func:`resume_point`'s record of the experiment ``name``, which Tune
    restores (:func:`_tuner`), its parent run reopened."""
    t0 = time.perf_counter()
    metric = _ready(cfg)
    tc = cfg.tune
    uri, exp_id, parent = _parent_run(cfg, name, kind, parent_tags, resume)
    fixed = {"base": to_dict(cfg), "parent_run_id": parent, "run_prefix": name, "early_stopping": scheduler == "asha",
             "train_shards": dict(inputs.get("train_shards") or {}), "teachers": dict(inputs.get("teachers") or {})}
    lines = _ProgressLines(num_trials * num_samples, metric, tc.mode, log)
    stopped: BaseException | None = None
    try:
        tuner = _tuner(cfg, {**fixed, **param_space}, name, scheduler, num_samples, [lines.make(), JsonLoggerCallback()],
                       resume is not None, metric)
        if resume:  # finished: a student written (Tune's own record may lag behind by a trial or two)
            lines.restored(_restored(tuner))
            n = sum(1 for _ in layout.students(cfg.output_dir).glob(f"{name}-*/{layout.STUDENT_FILE}"))
            log(f"{RESUME_VERB[kind]} --resume: {name}: {n} of {lines.total} trials had finished (kept); the others go on "
                "from their last saved epoch")
        grid = tuner.fit()
    except BaseException as e:
        stopped = e
        raise
    finally:
        killed: list[str] = []
        if parent is not None:  # Ctrl-C/SIGTERM: every unfinished trial KILLED as interrupted, not as ASHA's
            reason = interrupt_reason(stopped) or ("the sweep failed" if stopped else "stopped early by the Tune scheduler")
            killed = tracking.end_unfinished_children(uri, exp_id, parent, reason=reason)
            if stopped is None:
                mlflow_store.client(uri).set_terminated(parent, "FINISHED")
            else:
                tracking.end_stopped_run(uri, parent, stopped)
    res = SweepResult(parent, mlflow_store.experiment_name(cfg), uri, _outcomes(grid), killed_runs=killed)
    _record_best(res, cfg, metric)
    res.seconds = time.perf_counter() - t0
    return res


def selection_metric(cfg: ExperimentConfig, val: bool) -> str:
    """What Tune schedules on and picks the best trial by: ``tune.metric``, except that test_top1
    reads val_top1 where the data has a validation split (``val``), so that no choice looks at test."""
    return "val_top1" if val and cfg.tune.metric == "test_top1" else cfg.tune.metric


def _ready(cfg: ExperimentConfig) -> str:
    """The data store ready for the trials (Ray workers only open it), and the selection metric
    for its data (as its stored train split says)."""
    store_ready(cfg)
    return selection_metric(cfg, has_val(cfg.data, cfg.output_dir))


def _record_best(res: SweepResult, cfg: ExperimentConfig, metric: str | None = None) -> None:
    """The best trial by ``metric`` (default ``tune.metric``), on the result and as the parent run's
    metric and tags (with the best trial's test top-1 beside a val metric: what was chosen, on test)."""
    tc = cfg.tune
    res.metric = metric = metric or tc.metric
    scored = [t for t in res.trials if isinstance(t.metrics.get(metric), (int, float))]
    if scored:
        res.best = (max if tc.mode == "max" else min)(scored, key=lambda t: t.metrics[metric])
    if res.parent_run_id is not None and res.best is not None:
        c = mlflow_store.client(res.tracking_uri)
        c.log_metric(res.parent_run_id, f"best/{metric}", float(res.best.metrics[metric]))
        if metric != "test_top1" and isinstance(res.best.metrics.get("test_top1"), (int, float)):
            c.log_metric(res.parent_run_id, "best/test_top1", float(res.best.metrics["test_top1"]))
        for k, v in res.best.overrides.items():
            c.set_tag(res.parent_run_id, f"best.{k}", str(v))


def tune_sweep(cfg: ExperimentConfig, inputs: Mapping[str, Mapping[str, str]], log: Callable[[str], None] = print,
               resume: Mapping[str, Any] | None = None) -> SweepResult:
    """``ensemble-kd tune``: sweep ``cfg.tune.space`` over the ``distill`` config (``inputs`` as
    :func:`run_trials` takes them); ``resume``: ``tune --resume``'s :func:`resume_point`."""
    distill.check_inputs(cfg, inputs.get("train_shards") or {}, inputs.get("teachers") or {})  # once, not per trial
    space = search_space(cfg)
    name = resume["experiment"] if resume else cfg.tune.name or f"{cfg.name}-tune-{time.strftime('%Y%m%d-%H%M%S')}"
    grid_points = 1
    for v in cfg.tune.space.values():
        grid_points *= len(v["grid"]) if "grid" in v and cfg.tune.search == "grid" else 1
    where = (f"each trial one process of {cfg.distill.cpus_per_worker} CPU (Ray Train local mode)" if runs_locally(cfg)
             else f"{cfg.tune.cpus_per_trial} CPU per trial driver, {cfg.distill.num_workers} x "
                  f"{cfg.distill.cpus_per_worker} CPU per trial's workers")
    log(f"tune: {name}: {grid_points * cfg.tune.num_samples} trial(s) over {list(cfg.tune.space)}, "
        f"scheduler {cfg.tune.scheduler}, {where}")
    res = run_trials(cfg, inputs, {"overrides": space}, name=name, num_trials=grid_points,
                     scheduler=cfg.tune.scheduler, num_samples=cfg.tune.num_samples,
                     parent_tags={"method": tracking.method_name(cfg), "teacher_set": tracking.teacher_set(cfg)}, log=log,
                     resume=resume)
    record_finished(cfg, "sweep")
    return res
