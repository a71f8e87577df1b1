"""The one training loop: ``train_loop_per_worker`` run by Ray Train's ``TorchTrainer``.

Every method enters through the loss registry: the loop builds the configured loss terms,
puts them and the student into one trainable :class:`DistillModule` (wrapped once by Ray
Train for DDP), and minimises ``sum(weight * term)``. There is no per-method branch here.

Each epoch ends with a checkpoint (student, heads, memories, optimiser, scheduler, RNG states,
epoch, metric history) reported to Ray Train; a restarted worker group (a killed worker,
``max_failures``) or a resumed run (``--resume``: the same run name) continues from it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ensemble_kd.checkpoint import atomic_torch_save
from ensemble_kd.config import ConfigError, ExperimentConfig, from_dict, to_dict
from ensemble_kd.data import DistillData, epoch_rows, eval_dataset
from ensemble_kd.devices import autocast, seed_everything
from ensemble_kd.raycluster import quiet_train_reports
from ensemble_kd.losses import DistillInputs, LossContext, build_loss
from ensemble_kd import dist
from modalities import build_dataset, build_encoder


class DistillModule(nn.Module):
    """Everything trainable, as one module: the student and every loss term (with its heads,
    regressors and memories), keyed by loss name."""

    def __init__(self, student: nn.Module, losses: dict[str, nn.Module], weights: dict[str, float]) -> None:
        super().__init__()
        self.student = student
        self.losses = nn.ModuleDict(losses)
        self.weights = dict(weights)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        emb, logits = self.student(batch["x"])  # (B, d_s), (B, C)
        x = DistillInputs(emb, logits, batch["labels"], batch["index"], batch["teacher_emb"], batch["teacher_logits"])
        return {name: loss(x) for name, loss in self.losses.items()}


def build_module(cfg: ExperimentConfig, data: DistillData, num_classes: int, device: torch.device) -> DistillModule:
    d = cfg.distill
    student = build_encoder(d.student.arch, data.spec, num_classes, **d.student.arch_kwargs)
    ctx = LossContext(student_dim=student.embed_dim, num_classes=num_classes,
                      teacher_dims={n: int(e.shape[1]) for n, e in data.bank.embeddings.items()},
                      bank=data.bank, seed=d.seed, device=device)
    losses = {t.name: build_loss(t.name, ctx, **t.kwargs) for t in d.losses}
    return DistillModule(student, losses, {t.name: t.weight for t in d.losses})


def build_optim(cfg: ExperimentConfig, params) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    o = cfg.distill.optim
    if o.name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    # Closed-form multipliers of the epoch, computed from the current config: a run resumed with
    # more epochs follows the new schedule (a restored chained scheduler would keep the old one).
    epochs = cfg.distill.epochs
    if o.schedule == "step":
        def factor(e: int) -> float:
            return o.decay_rate ** sum(e >= m for m in o.decay_epochs)
    elif o.schedule == "cosine":
        def factor(e: int) -> float:
            return 0.5 * (1.0 + math.cos(math.pi * min(e, epochs) / epochs))
    else:
        def factor(e: int) -> float:
            return 1.0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return opt, sched


@torch.no_grad()
def evaluate(student: nn.Module, ds, modality: str, device: torch.device, batch_size: int = 1024) -> float:
    was = student.training
    student.eval()
    correct = 0
    for s in range(0, len(ds), batch_size):
        b = ds.get_batch(np.arange(s, min(s + batch_size, len(ds))), [modality])
        _, logits = student(b["inputs"][modality].to(device))
        correct += int((logits.argmax(1).cpu() == b["label"]).sum())
    student.train(was)
    return correct / max(len(ds), 1)


def buffer_checksums(module: nn.Module) -> list[str]:
    """Every rank's checksum of the module's buffers (memories, Z, BN statistics aside), gathered
    in rank order: equal entries mean the memories stayed identical across workers."""
    h = hashlib.sha256()
    for name, b in sorted(module.named_buffers()):
        if "running_" in name or "num_batches_tracked" in name:  # per-rank BN statistics may differ
            continue
        h.update(name.encode())
        h.update(b.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    mine = torch.tensor([int(h.hexdigest()[:15], 16)], dtype=torch.int64)
    dev = next(module.parameters()).device
    return [f"{int(v):015x}" for v in dist.all_gather_cat(mine.to(dev)).cpu()]


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


STATE_FILE = "state.pt"


def reported(metrics: dict[str, Any]) -> dict[str, Any]:
    """What goes to Ray Train (and Tune): the scalar metrics. The per-rank buffer checksums stay in
    the checkpointed history; Tune's loggers take scalars only."""
    return {k: v for k, v in metrics.items() if not isinstance(v, (list, tuple, dict))}


