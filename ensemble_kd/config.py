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


def _absolute(obj: Any, field: str) -> None:
    """Make a path field absolute (against the working directory where the config is loaded):
    Ray Train workers and Tune trials run in other working directories."""
    v = getattr(obj, field)
    if v is not None:
        object.__setattr__(obj, field, str(Path(v).expanduser().resolve()))


@dataclass(config=_FROZEN)
class DataConfig:
    name: str = Field("uci-mfeat", description="registered dataset name (`ensemble-kd list datasets`)")
    root: str | None = Field(None, description="directory of an on-disk dataset (cifar10, cifar100, image-folder; relative: to the working directory); never downloaded")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for the dataset builder (e.g. image_size)")

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
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="optimiser")
    lr: float = Field(0.05, gt=0, description="peak learning rate (cosine decay to 0)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="weight decay")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the cross-entropy")
    augment: bool = Field(False, description="random crop+flip during training (image modalities only)")

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
    steps: int = Field(5, ge=1, description="PGD steps (signed-gradient ascent on the teacher's cross-entropy)")
    step_size: float = Field(0.05, gt=0, description="PGD step size, in standardised units")
    seed: int = Field(0, description="seed of the random starts (one per (sample_id, view): replayable, batch-independent)")
    random_start: bool = Field(True, description="start from a uniform point of the epsilon ball (Madry et al.)")


@dataclass(config=_FROZEN)
class EmbedConfig:
    splits: tuple[Literal["train", "test"], ...] = Field(("train", "test"), min_length=1, description="dataset splits to embed")
    batch_size: int = Field(512, ge=1, description="inference batch size inside each teacher actor")
    embedding_dtype: Literal["float32", "float16"] = Field("float32", description="storage dtype of embeddings (logits stay float32)")
    rows_per_part: int = Field(65536, ge=1, description="rows per Arrow part file (one record batch each; bounds writer memory)")
    num_cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved by each teacher actor")
    num_gpus_per_actor: float = Field(0.0, ge=0, description="GPU fraction of each teacher actor (0 = CPU)")
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
    selection: str | None = Field(None, description="path of a selection (`ensemble-kd select`, DFND): train only on its rows, with its pseudo-labels as labels")
    eval_data: DataConfig | None = Field(None, description="evaluate the student's test top-1 on this dataset's test split instead of data's (DFND: the teacher's test set)")
    adv_replay_teacher: str | None = Field(None, description="teacher whose stored PGD deltas the student replays on adversarial rows; None = the one distill teacher of the student's modality")

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
    trial_cpus: float = Field(1.0, ge=0, description="CPUs of each trial's driver (it starts the trial's TorchTrainer)")
    max_concurrent_trials: int | None = Field(None, ge=1, description="trials at once (None = as the cluster's CPUs allow)")
    name: str | None = Field(None, description="Tune run name (folder under <output_dir>/tune); None = <experiment>-<time>")


@dataclass(config=_FROZEN)
class ArmConfig:
    name: str = Field(..., pattern=r"^[A-Za-z0-9_\-+]+$", description="arm name (MLflow tag `arm`, summary key)")
    teachers: Literal["none", "best", "all"] | tuple[str, ...] = Field(
        "all", description="none, best (the single teacher with the best test top-1), all (the ensemble), or a list of names")
    losses: tuple[LossTerm, ...] | None = Field(None, description="loss terms of this arm; None = distill.losses")


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


@dataclass(config=_FROZEN)
class ExperimentConfig:
    name: str = Field("uci-mfeat-default", description="experiment name (MLflow experiment, output sub-folders)")
    output_dir: str = Field("outputs", description="root of checkpoints, shards and results (relative: to the working directory)")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="device for teachers and students; auto = cuda if present")
    amp: bool = Field(True, description="mixed precision on CUDA (ignored on CPU)")
    data: DataConfig = Field(default_factory=DataConfig, description="dataset")
    teachers: tuple[TeacherConfig, ...] = Field((), description="teachers to train (or load) and embed")
    embed: EmbedConfig = Field(default_factory=EmbedConfig, description="embed stage (Ray actors -> Arrow shards)")
    select: SelectConfig = Field(default_factory=SelectConfig, description="DFND: confident rows of an unlabeled pool (`ensemble-kd select`)")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray cluster")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="student distillation (Ray Train)")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking")
    tune: TuneConfig = Field(default_factory=TuneConfig, description="Ray Tune sweep (`ensemble-kd tune`) and trial resources")
    run: RunJobConfig = Field(default_factory=RunJobConfig, description="the arms, seeds and sweep of `ensemble-kd run`")

    def __post_init__(self) -> None:
        _absolute(self, "output_dir")
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
    if cfg.distill.adv_replay_teacher is not None and cfg.distill.adv_replay_teacher not in cfg.distill.teachers:
        errs.append(f"distill.adv_replay_teacher: {cfg.distill.adv_replay_teacher!r} is not one of distill.teachers "
                    f"{list(cfg.distill.teachers)}")
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
        else:
            bad = _unknown_kwargs(LOSSES.get(term.name), term.kwargs)
            if bad:
                errs.append(f"distill.losses.{i}.kwargs: loss {term.name!r} has no option(s) {bad}; "
                            f"options: {_options(LOSSES.get(term.name))}")
    errs += _check_select(cfg, names)
    errs += _check_run_section(cfg)
    if errs:
        raise ConfigError(f"invalid config {source}:\n  " + "\n  ".join(errs))


