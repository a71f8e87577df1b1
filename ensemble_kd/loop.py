"""The one training loop: ``train_loop_per_worker`` run by Ray Train's ``TorchTrainer``.

Every method enters through the loss registry: the loop builds the configured loss terms,
puts them and the student into one trainable :class:`DistillModule` (wrapped once by Ray
Train for DDP), and minimises ``sum(weight * term)``. There is no per-method branch here.
Each loss returns its value and its metrics as device tensors; the loop sums them on the
device and reads them once per epoch (no host synchronisation per step).

Each epoch ends with a checkpoint (student, heads, memories, optimiser, scheduler, RNG states,
epoch, metric history) reported to Ray Train; a restarted worker group (a killed worker,
``max_failures``) or a resumed run (``--resume``: the same run name) continues from it.

:class:`LoopCallback` is the loop's one extension point (``on_epoch_start``/``on_epoch_end``),
passed in the train loop config; the tests use it to inject faults.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch import nn

from ensemble_kd import dist
from ensemble_kd.checkpoint import atomic_torch_save
from ensemble_kd.config import ExperimentConfig, from_dict, to_dict
from ensemble_kd.data import DistillData, epoch_rows, eval_dataset
from ensemble_kd.online_data import OnlineData
from ensemble_kd.devices import autocast, seed_everything
from ensemble_kd.interrupts import ray_train_fit
from ensemble_kd.losses import LOSSES, DistillInputs, LossContext, LossOutput, build_loss
from ensemble_kd.raycluster import quiet_train_reports
from ensemble_kd.teacher_checkpoint import load_record
from ensemble_kd.tracking import log_epoch
from modalities import PairedDataset, build_dataset, build_encoder


class DistillModule(nn.Module):
    """Everything trainable, as one module: the student and every loss term (with its heads,
    regressors and memories), keyed by loss name."""

    def __init__(self, student: nn.Module, losses: dict[str, nn.Module], weights: dict[str, float],
                 feature_maps: bool = False) -> None:
        super().__init__()
        self.student = student
        self.losses = nn.ModuleDict(losses)
        self.weights = dict(weights)
        self.feature_maps = feature_maps  # a loss reads the stage outputs: run forward_features

    def forward(self, batch: dict[str, Any], epoch: int = 0, step: int = 0) -> dict[str, LossOutput]:
        feats = None
        if self.feature_maps:
            feats, logits = self.student.forward_features(batch["x"])  # [stage maps ..., (B, d_s)], (B, C)
            emb = feats[-1]
        else:
            emb, logits = self.student(batch["x"])  # (B, d_s), (B, C)
        x = DistillInputs(emb, logits, batch["labels"], batch["index"], batch["teacher_emb"], batch["teacher_logits"],
                          epoch=epoch, step=step, student_feats=feats, teacher_feats=batch.get("teacher_feats") or {})
        return {name: loss(x) for name, loss in self.losses.items()}


def needs_feature_maps(cfg: ExperimentConfig) -> bool:
    """Whether a configured loss reads the encoders' stage outputs (registry metadata ``needs``)."""
    return any("feature_maps" in LOSSES.meta(t.name).get("needs", ()) for t in cfg.distill.losses)


def build_module(cfg: ExperimentConfig, data: DistillData | OnlineData, num_classes: int,
                 device: torch.device) -> DistillModule:
    d = cfg.distill
    student = build_encoder(d.student.arch, data.spec, num_classes, **d.student.arch_kwargs)
    ctx = LossContext(student_dim=student.embed_dim, num_classes=num_classes, teacher_dims=data.teacher_dims,
                      bank=data.bank, seed=d.seed, device=device,
                      selection=data.selection.manifest if data.selection is not None else None)
    losses = {t.name: build_loss(t.name, ctx, **t.kwargs) for t in d.losses}
    return DistillModule(student, losses, {t.name: t.weight for t in d.losses}, needs_feature_maps(cfg))


def build_optim(cfg: ExperimentConfig, params, steps_per_epoch: int = 1
                ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, bool]:
    """The optimiser, its schedule and whether the schedule steps per optimisation step (onecycle)
    rather than per epoch."""
    o = cfg.distill.optim
    if o.name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                                     nesterov=o.nesterov)
    else:
        opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.schedule == "onecycle":  # per step, over the whole run (a resumed run keeps its total)
        total = cfg.distill.epochs * steps_per_epoch
        return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=o.lr, total_steps=total, pct_start=o.pct_start), True
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
    return opt, sched, False


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