def save_state(path: Path, module: DistillModule, opt, sched, epoch: int, history: list[dict], cfg: ExperimentConfig) -> None:
    atomic_torch_save({"module": module.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                       "epoch": epoch, "rng": _rng_state(), "history": history, "config": to_dict(cfg)}, path)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config``: {"experiment": the config as a dict, "train_shards": {teacher: dir}}."""
    import ray.train
    import ray.train.torch

    cfg = from_dict(config["experiment"])
    d = cfg.distill
    quiet_train_reports(cfg.ray.train_log_level)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(d.cpus_per_worker)))
    seed_everything(d.seed)  # same initial weights on every rank

    train_ds = build_dataset(cfg.data.name, "train", cfg.data.root, **cfg.data.kwargs)
    test_ds = eval_dataset(cfg, train_ds)  # distill.eval_data's test split, else data's
    data = DistillData(train_ds, d.student.modality, config["train_shards"], adv_replay_teacher=d.adv_replay_teacher,
                       selection=d.selection)
    module = build_module(cfg, data, train_ds.num_classes, device).to(device)
    opt, sched = build_optim(cfg, [p for p in module.parameters() if p.requires_grad])

    start, history = 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as cdir:
            st = torch.load(Path(cdir) / STATE_FILE, map_location=device, weights_only=False)
        module.load_state_dict(st["module"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        for g, lr in zip(opt.param_groups, sched.get_lr()):  # the lr of the *current* schedule at this epoch,
            g["lr"] = lr  # not the one the optimiser state saved (a run resumed with more epochs changes it)
        _set_rng_state(st["rng"])
        start, history = st["epoch"] + 1, st["history"]
        if rank == 0:
            print(f"[distill] resumed from the checkpoint of epoch {st['epoch'] + 1}", flush=True)

    # One wrap. Memories are kept identical by the losses' own all-gather updates, so DDP must not
    # re-broadcast buffers from rank 0 on every forward.
    model = ray.train.torch.prepare_model(module, parallel_strategy_kwargs={"broadcast_buffers": False})
    fault = config.get("fault") or {}
    mlflow_run = config.get("mlflow")
    for epoch in range(start, d.epochs):
        if fault.get("kill_at_epoch") == epoch and rank == fault.get("rank", 0) and not Path(fault["marker"]).exists():
            Path(fault["marker"]).write_text("killed")  # once: the restarted group carries on
            os._exit(1)  # a hard worker death, as an OOM kill or a lost node would be
        t0 = time.perf_counter()
        module.train()
        sums: dict[str, float] = {}
        batches = epoch_rows(len(data), d.batch_size, world, rank, d.seed, epoch)
        for rows in batches:
            batch = data.batch(rows, device)
            with autocast(device, cfg.amp):
                parts = model(batch)
            loss = sum(module.weights[n] * v.float() for n, v in parts.items())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for n, v in parts.items():
                sums[n] = sums.get(n, 0.0) + float(v.detach())
            sums["total"] = sums.get("total", 0.0) + float(loss.detach())
        lr = opt.param_groups[0]["lr"]
        sched.step()
        means = dist.all_reduce_mean(torch.tensor([sums[k] / len(batches) for k in sorted(sums)], device=device))
        metrics: dict[str, Any] = {f"loss/{k}": float(v) for k, v in zip(sorted(sums), means.tolist())}
        metrics.update({"epoch": epoch + 1, "lr": lr, "epoch_seconds": time.perf_counter() - t0})
        if (epoch + 1) % d.eval_every == 0 or epoch + 1 == d.epochs:
            metrics["test_top1"] = evaluate(module.student, test_ds, d.student.modality, device)
        for loss in module.losses.values():  # per-term diagnostics (CRD's per-teacher parts and Z, ...)
            metrics.update(getattr(loss, "extra_metrics", dict)())
        metrics["buffer_checksums"] = buffer_checksums(module)
        history.append(metrics)
        if rank == 0:
            if mlflow_run:  # per epoch, from the worker: a trial that ASHA stops keeps the epochs it ran
                from ensemble_kd.tracking import log_epoch

                log_epoch(mlflow_run["uri"], mlflow_run["run_id"], metrics)
            if config.get("verbose", True):
                print("[distill] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()), flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                save_state(Path(tmp) / STATE_FILE, module, opt, sched, epoch, history, cfg)
                (Path(tmp) / "history.json").write_text(json.dumps(history))
                ray.train.report(reported(metrics), checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(reported(metrics))


@dataclass
class DistillResult:
    run_name: str
    history: list[dict[str, Any]]
    student_path: Path
    final_top1: float | None
    checkpoint_dir: str
    mlflow_run_id: str | None = None


def train_shard_dirs(cfg: ExperimentConfig) -> dict[str, str]:
    """Train-split shard directory of every distill teacher, checked to exist."""
    from ensemble_kd.embed import plan_shards
    from ensemble_kd.teachers import existing_checkpoints

    names = list(cfg.distill.teachers)
    if not names:
        return {}
    sub = _train_split_only(cfg, names)
    ckpts = existing_checkpoints(cfg, names, verify=False)  # plan_shards reads (and verifies) each next
    out = {}
    for name, _split, key, _n in plan_shards(sub, ckpts):
        dr = cfg.shard_dir / key.dirname
        if not dr.exists():
            raise ConfigError(f"no train shard of teacher {name!r} at {dr}: run `ensemble-kd embed` first")
        out[name] = str(dr)  # absolute, as output_dir is: Ray Train workers run in another working directory
    if cfg.distill.selection:  # DFND: refuse a corrupt or mismatched selection before any worker starts
        from ensemble_kd.select import check_selection, load_selection
        from ensemble_kd.shards import read_manifest

        check_selection(load_selection(cfg.distill.selection), {n: read_manifest(p) for n, p in out.items()})
    return out


def _train_split_only(cfg: ExperimentConfig, teachers: list[str]) -> ExperimentConfig:
    """The config narrowed to the given teachers and the train split (to plan their train shards)."""
    d = to_dict(cfg)
    d["teachers"] = [to_dict(cfg.teacher(n)) for n in teachers]
    d["embed"]["splits"] = ["train"]
    return from_dict(d)


def run_distill(cfg: ExperimentConfig, resume: bool = False, log=print, fault: dict | None = None,
                callbacks: list | None = None, extra_tags: dict[str, str] | None = None,
                parent_run_id: str | None = None, verbose: bool = True) -> DistillResult:
    """Distil the configured student on Ray Train (Ray must be initialised); returns its history.

    With tracking on, the MLflow run is opened before training (nested under ``parent_run_id``,
    with ``extra_tags``), rank 0 logs every epoch into it, and it is closed FINISHED with the
    artifacts (or FAILED). ``callbacks``: Ray Train user callbacks (a Tune trial passes
    ``TuneReportCallback``). ``verbose``: a ``[distill]`` line per epoch from rank 0. ``fault`` is
    a test hook: ``{"kill_at_epoch": k, "marker": path}`` kills worker 0 once at the start of
    epoch k, to exercise Ray Train's restart from the last checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    d = cfg.distill
    shards = train_shard_dirs(cfg)
    out = Path(cfg.output_dir)
    last = out / "distill" / "last_run.txt"
    if d.run_name:
        name = d.run_name
    elif resume:
        if not last.exists():
            raise ConfigError(f"--resume: no earlier distillation run under {out} (no {last})")
        name = last.read_text().strip()
    else:
        name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    last.parent.mkdir(parents=True, exist_ok=True)
    last.write_text(name)
    log(f"distill: run {name}: student {d.student.arch} on {d.student.modality}, teachers {list(d.teachers) or 'none'}, "
        f"losses {[t.name for t in d.losses]}, {d.num_workers} worker(s)")
    mlflow_run = None
    if cfg.tracking.enabled:
        from ensemble_kd import tracking

        mlflow_run = {"uri": tracking.tracking_uri(cfg), "run_id": tracking.start_distill_run(cfg, name, extra_tags, parent_run_id)}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"experiment": to_dict(cfg), "train_shards": shards, "fault": fault, "mlflow": mlflow_run,
                           "verbose": verbose},
        scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu,
                                     resources_per_worker={"CPU": d.cpus_per_worker, **({"GPU": 1} if d.use_gpu else {})}),
        run_config=RunConfig(name=name, storage_path=str(out / "ray_results"),
                             failure_config=FailureConfig(max_failures=d.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=callbacks or [],
                             logging_config=LoggingConfig(log_level=cfg.ray.train_log_level)),
    )
    try:
        result = trainer.fit()
        if result.error is not None:
            raise result.error
    except BaseException:
        if mlflow_run:
            tracking.fail_distill_run(cfg, mlflow_run["run_id"])
        raise
    with result.checkpoint.as_directory() as cdir:
        st = torch.load(Path(cdir) / STATE_FILE, map_location="cpu", weights_only=False)
    student = {k[len("student."):]: v for k, v in st["module"].items() if k.startswith("student.")}
    spath = out / "students" / name / "student.pt"
    atomic_torch_save({"format": "ensemble-kd/student", "arch": d.student.arch, "modality": d.student.modality,
                       "arch_kwargs": dict(d.student.arch_kwargs), "state_dict": student, "history": st["history"],
                       "config": st["config"]}, spath)
    hist = st["history"]
    top1 = next((h["test_top1"] for h in reversed(hist) if "test_top1" in h), None)
    if mlflow_run:
        tracking.finish_distill_run(cfg, mlflow_run["run_id"], top1, len(hist), spath)
        log(f"distill: MLflow run {mlflow_run['run_id']} in experiment {tracking.experiment_name(cfg)!r} at {mlflow_run['uri']}")
    log(f"distill: run {name} done: test top-1 {top1:.4f}; student at {spath}")
    return DistillResult(name, hist, spath, top1, result.checkpoint.path, mlflow_run and mlflow_run["run_id"])

