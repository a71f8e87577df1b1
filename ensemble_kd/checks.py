"""Cross-checks of a config against the registries: names that must be registered, modalities a
dataset must have, loss options a loss must take, teachers a run must configure.

The schema (:mod:`ensemble_kd.config`) checks types and ranges; these checks need the registries
(datasets, encoders, losses), so they live here, one layer above, and run wherever a config enters
the system (the CLI verbs, the pipeline, a sweep's probe), before any work. Every error names the
field and the file.
"""
from __future__ import annotations

from ensemble_kd.config import ConfigError, DataConfig, ExperimentConfig
from ensemble_kd.losses import LOSSES
from ensemble_kd.losses.base import loss_options
from modalities import DATASETS, ENCODERS


def check_config(cfg: ExperimentConfig, source: str = "<config>") -> ExperimentConfig:
    """Raise one :class:`ConfigError` listing every registry-level problem of ``cfg``; return it."""
    errs = _check_models(cfg) + _check_losses(cfg) + _check_select(cfg)
    if errs:
        raise ConfigError(f"invalid config {source}:\n  " + "\n  ".join(errs))
    return cfg


def dataset_modalities(name: str) -> tuple[str, ...] | None:
    """The modalities a registered dataset declares (None when it does not say, or is unknown)."""
    if name not in DATASETS:
        return None
    return tuple(DATASETS.meta(name).get("modalities") or ()) or None


def _check_models(cfg: ExperimentConfig) -> list[str]:
    """Dataset, teachers' and student's archs and modalities, distill.teachers names."""
    errs = []
    if cfg.data.name not in DATASETS:
        errs.append(f"data.name: {DATASETS.unknown_message(cfg.data.name)}")
    mods = dataset_modalities(cfg.data.name)
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
    return errs


def _check_losses(cfg: ExperimentConfig) -> list[str]:
    """Each loss registered, once, with options it takes, teachers when it needs them, and a data
    path that provides what it reads."""
    errs = []
    path = cfg.distill.teacher_outputs
    loss_names = [t.name for t in cfg.distill.losses]
    if len(set(loss_names)) != len(loss_names):
        errs.append(f"distill.losses: each loss may appear once (they are keyed by name), got {loss_names}")
    for i, term in enumerate(cfg.distill.losses):
        if term.name not in LOSSES:
            errs.append(f"distill.losses.{i}.name: {LOSSES.unknown_message(term.name)}")
        elif LOSSES.meta(term.name).get("needs_teachers", True) and not cfg.distill.teachers:
            errs.append(f"distill.losses.{i}.name: loss {term.name!r} needs teachers, but distill.teachers is empty")
        elif "feature_maps" in LOSSES.meta(term.name).get("needs", ()) and path != "online":
            errs.append(f"distill.losses.{i}.name: loss {term.name!r} reads feature maps, which only the online data path "
                        f"provides; distill.teacher_outputs is {path!r} (set it to 'online')")
        else:
            bad = sorted(set(term.kwargs) - set(loss_options(term.name)))
            if bad:
                errs.append(f"distill.losses.{i}.kwargs: loss {term.name!r} has no option(s) {bad}; "
                            f"options: {list(loss_options(term.name))}")
    return errs


def _check_select(cfg: ExperimentConfig) -> list[str]:
    """DFND fields: select.* and distill.selection / distill.eval_data."""
    errs = []

    def mods_of(field: str, data: DataConfig) -> tuple[str, ...] | None:
        if data.name not in DATASETS:
            errs.append(f"{field}.name: {DATASETS.unknown_message(data.name)}")
        return dataset_modalities(data.name)

    if cfg.select.teacher_data is not None:
        mods = mods_of("select.teacher_data", cfg.select.teacher_data)
        chosen = cfg.distill.teachers or tuple(t.name for t in cfg.teachers)  # the teachers that score the pool
        for i, t in enumerate(cfg.teachers):
            if t.name in chosen and mods is not None and t.modality not in mods:
                errs.append(f"select.teacher_data: dataset {cfg.select.teacher_data.name!r} has no modality {t.modality!r} "
                            f"(of teachers.{i}); it has: {', '.join(mods)}")
    if cfg.distill.eval_data is not None:
        mods = mods_of("distill.eval_data", cfg.distill.eval_data)
        if mods is not None and cfg.distill.student.modality not in mods:
            errs.append(f"distill.eval_data: dataset {cfg.distill.eval_data.name!r} has no modality "
                        f"{cfg.distill.student.modality!r} (the student's); it has: {', '.join(mods)}")
    if cfg.distill.selection is not None and not cfg.distill.teachers:
        errs.append("distill.selection: training on a selection needs distill.teachers (its rows are rows of their shards)")
    if cfg.distill.selection is not None and cfg.distill.labels.subset:  # every selected row carries a pseudo-label
        errs.append("distill.labels: a label subset does not apply to a DFND selection (distill.selection), whose rows "
                    "are labelled by the teachers' pseudo-labels; unset one of them")
    if cfg.distill.selection is not None and cfg.distill.teacher_outputs != "shards":
        errs.append("distill.selection: a selection is rows of the teachers' shards: it needs distill.teacher_outputs: shards")
    return errs
