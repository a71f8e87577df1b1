"""Teacher checkpoints: train, save (with a content hash), load by config or path, freeze.

A checkpoint is one ``torch.save`` file holding everything needed to rebuild and trust the
model without the config that made it::

    {"format": "ensemble-kd/teacher", "version": 1,
     "name", "arch", "arch_kwargs", "modality", "modality_spec", "dataset", "num_classes",
     "config" (the TeacherConfig as a dict), "config_hash", "state_dict",
     "test_top1", "train_top1", "content_hash"}

``content_hash`` is the sha256 of the weights plus architecture and modality; it is what the
embed stage puts in a shard id, and it is checked again on every load.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ensemble_kd.checkpoint import atomic_torch_save, state_dict_hash
from ensemble_kd.config import ConfigError, DataConfig, ExperimentConfig, TeacherConfig, config_hash, to_dict
from ensemble_kd.devices import autocast, resolve_device, seed_everything
from ensemble_kd.views import apply_view, draw_views
from modalities import Encoder, ModalitySpec, PairedDataset, build_dataset, build_encoder

FORMAT = "ensemble-kd/teacher"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted or used; the message names the file."""


@dataclass
class Teacher:
    """A loaded, frozen teacher and what its checkpoint says about it."""

    name: str
    model: Encoder
    arch: str
    modality: str
    dataset: str
    num_classes: int
    content_hash: str
    path: Path
    test_top1: float | None

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Teachers are frozen everywhere: eval mode, no gradients."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _content_hash(state: dict[str, torch.Tensor], arch: str, arch_kwargs: dict, modality: str, num_classes: int) -> str:
    return state_dict_hash(state, extra=f"{arch}|{sorted(arch_kwargs.items())}|{modality}|{num_classes}")


def save_teacher(path: str | Path, model: Encoder, cfg: TeacherConfig, data: DataConfig, spec: ModalitySpec,
                 num_classes: int, metrics: dict[str, float]) -> str:
    """Write a teacher checkpoint atomically; returns its content hash."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    chash = _content_hash(state, cfg.arch, dict(cfg.arch_kwargs), cfg.modality, num_classes)
    atomic_torch_save(
        {
            "format": FORMAT,
            "version": VERSION,
            "name": cfg.name,
            "arch": cfg.arch,
            "arch_kwargs": dict(cfg.arch_kwargs),
            "modality": cfg.modality,
            "modality_spec": {"name": spec.name, "kind": spec.kind, "shape": list(spec.shape)},
            "dataset": to_dict(data),
            "num_classes": num_classes,
            "config": to_dict(cfg),
            "config_hash": teacher_config_hash(cfg, data),
            "state_dict": state,
            "content_hash": chash,
            **metrics,
        },
        path,
    )
    return chash


def teacher_config_hash(cfg: TeacherConfig, data: DataConfig) -> str:
    """What decides a trained checkpoint: the teacher's recipe and the dataset (not its name)."""
    d = to_dict(cfg)
    d.pop("name"), d.pop("checkpoint")
    return config_hash({"teacher": d, "data": to_dict(data)})


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and verify a teacher checkpoint file; errors name the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"teacher checkpoint not found: {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, ...
        raise CheckpointError(f"teacher checkpoint {path} is unreadable (truncated or not a torch file): {e}") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an ensemble-kd teacher checkpoint (no format={FORMAT!r} field)")
    if ck.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ck.get('version')} is not supported (this is {VERSION})")
    missing = [k for k in ("arch", "modality", "num_classes", "state_dict", "content_hash", "modality_spec") if k not in ck]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks fields {missing}")
    got = _content_hash(ck["state_dict"], ck["arch"], dict(ck.get("arch_kwargs", {})), ck["modality"], ck["num_classes"])
    if got != ck["content_hash"]:
        raise CheckpointError(f"{path}: content hash mismatch: the file says {ck['content_hash'][:16]}, its weights hash to {got[:16]}")
    return ck


