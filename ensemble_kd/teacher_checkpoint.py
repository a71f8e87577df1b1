"""Teacher checkpoints: the file format, its content hash, loading a frozen teacher.

A checkpoint is one ``torch.save`` file holding everything needed to rebuild and trust the
model without the config that made it::

    {"format": "ensemble-kd/teacher", "version": 1,
     "name", "arch", "arch_kwargs", "modality", "modality_spec", "dataset", "num_classes",
     "config" (the TeacherConfig as a dict), "config_hash", "state_dict",
     "test_top1", "train_top1", "content_hash"}

``content_hash`` is the sha256 of the weights plus architecture and modality; it is what the
embed stage puts in a shard id, and it is checked again on every load. Files are read with
``weights_only=True``: a checkpoint from a shared folder cannot run code.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ensemble_kd.checkpoint import atomic_torch_save, state_dict_hash
from ensemble_kd.config import DataConfig, TeacherConfig, config_hash, to_dict
from ensemble_kd.devices import autocast
from modalities import Encoder, ModalitySpec, PairedDataset, build_encoder

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
    for k in ("name", "checkpoint", "num_workers", "cpus_per_worker", "use_gpu"):  # resources do not decide the weights
        d.pop(k)
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
