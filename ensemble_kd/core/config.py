"""Experiment configuration, a schema: frozen dataclasses, validated on load, one doc line per field.

Configs are pydantic dataclasses (frozen, unknown keys rejected), so a bad YAML file gets an
error naming the field path (``teachers.1.arch``) and the file. ``flatten()`` turns a config
into dotted keys for MLflow params and Ray Tune search spaces; ``to_yaml``/``load_config``
round-trip it; :func:`apply_overrides` is the one way to change fields by dotted key (``--set``,
sweeps, arms). Nothing here knows the registries or orchestrates: cross-checks against
registered names live in :mod:`ensemble_kd.orchestration.checks`, the expansion of ``run.arms`` in
:mod:`ensemble_kd.orchestration.plan`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from ensemble_kd.core import layout
from ensemble_kd.core.errors import ProjectError

# allow_inf_nan=False: an lr or a weight of inf/nan is refused at load (it would train to NaN and "succeed")
_FROZEN = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)



class ConfigError(ValueError, ProjectError):
    """A config that cannot be used; the message names the file and the field."""


def _absolute(obj: Any, field: str) -> None:
    """Make a path field absolute (against the working directory where the config is loaded):
    Ray Train workers and Tune trials run in other working directories."""
    v = getattr(obj, field)
    if v is not None:
        object.__setattr__(obj, field, str(Path(v).expanduser().resolve()))


@dataclass(config=_FROZEN)
class DataConfig:
    name: str = Field("uci-mfeat", description="registered dataset name (`ensemble-kd list datasets`): uci-mfeat, digits, mnist-5k, cifar10/100, image-folder, paired-folder, synthetic, or table (your own paired modalities in a Parquet/Arrow file, no code: README 'Your own data')")
    root: str | None = Field(None, description="file or directory of an on-disk dataset (cifar10/100, image-folder, paired-folder: a folder; table: a Parquet/Arrow file or a folder of them; relative: to the working directory); never downloaded. Read once into <output_dir>/data (`ensemble-kd data prepare`)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for the dataset builder (e.g. image_size)")
    val_fraction: float = Field(0.0, ge=0, lt=1, description="carve this fraction of each class of the train split into a validation split (seeded by val_seed, recorded in the data store); teachers and students train on the rest and selection (Tune, compare, export --arm) uses val top-1. 0: none (a table's own `val` rows are one)")
    val_seed: int = Field(0, ge=0, description="seed of the data.val_fraction carve (the same rows for every teacher, arm and seed)")

    def __post_init__(self) -> None:
        _absolute(self, "root")


@dataclass(config=_FROZEN)
class TeacherConfig:
    name: str = Field(..., pattern=r"^[A-Za-z0-9_\-]+$", description="unique teacher name; prefixes its shard columns (`<name>.embedding`)")
    arch: str = Field("mlp", description="registered encoder (`ensemble-kd list encoders`)")
    modality: str = Field("pix", description="dataset modality the teacher reads (a view of the same samples)")
    checkpoint: str | None = Field(None, description="use this existing checkpoint file instead of training one (relative: to the working directory)")
    arch_kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the encoder builder")
    seed: int = Field(0, description="seed for initialisation and data order")
    epochs: int = Field(30, ge=1, description="training epochs")
    batch_size: int = Field(64, ge=1, description="training batch size")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="optimiser (SGD with Nesterov momentum)")
    lr: float = Field(0.05, gt=0, description="peak learning rate")
    schedule: Literal["onecycle", "step", "cosine", "constant"] = Field("onecycle", description="learning-rate schedule (onecycle: per step, 15% warm-up)")
    decay_epochs: tuple[int, ...] = Field((150, 180, 210), description="epochs at which 'step' multiplies the lr by 0.1 (the reference CIFAR teachers: 150, 180, 210 of 240)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="weight decay")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the cross-entropy")
    augment: bool = Field(False, description="a fresh random crop (+ flip) every step (image modalities only)")
    crop_padding: int = Field(2, ge=0, description="zero padding of the random crop, in pixels (CIFAR: 4)")
    flip: bool = Field(False, description="random horizontal flips with augment (on for natural images, off for digits)")
    eval_every: int = Field(1, ge=1, description="evaluate the teacher's test top-1 every this many epochs (and at the end; each is a pass over the test split)")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks) of this teacher's training run")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker of this teacher's training run")
    use_gpu: bool = Field(False, description="one GPU per worker of this teacher's training run, which then trains on it; false: on the CPU, GPUs hidden (the one rule for where a stage runs: see `device`)")

    def __post_init__(self) -> None:
        _absolute(self, "checkpoint")


@dataclass(config=_FROZEN)
class ViewsConfig:
    num_views: int = Field(1, ge=1, description="views per sample in the shards (view 0 is clean when include_clean)")
    include_clean: bool = Field(True, description="view 0 is the un-augmented sample")
    crop_padding: int = Field(2, ge=0, description="zero padding before the random crop, in pixels (image modalities)")
    flip: bool = Field(False, description="random horizontal flips (off for digits, on for natural images)")
    seed: int = Field(0, description="seed of the view parameters; stored, so views replay exactly")


@dataclass(config=_FROZEN)
class AdversarialConfig:
    enabled: bool = Field(False, description="store PGD adversarial views made by each teacher at embed time (GACD); part of the shard id")
    num_views: int = Field(1, ge=1, description="adversarial views per sample, stored after the normal views (view ids V..V+A-1)")
    epsilon: float = Field(0.1, gt=0, description="L_inf radius of the perturbation, in the modality's standardised units")
    steps: int = Field(5, ge=1, description="PGD steps (signed-gradient ascent on `objective`)")
    step_size: float = Field(0.05, gt=0, description="PGD step size, in standardised units")
    seed: int = Field(0, description="seed of the random starts (one per (sample_id, view): replayable, batch-independent)")
    random_start: bool = Field(True, description="start from a uniform point of the epsilon ball (Madry et al.)")
    objective: Literal["self-supervised", "ce"] = Field(
        "self-supervised", description="what PGD ascends: self-supervised (GACD: the teacher's feature of the view moved "
                                       "away from its clean view's, no label) or ce (the teacher's CE at the true label)")

    def __post_init__(self) -> None:
        if self.enabled and self.objective == "self-supervised" and not self.random_start:
            raise ValueError("objective 'self-supervised' needs random_start: true (its gradient is 0 at delta = 0)")


@dataclass(config=_FROZEN)
class EmbedConfig:
    splits: tuple[Literal["train", "test"], ...] = Field(("train", "test"), min_length=1, description="dataset splits to embed")
    batch_size: int = Field(512, ge=1, description="inference batch size inside each teacher's embed task")
    embedding_dtype: Literal["float32", "float16"] = Field("float32", description="storage dtype of embeddings (logits stay float32)")
    rows_per_part: int = Field(65536, ge=1, description="rows per Arrow part file (one record batch each; bounds writer memory)")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved by each embed task (one per worker of a teacher: workers_per_teacher)")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPU fraction of each embed task (one per worker of a teacher), which then embeds on it; 0 = on the CPU, GPUs hidden")
    workers_per_teacher: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="embed tasks splitting each teacher's rows (each loads the teacher once; same shard bytes); auto: the free CPUs/GPUs at the stage's start shared by the teachers")
    min_rows_per_worker: int = Field(50000, ge=1, description="workers_per_teacher=auto starts at most one task per this many of a teacher's rows (the default's 2,000 rows: one task)")
    views: ViewsConfig = Field(default_factory=ViewsConfig, description="augmented views stored per sample")
    adversarial: AdversarialConfig = Field(default_factory=AdversarialConfig, description="PGD adversarial views stored per sample (GACD)")


@dataclass(config=_FROZEN)
class RayConfig:
    address: str | None = Field(None, description="Ray cluster address ('auto' inside `ray job submit`); None starts a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray (None = all)")
    object_store_memory: int | None = Field(None, ge=78643200, description="object store bytes of a local Ray")
    train_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "WARNING", description="level of Ray Train's own console logs (INFO: every report, checkpoint and worker-group start)")


@dataclass(config=_FROZEN)
class LossTerm:
    name: str = Field(..., description="registered loss (`ensemble-kd list losses`): ce, kd, crd, ...")
    weight: float = Field(1.0, ge=0, description="weight of this term in the total loss")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="options of the loss (e.g. temperature, num_negatives); each loss's, with types and defaults: `ensemble-kd list losses`")


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
    schedule: Literal["step", "cosine", "constant", "onecycle"] = Field(
        "step", description="learning-rate schedule: step, cosine, constant (stepped per epoch) or onecycle (per step)")
    decay_epochs: tuple[int, ...] = Field((150, 180, 210), description="epochs at which 'step' multiplies the lr by decay_rate")
    decay_rate: float = Field(0.1, gt=0, le=1, description="step decay factor")
    pct_start: float = Field(0.15, gt=0, lt=1, description="onecycle: fraction of the steps spent raising the lr to its peak")
    nesterov: bool = Field(False, description="SGD with Nesterov momentum")


@dataclass(config=_FROZEN)
class AugmentConfig:
    enabled: bool = Field(True, description="a fresh random view of every image each step (the online path; vectors are not augmented)")
    crop_padding: int = Field(4, ge=0, description="zero padding before the random crop, in pixels (the reference CIFAR pipeline: 4)")
    flip: bool = Field(True, description="random horizontal flips (on for natural images, off for digits)")


@dataclass(config=_FROZEN)
class LabelsConfig:
    count: int | None = Field(None, ge=1, description="labelled train samples (e.g. 50), drawn per seed, stratified by class; the other rows are unlabelled")
    fraction: float | None = Field(None, gt=0, le=1, description="labelled fraction of the train samples, drawn like count (exclusive with count); neither = every row labelled")
    seed: int | None = Field(None, description="seed of the draw; None = distill.seed (a new labelled subset per seed, the same in every arm)")

    def __post_init__(self) -> None:
        if self.count is not None and self.fraction is not None:
            raise ValueError(f"count ({self.count}) and fraction ({self.fraction}) are exclusive: set one")

    @property
    def subset(self) -> bool:
        """Whether only some rows are labelled."""
        return self.count is not None or self.fraction is not None


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
    use_gpu: bool = Field(False, description="one GPU per worker (and per Tune trial), which then trains on it; false: on the CPU, GPUs hidden")
    gpus_per_worker: float = Field(1.0, gt=0, le=1, description="with use_gpu, the share of a GPU each worker (and each single-worker Tune trial) holds: 0.5 lets two trials train on one GPU")
    max_failures: int = Field(2, ge=0, description="worker failures Ray Train recovers from (restart from the last checkpoint)")
    eval_every: int = Field(1, ge=1, description="evaluate the student's test top-1 every this many epochs (and at the end)")
    checkpoint_every: int = Field(1, ge=1, description="save the training state every this many epochs (and at the end); a restart or --resume continues from the last one")
    metrics_flush_s: float = Field(5.0, ge=0, description="send the per-epoch MLflow metrics at most every this many seconds, all epochs since the last send in one batch (and at every checkpoint, at the end and on an error); 0: every epoch. A sweep with an early-stopping scheduler sends every epoch, so that a stopped trial keeps each epoch Tune saw")
    local_mode: bool = Field(True, description="a single-worker run executes its loop in one Ray process (Ray Train's local mode: no controller or worker group to start); false: always a Ray Train worker group")
    run_name: str | None = Field(None, description="Ray Train run name; None = a fresh unique name (a reused name resumes that run)")
    selection: str | None = Field(None, description="path of a selection (`ensemble-kd select`, DFND): train only on its rows, with its pseudo-labels as labels")
    eval_data: DataConfig | None = Field(None, description="evaluate the student's test top-1 on this dataset's test split instead of data's (DFND: the teacher's test set)")
    adv_replay_teacher: str | None = Field(None, description="teacher whose stored PGD deltas the student replays on adversarial rows; None = the one distill teacher of the student's modality")
    teacher_outputs: Literal["shards", "online"] = Field(
        "shards", description="shards: precomputed teacher outputs, stored views replayed (cheapest step); online: the frozen "
                              "teachers run in each worker on a fresh augmentation every step (feature maps available)")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="the online path's fresh augmentation (ignored on the shard path, whose views are stored)")
    labels: LabelsConfig = Field(default_factory=LabelsConfig, description="labels on a subset: supervised terms (CE) see only the labelled rows, teacher terms every row")

    def __post_init__(self) -> None:
        _absolute(self, "selection")


@dataclass(config=_FROZEN)
class TrackingConfig:
    enabled: bool = Field(True, description="record every distillation as an MLflow run")
    uri: str | None = Field(None, description="MLflow tracking URI; None = $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db")
    experiment: str | None = Field(None, description="MLflow experiment name; None = the config's name")


@dataclass(config=_FROZEN)
class SelectConfig:
    teacher_data: DataConfig | None = Field(None, description="the teachers' own labelled dataset: its test split gives their per-class accuracy a_i (required by `ensemble-kd select`)")
    fraction: float = Field(0.5, gt=0, le=1, description="fraction of the pool's train rows kept, the most confident (lowest-noise) first")
    per_class: bool = Field(True, description="keep the top fraction within each pseudo-class (class balance), not the top fraction overall")
    # the teachers that score and label the pool are distill.teachers (every teacher when it is empty)


@dataclass(config=_FROZEN)
class TuneConfig:
    space: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="dotted config key -> {grid|choice: [..]} or {uniform|loguniform|randint: [lo, hi]}; "
                    "losses by name: distill.losses.crd.kwargs.tau")
    search: Literal["grid", "random"] = Field("grid", description="grid: every grid point; random: num_samples draws (grid keys still expand)")
    num_samples: int = Field(1, ge=1, description="repeats of the grid (grid) or random draws (random)")
    scheduler: Literal["fifo", "asha"] = Field("asha", description="asha stops weak trials early (at grace_period, then every reduction_factor x epochs)")
    metric: str = Field("test_top1", description="metric the scheduler and 'best trial' use")
    mode: Literal["max", "min"] = Field("max", description="maximise or minimise the metric")
    grace_period: int = Field(1, ge=1, description="ASHA: epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: keep 1/reduction_factor of the trials at each rung")
    cpus_per_trial: float = Field(1.0, ge=0, description="CPUs of a multi-worker trial's driver, which starts its TorchTrainer (a single-worker trial in local mode holds distill.cpus_per_worker instead)")
    max_concurrent_trials: int | None = Field(None, ge=1, description="trials at once (None = as the cluster's CPUs allow)")
    name: str | None = Field(None, description="Tune run name (folder under <output_dir>/tune); None = <experiment>-<time>")


@dataclass(config=_FROZEN)
class ArmConfig:
    name: str = Field(..., pattern=r"^[A-Za-z0-9_\-+]+$", description="arm name (MLflow tag `arm`, summary key)")
    teachers: Literal["none", "best", "all"] | tuple[str, ...] = Field(
        "all", description="none, best (the single teacher with the best test top-1), all (the ensemble), or a list of names")
    losses: tuple[LossTerm, ...] | None = Field(None, description="loss terms of this arm; None = distill.losses")
    labels: LabelsConfig | None = Field(None, description="labels of this arm (e.g. {count: 50}; {} = every row); None = distill.labels")
    set: dict[str, Any] = Field(default_factory=dict, description="other dotted overrides of this arm's config (e.g. distill.epochs: 30), applied last")


@dataclass(config=_FROZEN)
class SweepConfig:
    arm: str = Field(..., description="the arm whose config is swept")
    space: dict[str, dict[str, Any]] = Field(..., description="as tune.space, grid values only (e.g. CRD tau and num_negatives)")
    seed: int | None = Field(None, description="seed of the sweep's trials; None = the first of run.seeds")


@dataclass(config=_FROZEN)
class RunJobConfig:
    arms: tuple[ArmConfig, ...] = Field((), description="arms of `ensemble-kd run`, each over every seed; empty = one run of `distill`")
    seeds: tuple[int, ...] = Field((0,), min_length=1, description="seeds each arm runs with (distill.seed)")
    sweep: SweepConfig | None = Field(None, description="a small grid sweep on one arm, run with the arms")
    export: bool = Field(True, description="at the end, export the best student of the headline arm (TorchScript, ONNX, MLflow model, model card) under <output_dir>/exports/")
    export_arm: str | None = Field(None, description="the headline arm `run` exports; None = the last of run.arms")

    def __post_init__(self) -> None:
        names = [a.name for a in self.arms]
        if self.export_arm is not None and self.export_arm not in names:
            raise ValueError(f"run.export_arm: {self.export_arm!r} is not an arm; arms: {names}")


@dataclass(config=_FROZEN)
class ExperimentConfig:
    name: str = Field("uci-mfeat-default", description="experiment name (MLflow experiment, output sub-folders)")
    output_dir: str = Field("outputs", description="root of checkpoints, shards and results (relative: to the working directory)")
    plugins: tuple[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")], ...] = Field(
        (), description="modules imported in the driver and in every Ray worker before anything is built (a user's datasets, encoders, losses register themselves on import); each must be importable on every node")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="not a switch: each stage runs where its GPU field says (teachers[i].use_gpu, embed.gpus_per_actor, distill.use_gpu: a GPU when set, else the CPU with GPUs hidden); auto = just that, cpu/cuda = an assertion checked at load (cpu: no GPU field set; cuda: every stage that runs sets one)")
    amp: bool = Field(True, description="mixed precision on CUDA (ignored on CPU)")
    data: DataConfig = Field(default_factory=DataConfig, description="dataset")
    teachers: tuple[TeacherConfig, ...] = Field((), description="teachers to train (or load) and embed")
    embed: EmbedConfig = Field(default_factory=EmbedConfig, description="embed stage (Ray tasks, each teacher's rows split over workers_per_teacher of them -> Arrow shards)")
    select: SelectConfig = Field(default_factory=SelectConfig, description="DFND: confident rows of an unlabeled pool (`ensemble-kd select`)")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray cluster")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="student distillation (Ray Train)")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking")
    tune: TuneConfig = Field(default_factory=TuneConfig, description="Ray Tune sweep (`ensemble-kd tune`) and trial resources")
    run: RunJobConfig = Field(default_factory=RunJobConfig, description="the arms, seeds and sweep of `ensemble-kd run`")

    def __post_init__(self) -> None:
        _absolute(self, "output_dir")
        _check_device(self)
        names = [t.name for t in self.teachers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"teacher names must be unique, repeated: {dup}")

    @property
    def checkpoint_dir(self) -> Path:
        return layout.teachers(self.output_dir)

    @property
    def shard_dir(self) -> Path:
        return layout.shards(self.output_dir)

    def teacher(self, name: str) -> TeacherConfig:
        for t in self.teachers:
            if t.name == name:
                return t
        raise KeyError(f"no teacher {name!r}; teachers: {[t.name for t in self.teachers]}")


_ADAPTER = TypeAdapter(ExperimentConfig)


def _format_errors(err: ValidationError, source: str, overrides: Mapping[str, Any] | None = None) -> str:
    """One line per error, naming the field (and, for an unknown key, the closest known one); an
    error in a field an override set (``--set``) names that override instead of the file."""
    set_keys = {k: k for k in (overrides or {})}
    mine, theirs = [], []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        unknown = e["type"] in ("extra_forbidden", "unexpected_keyword_argument")
        hint = _did_you_mean(e["loc"]) if unknown else ""
        given = next((k for k in set_keys if _covers(k, e["loc"])), None)
        if given is not None:
            key = set_keys[given]
            what = (f"unknown key {str(e['loc'][-1])!r}{hint}" if unknown
                    else f"{loc}: required" if e["type"] == "missing" else f"{loc}: {msg} (got {e.get('input')!r})")
            mine.append(f"--set {key}={_shown((overrides or {})[key])}: {what}")
            continue
        if unknown:
            msg = "unknown key"
        theirs.append(f"{loc}: {msg} (got {e.get('input')!r}){hint}" if e["type"] != "missing" else f"{loc}: required")
    if mine and not theirs and len(mine) == 1:
        return mine[0]
    return "\n".join([f"invalid config {source}" + (" with --set" if mine else "") + ":"]
                     + [f"  {ln}" for ln in theirs + mine])


def _shown(v: Any) -> str:
    """An override's value as it would be typed after ``--set key=``."""
    return v if isinstance(v, str) else json.dumps(v, default=str)


