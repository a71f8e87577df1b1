"""Experiment configuration: frozen dataclasses, validated on load, one doc line per field.

Configs are pydantic dataclasses (frozen, unknown keys rejected), so a bad YAML file gets an
error naming the field path (``teachers.1.arch``) and the file. ``flatten()`` turns a config
into dotted keys for MLflow params and Ray Tune search spaces; ``to_yaml``/``load_config``
round-trip it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

_FROZEN = ConfigDict(extra="forbid", frozen=True)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the field."""


@dataclass(config=_FROZEN)
class DataConfig:
    name: str = Field("uci-mfeat", description="registered dataset name (`ensemble-kd list datasets`)")
    root: str | None = Field(None, description="directory of an on-disk dataset (cifar10, cifar100, image-folder); never downloaded")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for the dataset builder (e.g. image_size)")


@dataclass(config=_FROZEN)
class TeacherConfig:
    name: str = Field(..., pattern=r"^[A-Za-z0-9_\-]+$", description="unique teacher name; prefixes its shard columns (`<name>.embedding`)")
    arch: str = Field("mlp", description="registered encoder (`ensemble-kd list encoders`)")
    modality: str = Field("pix", description="dataset modality the teacher reads (a view of the same samples)")
    checkpoint: str | None = Field(None, description="use this existing checkpoint file instead of training one")
    arch_kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the encoder builder")
    seed: int = Field(0, description="seed for initialisation and data order")
    epochs: int = Field(30, ge=1, description="training epochs")
    batch_size: int = Field(64, ge=1, description="training batch size")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="optimiser")
    lr: float = Field(0.05, gt=0, description="peak learning rate (cosine decay to 0)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="weight decay")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the cross-entropy")
    augment: bool = Field(False, description="random crop+flip during training (image modalities only)")


@dataclass(config=_FROZEN)
class ViewsConfig:
    num_views: int = Field(1, ge=1, description="views per sample in the shards (view 0 is clean when include_clean)")
    include_clean: bool = Field(True, description="view 0 is the un-augmented sample")
    crop_padding: int = Field(2, ge=0, description="zero padding before the random crop, in pixels (image modalities)")
    flip: bool = Field(False, description="random horizontal flips (off for digits, on for natural images)")
    seed: int = Field(0, description="seed of the view parameters; stored, so views replay exactly")


@dataclass(config=_FROZEN)
class EmbedConfig:
    splits: tuple[Literal["train", "test"], ...] = Field(("train", "test"), min_length=1, description="dataset splits to embed")
    batch_size: int = Field(512, ge=1, description="inference batch size inside each teacher actor")
    embedding_dtype: Literal["float32", "float16"] = Field("float32", description="storage dtype of embeddings (logits stay float32)")
    rows_per_part: int = Field(65536, ge=1, description="rows per Arrow part file (one record batch each; bounds writer memory)")
    num_cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved by each teacher actor")
    num_gpus_per_actor: float = Field(0.0, ge=0, description="GPU fraction of each teacher actor (0 = CPU)")
    views: ViewsConfig = Field(default_factory=ViewsConfig, description="augmented views stored per sample")


@dataclass(config=_FROZEN)
class RayConfig:
    address: str | None = Field(None, description="Ray cluster address ('auto' inside `ray job submit`); None starts a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray (None = all)")
    object_store_memory: int | None = Field(None, ge=78643200, description="object store bytes of a local Ray")


@dataclass(config=_FROZEN)
class LossTerm:
    name: str = Field(..., description="registered loss (`ensemble-kd list losses`): ce, kd, crd, ...")
    weight: float = Field(1.0, ge=0, description="weight of this term in the total loss")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="options of the loss (e.g. temperature, num_negatives)")


@dataclass(config=_FROZEN)
class StudentConfig:
    arch: str = Field("mlp", description="registered encoder of the student")
    modality: str = Field("fou", description="dataset modality the student reads (may differ from the teachers': cross-modal)")
    arch_kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the encoder builder")


