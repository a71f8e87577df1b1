"""The end-to-end GPU check: ``ensemble-kd run`` with every stage on the GPU, an interrupted run
resumed, and a CIFAR-sized job on both distill paths, in one call of a lent GPU machine (about 4
minutes there: ``bench/gpu_e2e.sh`` installs the carried wheels, then runs this).

Stages, each the real command (``python -m ensemble_kd.cli``) in a subprocess, in one work folder:

  default   ``run`` on the embedded default (one seed, the default's arms and sweep, 20 epochs; ``--tiny``:
            two arms, no sweep, 1-epoch teachers) with every stage's GPU field set: ``teachers[i].use_gpu``,
            ``embed.gpus_per_actor: 0.25`` (a fraction: embed tasks share the GPU), ``distill.use_gpu``
            with ``distill.gpus_per_worker: 0.5`` (two Tune trials share the one GPU), ``device: cuda``
            (the config's own check that every stage sets its field), ``distill.checkpoint_every: 1``.
            Once a trial has saved an epoch the command is stopped with SIGINT (Ctrl-C; exit 130),
            which kills its running trials (those left with saved epochs and no student);
  resume    ``run --resume`` on the same config: the kept trials are not run again, the killed one
            goes on from its last saved epoch (its log says ``resumed from the checkpoint of epoch k``);
  cifar     ``run`` on ``synthetic`` 3x32x32 images, 100 classes: two ``resnet32x4`` teachers and a
            ``resnet8x4`` student, one arm on the shard path (CRD exact) and one on the online path
            (CRD reference, fresh crops, the teachers in the worker), CRD with ``per_sample: true``,
            a few hundred steps each (``--tiny``: a few);
  syncs     (GPU only) in this process, CE + KD + CRD steps of the CIFAR job's two arms as the loop
            takes them, under ``torch.cuda.set_sync_debug_mode("warn")``: the host-device syncs per
            step by phase (batch, forward, backward, optimiser, the loop's bookkeeping) and where.

Where each stage's tensors were is read from what the runs recorded: every epoch's ``run.device``
and ``peak_accel_mem_mb`` in the teachers' training states and the students' histories, and, for
the embed tasks (which record no device), the shards' values: a teacher run under CUDA's bf16
autocast (``amp: true``) writes bf16 values (float32 with the low 16 bits zero), one on the CPU
does not. With ``nvidia-smi`` on the PATH a thread samples the GPU's memory and its compute
processes per stage.

    python bench/gpu_e2e.py [--device cuda|cpu] [--tiny] [--json FILE] [--logs FILE.tar.gz] [--workdir DIR]
                            [--budget-s 240]

Prints (and with ``--json`` writes) one JSON document: ``device``, ``stage_seconds``, ``step_ms`` per
arm, ``peak_accel_mem_mb``, ``on_gpu`` per stage, ``resume``, ``syncs``, ``status`` and each stage's
details. ``--device cpu --tiny`` runs the same code on the CPU in about a minute (the suite's smoke
test); ``--device cuda`` without a GPU reports ``skipped`` and exits 0. Commands join a running Ray
through ``RAY_ADDRESS``, else each starts its own local Ray, as a user's would. A stage that would
start after ``--budget-s`` seconds is skipped (said so), so the call ends inside its limit; the JSON
file is rewritten after every stage (``"partial": true`` until the end), so a call stopped at its
limit still brings back what ran.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _workdir import add_workdir_arg, workdir  # noqa: E402

DEFAULT_CFG = ROOT / "ensemble_kd" / "configs" / "default.yaml"
SIZES: dict[str, dict[str, Any]] = {
    # on a GPU: the default's arms and sweep over one seed, its 30-epoch teachers, 20-epoch trials (the
    # default's 15 and 5 more, so that Ctrl-C after a trial's first epoch finds it still running);
    # CIFAR: 12,800 train images, batch 64, 2 epochs = 400 steps per arm, N = 16384
    "gpu": {"teacher_epochs": None, "distill_epochs": 20, "arms": None, "sweep": True, "interrupt_at": 1,
            "cifar_rows": 14_223, "cifar_batch": 64, "cifar_teacher_epochs": 1, "cifar_epochs": 2,
            "cifar_negatives": 16384, "sync_steps": 6},
    # CI on 2 CPU cores: the same commands, a few steps each
    "tiny": {"teacher_epochs": 1, "distill_epochs": 10, "arms": ("student-ce", "crd+kd-ensemble"), "sweep": False,
             "interrupt_at": 1, "cifar_rows": 160, "cifar_batch": 32, "cifar_teacher_epochs": 1, "cifar_epochs": 1,
             "cifar_negatives": 64, "sync_steps": 2},
}
SYNC_MSG = "synchronizing CUDA operation"


# ----------------------------------------------------------------------------------------------
# configs


def default_config(out: Path, gpu: bool, size: dict[str, Any]) -> dict[str, Any]:
    """The embedded default with every stage's GPU field set (or none, on the CPU), one seed."""
    d = yaml.safe_load(DEFAULT_CFG.read_text())
    d["output_dir"] = str(out)
    d["device"] = "cuda" if gpu else "cpu"
    for t in d["teachers"]:
        t["use_gpu"] = gpu
        if size["teacher_epochs"]:
            t["epochs"] = size["teacher_epochs"]
    d["embed"]["gpus_per_actor"] = 0.25 if gpu else 0
    d["distill"].update(use_gpu=gpu, epochs=size["distill_epochs"], checkpoint_every=1)
    if gpu:
        d["distill"]["gpus_per_worker"] = 0.5  # two Tune trials train on the one GPU at once
    if gpu:
        d["ray"]["num_cpus"] = None  # the GPU machine's every core (the default asks for 2)
    run = d["run"]
    run.update(seeds=[0], export=False)
    if size["arms"]:
        run["arms"] = [a for a in run["arms"] if a["name"] in size["arms"]]
    if not size["sweep"]:
        run["sweep"] = None
    return d