def _covers(key: str, loc: tuple) -> bool:
    """Whether the dotted override ``key`` set (or created) the field at pydantic ``loc``: one is a
    prefix of the other, a list item given by name matching any index."""
    parts = key.split(".")
    for a, b in zip(parts, (str(p) for p in loc)):
        if a != b and not (b.isdigit() and not a.isdigit()):
            return False
    return True


def _did_you_mean(loc: tuple) -> str:
    """``; did you mean 'distill'?`` for an unknown key at ``loc``, from the fields of the section
    that holds it (empty when none is close)."""
    import difflib
    import typing

    t: Any = ExperimentConfig
    try:
        for p in loc[:-1]:
            t = _inner(typing.get_type_hints(t)[p] if dataclasses.is_dataclass(t) else t, str(p).isdigit())
        names = [f.name for f in dataclasses.fields(t)] if dataclasses.is_dataclass(t) else []
    except Exception:  # noqa: BLE001 - a hint only
        return ""
    close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _inner(t: Any, item: bool) -> Any:
    """The dataclass a field of type ``t`` holds (through Annotated, X | None, tuple[X, ...])."""
    import typing

    while True:
        origin, args = typing.get_origin(t), typing.get_args(t)
        if origin is Annotated:
            t = args[0]
        elif origin in (tuple, list) and args and item:
            t, item = args[0], False
        elif args and origin not in (tuple, list, dict, Literal):  # a union: its dataclass member
            t = next((a for a in args if dataclasses.is_dataclass(a) or typing.get_origin(a) in (tuple, list)), args[0])
        else:
            return t


