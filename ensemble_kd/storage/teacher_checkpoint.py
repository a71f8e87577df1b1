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

``load_teacher`` and ``inspect_teacher`` also take a user's own weights, the format read from the
content (never the file name): a RepDistiller checkpoint (a dict with the state_dict under
``"model"``, as ``{"epoch", "model", "accuracy", "optimizer"}``), or a plain state_dict (str ->
tensor; e.g. ``torch.save(torchvision_model.state_dict(), f)``). These record no architecture, so
the caller names it (``arch``, ``spec``, ``num_classes``); their content hash is the sha256 of the
file's bytes. Keys and shapes must fit the encoder exactly.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import pickle
import re
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ensemble_kd.core.files import atomic_torch_save, state_dict_hash
from ensemble_kd.core.config import DataConfig, TeacherConfig, config_hash, to_dict
from ensemble_kd.core.devices import autocast
from ensemble_kd.core.errors import ProjectError
from ensemble_kd.core.shared_folder import in_ray_worker, not_shared
from modalities import Encoder, ModalitySpec, PairedDataset, build_encoder

FORMAT = "ensemble-kd/teacher"
VERSION = 1
FORMATS = ("ensemble-kd", "repdistiller", "state_dict")
"""What ``Teacher.format`` and ``inspect_teacher(...)["format"]`` can be."""
_DESCRIBED = {"repdistiller": "a RepDistiller checkpoint", "state_dict": "a plain state_dict"}


class CheckpointError(ValueError, ProjectError):
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
    format: str = "ensemble-kd"
    """One of ``FORMATS``: the file's format, read from its content."""
    reported_accuracy: float | None = None
    """What a RepDistiller file says its accuracy was (as saved there: percent), unverified."""

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
    for k in ("name", "checkpoint", "num_workers", "cpus_per_worker", "use_gpu", "eval_every"):  # nor do resources or evaluation
        d.pop(k)
    return config_hash({"teacher": d, "data": data_recipe(data)})


def data_recipe(data: DataConfig) -> dict[str, Any]:
    """The data config as a recipe: without a validation carve, as it was before ``val_fraction``
    existed (so checkpoints trained then are still reused); with one, the carve is part of it."""
    d = to_dict(data)
    if not data.val_fraction:
        d.pop("val_fraction")
        d.pop("val_seed")
    return d


def _read_file(path: Path) -> tuple[Any, bytes]:
    """The file's content, loaded with ``weights_only=True``, and its bytes (a foreign file's hash is
    taken from the very bytes loaded, so the hash and the weights cannot come from two versions)."""
    if not path.is_file():
        if in_ray_worker():  # found by the driver before any work: this node does not share the folder
            raise not_shared(path, path.parent, "the teacher checkpoint")
        raise CheckpointError(f"teacher checkpoint not found: {path}")
    data = path.read_bytes()
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # the weights-only unpickler refused something, or a broken pickle
        msg = str(e)
        if "Weights only load failed" not in msg:
            raise _unreadable(path, f"UnpicklingError: {(msg.splitlines() or [''])[0]}") from None
        if _truncated_global(msg):
            raise _unreadable(path, f"a pickled name is cut short ({_GLOBAL.search(msg).group(1)})") from None
        raise CheckpointError(
            f"{path} needs code execution to load ({_refused_detail(msg)}) and is refused: only tensors and "
            "plain containers are read (torch.load weights_only=True). Save just the weights: "
            "torch.save(model.state_dict(), path)") from None
    except Exception as e:  # truncated zip, not a torch file, empty file, ...
        first = (str(e).splitlines() or [""])[0]
        raise _unreadable(path, f"{type(e).__name__}: {first}" if first else f"{type(e).__name__} (empty or cut short)") from None
    return obj, data


def _unreadable(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"teacher checkpoint {path} is unreadable (truncated or not a torch file): {why}")


_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+) was not an allowed global")


def _refused_detail(msg: str) -> str:
    """What torch's weights-only unpickler refused, in a few words."""
    m = _GLOBAL.search(msg)
    if m:
        return f"it pickles {m.group(1)}"
    tail = msg.split("WeightsUnpickler error:")[-1].strip().splitlines()
    return f"the weights-only unpickler refused it: {tail[0] if tail else 'no reason given'}"


def _truncated_global(msg: str) -> bool:
    """True when a refused global is a name cut short: an old-format (pre-zip) file truncated
    inside a pickled name, not a file that needs code (``torch._ut.``, ``collections.Orde``)."""
    m = _GLOBAL.search(msg)
    if not m:
        return False
    module, _, attr = m.group(1).rpartition(".")
    if not module or not all(p.isidentifier() for p in [*module.split("."), attr]):
        return True
    loaded = sys.modules.get(module)  # only modules already imported are looked at: nothing is imported here
    return loaded is not None and not hasattr(loaded, attr)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _detect(obj: Any, path: Path) -> str:
    """The file's format, from its content."""
    if isinstance(obj, Mapping) and isinstance(obj.get("format"), str) and obj["format"] == FORMAT:
        return "ensemble-kd"
    if isinstance(obj, Mapping) and _is_state_dict(obj.get("model")):
        return "repdistiller"
    if _is_state_dict(obj):
        return "state_dict"
    what = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
    raise CheckpointError(
        f"{path} is not a teacher file this loader knows: expected an ensemble-kd teacher checkpoint "
        f"(format={FORMAT!r}), a RepDistiller checkpoint {{'epoch', 'model': state_dict, 'accuracy'}} or a "
        f"state_dict (str -> tensor); it holds {what}")