def cifar_config(out: Path, gpu: bool, size: dict[str, Any]) -> dict[str, Any]:
    """resnet32x4 x 2 -> resnet8x4 on synthetic 3x32x32 images of 100 classes: the shard path (CRD
    exact) and the online path (CRD reference, fresh crops), both with per-sample negatives."""
    n = size["cifar_negatives"]
    teacher = {"arch": "resnet32x4", "modality": "img", "epochs": size["cifar_teacher_epochs"],
               "batch_size": size["cifar_batch"], "lr": 0.05, "use_gpu": gpu, "cpus_per_worker": 1}
    crd = {"feat_dim": 128, "tau": 0.07, "num_negatives": n, "momentum": 0.5, "per_sample": True}
    kd = {"name": "kd", "kwargs": {"temperature": 4.0}}
    return {
        "name": "cifar-synth", "output_dir": str(out), "device": "cuda" if gpu else "cpu", "amp": True,
        "data": {"name": "synthetic", "kwargs": {"rows": size["cifar_rows"], "classes": 100, "seed": 0,
                                                  "modalities": {"img": [3, 32, 32]}, "normalize": True}},
        "teachers": [{"name": "r32x4_s0", "seed": 0, **teacher}, {"name": "r32x4_s1", "seed": 1, **teacher}],
        "embed": {"splits": ["train", "test"], "batch_size": 256, "cpus_per_actor": 1,
                  "gpus_per_actor": 0.5 if gpu else 0},
        "ray": {"num_cpus": None if gpu else 2},
        "distill": {"teachers": ["r32x4_s0", "r32x4_s1"], "student": {"arch": "resnet8x4", "modality": "img"},
                    "losses": [{"name": "ce"}, kd,
                               {"name": "crd", "weight": 0.8, "kwargs": {**crd, "mode": "exact", "negatives": "class-aware"}}],
                    "epochs": size["cifar_epochs"], "batch_size": size["cifar_batch"], "use_gpu": gpu, "cpus_per_worker": 1,
                    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0005, "schedule": "cosine"}},
        "run": {"seeds": [0], "export": False, "arms": [
            {"name": "crd-shards", "teachers": "all"},
            {"name": "crd-online", "teachers": "all", "losses": [
                {"name": "ce"}, kd, {"name": "crd", "weight": 0.8, "kwargs": {**crd, "mode": "reference", "negatives": "uniform"}}],
             "set": {"distill.teacher_outputs": "online",
                     "distill.augment": {"enabled": True, "crop_padding": 4, "flip": True}}}]},
        "tune": {"cpus_per_trial": 1, "max_concurrent_trials": 2},
    }


