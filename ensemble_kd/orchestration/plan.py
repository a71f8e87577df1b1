"""What `ensemble-kd run` and the sweeps will run, as typed values: arms expanded per seed, and
one :class:`Trial` per distillation.

An :class:`~ensemble_kd.core.config.ArmConfig` says which teachers (none, the best single one, all, a
list), which loss terms, which labels (all, or a subset: ``labels: {count: 50}``) and any other
overrides (``set``); :func:`arm_config` turns it into the config of one distillation at one
seed, through the config's one override mechanism. :func:`plan_trials` lists the trials of a run
(every arm x seed, then the sweep's grid points); each Trial carries its own config and the
:class:`~ensemble_kd.training.tracking.RunContext` its MLflow run is tagged from.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from ensemble_kd.storage.artifacts import TeacherSet
from ensemble_kd.orchestration.checks import check_config
from ensemble_kd.core.config import ArmConfig, ConfigError, ExperimentConfig, from_dict, to_dict, with_overrides
from ensemble_kd.training.tracking import RunContext, method_name


def arm_teachers(cfg: ExperimentConfig, arm: ArmConfig, best_teacher: str | None) -> list[str]:
    """The teacher names of an arm: none, the best single teacher, all, or its own list."""
    if arm.teachers == "none":
        return []
    if arm.teachers == "all":
        return [t.name for t in cfg.teachers]
    if arm.teachers == "best":
        if best_teacher is None:
            raise ConfigError(f"arm {arm.name!r}: teachers 'best' needs at least one teacher")
        return [best_teacher]
    return list(arm.teachers)


def arm_config(cfg: ExperimentConfig, arm: ArmConfig, best_teacher: str | None, seed: int) -> ExperimentConfig:
    """The config of one arm at one seed: its teachers, losses and labels, the seed, its own ``set``
    overrides (applied last), no arms of its own."""
    over: dict[str, Any] = {"distill.teachers": arm_teachers(cfg, arm, best_teacher), "distill.seed": seed,
                            "run": {"arms": [], "seeds": [seed], "sweep": None}}
    if arm.losses is not None:
        over["distill.losses"] = [to_dict(t) for t in arm.losses]
    if arm.labels is not None:
        over["distill.labels"] = to_dict(arm.labels)
    over.update(arm.set)
    return check_config(with_overrides(cfg, over, f"<arm {arm.name}>"), f"<arm {arm.name}>")


def effective_arms(cfg: ExperimentConfig) -> tuple[ArmConfig, ...]:
    """``run.arms``, or without any, the one ``distill`` run as an arm named 'distill'."""
    if cfg.run.arms:
        return cfg.run.arms
    return (ArmConfig(name="distill", teachers=tuple(cfg.distill.teachers), losses=cfg.distill.losses),)


@dataclass(frozen=True)
class Trial:
    """One distillation of a run or sweep: its config (as a plain dict, what travels to Ray), the
    dotted overrides a sweep applies on top, and what it is part of."""

    label: str  # for people: "crd+kd-single/seed0", "sweep crd+kd-single tau=0.2"
    base: dict[str, Any]  # the trial's config before ``overrides`` (to_dict of an ExperimentConfig)
    context: RunContext
    overrides: dict[str, Any] = field(default_factory=dict)

    def config(self) -> ExperimentConfig:
        return with_overrides(from_dict(self.base, "<trial base>"), self.overrides, f"<trial {self.label}>")

    @property
    def seed(self) -> int:
        return int(self.base["distill"]["seed"])

    @property
    def epochs(self) -> int:
        return int(self.base["distill"]["epochs"])

    def to_dict(self) -> dict[str, Any]:
        """The plain form that travels inside Ray Tune's param space."""
        return {"label": self.label, "base": self.base, "overrides": dict(self.overrides), "context": self.context.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trial:
        return cls(d["label"], d["base"], RunContext.from_dict(d["context"]), dict(d.get("overrides") or {}))


def plan_trials(cfg: ExperimentConfig, best: str | None) -> list[Trial]:
    """One trial per (arm, seed), then one per sweep grid point."""
    trials = []
    arms = {a.name: a for a in cfg.run.arms}
    for arm in cfg.run.arms:
        for seed in cfg.run.seeds:
            trials.append(Trial(f"{arm.name}/seed{seed}", to_dict(arm_config(cfg, arm, best, seed)),
                                RunContext(arm=arm.name, kind="arm")))
    sw = cfg.run.sweep
    if sw is not None:
        seed = cfg.run.seeds[0] if sw.seed is None else sw.seed
        c = arm_config(cfg, arms[sw.arm], best, seed)
        keys = list(sw.space)
        for values in itertools.product(*(sw.space[k]["grid"] for k in keys)):
            over = dict(zip(keys, values))
            short = " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in over.items())
            trials.append(Trial(f"sweep {sw.arm} {short}", to_dict(c),
                                RunContext(arm=f"sweep:{sw.arm}", kind="sweep", overrides=over, method=method_name(c)), over))
    return trials


def best_teacher(teachers: TeacherSet) -> str | None:
    """The single teacher with the best test top-1 (ties: the first configured)."""
    scored = [(t.test_top1, -i, n) for i, (n, t) in enumerate(teachers.items()) if t.test_top1 is not None]
    return max(scored)[2] if scored else None


def check_run_section(cfg: ExperimentConfig, source: str = "<config>") -> None:
    """Each arm must make a valid config (the first teacher standing in for 'best'), and the sweep
    must name an arm and grid-only keys that exist."""
    errs = []
    arms = {a.name: a for a in cfg.run.arms}
    if len(arms) != len(cfg.run.arms):
        errs.append(f"run.arms: arm names must be unique, got {[a.name for a in cfg.run.arms]}")
    first = cfg.teachers[0].name if cfg.teachers else None
    for i, arm in enumerate(cfg.run.arms):
        try:
            arm_config(cfg, arm, first, cfg.run.seeds[0])
        except ConfigError as e:
            errs.append(f"run.arms.{i} ({arm.name}): {str(e).split(chr(10), 1)[-1].strip()}")
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
                check_config(with_overrides(base, {k: v["grid"][0] for k, v in sw.space.items()}))
            except ConfigError as e:
                errs.append(f"run.sweep.space: {str(e).splitlines()[-1].strip()}")
    if errs:
        raise ConfigError(f"invalid config {source}:\n  " + "\n  ".join(errs))