def from_dict(d: dict[str, Any] | None, source: str = "<dict>") -> ExperimentConfig:
    """Validate a plain dict (as read from YAML) against the schema. Registry names (datasets,
    encoders, losses) are checked where they are used: :func:`ensemble_kd.orchestration.checks.check_config`."""
    return _validate(d, source)


def _validate(d: dict[str, Any] | None, source: str, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    try:
        return _ADAPTER.validate_python(d or {})
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source, overrides)) from None


def _yaml_error(e: yaml.YAMLError, source: str, text: str) -> str:
    """A YAML syntax error as one line naming the file, the line and the column (PyYAML's own
    report spans several lines, with carets); a tab where YAML wants spaces says so."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = " ".join(str(getattr(e, "problem", None) or e).split())
    where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    ctx, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if ctx and cmark is not None and (mark is None or (cmark.line, cmark.column) != (mark.line, mark.column)):
        problem += f" ({ctx} at line {cmark.line + 1}, column {cmark.column + 1})"
    line = text.splitlines()[mark.line] if mark is not None and mark.line < len(text.splitlines()) else ""
    tab = "\t" in line or "\\t" in problem or re.search(r"\btab\b", problem) is not None
    return (f"config {source}{where}: not valid YAML: {problem}"
            + ("; indent with spaces: YAML does not allow tabs for indentation" if tab else ""))


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Load a YAML config (None = the embedded default), then apply dotted-key overrides (``--set``:
    an error in one names it, not the file)."""
    if path is None:
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
        raise ConfigError(_yaml_error(e, source, text)) from None
    if d is None and path is not None:
        raise ConfigError(f"config {source} is empty (no settings, only blank lines or comments): write the fields to "
                          "change (`ensemble-kd config show` prints them all), or leave --config out for the embedded default")
    if d is not None and not isinstance(d, dict):
        raise ConfigError(f"config {source}: the top level must be a mapping, got {type(d).__name__}")
    return _validate(apply_overrides(d or {}, overrides or {}, label="--set"), source, overrides)


