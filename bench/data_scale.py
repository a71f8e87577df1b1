"""Data scale: what a distill worker and the embed stage cost as the dataset grows.

For each row count of a ``synthetic`` dataset (a 64-d vector modality ``vec`` and a 1x32x32 image
``img``, both projections of one latent per sample) the bench

1. prepares the data store (``ensemble_kd.storage.datastore.prepare``: the source streamed into
   memory-mapped Arrow files; ``prepare_s``, ``store_mb``);
2. saves a teacher checkpoint WITHOUT training it (an ``mlp`` on ``img``, random initial weights:
   its memory and speed are those of a trained one, its outputs are not) and runs the embed stage
   (``ensemble_kd.stages.embed.run`` under ``ray_session``, ``embed.workers_per_teacher: 1``,
   ``cpus_per_actor: 1``): ``embed_rows_per_s`` is the train split's rows over the stage's wall
   time (task start, teacher load, store reads and shard writes included);
3. in a fresh child process per variant (nothing of the parent's heap in the measurement), builds
   a distill worker as the loop does (``open_split``, ``make_data`` -> ``DistillData``,
   ``build_module``, ``build_optim``, the epoch's ``epoch_rows``) for a student ``mlp`` on ``vec``
   distilled from the teacher's shards, runs ``--warmup`` then ``--steps`` steps of
   ``DistillModule`` forward / backward / optimiser step as ``loop._train_epoch`` does, on one
   thread (``distill.cpus_per_worker: 1``), and reports its private memory: ``RssAnon`` of
   ``/proc/self/status`` (anonymous pages only; the memory-mapped store and shards are file pages
   of the shared page cache, reported apart as ``RssFile``) and the mean step time (``step_ms``),
   then, after reading one value of every page of the maps a step reads (as a run is from its
   second epoch on: the first touch of a mapped page is a minor fault), the same number of steps
   again (``step_ms_steady``). Variant
   ``kd``: CE + KD (T = 4). Variant ``crd``: CE + KD + CRD with the default config's CRD options,
   whose memories are rows x feat_dim x 4 bytes each, by design (``crd_memory_mb``: the module's
   memory buffers; the default ``mode: reference`` keeps two per teacher, student and teacher side).
   ``worker_phases_mb`` splits the KD worker's RssAnon by setup phase, to find where per-row
   memory goes when it grows.

Then ``embed_scaling``: the embed stage's rows/s on ``--scaling-rows`` rows with 1 and 2 workers
per teacher (``embed.workers_per_teacher``), each worker a Ray task with ``cpus_per_actor: 1``;
best of ``--scaling-repeats`` runs each, alternated 1, 2, 1, 2 (every run writes the shard anew;
``embed_scaling_runs`` lists them all). Before any measurement one untimed 2-worker embed of a
small dataset warms Ray's worker pool (two processes with everything imported, as a pipeline's
teacher training leaves them), so no rate includes a cold worker's imports.

Targets it informs: the KD worker's private memory grows <= 20 % from the smallest to the largest
size; a step's time does not grow with the rows beyond what the CRD memories cost; embed rows/s
with 2 workers per teacher on 2 cores >= 1.7x that of 1 worker.

Disk: each size lives in its own folder, removed when measured (unless ``--workdir``): at 1M rows
the store takes ~1.2 GB (900,000 train rows x (64 x 4 + 1024) bytes) and the teacher's shard
~0.5 GB (a 128-d float32 embedding and 10 logits a row, plus ids and views), so the default needs
about 2 GB free under the temp folder; ``--scaling-rows`` 200,000 adds ~0.4 GB after that.
Time: about 2-3 minutes on 2 cores at the default sizes (the 1M-row store and embed dominate).

    python bench/data_scale.py                                   # 10k, 100k, 1M rows; scaling on 200k
    python bench/data_scale.py --rows 2000 4000 --scaling-rows 4000 --steps 3   # the smoke test's sizes
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ensemble_kd.core.config import EmbedConfig, from_dict, to_dict  # noqa: E402
from ensemble_kd.training.data import epoch_rows  # noqa: E402
from ensemble_kd.storage.datastore import open_split, prepare  # noqa: E402
from ensemble_kd.core.devices import autocast, seed_everything  # noqa: E402
from ensemble_kd.training.loop import LoopConfig, build_module, build_optim, make_data  # noqa: E402
from ensemble_kd.losses.base import optimizer_param_groups  # noqa: E402
from ensemble_kd.blocks.memory import MomentumMemory  # noqa: E402
from ensemble_kd.core.raycluster import ray_session  # noqa: E402
from ensemble_kd.core.rows import PartedRows  # noqa: E402
from ensemble_kd.stages import embed as embed_stage  # noqa: E402
from ensemble_kd.stages.teachers import checkpoint_path, existing  # noqa: E402
from ensemble_kd.storage.teacher_checkpoint import save_teacher  # noqa: E402
from modalities import build_encoder  # noqa: E402
from _workdir import add_workdir_arg, workdir  # noqa: E402

MODALITIES = {"vec": [64], "img": [1, 32, 32]}
TEACHER = {"name": "t_img", "arch": "mlp", "modality": "img", "arch_kwargs": {"hidden": [1024, 128]}}
STUDENT = {"arch": "mlp", "modality": "vec", "arch_kwargs": {}}
CE, KD = {"name": "ce"}, {"name": "kd", "kwargs": {"temperature": 4.0}}
CRD = {"name": "crd", "weight": 0.8,  # the default config's CRD term (ensemble_kd/configs/default.yaml)
       "kwargs": {"feat_dim": 128, "tau": 0.07, "num_negatives": 16384, "momentum": 0.5, "per_sample": False}}
HAS_WORKERS = "workers_per_teacher" in {f.name for f in dataclasses.fields(EmbedConfig)}


# ----------------------------------------------------------------------------------------------
# the child: one distill worker, measured
# ----------------------------------------------------------------------------------------------
def proc_status_mb() -> dict[str, float]:
    """RssAnon (private, anonymous pages) and RssFile (file pages mapped, the shared page cache) in MB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmHWM"):
            out[key] = int(val.split()[0]) / 1024  # kB -> MB
    return out


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """A distill worker built as ``loop._setup`` builds one (the shard path, one rank, CPU), then
    ``warmup`` + ``steps`` steps as ``loop._train_epoch`` runs them; its memory after each phase."""
    phases = {"imported": proc_status_mb()["RssAnon"]}
    cfg = from_dict(spec["config"])
    d = cfg.distill
    device = torch.device("cpu")
    torch.set_num_threads(max(1, int(d.cpus_per_worker)))
    seed_everything(d.seed)
    t0 = time.perf_counter()
    train_ds = open_split(cfg.data, "train", cfg.output_dir)  # memory-mapped store
    phases["open_split"] = proc_status_mb()["RssAnon"]
    lc = LoopConfig(experiment=to_dict(cfg), train_shards=spec["train_shards"], verbose=False)
    data = make_data(cfg, train_ds, lc, device)  # DistillData: the student's rows joined with the shards
    phases["make_data"] = proc_status_mb()["RssAnon"]
    module = build_module(cfg, data, train_ds.num_classes, device).to(device)
    phases["build_module"] = proc_status_mb()["RssAnon"]
    batches = epoch_rows(len(data), d.batch_size, 1, 0, d.seed, 0)  # the epoch's permutation, cut into batches
    opt, sched, per_step = build_optim(cfg, optimizer_param_groups(module, module.losses.values()), len(batches))
    phases["build_optim_and_epoch_rows"] = proc_status_mb()["RssAnon"]
    setup_s = time.perf_counter() - t0
    module.train()

    def steps(first: int, n: int) -> tuple[list[float], torch.Tensor]:
        """``n`` steps as ``loop._train_epoch`` runs them, from batch ``first``: (seconds each, last loss)."""
        out = []
        for i in range(first, first + n):
            t = time.perf_counter()
            batch = data.batch(batches[i % len(batches)], device, 0, i)
            with autocast(device, cfg.amp):
                parts = module(batch, 0, i)
            loss = sum(module.weights[k] * o.loss.float() for k, o in parts.items())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if per_step:
                sched.step()
            out.append(time.perf_counter() - t)
        return out, loss

    times, loss = steps(0, spec["warmup"] + spec["steps"])
    if not torch.isfinite(loss):
        raise RuntimeError(f"the loss is not finite after {len(times)} steps: {float(loss)}")
    status = proc_status_mb()
    # Steady state, as from the second epoch on: every page of the maps a step reads is mapped into
    # this process (the first touch of a page is a minor fault, so the steps above include faults that
    # a long run pays once per page), then the same number of steps again.
    for col in [train_ds._rows[cfg.distill.student.modality], *data.bank.embeddings.values(), *data.bank.logits.values()]:
        for part in (col.parts if isinstance(col, PartedRows) else [np.asarray(col)]):
            flat = part.reshape(-1)
            float(flat[:: max(1, 4096 // flat.itemsize)].sum())  # one read a page
    steady, _ = steps(spec["warmup"] + spec["steps"], spec["steps"])
    phases["steps"] = status["RssAnon"]
    timed = np.asarray(times[spec["warmup"]:]) * 1000  # (steps,) ms
    memories = [m.memory for m in module.modules() if isinstance(m, MomentumMemory)]
    return {
        "rows": len(data), "private_rss_mb": round(status["RssAnon"], 1), "rss_file_mb": round(status["RssFile"], 1),
        "peak_rss_mb": round(status["VmHWM"], 1), "phases_mb": {k: round(v, 1) for k, v in phases.items()},
        "step_ms": round(float(timed.mean()), 3), "step_ms_median": round(float(np.median(timed)), 3),
        "step_ms_steady": round(float(np.mean(steady)) * 1000, 3),
        "setup_s": round(setup_s, 2), "last_loss": round(float(loss), 4),
        "crd_memory_mb": round(sum(m.numel() * m.element_size() for m in memories) / 2**20, 1),
        "crd_memories": len(memories),
    }


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """:func:`worker` in a fresh Python process; its one JSON line back."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                       capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"the distill worker failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------------------
def experiment(out: Path, rows: int, batch: int, workers: int, embed_batch: int) -> dict[str, Any]:
    embed = {"splits": ["train"], "batch_size": embed_batch, "cpus_per_actor": 1}
    if HAS_WORKERS:
        embed["workers_per_teacher"] = workers
    return {
        "name": "data-scale", "output_dir": str(out), "device": "cpu", "amp": False,
        "data": {"name": "synthetic", "kwargs": {"rows": rows, "modalities": MODALITIES, "seed": 0}},
        "teachers": [TEACHER],
        "embed": embed,
        "distill": {"teachers": [TEACHER["name"]], "student": STUDENT, "losses": [CE, KD], "batch_size": batch,
                    "cpus_per_worker": 1, "epochs": 1, "num_workers": 1},
        "tracking": {"enabled": False},
    }


def du_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def prepare_teacher(cfg) -> Any:
    """The teacher's checkpoint, untrained (seeded random weights), and its TeacherSet."""
    ds = open_split(cfg.data, "train", cfg.output_dir)
    t = cfg.teachers[0]
    spec = ds.spec(t.modality)
    torch.manual_seed(0)
    model = build_encoder(t.arch, spec, ds.num_classes, **t.arch_kwargs)
    save_teacher(checkpoint_path(t, cfg.checkpoint_dir), model, t, cfg.data, spec, ds.num_classes, {"test_top1": None})
    return existing(cfg.teachers, cfg.checkpoint_dir, cfg.data, cfg.output_dir)


def timed_embed(cfg, teachers) -> tuple[float, dict[str, str], int]:
    """(rows/s of the embed stage's wall time, train shard folders, rows written)."""
    t0 = time.perf_counter()
    idx = embed_stage.run(teachers, cfg.data, ["train"], cfg.embed, cfg.output_dir, amp=False,
                          progress=False, log=lambda m: None)
    wall = time.perf_counter() - t0
    (rec,) = idx.shards
    if rec.reused:
        raise RuntimeError(f"the shard {rec.dir} was reused, not written: the measurement would time nothing")
    return rec.rows / wall, idx.dirs("train", list(teachers)), rec.rows


def measure_size(out: Path, rows: int, args) -> dict[str, Any]:
    cfg = from_dict(experiment(out, rows, args.batch, 1, args.embed_batch))
    t0 = time.perf_counter()
    prepare(cfg.data, "train", cfg.output_dir)
    prepare_s = time.perf_counter() - t0
    teachers = prepare_teacher(cfg)
    embed_rate, shard_dirs, shard_rows = timed_embed(cfg, teachers)
    res = {"rows": rows, "train_rows": shard_rows, "prepare_s": round(prepare_s, 2), "embed_rows_per_s": round(embed_rate, 1),
           "store_mb": round(du_mb(out / "data"), 1), "shards_mb": round(du_mb(out / "shards"), 1)}
    for variant, losses in (("kd", [CE, KD]), ("crd", [CE, KD, CRD])):
        c = experiment(out, rows, args.batch, 1, args.embed_batch)
        c["distill"]["losses"] = losses
        res[variant] = run_worker({"config": c, "train_shards": shard_dirs, "warmup": args.warmup, "steps": args.steps})
    return res


def warm_pool(out: Path, args) -> None:
    """One untimed 2-worker embed of a small dataset: Ray's pool then holds two worker processes
    with torch, the package and the teacher code imported, as after a pipeline's teacher training
    (a cold worker's imports cost seconds of a core, which would swamp the smaller sizes' rates)."""
    cfg = from_dict(experiment(out, 2 * 4096, args.batch, 2, args.embed_batch))
    prepare(cfg.data, "train", cfg.output_dir)
    timed_embed(cfg, prepare_teacher(cfg))


def measure_scaling(out: Path, rows: int, args) -> dict[str, Any]:
    """Best of ``--scaling-repeats`` embed runs with 1 and with 2 workers per teacher, alternated
    (1, 2, 1, 2, ...) so that a burst of load from elsewhere hits both alike; each run writes the
    shard anew (the key does not depend on the workers)."""
    if not HAS_WORKERS:
        return {"1": None, "2": None, "note": "embed.workers_per_teacher is not a field of this EmbedConfig: not measured"}
    runs: dict[str, list[float]] = {"1": [], "2": []}
    for _ in range(args.scaling_repeats):
        for workers in (1, 2):
            cfg = from_dict(experiment(out, rows, args.batch, workers, args.embed_batch))
            prepare(cfg.data, "train", cfg.output_dir)
            teachers = prepare_teacher(cfg)
            shutil.rmtree(out / "shards", ignore_errors=True)
            shutil.rmtree(out / "index", ignore_errors=True)
            runs[str(workers)].append(round(timed_embed(cfg, teachers)[0], 1))
    return {"1": max(runs["1"]), "2": max(runs["2"]), "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="dataset sizes (both splits)")
    ap.add_argument("--scaling-rows", type=int, default=200_000, help="dataset size of the 1-vs-2 workers embed run")
    ap.add_argument("--steps", type=int, default=100, help="timed steps per distill worker")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps first (CRD fixes Z on its first step)")
    ap.add_argument("--batch", type=int, default=64, help="distill batch size (the default config's)")
    ap.add_argument("--scaling-repeats", type=int, default=2, help="embed runs per worker count (best kept)")
    ap.add_argument("--embed-batch", type=int, default=1024, help="embed stage batch size")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one measured worker
    add_workdir_arg(ap)
    args = ap.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    t_start = time.perf_counter()
    load0 = os.getloadavg()[0]
    sizes = []
    with workdir(args.workdir, "ekd-data-scale-") as tmp:
        root = Path(tmp)
        with ray_session(from_dict(experiment(root, 2, args.batch, 1, args.embed_batch)).ray):
            warm_pool(root / "warm-up", args)
            shutil.rmtree(root / "warm-up", ignore_errors=True)
            for rows in args.rows:
                out = root / f"rows-{rows}"
                sizes.append(measure_size(out, rows, args))
                if args.workdir is None:
                    shutil.rmtree(out, ignore_errors=True)  # keep the disk bounded: one size at a time
                print(f"[data_scale] {rows} rows: {json.dumps(sizes[-1])}", file=sys.stderr, flush=True)
            out = root / f"scaling-{args.scaling_rows}"
            scaling = measure_scaling(out, args.scaling_rows, args)
            if args.workdir is None:
                shutil.rmtree(out, ignore_errors=True)

    kd_rss = [s["kd"]["private_rss_mb"] for s in sizes]
    crd_rss = [s["crd"]["private_rss_mb"] for s in sizes]
    span = sizes[-1]["train_rows"] - sizes[0]["train_rows"]
    res: dict[str, Any] = {
        "rows": [s["rows"] for s in sizes],
        "train_rows": [s["train_rows"] for s in sizes],
        "worker_private_rss_mb": kd_rss,
        "step_ms": [s["kd"]["step_ms"] for s in sizes],
        "embed_rows_per_s": [s["embed_rows_per_s"] for s in sizes],
        "embed_scaling": {k: v for k, v in scaling.items() if k in ("1", "2")},
        "worker_private_rss_growth": round(kd_rss[-1] / kd_rss[0], 3),
        "worker_private_bytes_per_row": round((kd_rss[-1] - kd_rss[0]) * 2**20 / span, 1) if span else None,
        "worker_phases_mb": [s["kd"]["phases_mb"] for s in sizes],
        "worker_rss_file_mb": [s["kd"]["rss_file_mb"] for s in sizes],
        "step_ms_median": [s["kd"]["step_ms_median"] for s in sizes],
        "step_ms_steady": [s["kd"]["step_ms_steady"] for s in sizes],
        "step_ms_crd_steady": [s["crd"]["step_ms_steady"] for s in sizes],
        "worker_private_rss_mb_crd": crd_rss,
        "step_ms_crd": [s["crd"]["step_ms"] for s in sizes],
        "crd_memory_mb": [s["crd"]["crd_memory_mb"] for s in sizes],
        "crd_memories_per_teacher": sizes[0]["crd"]["crd_memories"],
        "worker_private_rss_mb_crd_less_memory": [round(r - s["crd"]["crd_memory_mb"], 1) for r, s in zip(crd_rss, sizes)],
        "store_mb": [s["store_mb"] for s in sizes],
        "shards_mb": [s["shards_mb"] for s in sizes],
        "prepare_s": [s["prepare_s"] for s in sizes],
        "embed_scaling_ratio": (round(scaling["2"] / scaling["1"], 3) if scaling.get("1") and scaling.get("2") else None),
        "embed_scaling_rows": args.scaling_rows,
        "embed_scaling_runs": scaling.get("runs"),
        "targets": {"worker_private_rss_growth_max": 1.2, "embed_scaling_ratio_min": 1.7},
        "teacher": f"{TEACHER['arch']} {TEACHER['arch_kwargs']} on {TEACHER['modality']}, untrained (random init: "
                   "memory and speed as trained, outputs not)",
        "student": f"{STUDENT['arch']} on {STUDENT['modality']}", "batch": args.batch, "steps": args.steps,
        "warmup": args.warmup, "threads_per_worker": 1,
        "machine": {"cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "loadavg_at_start": round(load0, 2),
                    "torch": torch.__version__},
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    if "note" in scaling:
        res["embed_scaling_note"] = scaling["note"]
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