def _verify_ours(ck: Any, path: Path) -> dict[str, Any]:
    """An ensemble-kd teacher checkpoint's fields and content hash, checked."""
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


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and verify an ensemble-kd teacher checkpoint file; errors name the file and what is wrong."""
    return _verify_ours(_read_file(Path(path))[0], Path(path))


@dataclass(frozen=True)
class _Weights:
    """A teacher file, read and understood: its weights and what they are for."""

    format: str
    state: Mapping[str, torch.Tensor]
    arch: str
    arch_kwargs: dict[str, Any]
    spec: ModalitySpec
    modality: str
    num_classes: int
    content_hash: str
    dataset: str | None = None
    test_top1: float | None = None
    reported_accuracy: float | None = None
    name: str | None = None


def _weights(path: Path, arch: str | None, modality: str | None, spec: ModalitySpec | None,
             num_classes: int | None, arch_kwargs: dict[str, Any] | None) -> _Weights:
    """Read ``path`` in whichever format it is, with the caller's description where the file has none."""
    obj, data = _read_file(path)
    fmt = _detect(obj, path)
    if fmt == "ensemble-kd":
        return _ours(_verify_ours(obj, path), path, arch, modality, spec, num_classes, arch_kwargs)
    missing = [n for n, v in (("arch", arch), ("spec", spec), ("num_classes", num_classes)) if v is None]
    if missing:
        raise CheckpointError(f"{path} is {_DESCRIBED[fmt]}, which records no architecture: give {', '.join(missing)} "
                              "(arch=<registered encoder>, spec=<ModalitySpec of its input>, num_classes=<int>)")
    if not isinstance(spec, ModalitySpec):
        raise CheckpointError(f"{path}: spec must be a modalities.ModalitySpec, got {type(spec).__name__}")
    if modality is not None and modality != spec.name:
        raise CheckpointError(f"{path}: modality {modality!r} was given with the spec of modality {spec.name!r}")
    accuracy = obj.get("accuracy") if fmt == "repdistiller" else None
    return _Weights(fmt, obj["model"] if fmt == "repdistiller" else obj, arch, dict(arch_kwargs or {}), spec,
                    spec.name, int(num_classes), hashlib.sha256(data).hexdigest(), reported_accuracy=_number(accuracy))


def _number(x: Any) -> float | None:
    """A plain number or one-element tensor as a float (RepDistiller saves its accuracy as a tensor)."""
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return float(x)
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _ours(ck: dict[str, Any], path: Path, arch: str | None, modality: str | None, spec: ModalitySpec | None,
          num_classes: int | None, arch_kwargs: dict[str, Any] | None) -> _Weights:
    """An ensemble-kd checkpoint describes itself; what the caller also gave must agree with it."""
    s = ck["modality_spec"]
    w = _Weights("ensemble-kd", ck["state_dict"], ck["arch"], dict(ck.get("arch_kwargs", {})),
                 ModalitySpec(s["name"], s["kind"], tuple(s["shape"])), ck["modality"], int(ck["num_classes"]),
                 ck["content_hash"], dataset=(ck.get("dataset") or {}).get("name"), test_top1=ck.get("test_top1"),
                 name=ck.get("name"))
    given = {"arch": arch, "modality": modality, "spec": spec, "num_classes": num_classes, "arch_kwargs": arch_kwargs}
    for key, want in given.items():
        have = getattr(w, key)
        if want is not None and (dict(want) if key == "arch_kwargs" else want) != have:
            raise CheckpointError(f"{path} is an ensemble-kd teacher checkpoint with {key} {have!r}, "
                                  f"but {key} {want!r} was given")
    return w


def _few(keys: list[str], n: int = 4) -> str:
    return ", ".join(map(repr, keys[:n])) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def _check_fits(path: Path, w_state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor],
                what: str) -> None:
    """Raise ``CheckpointError`` unless the file's keys and shapes are exactly the model's; the
    message names the file, the first missing and unexpected keys and the first shape mismatch."""
    missing = [k for k in model_state if k not in w_state]
    unexpected = [k for k in w_state if k not in model_state]
    shapes = [k for k in model_state if k in w_state and tuple(w_state[k].shape) != tuple(model_state[k].shape)]
    if not (missing or unexpected or shapes):
        return
    parts = [f"missing keys ({len(missing)}): {_few(missing)}"] if missing else []
    parts += [f"unexpected keys ({len(unexpected)}): {_few(unexpected)}"] if unexpected else []
    if shapes:
        k = shapes[0]
        parts.append(f"shape mismatch at {k!r}: the file has {list(w_state[k].shape)}, the encoder needs "
                     f"{list(model_state[k].shape)}" + (f" (and at {len(shapes) - 1} more keys)" if len(shapes) > 1 else ""))
    if unexpected and all(k.startswith("module.") for k in w_state) and {k[7:] for k in w_state} == set(model_state):
        parts.append("every key carries DataParallel's 'module.' prefix: save model.module.state_dict() instead")
    raise CheckpointError(f"{path}: weights do not fit {what}: " + "; ".join(parts))