def apply_overrides(d: dict[str, Any], overrides: Mapping[str, Any], label: str = "override") -> dict[str, Any]:
    """The one override mechanism: set each dotted key (``distill.losses.crd.kwargs.tau``) of the
    plain config dict ``d`` in place (list items by index or by name); returns ``d``. A list the
    dict leaves out (``distill.losses``) is its default's, so that an item of it can be named.
    ``label``: how an error names the override (``--set`` from the command line)."""
    for key, value in overrides.items():
        where = f"--set {key}={_shown(value)}" if label == "--set" else f"{label} {key!r}"
        _set_dotted(d, key, value, where)
    return d


_DEFAULTS: dict[str, Any] | None = None


def _default_at(parts: list[str]) -> Any:
    """The schema's default value at the dotted path ``parts`` of sections (None where there is
    none, or the path goes through a list: an item of a list the config gives is its own)."""
    global _DEFAULTS
    if _DEFAULTS is None:
        _DEFAULTS = to_dict(ExperimentConfig())
    cur: Any = _DEFAULTS
    for p in parts:
        if not isinstance(cur, dict):
            return None
        cur = cur.get(p)
    return cur


def _item_word(section: str) -> str:
    """``losses`` -> ``loss``, ``teachers`` -> ``teacher``, ``arms`` -> ``arm``."""
    last = section.rsplit(".", 1)[-1]
    return last[:-2] if last.endswith("sses") else last[:-1] if last.endswith("s") else "item"