def write_config(d: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


# ----------------------------------------------------------------------------------------------
# commands and what they leave


class Command:
    """``python -m ensemble_kd.cli ARGS`` in a subprocess, its merged output read line by line with
    the time each line came (the stage boundaries) and kept in ``log``."""

    def __init__(self, args: list[str], log: Path) -> None:
        env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.t0 = time.monotonic()
        self.lines: list[tuple[float, str]] = []
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "ensemble_kd.cli", *args, "--no-progress"], cwd=ROOT,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with self.log.open("w") as f:
            for line in self.proc.stdout:
                self.lines.append((time.monotonic() - self.t0, line.rstrip("\n")))
                f.write(line)
                f.flush()

    def wait(self, timeout: float | None = None) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._reader.join(10)
        self.seconds = time.monotonic() - self.t0
        return rc

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def tail(self, n: int = 40) -> str:
        return "\n".join(line for _, line in self.lines[-n:])

    def log_file(self) -> Path | None:
        """The command's own log file (its ``log: <file>`` line)."""
        return next((Path(line[5:].strip()) for _, line in reversed(self.lines) if line.startswith("log: ")), None)

    def stage_seconds(self) -> dict[str, float]:
        """When the command's steps ended, from the time its lines came: the last teacher trained, the
        last shard written, the trials (from the line announcing them to the command's end)."""
        def last(pattern: str) -> float | None:
            return next((t for t, line in reversed(self.lines) if re.search(pattern, line)), None)

        def first(pattern: str) -> float | None:
            return next((t for t, line in self.lines if re.search(pattern, line)), None)

        out = {"teachers_done_at_s": last(r"^teacher \S+: (test top-1|reused)"),
               "shards_done_at_s": last(r"shards under .* \(\d+ reused\)"),
               "trials_start_at_s": first(r"as Ray Tune trials|--resume: .* trials had finished")}
        end = getattr(self, "seconds", None)
        if out["trials_start_at_s"] is not None and end is not None:
            out["trials_s"] = end - out["trials_start_at_s"]
        out["command_s"] = end
        return {k: round(v, 2) for k, v in out.items() if v is not None}


def state_epochs(path: Path) -> int:
    """Epochs in a run's saved state (0: none yet, or being replaced)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"]) + 1
    except Exception:  # noqa: BLE001 - not there yet, or half written
        return 0


def mlflow_runs(out: Path) -> dict[str, dict[str, str]]:
    """run name -> its tags and ``run.*`` params, from the folder's MLflow store (read-only)."""
    db = out / "mlflow.db"
    if not db.is_file():
        return {}
    runs: dict[str, dict[str, str]] = collections.defaultdict(dict)
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as c:
        for name, k, v in c.execute("SELECT r.name, t.key, t.value FROM runs r JOIN tags t ON r.run_uuid = t.run_uuid "
                                    "WHERE t.key IN ('arm', 'seed') OR t.key LIKE 'sweep.%'"):
            runs[name][k] = v
        for name, k, v in c.execute("SELECT r.name, p.key, p.value FROM runs r JOIN params p ON r.run_uuid = p.run_uuid "
                                    "WHERE p.key IN ('run.device', 'run.peak_accel_mem_mb')"):
            runs[name][k] = v
    return dict(runs)