def _check_select(cfg: ExperimentConfig, names: list[str]) -> list[str]:
    """DFND fields: select.* and distill.selection / distill.eval_data."""
    from modalities import DATASETS

    errs = []

    def dataset_mods(field: str, data: DataConfig) -> tuple[str, ...] | None:
        if data.name not in DATASETS:
            errs.append(f"{field}.name: {DATASETS.unknown_message(data.name)}")
            return None
        return tuple(DATASETS.meta(data.name).get("modalities") or ()) or None

    if cfg.select.teacher_data is not None:
        mods = dataset_mods("select.teacher_data", cfg.select.teacher_data)
        chosen = cfg.distill.teachers or tuple(names)  # the teachers that score the pool
        for i, t in enumerate(cfg.teachers):
            if t.name in chosen and mods is not None and t.modality not in mods:
                errs.append(f"select.teacher_data: dataset {cfg.select.teacher_data.name!r} has no modality {t.modality!r} "
                            f"(of teachers.{i}); it has: {', '.join(mods)}")
    if cfg.distill.eval_data is not None:
        mods = dataset_mods("distill.eval_data", cfg.distill.eval_data)
        if mods is not None and cfg.distill.student.modality not in mods:
            errs.append(f"distill.eval_data: dataset {cfg.distill.eval_data.name!r} has no modality "
                        f"{cfg.distill.student.modality!r} (the student's); it has: {', '.join(mods)}")
    if cfg.distill.selection is not None and not cfg.distill.teachers:
        errs.append("distill.selection: training on a selection needs distill.teachers (its rows are rows of their shards)")
    return errs


def _check_run_section(cfg: ExperimentConfig) -> list[str]:
    """Each arm must make a valid config (checked with the first teacher standing in for 'best'),
    and the sweep must name an arm and grid-only keys that exist."""
    errs = []
    arms = {a.name: a for a in cfg.run.arms}
    if len(arms) != len(cfg.run.arms):
        errs.append(f"run.arms: arm names must be unique, got {[a.name for a in cfg.run.arms]}")
    first = cfg.teachers[0].name if cfg.teachers else None
    for i, arm in enumerate(cfg.run.arms):
        try:
            arm_config(cfg, arm, first, cfg.run.seeds[0])
        except ConfigError as e:
            detail = str(e).split("\n", 1)[-1].strip()
            errs.append(f"run.arms.{i} ({arm.name}): {detail}")
    sw = cfg.run.sweep
    if sw is not None:
        if sw.arm not in arms:
            errs.append(f"run.sweep.arm: {sw.arm!r} is not an arm; arms: {list(arms)}")
        for key, spec in sw.space.items():
            if set(spec) != {"grid"} or not isinstance(spec["grid"], list) or not spec["grid"]:
                errs.append(f"run.sweep.space.{key}: must be {{grid: [values]}}, got {spec!r}")
        if sw.arm in arms and not errs:
            base = arm_config(cfg, arms[sw.arm], first, cfg.run.seeds[0])
            try:
                with_overrides(base, {k: v["grid"][0] for k, v in sw.space.items()})
            except ConfigError as e:
                errs.append(f"run.sweep.space: {str(e).splitlines()[-1].strip()}")
    return errs


def _options(builder: Any) -> list[str]:
    import inspect

    params = list(inspect.signature(builder).parameters.values())
    return [p.name for p in params[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]  # [0] is the LossContext


def _unknown_kwargs(builder: Any, kwargs: dict[str, Any]) -> list[str]:
    """Keyword options a loss builder does not take (none when it takes **kwargs)."""
    import inspect

    if any(p.kind == p.VAR_KEYWORD for p in inspect.signature(builder).parameters.values()):
        return []
    return sorted(set(kwargs) - set(_options(builder)))


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
            j = _list_index(cur, p)
            if j is None:
                names = [x.get("name") for x in cur if isinstance(x, dict) and "name" in x]
                raise ConfigError(f"override {key!r}: {'.'.join(parts[:i]) or 'top level'} has no item {p!r}"
                                  + (f"; items by name: {names}" if names else f"; it has {len(cur)} items"))
            if last:
                cur[j] = value
            else:
                cur = cur[j]
        elif isinstance(cur, dict):
            if last:
                cur[p] = value
            else:
                cur = cur.setdefault(p, {})
        else:
            raise ConfigError(f"override {key!r}: {'.'.join(parts[:i])} is a value, not a section")


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
    d = to_dict(cfg)
    for key, value in overrides.items():
        _set_dotted(d, key, value)
    return from_dict(d, source)


def arm_config(cfg: ExperimentConfig, arm: ArmConfig, best_teacher: str | None, seed: int) -> ExperimentConfig:
    """The config of one arm of `ensemble-kd run` at one seed: its teachers and losses, the seed, no arms of its own."""
    if arm.teachers == "none":
        teachers: list[str] = []
    elif arm.teachers == "all":
        teachers = [t.name for t in cfg.teachers]
    elif arm.teachers == "best":
        if best_teacher is None:
            raise ConfigError(f"arm {arm.name!r}: teachers 'best' needs at least one teacher")
        teachers = [best_teacher]
    else:
        teachers = list(arm.teachers)
    d = to_dict(cfg)
    d["distill"]["teachers"] = teachers
    if arm.losses is not None:
        d["distill"]["losses"] = [to_dict(t) for t in arm.losses]
    d["distill"]["seed"] = seed
    d["run"] = {"arms": [], "seeds": [seed], "sweep": None}
    return from_dict(d, f"<arm {arm.name}>")


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