def _set_dotted(d: dict[str, Any], key: str, value: Any, where: str | None = None) -> None:
    """Set ``a.b.0.c`` in nested dicts/lists (list items by index or name), creating dicts on the
    way (a list the dict lacks: its default, so that its items can be named)."""
    where = where or f"override {key!r}"
    parts = key.split(".")
    cur: Any = d
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(cur, list):
            j = _list_index(cur, p)
            if j is None:
                section = ".".join(parts[:i]) or "top level"
                names = [x.get("name") for x in cur if isinstance(x, dict) and "name" in x]
                if names and not p.isdigit():
                    word = _item_word(section)
                    raise ConfigError(f"{where}: {section} has no item {p!r}: no {word} is named {p!r}; "
                                      f"{word}{'es' if word.endswith('s') else 's'}: {', '.join(map(str, names))}")
                raise ConfigError(f"{where}: {section} has no item {p!r}"
                                  + (f"; items by name: {names}" if names else f"; it has {len(cur)} items"))
            if last:
                cur[j] = value
            else:
                cur = cur[j]
        elif isinstance(cur, dict):
            if last:
                cur[p] = value
            else:
                if p not in cur:
                    default = _default_at(parts[:i + 1])
                    cur[p] = json.loads(json.dumps(default)) if isinstance(default, list) else {}
                cur = cur[p]
        else:
            raise ConfigError(f"{where}: {'.'.join(parts[:i])} is a value, not a section")