def history_record(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Where a run's epochs ran and its peak accelerator memory, from every epoch's ``run`` entry."""
    runs = [h["run"] for h in history if isinstance(h.get("run"), dict)]
    devices = sorted({r["device"] for r in runs})
    epoch_s = [h["epoch_seconds"] for h in history if "epoch_seconds" in h]
    steady = epoch_s[1:] or epoch_s  # the first epoch pays the warm-up (CUDA kernels, cuDNN's choices)
    return {"devices": devices, "epochs": len(history),
            "peak_accel_mem_mb": max((r.get("peak_accel_mem_mb", 0.0) for r in runs), default=None),
            "epoch_ms": round(1000 * float(np.median(steady)), 2) if steady else None}


def on_gpu(devices: list[str]) -> bool:
    return bool(devices) and all(d.startswith("cuda") for d in devices)


def teachers_record(out: Path) -> dict[str, Any]:
    """Each teacher training run's record (``ray_results/teacher-*/state.pt``)."""
    res = {}
    for st in sorted((out / "ray_results").glob("teacher-*/state.pt")):
        s = torch.load(st, map_location="cpu", weights_only=True)
        res[st.parent.name] = history_record(s["history"])
    return res


def students_record(out: Path, experiment: str) -> dict[str, Any]:
    """Each finished trial of the experiment: its arm (MLflow tag), where it ran, its peak memory and
    its steady step time (median epoch / steps per epoch)."""
    from ensemble_kd.core.config import from_dict
    from ensemble_kd.storage.datastore import open_split

    tags = mlflow_runs(out)
    res: dict[str, Any] = {}
    rows_cache: dict[str, int] = {}
    for sp in sorted((out / "students").glob(f"{experiment}-*/student.pt")):
        s = torch.load(sp, map_location="cpu", weights_only=True)
        name = sp.parent.name
        rec = history_record(s["history"])
        cfg = from_dict(s["config"])
        key = json.dumps(s["config"]["data"], sort_keys=True)
        if key not in rows_cache:
            rows_cache[key] = len(open_split(cfg.data, "train", str(out)))
        rows = rows_cache[key]
        lab = cfg.distill.labels
        if not cfg.distill.teachers and lab is not None and getattr(lab, "count", None):  # CE alone on the labelled rows
            rows = lab.count
        steps = max(1, rows // cfg.distill.batch_size)
        t = tags.get(name, {})
        arm = t.get("arm", name) + "".join(f" {k[6:]}={v}" for k, v in sorted(t.items()) if k.startswith("sweep."))
        res[name] = {"arm": arm, **rec, "steps_per_epoch": steps, "mlflow_run_device": t.get("run.device"),
                     "step_ms": round(rec["epoch_ms"] / steps, 3) if rec["epoch_ms"] else None}
    return res


def bf16_share(shard_dir: Path) -> dict[str, float]:
    """Share of a shard's non-zero embedding and logit values that are bf16 numbers (float32 with
    the low 16 bits zero): 1.0 where the teacher ran under CUDA's bf16 autocast, about 0 on the CPU."""
    out = {}
    for part in sorted(shard_dir.glob("part-*.arrow"))[:1]:
        with pa.memory_map(str(part)) as src:
            table = pa.ipc.open_file(src).read_all()
        for col in table.column_names:
            if col.endswith((".embedding", ".logits")):
                flat = table.column(col).combine_chunks().flatten().to_numpy(zero_copy_only=False)
                bits = np.asarray(flat, dtype=np.float32).view(np.uint32)
                nz = bits[(bits & 0x7FFFFFFF) != 0]
                out[col.rsplit(".", 1)[1]] = round(float(np.mean((nz & 0xFFFF) == 0)), 4) if len(nz) else 0.0
    return out


def embed_record(out: Path, gpus_per_actor: float) -> dict[str, Any]:
    """The embed stage's shards: per train shard, the bf16 shares of its values (see :func:`bf16_share`)."""
    shards = {d.name.split("__")[0]: bf16_share(d) for d in sorted((out / "shards").glob("*__train__*")) if d.is_dir()}
    shares = [v for s in shards.values() for v in s.values()]
    return {"gpus_per_actor": gpus_per_actor, "bf16_share": shards,
            "on_gpu": bool(shares) and min(shares) > 0.9, "recorded_device": None}


def experiment_of(out: Path) -> str | None:
    p = out / "index" / "run.json"
    return json.loads(p.read_text())["experiment"] if p.is_file() else None


# ----------------------------------------------------------------------------------------------
# the GPU's own view


class GpuMonitor:
    """Samples ``nvidia-smi`` (memory used, utilisation, compute processes) every ``every`` seconds,
    per stage; nothing where there is no nvidia-smi."""

    def __init__(self, every: float = 0.5) -> None:
        self.every, self.stage, self.stats = every, None, {}
        self.ok = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if self.ok:
            self._thread.start()

    def _query(self, *args: str) -> list[list[str]]:
        r = subprocess.run(["nvidia-smi", *args, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
        return [[c.strip() for c in ln.split(",")] for ln in r.stdout.strip().splitlines() if ln.strip()]

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            stage = self.stage
            if stage is None:
                continue
            try:
                used, util = (float(v) for v in self._query("--query-gpu=memory.used,utilization.gpu")[0][:2])
                procs = self._query("--query-compute-apps=pid,used_memory")
            except Exception:  # noqa: BLE001 - a sample lost is no matter
                continue
            s = self.stats.setdefault(stage, {"max_used_mb": 0.0, "max_util_pct": 0.0, "max_processes": 0, "samples": 0})
            s["max_used_mb"] = max(s["max_used_mb"], used)
            s["max_util_pct"] = max(s["max_util_pct"], util)
            s["max_processes"] = max(s["max_processes"], len(procs))
            s["samples"] += 1

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        return self.stats if self.ok else {"status": "skipped: no nvidia-smi"}


# ----------------------------------------------------------------------------------------------
# stages


def killed_trials(out: Path) -> dict[str, int]:
    """The experiment's trials that saved some epochs and have no student (stopped mid-run): run -> epochs saved."""
    exp = experiment_of(out)
    if exp is None:
        return {}
    return {st.parent.name: state_epochs(st) for st in sorted((out / "ray_results").glob(f"{exp}-*/state.pt"))
            if not (out / "students" / st.parent.name / "student.pt").exists()}


def stage_default(cfg: Path, out: Path, logs: Path, size: dict[str, Any], res: dict[str, Any]) -> None:
    """``run`` on the default, stopped with SIGINT (Ctrl-C) as soon as a trial has saved
    ``interrupt_at`` epochs; the trials it kills are those left with saved epochs and no student."""
    epochs, at = size["distill_epochs"], size["interrupt_at"]
    cmd = Command(["run", "--config", str(cfg), "--out", str(out)], logs / "default-run.log")
    seen: dict[Path, int] = {}
    signalled = None
    while signalled is None and cmd.proc.poll() is None:
        exp = experiment_of(out)
        for st in (out / "ray_results").glob(f"{exp}-*/state.pt") if exp else ():
            try:
                mtime = st.stat().st_mtime_ns
            except OSError:
                continue
            if seen.get(st) == mtime:
                continue
            seen[st] = mtime
            n = state_epochs(st)
            if at <= n < epochs:
                cmd.proc.send_signal(signal.SIGINT)
                signalled = {"trial": st.parent.name, "saved_epochs": n, "at_s": round(time.monotonic() - cmd.t0, 2)}
                break
        time.sleep(0.05)
    rc = cmd.wait(600)
    killed = killed_trials(out)
    res["interrupt"] = {"rc": rc, "signalled_at": signalled, "killed": killed, **cmd.stage_seconds()}
    res["teachers"] = teachers_record(out)
    res["embed"] = embed_record(out, yaml.safe_load(cfg.read_text())["embed"]["gpus_per_actor"])
    if signalled is None:
        raise RuntimeError(f"the run ended (exit {rc}) before any trial could be interrupted:\n{cmd.tail()}")
    if rc != 130:
        raise RuntimeError(f"the interrupted run exited {rc}, not 130:\n{cmd.tail()}")
    if not any(n >= 1 for n in killed.values()):
        raise RuntimeError(f"Ctrl-C came too late: no trial was left with saved epochs to resume ({killed}); "
                           f"rerun with more distill epochs")


def stage_resume(cfg: Path, out: Path, logs: Path, res: dict[str, Any], killed: dict[str, int]) -> None:
    """``run --resume``: each killed trial goes on from its last saved epoch; the run finishes."""
    cmd = Command(["run", "--config", str(cfg), "--out", str(out), "--resume"], logs / "default-resume.log")
    rc = cmd.wait(600)
    log = cmd.log_file()
    text = cmd.text() + ("\n" + log.read_text() if log and log.is_file() else "")
    resumed = sorted(int(m) for m in re.findall(r"resumed from the checkpoint of epoch (\d+)", text))
    exp = experiment_of(out)
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    trials = students_record(out, exp) if exp else {}
    saved = sorted(n for n in killed.values() if n >= 1)
    res.update({"rc": rc, **cmd.stage_seconds(), "killed_trials": killed, "resumed_from_epochs": resumed,
                "killed_trials_finished": {t: trials.get(t, {}).get("epochs") for t in killed},
                "unfinished": summary.get("unfinished"), "arms": sorted(summary.get("arms", {}))})
    res["trials"] = trials
    if rc != 0:
        raise RuntimeError(f"run --resume exited {rc}:\n{cmd.tail()}")
    if not saved or collections.Counter(saved) - collections.Counter(resumed) or not all(t in trials for t in killed):
        raise RuntimeError(f"the killed trials did not go on from their saved epochs {saved} (resumed from {resumed}; "
                           f"finished: {res['killed_trials_finished']})")


def stage_cifar(cfg: Path, out: Path, logs: Path, res: dict[str, Any]) -> None:
    cmd = Command(["run", "--config", str(cfg), "--out", str(out)], logs / "cifar-run.log")
    rc = cmd.wait(600)
    res.update({"rc": rc, **cmd.stage_seconds()})
    if rc != 0:
        raise RuntimeError(f"the CIFAR-sized run exited {rc}:\n{cmd.tail()}")
    res["teachers"] = teachers_record(out)
    res["embed"] = embed_record(out, yaml.safe_load(cfg.read_text())["embed"]["gpus_per_actor"])
    res["trials"] = students_record(out, experiment_of(out))


def stage_syncs(cfg_path: Path, out: Path, steps: int, device: torch.device = torch.device("cuda", 0)) -> dict[str, Any]:
    """Host-device syncs per CE + KD + CRD step of the CIFAR job's two arms, in this process, on the
    GPU, as the loop takes a step (:func:`ensemble_kd.training.loop._train_epoch`): the batch, the
    forward under autocast, backward, the optimiser, and the loop's on-device bookkeeping."""
    from ensemble_kd.core.config import from_dict, to_dict
    from ensemble_kd.core.devices import autocast
    from ensemble_kd.orchestration import pipeline
    from ensemble_kd.storage.datastore import open_split
    from ensemble_kd.training import loop
    from ensemble_kd.training.data import epoch_rows

    base = yaml.safe_load(cfg_path.read_text())
    arms = {a["name"]: a for a in base["run"]["arms"]}
    cuda = device.type == "cuda"  # (on the CPU the same steps run, with nothing to count: a check of this code)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    res: dict[str, Any] = {}
    for arm_name, arm in arms.items():
        d = json.loads(json.dumps(base))
        if arm.get("losses"):
            d["distill"]["losses"] = arm["losses"]
        for k, v in (arm.get("set") or {}).items():
            d["distill"][k.split(".", 1)[1]] = v
        cfg = from_dict(d)
        inputs = pipeline.distill_inputs(cfg)
        lc = loop.LoopConfig(experiment=to_dict(cfg), train_shards=inputs["train_shards"], teachers=inputs["teachers"])
        torch.manual_seed(0)
        train_ds = open_split(cfg.data, "train", cfg.output_dir)
        data = loop.make_data(cfg, train_ds, lc, device)
        module = loop.build_module(cfg, data, train_ds.num_classes, device).to(device)
        opt = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
        batches = epoch_rows(len(data), cfg.distill.batch_size, 1, 0, cfg.distill.seed, 0)
        names = [*module.losses.keys(), "total"]
        first_bad = torch.full((len(names),), -1, dtype=torch.int64, device=device)
        step_ids = torch.arange(len(batches), device=device)
        sums: dict[str, torch.Tensor] = {}
        phases = ("batch", "forward", "backward", "optimizer", "bookkeeping")
        counts = {p: [] for p in phases}
        sites: collections.Counter = collections.Counter()
        times = []
        for i in range(1 + steps):
            rows = batches[i % len(batches)]
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                sync()
                t0 = time.perf_counter()
                if cuda:
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    marks = [0]
                    batch = data.batch(rows, device, 0, i)
                    marks.append(len(rec))
                    with autocast(device, cfg.amp):
                        parts = module(batch, 0, i)
                    loss = sum(module.weights[n] * o.loss.float() for n, o in parts.items())
                    marks.append(len(rec))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    marks.append(len(rec))
                    opt.step()
                    marks.append(len(rec))
                    for n, o in parts.items():
                        sums[n] = sums.get(n, 0) + o.loss.detach().double()
                    vals = torch.stack([*(o.loss.detach().float() for o in parts.values()), loss.detach().float()])
                    first_bad = torch.where((first_bad < 0) & ~torch.isfinite(vals), step_ids[i % len(batches)], first_bad)
                    marks.append(len(rec))
                finally:
                    if cuda:
                        torch.cuda.set_sync_debug_mode("default")
                sync()
                times.append(time.perf_counter() - t0)
            syncs = [w for w in rec if SYNC_MSG in str(w.message)]
            if i == 0:
                first = len(syncs)
                continue
            for p, a, b in zip(phases, marks, marks[1:]):
                counts[p].append(sum(1 for w in rec[a:b] if SYNC_MSG in str(w.message)))
            sites.update(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
        per_phase = {p: round(float(np.mean(v)), 2) for p, v in counts.items()}
        res[arm_name] = {"first_step": first, "per_step": round(sum(per_phase.values()), 2), "per_phase": per_phase,
                         "sites": dict(sites.most_common(8)), "steps": steps,
                         "step_ms_in_process": round(1000 * float(np.median(times[1:])), 2)}
        del module, data, opt
        if cuda:
            torch.cuda.empty_cache()
    return res


# ----------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a few steps per stage (the suite's smoke test, on CPU)")
    ap.add_argument("--json", default=None, help="also write the JSON document here")
    ap.add_argument("--budget-s", type=float, default=240.0,
                    help="skip a stage that would start after this many seconds (default 240: the call's limit is 360)")
    ap.add_argument("--logs", default=None, help="write the commands' logs and configs here (a .tar.gz)")
    ap.add_argument("--install-s", type=float, default=None, help="(gpu_e2e.sh) seconds its wheel install took")
    add_workdir_arg(ap)
    args = ap.parse_args()
    gpu = args.device == "cuda"
    size = SIZES["tiny" if args.tiny else "gpu"]
    t_start = time.monotonic()
    import ray  # noqa: PLC0415 - its version for the record (and an early failure where it is missing)

    res: dict[str, Any] = {"device": args.device, "size": "tiny" if args.tiny else "gpu", "torch": torch.__version__,
                           "ray": ray.__version__, "cuda": torch.version.cuda, "install_s": args.install_s,
                           "gpu": torch.cuda.get_device_name(0) if gpu and torch.cuda.is_available() else None,
                           "ray_address": os.environ.get("RAY_ADDRESS")}
    if gpu and not torch.cuda.is_available():
        res["status"] = "skipped: torch sees no CUDA device"
        emit(res, args.json)
        return
    stages: dict[str, dict[str, Any]] = {}
    monitor = GpuMonitor() if gpu else None

    def run_stage(name: str, fn) -> None:
        st = stages.setdefault(name, {})
        if time.monotonic() - t_start > args.budget_s:
            st["status"] = f"skipped: past --budget-s {args.budget_s:.0f}"
            return
        if monitor:
            monitor.stage = name
        t0 = time.monotonic()
        try:
            fn(st)
            st["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - every stage is reported, whatever failed before it
            st["status"] = f"failed: {type(e).__name__}: {e}"[:4000]
            st["traceback"] = traceback.format_exc()[-2000:]
        st["seconds"] = round(time.monotonic() - t0, 2)
        if args.json:  # so far, in case the call's limit ends it before the next stage does
            emit({**res, **summarise(stages, gpu), "stages": stages, "partial": True}, args.json, quiet=True)

    with workdir(args.workdir, "ekd-gpu-e2e-") as tmp:
        work = Path(tmp)
        logs = work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        dcfg = write_config(default_config(work / "default", gpu, size), work / "default.yaml")
        ccfg = write_config(cifar_config(work / "cifar", gpu, size), work / "cifar.yaml")
        run_stage("default", lambda st: stage_default(dcfg, work / "default", logs, size, st))
        run_stage("resume", lambda st: stage_resume(dcfg, work / "default", logs, st,
                                                    stages["default"].get("interrupt", {}).get("killed", {})))
        run_stage("cifar", lambda st: stage_cifar(ccfg, work / "cifar", logs, st))
        if gpu:
            run_stage("syncs", lambda st: st.update(stage_syncs(ccfg, work / "cifar", size["sync_steps"])))
        else:
            stages["syncs"] = {"status": "skipped: cpu (torch.cuda.set_sync_debug_mode counts CUDA syncs only)"}
        if monitor:
            res["gpu_monitor"] = monitor.stop()
        if args.logs:  # the commands' console output and their own log files (the workers' lines), as one archive
            Path(args.logs).parent.mkdir(parents=True, exist_ok=True)
            files = [*logs.glob("*.log"), *work.glob("*/logs/*.log"), dcfg, ccfg]
            subprocess.run(["tar", "czf", args.logs, "-C", str(work), *(str(f.relative_to(work)) for f in files)],
                           check=False)
    res.update(summarise(stages, gpu))
    res["stages"] = stages
    res["total_s"] = round(time.monotonic() - t_start, 2)
    emit(res, args.json)
    if res["status"] != "ok":
        sys.exit(1)


def summarise(stages: dict[str, dict[str, Any]], gpu: bool) -> dict[str, Any]:
    """The headline figures: seconds per stage, step ms per arm, peak accelerator memory and whether
    each stage's tensors were on the GPU."""
    d, r, c = stages.get("default", {}), stages.get("resume", {}), stages.get("cifar", {})
    secs = {"default_run_interrupted": d.get("seconds"), "default_run_resumed": r.get("seconds"),
            "cifar_run": c.get("seconds"), "syncs": stages.get("syncs", {}).get("seconds")}
    for prefix, st in (("default_", d.get("interrupt", {})), ("resume_", r), ("cifar_", c)):
        for k in ("teachers_done_at_s", "shards_done_at_s", "trials_s", "command_s"):
            if k in st:
                secs[prefix + k] = st[k]
    step_ms = {f"default/{t['arm']}": t["step_ms"] for t in r.get("trials", {}).values()}
    step_ms.update({f"cifar/{t['arm']}": t["step_ms"] for t in c.get("trials", {}).values()})
    for arm, s in (stages.get("syncs") or {}).items():
        if isinstance(s, dict) and "step_ms_in_process" in s:
            step_ms[f"cifar/{arm} (in-process)"] = s["step_ms_in_process"]

    def peak(recs: dict[str, Any]) -> float | None:
        vals = [v["peak_accel_mem_mb"] for v in recs.values() if v.get("peak_accel_mem_mb") is not None]
        return max(vals) if vals else None

    def where(recs: dict[str, Any]) -> bool | None:
        return all(on_gpu(v["devices"]) for v in recs.values()) if recs else None

    tr = {"default_teachers": d.get("teachers", {}), "default_trials": r.get("trials", {}),
          "cifar_teachers": c.get("teachers", {}), "cifar_trials": c.get("trials", {})}
    flags = {k: where(v) for k, v in tr.items()}
    flags["default_embed"] = d.get("embed", {}).get("on_gpu")
    flags["cifar_embed"] = c.get("embed", {}).get("on_gpu")
    ran = all(stages.get(s, {}).get("status") == "ok" for s in ("default", "resume", "cifar")) and \
        stages.get("syncs", {}).get("status", "").startswith(("ok", "skipped: cpu"))
    placed = all(v is gpu for v in flags.values())  # every stage where the run asked it to be
    return {"stage_seconds": {k: v for k, v in secs.items() if v is not None}, "step_ms": step_ms,
            "peak_accel_mem_mb": {k: peak(v) for k, v in tr.items()}, "on_gpu": flags,
            "resume": {k: r.get(k) for k in ("killed_trials", "resumed_from_epochs", "killed_trials_finished", "rc")},
            "syncs": stages.get("syncs"), "status": "ok" if ran and placed else "failed"}


def emit(res: dict[str, Any], path: str | None, quiet: bool = False) -> None:
    text = json.dumps(res, indent=2, default=str)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path + ".tmp").write_text(text)
        os.replace(path + ".tmp", path)
    if not quiet:
        print(text, flush=True)


if __name__ == "__main__":
    main()