@dataclass(config=_FROZEN)
class OptimConfig:
    name: Literal["sgd", "adamw"] = Field("sgd", description="optimiser")
    lr: float = Field(0.05, gt=0, description="base learning rate (reference CRD: 0.05)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="weight decay")
    schedule: Literal["step", "cosine", "constant"] = Field("step", description="learning-rate schedule, stepped per epoch")
    decay_epochs: tuple[int, ...] = Field((150, 180, 210), description="epochs at which 'step' multiplies the lr by decay_rate")
    decay_rate: float = Field(0.1, gt=0, le=1, description="step decay factor")


@dataclass(config=_FROZEN)
class DistillConfig:
    teachers: tuple[str, ...] = Field((), description="names of the teachers (from `teachers`) to distil from; empty = student alone")
    student: StudentConfig = Field(default_factory=StudentConfig, description="the student")
    losses: tuple[LossTerm, ...] = Field(
        (LossTerm(name="ce"),), min_length=1, description="loss terms: total = sum(weight * term)")
    epochs: int = Field(30, ge=1, description="training epochs")
    batch_size: int = Field(64, ge=2, description="global batch size (split across workers)")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="optimiser and schedule")
    seed: int = Field(0, description="seed of initialisation, data order and negative sampling")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks)")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker")
    use_gpu: bool = Field(False, description="one GPU per worker (CUDA clusters)")
    max_failures: int = Field(2, ge=0, description="worker failures Ray Train recovers from (restart from the last checkpoint)")
    eval_every: int = Field(1, ge=1, description="evaluate the student's test top-1 every this many epochs (and at the end)")
    run_name: str | None = Field(None, description="Ray Train run name; None = a fresh unique name (a reused name resumes that run)")


@dataclass(config=_FROZEN)
class TrackingConfig:
    enabled: bool = Field(True, description="record every distillation as an MLflow run")
    uri: str | None = Field(None, description="MLflow tracking URI; None = $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db")
    experiment: str | None = Field(None, description="MLflow experiment name; None = the config's name")


@dataclass(config=_FROZEN)
class ExperimentConfig:
    name: str = Field("uci-mfeat-default", description="experiment name (MLflow experiment, output sub-folders)")
    output_dir: str = Field("outputs", description="root of checkpoints, shards and results")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="device for teachers and students; auto = cuda if present")
    amp: bool = Field(True, description="mixed precision on CUDA (ignored on CPU)")
    data: DataConfig = Field(default_factory=DataConfig, description="dataset")
    teachers: tuple[TeacherConfig, ...] = Field((), description="teachers to train (or load) and embed")
    embed: EmbedConfig = Field(default_factory=EmbedConfig, description="embed stage (Ray actors -> Arrow shards)")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray cluster")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="student distillation (Ray Train)")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking")

    def __post_init__(self) -> None:
        names = [t.name for t in self.teachers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"teacher names must be unique, repeated: {dup}")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.output_dir) / "teachers"

    @property
    def shard_dir(self) -> Path:
        return Path(self.output_dir) / "shards"

    def teacher(self, name: str) -> TeacherConfig:
        for t in self.teachers:
            if t.name == name:
                return t
        raise KeyError(f"no teacher {name!r}; teachers: {[t.name for t in self.teachers]}")


_ADAPTER = TypeAdapter(ExperimentConfig)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            msg = "unknown key"
        lines.append(f"  {loc}: {msg} (got {e.get('input')!r})" if e["type"] != "missing" else f"  {loc}: required")
    return "\n".join(lines)


def from_dict(d: dict[str, Any] | None, source: str = "<dict>") -> ExperimentConfig:
    """Validate a plain dict (as read from YAML) into an ExperimentConfig."""
    try:
        cfg = _ADAPTER.validate_python(d or {})
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None
    check_names(cfg, source)
    return cfg


