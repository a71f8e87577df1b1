"""The one training loop: the epochs of a run, on every worker (``train_loop_per_worker`` under
Ray Train's ``TorchTrainer``, or one process in local mode: :mod:`ensemble_kd.training.launch`).

Every method enters through the loss registry: the loop builds the configured loss terms,
puts them and the student into one trainable :class:`DistillModule` (wrapped once by Ray
Train for DDP), and minimises ``sum(weight * term)``. There is no per-method branch here.
Each loss returns its value and its metrics as device tensors; the loop sums them on the
device and reads them once per epoch (no host synchronisation per step).

Every ``checkpoint_every`` epochs, and at the end, rank 0 saves the training state
(:mod:`ensemble_kd.training.state`); a restarted worker group or a resumed run continues from it.
A run whose loss turns NaN or infinite stops at the end of that epoch, before it saves anything,
with :class:`NonFiniteError` naming the loss part, the epoch and the first bad step.

The loop talks to Ray Train through a small :class:`_Session` seam: :class:`_TrainSession` in a
Ray Train worker, :class:`_LocalSession` in one process (Ray Train's own local mode refuses its
``ray.train`` API inside a Tune trial in Ray 2.60). :class:`LoopCallback` is the loop's one
extension point (``on_epoch_start``/``on_epoch_end``), passed in the train loop config.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from torch import nn

from ensemble_kd.core import dist
from ensemble_kd.core.config import ExperimentConfig, from_dict
from ensemble_kd.core.devices import autocast, seed_everything, stage_device
from ensemble_kd.core.errors import ProjectError
from ensemble_kd.core.progress import write_progress
from ensemble_kd.core.raycluster import quiet_train_reports
from ensemble_kd.losses import LOSSES, DistillInputs, LossContext, LossOutput, build_loss
from ensemble_kd.losses.base import optimizer_param_groups
from ensemble_kd.storage.datastore import has_val, open_split
from ensemble_kd.storage.teacher_checkpoint import load_record
from ensemble_kd.training.data import DistillData, epoch_rows, eval_dataset
from ensemble_kd.training.online_data import OnlineData
from ensemble_kd.training.state import STATE_FILE, latest_state_dir, load_state, save_state, set_rng_state
from ensemble_kd.training.tracking import log_epochs, log_run_params
from modalities import PairedDataset, build_encoder



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
                          epoch=epoch, step=step, student_feats=feats, teacher_feats=batch.get("teacher_feats") or {},
                          labelled=batch.get("labelled"))
        return {name: loss(x) for name, loss in self.losses.items()}


def needs_feature_maps(cfg: ExperimentConfig) -> bool:
    """Whether a configured loss reads the encoders' stage outputs (registry metadata ``needs``)."""
    return any("feature_maps" in LOSSES.meta(t.name).get("needs", ()) for t in cfg.distill.losses)