def load_state(folder: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The training state in ``folder/state.pt``. Still a full unpickle (it holds numpy and Python
    RNG states): a crafted file in an output folder could run code; issue 14 moves the state to a
    weights-only format."""
    return torch.load(folder / STATE_FILE, map_location=device, weights_only=False)


def save_state(path: Path, module: DistillModule, opt, sched, epoch: int, history: list[dict], cfg: ExperimentConfig) -> None:
    atomic_torch_save({"module": module.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                       "epoch": epoch, "rng": _rng_state(), "history": history, "config": to_dict(cfg)}, path)


class LoopCallback:
    """Called by every rank at epoch boundaries; subclass and override what you need. Instances
    travel to the workers inside the train loop config (they must pickle)."""

    def on_epoch_start(self, epoch: int, rank: int) -> None:  # epoch: 0-based
        pass

    def on_epoch_end(self, epoch: int, rank: int, metrics: dict[str, Any]) -> None:
        pass


@dataclass
class LoopConfig:
    """What the driver hands ``train_loop_per_worker`` (as the dict of :meth:`to_dict`)."""

    experiment: dict[str, Any]  # the ExperimentConfig as a plain dict
    train_shards: dict[str, str] = field(default_factory=dict)  # shard path: teacher -> train shard folder
    teachers: dict[str, dict] = field(default_factory=dict)  # online path: teacher -> its TeacherRecord as a dict
    mlflow: dict[str, str] | None = None  # {"uri", "run_id"}: rank 0 logs every epoch there
    verbose: bool = True  # a line per epoch from rank 0
    label: str = "distill"  # what that line starts with
    callbacks: Sequence[LoopCallback] = ()
    state_dir: str | None = None  # local mode: where the loop keeps its own latest state (Ray Train keeps none)

    def to_dict(self) -> dict[str, Any]:
        return {"experiment": self.experiment, "train_shards": dict(self.train_shards), "teachers": dict(self.teachers),
                "mlflow": self.mlflow, "verbose": self.verbose, "label": self.label, "callbacks": list(self.callbacks),
                "state_dir": self.state_dir}


@dataclass
class _Worker:
    """One rank's training state: the config, data, module and its optimiser."""

    cfg: ExperimentConfig
    rank: int
    world: int
    device: torch.device
    data: DistillData | OnlineData
    test_ds: Any
    module: DistillModule
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    sched_per_step: bool = False
    start: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def make_data(cfg: ExperimentConfig, train_ds: PairedDataset, lc: LoopConfig, device: torch.device
              ) -> DistillData | OnlineData:
    """The loop's data source (``distill.teacher_outputs``): the teachers' shards, or the frozen
    teachers loaded here and run on a fresh view every step."""
    d = cfg.distill
    if d.teacher_outputs == "shards":
        return DistillData(train_ds, d.student.modality, lc.train_shards, adv_replay_teacher=d.adv_replay_teacher,
                           selection=d.selection)
    teachers = {n: load_record(lc.teachers[n], train_ds, device) for n in d.teachers}
    return OnlineData(train_ds, d.student.modality, teachers, d.augment, d.seed, cfg.amp, needs_feature_maps(cfg))


def _setup(cfg: ExperimentConfig, lc: LoopConfig) -> _Worker:
    """Build data, module and optimiser on this rank, and restore the last checkpoint if any."""
    d = cfg.distill
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(d.cpus_per_worker)))
    seed_everything(d.seed)  # same initial weights on every rank
    train_ds = build_dataset(cfg.data.name, "train", cfg.data.root, **cfg.data.kwargs)
    test_ds = eval_dataset(cfg, train_ds)  # distill.eval_data's test split, else data's
    data = make_data(cfg, train_ds, lc, device)
    module = build_module(cfg, data, train_ds.num_classes, device).to(device)
    steps = len(epoch_rows(len(data), d.batch_size, ctx.get_world_size(), ctx.get_world_rank(), d.seed, 0))
    opt, sched, per_step = build_optim(cfg, [p for p in module.parameters() if p.requires_grad], steps)
    w = _Worker(cfg, ctx.get_world_rank(), ctx.get_world_size(), device, data, test_ds, module, opt, sched, per_step)
    st = _saved_state(lc, device)
    if st is not None:
        module.load_state_dict(st["module"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        for g, lr in zip(opt.param_groups, sched.get_lr()):  # the lr of the *current* schedule at this epoch,
            g["lr"] = lr  # not the one the optimiser state saved (a run resumed with more epochs changes it)
        _set_rng_state(st["rng"])
        w.start, w.history = st["epoch"] + 1, st["history"]
        if w.rank == 0:
            print(f"[{lc.label}] resumed from the checkpoint of epoch {st['epoch'] + 1}", flush=True)
    return w


def _saved_state(lc: LoopConfig, device: torch.device) -> dict[str, Any] | None:
    """The state to continue from: Ray Train's last checkpoint (a restarted worker group, a resumed
    run), else, in local mode, the loop's own copy in ``state_dir``; None for a fresh start."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as cdir:
            return load_state(Path(cdir), device)
    if lc.state_dir and (Path(lc.state_dir) / STATE_FILE).is_file():
        return load_state(Path(lc.state_dir), device)
    return None


def _train_epoch(w: _Worker, model: nn.Module, epoch: int) -> tuple[dict[str, float], dict[str, float]]:
    """One epoch of steps; returns the loss parts (averaged over steps and ranks) and the losses'
    own metrics (averaged over this rank's steps)."""
    d = w.cfg.distill
    w.module.train()
    sums: dict[str, torch.Tensor] = {}  # loss part -> sum over steps, on the device (read once per epoch)
    extra: dict[str, torch.Tensor] = {}  # the losses' own metrics, likewise
    batches = epoch_rows(len(w.data), d.batch_size, w.world, w.rank, d.seed, epoch)
    step0 = epoch * len(batches)
    for i, rows in enumerate(batches):
        batch = w.data.batch(rows, w.device, epoch, step0 + i)
        with autocast(w.device, w.cfg.amp):
            parts = model(batch, epoch, step0 + i)
        loss = sum(w.module.weights[n] * out.loss.float() for n, out in parts.items())
        w.opt.zero_grad(set_to_none=True)
        loss.backward()
        w.opt.step()
        if w.sched_per_step:
            w.sched.step()
        for n, out in parts.items():
            sums[n] = sums.get(n, 0) + out.loss.detach().double()
            for k, v in out.metrics.items():
                extra[k] = extra.get(k, 0) + v.detach().double()
        sums["total"] = sums.get("total", 0) + loss.detach().double()
    keys = sorted(sums)
    means = dist.all_reduce_mean(torch.stack([sums[k] for k in keys]) / len(batches))  # one read per epoch
    return ({f"loss/{k}": float(v) for k, v in zip(keys, means.tolist())},
            {k: float(v) / len(batches) for k, v in extra.items()})


def _end_epoch(w: _Worker, epoch: int, metrics: dict[str, Any], extra: dict[str, float], lc: LoopConfig) -> None:
    """Evaluate, log (rank 0: MLflow and a line), checkpoint and report to Ray Train."""
    d = w.cfg.distill
    if (epoch + 1) % d.eval_every == 0 or epoch + 1 == d.epochs:
        metrics["test_top1"] = evaluate(w.module.student, w.test_ds, d.student.modality, w.device)
    metrics.update(extra)  # per-term diagnostics (CRD's per-teacher parts and Z, ...)
    metrics["buffer_checksums"] = buffer_checksums(w.module)
    w.history.append(metrics)
    if w.rank != 0:
        ray.train.report(reported(metrics))
        return
    if lc.mlflow:  # per epoch, from the worker: a trial that ASHA stops keeps the epochs it ran
        log_epoch(lc.mlflow["uri"], lc.mlflow["run_id"], metrics)
    if lc.verbose:
        print(f"[{lc.label}] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()),
              flush=True)
    if lc.state_dir:  # local mode: Ray Train persists nothing, so the loop keeps the state itself
        save_state(Path(lc.state_dir) / STATE_FILE, w.module, w.opt, w.sched, epoch, w.history, w.cfg)
        ray.train.report(reported(metrics))
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_state(Path(tmp) / STATE_FILE, w.module, w.opt, w.sched, epoch, w.history, w.cfg)
        (Path(tmp) / "history.json").write_text(json.dumps(w.history))
        ray.train.report(reported(metrics), checkpoint=ray.train.Checkpoint.from_directory(tmp))


def fit(cfg: ExperimentConfig, lc: LoopConfig, name: str, callbacks: Sequence[Any] = (),
        local: bool = False) -> ray.train.Result:
    """Run the loop on Ray Train: ``distill.num_workers`` workers (DDP), ``use_gpu``, the run
    ``name`` under ``<output_dir>/ray_results`` (a reused name resumes it), ``max_failures``
    restarts from the last checkpoint; ``callbacks``: Ray Train user callbacks. Raises the
    training error, if any.

    ``local``: Ray Train's local mode, for a single worker that is already a Ray process of the
    right resources (a Ray task): the loop runs in this process, with no controller or worker group
    to start; its state is kept in ``ray_results/<name>/`` by the loop itself (an interrupted run
    resumes from it); no worker restarts, no Ray Train callbacks."""
    d = cfg.distill
    quiet_train_reports(cfg.ray.train_log_level)  # in this process too: local mode runs the loop here
    if local:
        if d.num_workers != 1:
            raise ValueError(f"local mode runs one worker, distill.num_workers is {d.num_workers}")
        lc = dataclasses.replace(lc, state_dir=str(Path(cfg.output_dir) / "ray_results" / name))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=lc.to_dict(),
        scaling_config=ScalingConfig(num_workers=0 if local else d.num_workers, use_gpu=d.use_gpu,
                                     resources_per_worker={"CPU": d.cpus_per_worker, **({"GPU": 1} if d.use_gpu else {})}),
        run_config=RunConfig(name=name, storage_path=str(Path(cfg.output_dir) / "ray_results"),
                             failure_config=FailureConfig(max_failures=d.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=list(callbacks),
                             logging_config=LoggingConfig(log_level=cfg.ray.train_log_level)),
    )
    with ray_train_fit():  # Ray Train takes SIGINT over during fit: a Ctrl-C still ends as Interrupted
        result = trainer.fit()
    if result.error is not None:
        raise result.error
    return result


def final_state(result: ray.train.Result, cfg: ExperimentConfig | None = None, name: str | None = None) -> dict[str, Any]:
    """The training state of a finished run's last checkpoint (module weights, history, config); a
    local-mode run (no Ray Train checkpoint) keeps it under ``ray_results/<name>/``."""
    if result.checkpoint is None and cfg is not None and name is not None:
        return load_state(Path(cfg.output_dir) / "ray_results" / name)
    with result.checkpoint.as_directory() as cdir:
        return load_state(Path(cdir))


def module_part(state: dict[str, Any], prefix: str = "student.") -> dict[str, torch.Tensor]:
    """The weights of one part of the DistillModule (the student) out of a training state."""
    return {k[len(prefix):]: v for k, v in state["module"].items() if k.startswith(prefix)}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config`` is a :class:`LoopConfig` as a dict."""
    lc = LoopConfig(**config)
    cfg = from_dict(lc.experiment)
    quiet_train_reports(cfg.ray.train_log_level)
    w = _setup(cfg, lc)
    # One wrap. Memories are kept identical by the losses' own all-gather updates, so DDP must not
    # re-broadcast buffers from rank 0 on every forward.
    model = ray.train.torch.prepare_model(w.module, parallel_strategy_kwargs={"broadcast_buffers": False})
    for epoch in range(w.start, cfg.distill.epochs):
        for cb in lc.callbacks:
            cb.on_epoch_start(epoch, w.rank)
        t0 = time.perf_counter()
        lr = w.opt.param_groups[0]["lr"]  # the lr this epoch started with
        parts, extra = _train_epoch(w, model, epoch)
        if not w.sched_per_step:
            w.sched.step()
        metrics: dict[str, Any] = {**parts, "epoch": epoch + 1, "lr": lr, "epoch_seconds": time.perf_counter() - t0}
        _end_epoch(w, epoch, metrics, extra, lc)
        for cb in lc.callbacks:
            cb.on_epoch_end(epoch, w.rank, metrics)