def check_names(cfg: ExperimentConfig, source: str = "<config>") -> None:
    """Registry-level checks that pydantic cannot do: registered names, modalities, kinds."""
    from modalities import DATASETS, ENCODERS

    errs = []
    if cfg.data.name not in DATASETS:
        errs.append(f"data.name: {DATASETS.unknown_message(cfg.data.name)}")
    mods = DATASETS.meta(cfg.data.name).get("modalities") if cfg.data.name in DATASETS else None
    for i, t in enumerate(cfg.teachers):
        if t.checkpoint is None and t.arch not in ENCODERS:
            errs.append(f"teachers.{i}.arch: {ENCODERS.unknown_message(t.arch)}")
        if mods is not None and t.modality not in mods:
            errs.append(f"teachers.{i}.modality: dataset {cfg.data.name!r} has no modality {t.modality!r}; it has: {', '.join(mods)}")
    names = [t.name for t in cfg.teachers]
    for n in cfg.distill.teachers:
        if n not in names:
            errs.append(f"distill.teachers: {n!r} is not a configured teacher; teachers: {names}")
    if cfg.distill.student.arch not in ENCODERS:
        errs.append(f"distill.student.arch: {ENCODERS.unknown_message(cfg.distill.student.arch)}")
    if mods is not None and cfg.distill.student.modality not in mods:
        errs.append(f"distill.student.modality: dataset {cfg.data.name!r} has no modality {cfg.distill.student.modality!r}; it has: {', '.join(mods)}")
    from ensemble_kd.losses import LOSSES

    loss_names = [t.name for t in cfg.distill.losses]
    if len(set(loss_names)) != len(loss_names):
        errs.append(f"distill.losses: each loss may appear once (they are keyed by name), got {loss_names}")
    for i, term in enumerate(cfg.distill.losses):
        if term.name not in LOSSES:
            errs.append(f"distill.losses.{i}.name: {LOSSES.unknown_message(term.name)}")
        elif LOSSES.meta(term.name).get("needs_teachers", True) and not cfg.distill.teachers:
            errs.append(f"distill.losses.{i}.name: loss {term.name!r} needs teachers, but distill.teachers is empty")
    if errs:
        raise ConfigError(f"invalid config {source}:\n  " + "\n  ".join(errs))


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Load a YAML config (None = the embedded default), then apply dotted-key overrides."""
    if path is None:
        from importlib import resources

        text = (resources.files("ensemble_kd") / "configs" / "default.yaml").read_text()
        source = "<embedded default>"
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        text, source = p.read_text(), str(p)
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config {source} is not valid YAML: {e}") from None
    if d is not None and not isinstance(d, dict):
        raise ConfigError(f"config {source}: the top level must be a mapping, got {type(d).__name__}")
    d = d or {}
    for key, value in (overrides or {}).items():
        _set_dotted(d, key, value)
    return from_dict(d, source)


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.0.c`` in nested dicts/lists (list items by index), creating dicts on the way."""
    parts = key.split(".")
    cur: Any = d
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(cur, list):
            if not p.isdigit() or int(p) >= len(cur):
                raise ConfigError(f"override {key!r}: {'.'.join(parts[:i]) or 'top level'} has no item {p}")
            if last:
                cur[int(p)] = value
            else:
                cur = cur[int(p)]
        elif isinstance(cur, dict):
            if last:
                cur[p] = value
            else:
                cur = cur.setdefault(p, {})
        else:
            raise ConfigError(f"override {key!r}: {'.'.join(parts[:i])} is a value, not a section")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, JSON/YAML-safe dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=list))


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> scalar values (``teachers.0.arch``), for MLflow params and Tune spaces."""
    out: dict[str, Any] = {}

    def walk(obj: Any, key: str) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(v, f"{key}.{i}" if key else str(i))
        else:
            out[key] = obj

    walk(to_dict(cfg) if not isinstance(cfg, dict) else cfg, prefix)
    return out


def config_hash(obj: Any) -> str:
    """Stable sha256 of a config (or any JSON-able value)."""
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its one-line description (for `ensemble-kd config docs` and the docs)."""
    return {f.name: (f.default.description if hasattr(f.default, "description") else "") for f in dataclasses.fields(cls)}