def stage_shapes(model: nn.Module, sample_shape: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Per-sample shapes of an encoder's ``forward_features`` outputs, from a dry forward of two zero
    inputs in eval mode (BN statistics untouched), as the reference sizes its connectors."""
    was = model.training
    model.eval()
    with torch.no_grad():
        x = torch.zeros(2, *sample_shape, device=next(model.parameters()).device)
        feats, _ = model.forward_features(x)  # [stage maps ..., (2, d)]
    model.train(was)
    return tuple(tuple(f.shape[1:]) for f in feats)


def build_module(cfg: ExperimentConfig, data: DistillData | OnlineData, num_classes: int,
                 device: torch.device) -> DistillModule:
    d = cfg.distill
    student = build_encoder(d.student.arch, data.spec, num_classes, **d.student.arch_kwargs)
    shapes: dict[str, Any] = {}
    if needs_feature_maps(cfg) and isinstance(data, OnlineData):  # feature-map losses size their parts from these
        shapes = {"student_feat_shapes": stage_shapes(student, data.spec.shape),
                  "teacher_feat_shapes": {n: stage_shapes(t.model, data.ds.spec(t.modality).shape)
                                          for n, t in data.teachers.items()}}
    ctx = LossContext(student_dim=student.embed_dim, num_classes=num_classes, teacher_dims=data.teacher_dims,
                      bank=data.bank, seed=d.seed, device=device, **shapes,
                      selection=data.selection.manifest if data.selection is not None else None)
    losses = {t.name: build_loss(t.name, ctx, **t.kwargs) for t in d.losses}
    return DistillModule(student, losses, {t.name: t.weight for t in d.losses}, needs_feature_maps(cfg))


def build_optim(cfg: ExperimentConfig, params, steps_per_epoch: int = 1
                ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, bool]:
    """The optimiser, its schedule and whether the schedule steps per optimisation step (onecycle)
    rather than per epoch. ``params``: parameters, or torch parameter groups (a group's own lr or
    weight_decay overrides the run's; the schedule scales each group's lr from its own start)."""
    o = cfg.distill.optim
    if o.name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                                     nesterov=o.nesterov)
    else:
        opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.schedule == "onecycle":  # per step, over the whole run (a resumed run keeps its total)
        total = cfg.distill.epochs * steps_per_epoch
        peaks = [g["lr"] for g in opt.param_groups]  # each group's own peak (the run's lr unless a group sets one)
        return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=peaks, total_steps=total, pct_start=o.pct_start), True
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


class NonFiniteError(RuntimeError, ProjectError):
    """The loss (or the weights, after a step) turned NaN or infinite."""


def reported(metrics: dict[str, Any]) -> dict[str, Any]:
    """What goes to Ray Train (and Tune): the scalar metrics. The per-rank buffer checksums stay in
    the checkpointed history; Tune's loggers take scalars only."""
    return {k: v for k, v in metrics.items() if not isinstance(v, (list, tuple, dict))}


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
    run_dir: str | None = None  # the run's folder under ray_results: a resumed run's state is found there
    local: bool = False  # Ray Train's local mode: the loop saves its state in run_dir itself (Ray Train keeps none)

    def to_dict(self) -> dict[str, Any]:
        return {"experiment": self.experiment, "train_shards": dict(self.train_shards), "teachers": dict(self.teachers),
                "mlflow": self.mlflow, "verbose": self.verbose, "label": self.label, "callbacks": list(self.callbacks),
                "run_dir": self.run_dir, "local": self.local}


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
    val_ds: Any = None  # data's validation split, where it has one (selection reads its top-1, never test's)
    start: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per part: setup_s, steps_s, eval_s, mlflow_s, ...
    unsent: list[dict[str, Any]] = field(default_factory=list)  # epochs' metrics not yet sent to MLflow (rank 0)
    sent_at: float = field(default_factory=time.perf_counter)  # when metrics were last sent


def make_data(cfg: ExperimentConfig, train_ds: PairedDataset, lc: LoopConfig, device: torch.device
              ) -> DistillData | OnlineData:
    """The loop's data source (``distill.teacher_outputs``): the teachers' shards, or the frozen
    teachers loaded here and run on a fresh view every step."""
    d = cfg.distill
    if d.teacher_outputs == "shards":
        return DistillData(train_ds, d.student.modality, lc.train_shards, adv_replay_teacher=d.adv_replay_teacher,
                           selection=d.selection, labels=d.labels, seed=d.seed)
    teachers = {n: load_record(lc.teachers[n], train_ds, device) for n in d.teachers}
    return OnlineData(train_ds, d.student.modality, teachers, d.augment, d.seed, cfg.amp, needs_feature_maps(cfg),
                      labels=d.labels)


class _Session:
    """What the loop needs of where it runs: its rank, the world size, its device, the state a
    restarted worker continues from, how to wrap the module, and where each epoch is reported."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    def restored(self, device: torch.device) -> dict[str, Any] | None:  # a restarted worker's state
        return None

    def wrap(self, module: nn.Module) -> nn.Module:
        return module

    def report(self, metrics: dict[str, Any], folder: str | None = None) -> None:  # folder: a checkpoint
        pass


class _TrainSession(_Session):
    """A Ray Train worker: DDP, Ray Train's checkpoints and reports."""

    def __init__(self) -> None:
        import ray.train.torch  # here, not at the top: a local run's process never pays for ray.train's import

        ctx = ray.train.get_context()
        self.rank, self.world, self.device = ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()

    def restored(self, device: torch.device) -> dict[str, Any] | None:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as cdir:
            return load_state(Path(cdir), device)

    def wrap(self, module: nn.Module) -> nn.Module:
        # One wrap. Memories are kept identical by the losses' own all-gather updates, so DDP must
        # not re-broadcast buffers from rank 0 on every forward.
        return ray.train.torch.prepare_model(module, parallel_strategy_kwargs={"broadcast_buffers": False})

    def report(self, metrics: dict[str, Any], folder: str | None = None) -> None:
        ray.train.report(reported(metrics), checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None)


class _LocalSession(_Session):
    """This process alone (rank 0 of 1), on the GPU Ray gave it (``use_gpu``) or the CPU; the loop
    saves its own state; epochs reach the caller through the loop callbacks."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.device = stage_device(1 if cfg.distill.use_gpu else 0, "distill.use_gpu")


def _setup(cfg: ExperimentConfig, lc: LoopConfig, session: _Session) -> _Worker:
    """Build data, module and optimiser on this rank, and restore the last checkpoint if any."""
    t0 = time.perf_counter()
    d = cfg.distill
    device = session.device
    torch.set_num_threads(max(1, int(d.cpus_per_worker)))
    seed_everything(d.seed)  # same initial weights on every rank
    train_ds = open_split(cfg.data, "train", cfg.output_dir)  # memory-mapped, shared with the node's other processes
    test_ds = eval_dataset(cfg, train_ds)  # distill.eval_data's test split, else data's
    data = make_data(cfg, train_ds, lc, device)
    module = build_module(cfg, data, train_ds.num_classes, device).to(device)
    steps = len(epoch_rows(len(data), d.batch_size, session.world, session.rank, d.seed, 0))
    opt, sched, per_step = build_optim(cfg, optimizer_param_groups(module, module.losses.values()), steps)
    w = _Worker(cfg, session.rank, session.world, device, data, test_ds, module, opt, sched, per_step,
                open_split(cfg.data, "val", cfg.output_dir) if has_val(cfg.data, cfg.output_dir) else None)
    st = session.restored(device)
    if st is None and lc.run_dir:
        folder = latest_state_dir(lc.run_dir)
        st = load_state(folder, device) if folder is not None else None
    if st is not None:
        module.load_state_dict(st["module"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        for g, lr in zip(opt.param_groups, sched.get_lr()):  # the lr of the *current* schedule at this epoch,
            g["lr"] = lr  # not the one the optimiser state saved (a run resumed with more epochs changes it)
        set_rng_state(st["rng"])
        w.start, w.history, w.timings = st["epoch"] + 1, st["history"], dict(st.get("timings") or {})
        if w.rank == 0:
            print(f"[{lc.label}] resumed from the checkpoint of epoch {st['epoch'] + 1}", flush=True)
    w.timings["setup_s"] = w.timings.get("setup_s", 0.0) + time.perf_counter() - t0
    return w


def _train_epoch(w: _Worker, model: nn.Module, epoch: int) -> tuple[dict[str, float], dict[str, float]]:
    """One epoch of steps; returns the loss parts (averaged over steps and ranks) and the losses'
    own metrics (averaged over this rank's steps)."""
    d = w.cfg.distill
    w.module.train()
    sums: dict[str, torch.Tensor] = {}  # loss part -> sum over steps, on the device (read once per epoch)
    extra: dict[str, torch.Tensor] = {}  # the losses' own metrics, likewise
    batches = epoch_rows(len(w.data), d.batch_size, w.world, w.rank, d.seed, epoch)
    step0 = epoch * len(batches)
    names = [*w.module.losses.keys(), "total"]
    step_ids = torch.arange(len(batches), device=w.device)  # (S,) indexed on the device: no host sync per step
    first_bad = torch.full((len(names),), -1, dtype=torch.int64, device=w.device)  # (P,) first non-finite step
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
        vals = torch.stack([*(out.loss.detach().float() for out in parts.values()), loss.detach().float()])  # (P,)
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(vals), step_ids[i], first_bad)
    keys = sorted(sums)
    means = dist.all_reduce_mean(torch.stack([sums[k] for k in keys]) / len(batches))  # one read per epoch
    _check_finite(w, epoch, step0, names, first_bad.tolist())
    return ({f"loss/{k}": float(v) for k, v in zip(keys, means.tolist())},
            {k: float(v) / len(batches) for k, v in extra.items()})


def _check_finite(w: _Worker, epoch: int, step0: int, names: list[str], first_bad: list[int]) -> None:
    """Stop on a NaN/inf loss part (first bad step named) or, after the steps, a non-finite weight
    (an infinite gradient leaves a finite loss but poisons the weights): before anything is saved."""
    bad = [(s, n) for n, s in zip(names, first_bad) if s >= 0]
    if bad:
        s, n = min(bad)
        raise NonFiniteError(f"loss part {n!r} became non-finite at epoch {epoch + 1}, step {s + 1} of the epoch "
                             f"(global step {step0 + s}); stopping before the epoch's checkpoint (lower "
                             f"distill.optim.lr, check the data and the loss options)")
    params = [(k, p) for k, p in w.module.named_parameters() if p.requires_grad]
    ok = torch.stack([torch.isfinite(p).all() for _, p in params]).tolist() if params else []
    if not all(ok):
        name = next(k for (k, _), good in zip(params, ok) if not good)
        raise NonFiniteError(f"parameter {name!r} became non-finite during epoch {epoch + 1} (a NaN/inf gradient); "
                             f"stopping before the epoch's checkpoint (lower distill.optim.lr, check the data)")


def _end_epoch(w: _Worker, epoch: int, metrics: dict[str, Any], extra: dict[str, float], lc: LoopConfig,
               session: _Session) -> None:
    """Evaluate, log (rank 0: MLflow and a line), checkpoint (every ``checkpoint_every`` epochs and
    at the end) and report; the time each part takes adds up in ``w.timings``."""
    d = w.cfg.distill
    clock = _Clock(w.timings)
    if (epoch + 1) % d.eval_every == 0 or epoch + 1 == d.epochs:
        metrics["test_top1"] = evaluate(w.module.student, w.test_ds, d.student.modality, w.device)
        if w.val_ds is not None:
            metrics["val_top1"] = evaluate(w.module.student, w.val_ds, d.student.modality, w.device)
    metrics.update(extra)  # per-term diagnostics (CRD's per-teacher parts and Z, ...)
    metrics["buffer_checksums"] = buffer_checksums(w.module)
    metrics["run"] = device_record(w.device)  # a dict: in the history, not in the line, Tune or MLflow's metrics
    w.history.append(metrics)
    clock.lap("eval_s")
    save = (epoch + 1) % d.checkpoint_every == 0 or epoch + 1 == d.epochs
    if w.rank != 0:
        session.report(metrics)
        return
    if lc.mlflow:  # from the worker, batched: one call per metrics_flush_s, checkpoint, the end
        w.unsent.append(metrics)
        if save or time.perf_counter() - w.sent_at >= d.metrics_flush_s:
            _send_metrics(w, lc)
        if epoch + 1 == d.epochs:
            log_run_params(lc.mlflow["uri"], lc.mlflow["run_id"], {f"run.{k}": v for k, v in metrics["run"].items()})
        clock.lap("mlflow_s")
    if lc.verbose:  # the worker's stdout: Ray streams it to the driver's log file (and its console with -v)
        print(epoch_line(lc.label, metrics), flush=True)
    if lc.run_dir:
        write_progress(Path(lc.run_dir), progress_doc(w, lc, metrics))
    if lc.local:  # no Ray Train to persist a checkpoint: the loop keeps its state in the run's folder
        if save:
            save_state(Path(lc.run_dir) / STATE_FILE, w)
            clock.lap("checkpoint_s")
        return
    if not save:
        session.report(metrics)
        clock.lap("report_s")
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_state(Path(tmp) / STATE_FILE, w)
        (Path(tmp) / "history.json").write_text(json.dumps(w.history))
        session.report(metrics, tmp)
    clock.lap("checkpoint_s")  # the state's save and Ray Train's persistence of it


def device_record(device: torch.device) -> dict[str, Any]:
    """Where this rank runs and the most accelerator memory it has held so far (MiB of tensors, the
    caching allocator's peak; 0 on the CPU, which has none): each epoch's ``run`` entry."""
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    return {"device": str(device), "peak_accel_mem_mb": round(peak, 1)}


def epoch_line(label: str, metrics: dict[str, Any]) -> str:
    """The per-epoch line: ``[label] loss/ce=0.41 ... test_top1=0.95``, the scalar metrics only (the
    per-rank buffer checksums stay in the checkpointed history: a diagnostic, not for people)."""
    return f"[{label}] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in metrics.items() if not isinstance(v, (list, tuple, dict)))


def progress_doc(w: _Worker, lc: LoopConfig, metrics: dict[str, Any]) -> dict[str, Any]:
    """What rank 0 writes to the run's progress file after an epoch (:mod:`ensemble_kd.core.progress`)."""
    top1 = next((h["test_top1"] for h in reversed(w.history) if "test_top1" in h), None)
    return {"label": lc.label, "epoch": int(metrics["epoch"]), "epochs": w.cfg.distill.epochs,
            "loss": metrics.get("loss/total"), "test_top1": top1, "epoch_seconds": metrics.get("epoch_seconds")}


def _send_metrics(w: _Worker, lc: LoopConfig) -> None:
    """The epochs' metrics not yet in MLflow, in one batch (only rank 0 with an MLflow run has any)."""
    if w.unsent:
        log_epochs(lc.mlflow["uri"], lc.mlflow["run_id"], w.unsent)
    w.unsent, w.sent_at = [], time.perf_counter()


class _Clock:
    """Adds the seconds since the last lap to a named total."""

    def __init__(self, totals: dict[str, float]) -> None:
        self.totals, self.t = totals, time.perf_counter()

    def lap(self, key: str) -> None:
        now = time.perf_counter()
        self.totals[key] = self.totals.get(key, 0.0) + now - self.t
        self.t = now


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config`` is a :class:`LoopConfig` as a dict."""
    lc = LoopConfig(**config)
    cfg = from_dict(lc.experiment)
    quiet_train_reports(cfg.ray.train_log_level)
    _run(cfg, lc, _TrainSession())


def _run(cfg: ExperimentConfig, lc: LoopConfig, session: _Session) -> None:
    """The epochs, from the restored one to ``distill.epochs``."""
    w = _setup(cfg, lc, session)
    try:
        _epochs(cfg, lc, session, w)
    except BaseException:  # the epochs the failed run did finish still reach MLflow (the error is what counts)
        with contextlib.suppress(Exception):
            _send_metrics(w, lc)
        raise


def _epochs(cfg: ExperimentConfig, lc: LoopConfig, session: _Session, w: _Worker) -> None:
    model = session.wrap(w.module)
    for epoch in range(w.start, cfg.distill.epochs):
        for cb in lc.callbacks:
            cb.on_epoch_start(epoch, w.rank)
        t0 = time.perf_counter()
        lr = w.opt.param_groups[0]["lr"]  # the lr this epoch started with
        parts, extra = _train_epoch(w, model, epoch)
        if not w.sched_per_step:
            w.sched.step()
        w.timings["steps_s"] = w.timings.get("steps_s", 0.0) + time.perf_counter() - t0
        metrics: dict[str, Any] = {**parts, "epoch": epoch + 1, "lr": lr, "epoch_seconds": time.perf_counter() - t0}
        _end_epoch(w, epoch, metrics, extra, lc, session)
        for cb in lc.callbacks:
            cb.on_epoch_end(epoch, w.rank, metrics)