def _list_index(items: list, key: str) -> int | None:
    """A list item by index (``0``) or, for lists of named items (losses, teachers), by name (``crd``)."""
    if key.isdigit():
        return int(key) if int(key) < len(items) else None
    for j, x in enumerate(items):
        if isinstance(x, dict) and x.get("name") == key:
            return j
    return None


def with_overrides(cfg: ExperimentConfig, overrides: dict[str, Any], source: str = "<overrides>") -> ExperimentConfig:
    """A new config: ``cfg`` with dotted-key overrides (``distill.losses.crd.kwargs.tau``) applied and re-validated."""
    return from_dict(apply_overrides(to_dict(cfg), overrides), source)


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


def _check_device(cfg: ExperimentConfig) -> None:
    """``device`` against the GPU fields, which alone decide where each stage runs: ``cpu`` with a
    GPU field set, or ``cuda`` with a stage that would run on the CPU, is refused, naming the fields."""
    gpu = {**{f"teachers.{i}.use_gpu": t.use_gpu for i, t in enumerate(cfg.teachers) if t.checkpoint is None},
           **({"embed.gpus_per_actor": cfg.embed.gpus_per_actor > 0} if cfg.teachers else {}),
           "distill.use_gpu": cfg.distill.use_gpu}
    if cfg.device == "cpu" and any(gpu.values()):
        raise ValueError(f"device: cpu, but {', '.join(k for k, v in gpu.items() if v)} asks Ray for a GPU; "
                         "each stage runs where its GPU field says: unset it, or set device: auto")
    if cfg.device == "cuda" and not all(gpu.values()):
        raise ValueError(f"device: cuda, but {', '.join(k for k, v in gpu.items() if not v)} asks Ray for no GPU, so "
                         "that stage would run on the CPU; each stage runs where its GPU field says: set it "
                         "(use_gpu: true, gpus_per_actor: 1), or set device: auto")


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its one-line description, for one section (every field by its YAML path: :mod:`ensemble_kd.core.config_docs`)."""
    return {f.name: (f.default.description if hasattr(f.default, "description") else "") for f in dataclasses.fields(cls)}