def load_teacher(path: str | Path, device: torch.device | str = "cpu", name: str | None = None) -> Teacher:
    """Rebuild a frozen teacher from a checkpoint file (ours, or a user's by path)."""
    ck = read_checkpoint(path)
    s = ck["modality_spec"]
    spec = ModalitySpec(s["name"], s["kind"], tuple(s["shape"]))
    model = build_encoder(ck["arch"], spec, ck["num_classes"], **ck.get("arch_kwargs", {}))
    try:
        model.load_state_dict(ck["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit encoder {ck['arch']!r}: {e}") from None
    freeze(model.to(device))
    return Teacher(
        name=name or ck.get("name", Path(path).stem),
        model=model,  # type: ignore[arg-type]
        arch=ck["arch"],
        modality=ck["modality"],
        dataset=ck.get("dataset", {}).get("name", "?"),
        num_classes=ck["num_classes"],
        content_hash=ck["content_hash"],
        path=Path(path),
        test_top1=ck.get("test_top1"),
    )


def checkpoint_path(cfg: ExperimentConfig, t: TeacherConfig) -> Path:
    """Where the teacher's checkpoint is: its own file if given, else ``<output_dir>/teachers/<name>.pt``."""
    return Path(t.checkpoint) if t.checkpoint else cfg.checkpoint_dir / f"{t.name}.pt"


def existing_checkpoints(cfg: ExperimentConfig, names: list[str], verify: bool = True) -> dict[str, Path]:
    """name -> checkpoint file of each named teacher, refusing a missing one (and, with ``verify``,
    an unreadable one) before any Ray work starts."""
    paths = {}
    for n in names:
        p = checkpoint_path(cfg, cfg.teacher(n))
        if not p.exists():
            raise ConfigError(f"teacher {n!r} has no checkpoint at {p}: run `ensemble-kd teachers train` first "
                              "(or set the teacher's checkpoint)")
        if verify:
            read_checkpoint(p)
        paths[n] = p
    return paths


@torch.no_grad()
def evaluate(model: Encoder, ds: PairedDataset, modality: str, device: torch.device, batch_size: int = 512,
             amp: bool = False) -> float:
    """Top-1 accuracy of ``model`` on ``ds`` (fraction in [0, 1])."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(ds), batch_size):
        b = ds.get_batch(np.arange(start, min(start + batch_size, len(ds))), [modality])
        with autocast(device, amp):
            _, logits = model(b["inputs"][modality].to(device))
        correct += int((logits.argmax(1).cpu() == b["label"]).sum())
    model.train(was_training)
    return correct / max(len(ds), 1)


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


def ensure_teachers(cfg: ExperimentConfig, progress: bool = True, retrain: bool = False,
                    log=print) -> dict[str, Path]:
    """Train every configured teacher that has no up-to-date checkpoint; reuse the others.

    A teacher with ``checkpoint:`` set is loaded from that file (and verified), never trained.
    Returns name -> checkpoint path.
    """
    device = resolve_device(cfg.device)
    out: dict[str, Path] = {}
    for t in cfg.teachers:
        path = checkpoint_path(cfg, t)
        if t.checkpoint:
            ck = read_checkpoint(path)
            log(f"teacher {t.name}: using checkpoint {path} ({ck['arch']} on {ck['modality']}, test top-1 {ck.get('test_top1')})")
            out[t.name] = path
            continue
        want = teacher_config_hash(t, cfg.data)
        if path.exists() and not retrain:
            try:
                ck = read_checkpoint(path)
            except CheckpointError as e:
                log(f"teacher {t.name}: retraining, existing checkpoint unusable: {e}")
            else:
                if ck.get("config_hash") == want:
                    log(f"teacher {t.name}: reused {path} (test top-1 {ck.get('test_top1', float('nan')):.4f})")
                    out[t.name] = path
                    continue
                log(f"teacher {t.name}: retraining, {path} was trained with another config")
        model, metrics, spec, num_classes = train_teacher(t, cfg.data, device, amp=cfg.amp, progress=progress)
        save_teacher(path, model, t, cfg.data, spec, num_classes, metrics)
        out[t.name] = path
    return out


def teacher_summary(paths: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """name -> {arch, modality, test_top1, content_hash, path} read from the checkpoints."""
    res = {}
    for name, p in paths.items():
        ck = read_checkpoint(p)
        res[name] = {
            "arch": ck["arch"],
            "modality": ck["modality"],
            "test_top1": ck.get("test_top1"),
            "content_hash": ck["content_hash"],
            "path": str(p),
        }
    return res
