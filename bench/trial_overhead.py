"""Where a trial's seconds go: wall time of the embedded default's trials against the time inside
the loop's steps.

Trains the default's teachers and embeds them once (in a temp folder), then runs ``--trials``
trials of one arm (seeds 0, 1, ...) as ``ensemble-kd run`` does (Ray Tune, one MLflow run each),
one at a time, so a trial's wall time is the sweep's wall time over the trials. Each trial's
saved training state says how long its loop spent on set-up (data, model), steps, evaluation,
MLflow's per-epoch metrics and checkpoints; the rest of the wall time is Ray/Tune start-up and
scheduling, the MLflow run's creation and end, and the student's file.

    python bench/trial_overhead.py [--arm crd+kd-ensemble] [--trials 3] [--mode local|group]

``--mode group`` forces a Ray Train worker group per trial (``distill.local_mode: false``), what
every trial paid before single-worker trials ran in their own process. Goal: the
ratio wall / steps <= 1.5 for the default's trials in local mode.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ensemble_kd.orchestration import pipeline  # noqa: E402
from ensemble_kd.core.config import to_dict, with_overrides  # noqa: E402
from ensemble_kd.training.state import STATE_FILE  # noqa: E402
from ensemble_kd.orchestration.plan import best_teacher, plan_trials  # noqa: E402
from ensemble_kd.core.raycluster import ray_session  # noqa: E402
from ensemble_kd.orchestration.sweep import run_trials  # noqa: E402
from ray import tune  # noqa: E402
from _workdir import add_workdir_arg, workdir  # noqa: E402

PARTS = ("setup_s", "steps_s", "eval_s", "mlflow_s", "checkpoint_s", "report_s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arm", default="crd+kd-ensemble", help="an arm of the embedded default")
    ap.add_argument("--trials", type=int, default=3, help="trials (seeds 0..trials-1), one at a time")
    ap.add_argument("--mode", choices=("local", "group"), default="local")
    ap.add_argument("--epochs", type=int, default=None, help="student epochs (default: the default's)")
    ap.add_argument("--teacher-epochs", type=int, default=None, help="teacher epochs (default: the default's)")
    add_workdir_arg(ap)
    args = ap.parse_args()
    with workdir(args.workdir, "ekd-bench-") as tmp:
        over = {"output_dir": tmp, "run.seeds": list(range(args.trials)), "run.sweep": None,
                "distill.local_mode": args.mode == "local", "tune.max_concurrent_trials": 1}
        if args.epochs:
            over["distill.epochs"] = args.epochs
        if args.teacher_epochs:
            over.update({f"teachers.{i}.epochs": args.teacher_epochs for i in range(3)})
        cfg = pipeline.load(None, over)
        cfg = with_overrides(cfg, {"run.arms": [a for a in to_dict(cfg)["run"]["arms"] if a["name"] == args.arm]},
                             "<bench>")
        if not cfg.run.arms:
            raise SystemExit(f"--arm {args.arm!r} is not an arm of the embedded default")
        with ray_session(cfg.ray):
            teachers = pipeline.train_teachers(cfg, progress=False, log=lambda m: None)
            shards = pipeline.embed(cfg, teachers, progress=False, log=lambda m: None)
            trials = plan_trials(cfg, best_teacher(teachers))
            inputs = {"train_shards": shards.dirs("train", list(teachers)), "teachers": {}}
            t0 = time.perf_counter()
            res = run_trials(cfg, inputs, {"trial": tune.grid_search([t.to_dict() for t in trials])}, name="bench",
                             num_trials=len(trials), scheduler="fifo", kind="run", log=lambda m: None)
            wall = time.perf_counter() - t0
        per_trial = []
        for o in res.trials:
            run_dir = Path(tmp) / "ray_results" / f"bench-{o.trial_id}"
            states = sorted(run_dir.glob(f"**/{STATE_FILE}"), key=lambda p: p.stat().st_mtime_ns)
            timings = torch.load(states[-1], weights_only=True)["timings"] if states else {}
            per_trial.append({k: float(timings.get(k, 0.0)) for k in PARTS})
    n = len(per_trial)
    mean = {k: sum(t[k] for t in per_trial) / n for k in PARTS}
    trial_wall = wall / n
    out = {"arm": args.arm, "mode": args.mode, "trials": n, "epochs": cfg.distill.epochs,
           "sweep_wall_s": wall, "trial_wall_s": trial_wall, **{f"loop_{k}": v for k, v in mean.items()},
           "rest_s (ray/tune start-up, scheduling, mlflow run, student file)": trial_wall - sum(mean.values()),
           "ratio_wall_over_steps": trial_wall / mean["steps_s"] if mean["steps_s"] else None,
           "statuses": sorted({o.status for o in res.trials})}
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}, indent=2))


if __name__ == "__main__":
    main()
