"""The teachers stage: train (or reuse) every configured teacher, or take a user's checkpoint,
and return the :class:`~ensemble_kd.artifacts.TeacherSet`.

A teacher is trained once per recipe: its checkpoint records the hash of the teacher config and
the dataset (``config_hash``), and a rerun with the same recipe reuses the file. A teacher with
``checkpoint:`` set is loaded from that file (and verified), never trained.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ensemble_kd.artifacts import TeacherRecord, TeacherSet, write_index
from ensemble_kd.config import ConfigError, DataConfig, TeacherConfig
from ensemble_kd.devices import autocast, resolve_device, seed_everything
from ensemble_kd.teacher_checkpoint import (CheckpointError, evaluate, read_checkpoint, save_teacher,
                                            teacher_config_hash)
from ensemble_kd.views import apply_view, draw_views
from modalities import Encoder, ModalitySpec, build_dataset, build_encoder

def train_teacher(t: TeacherConfig, data: DataConfig, device: torch.device, amp: bool = True,
                  progress: bool = True) -> tuple[Encoder, dict[str, float], ModalitySpec, int]:
    """Train one teacher on the train split; returns the model, metrics, its input spec and #classes."""
    gen = seed_everything(t.seed)
    train = build_dataset(data.name, "train", data.root, **data.kwargs)
    test = build_dataset(data.name, "test", data.root, **data.kwargs)
    spec = train.spec(t.modality)
    model = build_encoder(t.arch, spec, train.num_classes, **t.arch_kwargs).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=True)
    else:
        opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    steps_per_epoch = math.ceil(len(train) / t.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=t.lr, total_steps=t.epochs * steps_per_epoch, pct_start=0.15)
    augment = t.augment and spec.kind == "image"
    bar = tqdm(range(t.epochs), desc=f"teacher {t.name} ({t.arch} on {t.modality})", disable=not progress, unit="ep", leave=True)
    t0 = time.perf_counter()
    for epoch in bar:
        model.train()
        order = torch.randperm(len(train), generator=gen).numpy()
        total, n = 0.0, 0
        for s in range(0, len(order), t.batch_size):
            idx = order[s : s + t.batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            b = train.get_batch(idx, [t.modality])
            x, y = b["inputs"][t.modality].to(device), b["label"].to(device)
            if augment:  # fresh random views each step; the same replayable parameterisation as the shards
                v = draw_views(b["sample_id"].numpy(), 1, 2, True, False, seed=t.seed * 100003 + epoch)
                x = apply_view(x, torch.from_numpy(v.top), torch.from_numpy(v.left), torch.from_numpy(v.flip), 2)
            with autocast(device, amp):
                _, logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=t.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            n += len(idx)
        bar.set_postfix(loss=f"{total / max(n, 1):.3f}")
    metrics = {
        "train_top1": evaluate(model, train, t.modality, device, amp=amp),
        "test_top1": evaluate(model, test, t.modality, device, amp=amp),
        "train_seconds": time.perf_counter() - t0,
    }
    bar.write(f"teacher {t.name}: test top-1 {metrics['test_top1']:.4f} (train {metrics['train_top1']:.4f}) in {metrics['train_seconds']:.1f}s")
    return model, metrics, spec, train.num_classes  # type: ignore[return-value]


def checkpoint_path(t: TeacherConfig, checkpoint_dir: str | Path) -> Path:
    """Where a teacher's checkpoint is: its own file if given, else ``<checkpoint_dir>/<name>.pt``."""
    return Path(t.checkpoint) if t.checkpoint else Path(checkpoint_dir) / f"{t.name}.pt"


def record(name: str, path: str | Path) -> TeacherRecord:
    """A teacher record read from (and verified against) its checkpoint file."""
    ck = read_checkpoint(path)
    return TeacherRecord(name=name, path=str(path), arch=ck["arch"], modality=ck["modality"],
                         content_hash=ck["content_hash"], test_top1=ck.get("test_top1"),
                         dataset=(ck.get("dataset") or {}).get("name"))


def existing(teachers: Sequence[TeacherConfig], checkpoint_dir: str | Path) -> TeacherSet:
    """The teacher set of checkpoints already on disk, verified, refusing a missing one before any
    Ray work starts (what `embed`, `select` and `distill` use: they never train)."""
    out = {}
    for t in teachers:
        p = checkpoint_path(t, checkpoint_dir)
        if not p.exists():
            raise ConfigError(f"teacher {t.name!r} has no checkpoint at {p}: run `ensemble-kd teachers train` first "
                              "(or set the teacher's checkpoint)")
        out[t.name] = record(t.name, p)
    return TeacherSet(out)


def _reusable(t: TeacherConfig, data: DataConfig, path: Path, log: Callable[[str], None]) -> bool:
    """True when ``path`` holds a readable checkpoint trained with this exact recipe."""
    if not path.exists():
        return False
    try:
        ck = read_checkpoint(path)
    except CheckpointError as e:
        log(f"teacher {t.name}: retraining, existing checkpoint unusable: {e}")
        return False
    if ck.get("config_hash") != teacher_config_hash(t, data):
        log(f"teacher {t.name}: retraining, {path} was trained with another config")
        return False
    log(f"teacher {t.name}: reused {path} (test top-1 {ck.get('test_top1', float('nan')):.4f})")
    return True


def run(teachers: Sequence[TeacherConfig], data: DataConfig, output_dir: str | Path, device: str = "auto",
        amp: bool = True, retrain: bool = False, progress: bool = True,
        log: Callable[[str], None] = print) -> TeacherSet:
    """Train every teacher that has no up-to-date checkpoint, reuse the others, take given
    checkpoints as they are; record the set in ``<output_dir>/index/teachers.json``."""
    dev = resolve_device(device)
    out: dict[str, TeacherRecord] = {}
    for t in teachers:
        path = checkpoint_path(t, Path(output_dir) / "teachers")
        if t.checkpoint:
            out[t.name] = record(t.name, path)
            log(f"teacher {t.name}: using checkpoint {path} ({out[t.name].arch} on {out[t.name].modality}, "
                f"test top-1 {out[t.name].test_top1})")
            continue
        if retrain or not _reusable(t, data, path, log):
            model, metrics, spec, num_classes = train_teacher(t, data, dev, amp=amp, progress=progress)
            save_teacher(path, model, t, data, spec, num_classes, metrics)
        out[t.name] = record(t.name, path)
    ts = TeacherSet(out)
    write_index(output_dir, "teachers", ts.to_dict())
    return ts