def _meta_model(w: _Weights, path: Path) -> tuple[Encoder, dict[str, torch.Tensor]]:
    """The encoder for ``w`` built on the meta device (shapes only: no memory, no initialisation)
    and its state_dict, checked against the file's keys and shapes."""
    try:
        with torch.device("meta"):
            model = build_encoder(w.arch, w.spec, w.num_classes, **w.arch_kwargs)
    except (ValueError, TypeError) as e:  # unknown arch, wrong input kind, bad arch_kwargs
        raise CheckpointError(f"{path}: cannot build encoder {w.arch!r} for it: {e}") from None
    expected = model.state_dict()
    _check_fits(path, w.state, expected, f"encoder {w.arch!r} with {w.num_classes} classes on {w.spec.kind} {w.spec.shape}")
    return model, expected


def _fitted(w: _Weights, path: Path) -> Encoder:
    """The encoder for ``w`` holding the file's tensors (cast to the encoder's dtypes), without
    initialising weights that would be overwritten."""
    model, expected = _meta_model(w, path)
    state = {k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in w.state.items()}
    model.load_state_dict(state, assign=True)
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        # a tensor no state_dict carries (a non-persistent buffer): build for real and copy the weights in
        model = build_encoder(w.arch, w.spec, w.num_classes, **w.arch_kwargs)
        model.load_state_dict(state)
    return model


def load_teacher(path: str | Path, device: torch.device | str = "cpu", name: str | None = None, *,
                 arch: str | None = None, modality: str | None = None, spec: ModalitySpec | None = None,
                 num_classes: int | None = None, arch_kwargs: dict[str, Any] | None = None) -> Teacher:
    """Rebuild a frozen teacher from a file: an ensemble-kd checkpoint (describes itself; whatever
    of ``arch``, ``modality``, ... is given must agree), or a RepDistiller checkpoint or plain
    state_dict (``arch``, ``spec`` and ``num_classes`` are then required). Errors name the file."""
    path = Path(path)
    w = _weights(path, arch, modality, spec, num_classes, arch_kwargs)
    model = freeze(_fitted(w, path).to(device))
    return Teacher(
        name=name or w.name or path.stem,
        model=model,  # type: ignore[arg-type]
        arch=w.arch,
        modality=w.modality,
        dataset=w.dataset or "?",
        num_classes=w.num_classes,
        content_hash=w.content_hash,
        path=path,
        test_top1=w.test_top1,
        format=w.format,
        reported_accuracy=w.reported_accuracy,
    )


def inspect_teacher(path: str | Path, *, arch: str | None = None, modality: str | None = None,
                    spec: ModalitySpec | None = None, num_classes: int | None = None,
                    arch_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a teacher file is, checked as ``load_teacher`` checks it (format, hash, keys and shapes
    against the encoder built on the meta device) without building the model's weights."""
    path = Path(path)
    w = _weights(path, arch, modality, spec, num_classes, arch_kwargs)
    _meta_model(w, path)
    return {"format": w.format, "arch": w.arch, "modality": w.modality, "content_hash": w.content_hash,
            "test_top1": w.test_top1, "reported_accuracy": w.reported_accuracy, "num_classes": w.num_classes,
            "dataset": w.dataset}


def file_format(path: str | Path) -> str:
    """The format of a teacher file (one of :data:`FORMATS`), from its content."""
    path = Path(path)
    return _detect(_read_file(path)[0], path)


def load_record(rec: Any, ds: PairedDataset, device: torch.device | str = "cpu") -> Teacher:
    """The frozen teacher of a teacher record (``artifacts.TeacherRecord`` or its dict): an
    ensemble-kd checkpoint describes itself; a foreign file is built as the record's arch on
    ``ds``'s input spec and classes. A file whose weights changed since the record was made is
    refused (its content hash names both sides)."""
    r = rec if isinstance(rec, Mapping) else asdict(rec)
    if r.get("format", "ensemble-kd") == "ensemble-kd":
        t = load_teacher(r["path"], device, name=r["name"])
    else:
        t = load_teacher(r["path"], device, name=r["name"], arch=r["arch"], modality=r["modality"],
                         spec=ds.spec(r["modality"]), num_classes=ds.num_classes, arch_kwargs=r.get("arch_kwargs") or {})
    if t.content_hash != r["content_hash"]:
        raise CheckpointError(f"{r['path']}: the file's weights hash to {t.content_hash[:16]}, the teacher set recorded "
                              f"{r['content_hash'][:16]}: it changed since; rerun `ensemble-kd teachers train`")
    return t


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
