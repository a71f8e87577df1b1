"""Cross-checks of a config against the registries: names that must be registered, modalities a
dataset must have, loss options a loss must take, teachers a run must configure.

The schema (:mod:`ensemble_kd.core.config`) checks types and ranges; these checks need the registries
(datasets, encoders, losses), so they live here, one layer above, and run wherever a config enters
the system (the CLI verbs, the pipeline, a sweep's probe), before any work. Every error names the
field and the file.
"""
from __future__ import annotations

import functools
import inspect
import math
import re
import typing
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import ConfigDict, ValidationError, create_model

from ensemble_kd.blocks.bank import TeacherBank
from ensemble_kd.blocks.memory import faiss_gpu_problem
from ensemble_kd.core.config import ConfigError, DataConfig, ExperimentConfig
from ensemble_kd.core.raycluster import joins_cluster
from ensemble_kd.losses import LOSSES
from ensemble_kd.losses.base import LossContext, NeedsStoredEmbeddings, loss_options
from modalities import DATASETS, ENCODERS
from modalities.datasets.base import dataset_modalities as _dataset_modalities


def check_config(cfg: ExperimentConfig, source: str = "<config>") -> ExperimentConfig:
    """Raise one :class:`ConfigError` listing every registry-level problem of ``cfg``; return it."""
    errs = _check_models(cfg) + _check_losses(cfg) + _check_select(cfg)
    if errs:
        raise ConfigError(f"invalid config {source}:\n  " + "\n  ".join(errs))
    return cfg


def dataset_modalities(data: DataConfig | str) -> tuple[str, ...] | None:
    """The modalities a dataset config (``data``, ``distill.eval_data``, ``select.teacher_data``;
    or a bare registered name) serves, found cheaply for every dataset (a table's schema,
    synthetic's options, paired-folder's sub-folders, a shipped dataset's metadata; never its
    rows: :func:`modalities.datasets.base.dataset_modalities`). None when it cannot say (an
    unknown dataset, or a source that cannot be read now: building it reports that)."""
    if isinstance(data, str):
        return _dataset_modalities(data)
    return _dataset_modalities(data.name, data.root, data.kwargs)


def _check_models(cfg: ExperimentConfig) -> list[str]:
    """Dataset, teachers' and student's archs and modalities, distill.teachers names."""
    errs = []
    if cfg.data.name not in DATASETS:
        errs.append(f"data.name: {DATASETS.unknown_message(cfg.data.name)}")
    mods = dataset_modalities(cfg.data)
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
            else:
                found = loss_option_errors(term.name, term.kwargs, cfg.distill.teachers)
                if not found and term.kwargs.get("use_gpu_faiss"):
                    found = _gpu_faiss_errors(i, cfg)
                if not found and path == "online" and cfg.distill.teachers:
                    found = _online_probe_errors(i, term.name, term.kwargs, cfg.distill.teachers)
                errs += found
    return errs


def _gpu_faiss_errors(i: int, cfg: ExperimentConfig) -> list[str]:
    """``use_gpu_faiss`` asks for FAISS on the GPU: refused before any work where the run's workers
    hold no GPU (they see none), or, for a run on this machine's own Ray (its workers share this
    faiss), where this faiss is a CPU build (it would silently search on the CPU). On a cluster the
    driver's faiss says nothing of the GPU nodes': each worker checks its own where the index is
    built (``memory.check_faiss_gpu``, one line)."""
    field = f"distill.losses.{i}.kwargs.use_gpu_faiss"
    if not cfg.distill.use_gpu:
        return [f"{field}: FAISS on the GPU needs a GPU in the run's workers; set distill.use_gpu: true, or set it false"]
    problem = None if joins_cluster(cfg.ray) else faiss_gpu_problem(here=False)
    return [f"{field}: {problem}"] if problem else []


def _online_probe_errors(i: int, name: str, options: Mapping[str, Any], teachers: tuple[str, ...]) -> list[str]:
    """The online path keeps no table of the teachers' embeddings over the train rows (its bank
    holds labels only): a loss whose options need one (CRD/GACD modes exact and relax, hard
    negatives) is refused here, naming it, rather than in a Ray worker. The constructor is probed
    on a bank like the online path's."""
    try:
        LOSSES.get(name)(_probe_context(tuple(teachers), embeddings=False), **options)
    except NeedsStoredEmbeddings as e:
        return [f"distill.losses.{i}: loss {name!r} with options {dict(options)} needs the teachers' stored "
                f"embeddings of every train row, which only the shard data path keeps; distill.teacher_outputs is "
                f"'online' (for CRD/GACD there, set mode: reference: the teacher side from a teacher memory) ({e})"]
    except Exception:  # noqa: BLE001 - other probe errors are about the synthetic context: the real run decides
        pass
    return []


def loss_option_errors(name: str, options: Mapping[str, Any], teachers: tuple[str, ...] | list[str] = ("t",)) -> list[str]:
    """Problems of the values of registered loss ``name``'s ``options``, each naming the field
    (``distill.losses.crd.kwargs.tau: ...``), found at load time rather than in a Ray worker:

    1. types and ranges from the constructor's keyword annotations (``tau: PositiveFloat``,
       ``reduction: Reduction``), validated by pydantic against ``inspect.signature``;
    2. finiteness of every float, annotated or not (nan/inf anywhere in the value);
    3. the constructor's own checks, for options not (yet) annotated: the class is built on a
       tiny synthetic :class:`LossContext` (8-dim features, 16 bank rows: microseconds, no data,
       no files) with the numeric options given, and an error whose message names one of them
       is reported. Other errors of that probe (about the synthetic context, or options that
       need real inputs) are left to the real run, so the probe never refuses a valid config.
    """
    field = f"distill.losses.{name}.kwargs"
    errs = [f"{field}.{k}: must be a finite number (got {v!r})" for k, v in options.items() if not _finite(v)]
    if errs:
        return errs
    try:
        _options_model(name).model_validate(dict(options))
    except ValidationError as e:
        return [f"{field}.{'.'.join(str(p) for p in x['loc'])}: {x['msg']} (got {x.get('input')!r})" for x in e.errors()]
    numeric = {k: v for k, v in options.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not numeric or "feature_maps" in LOSSES.meta(name).get("needs", ()):
        return []  # a feature-map loss's constructor needs the real stage shapes (a dry forward in the loop)
    try:
        LOSSES.get(name)(_probe_context(tuple(teachers) or ("t",)), **numeric)
    except Exception as e:  # noqa: BLE001 - any constructor error that names a given option is the option's
        named = [k for k in numeric if re.search(rf"\b{re.escape(k)}\b", str(e))]
        if named:
            return [f"{field}.{named[0]}: {e}"]
    return []


def _finite(v: Any) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, Mapping):
        return all(_finite(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return all(_finite(x) for x in v)
    return True


@functools.lru_cache(maxsize=None)
def _options_model(name: str) -> Any:
    """A pydantic model of loss ``name``'s keyword options: each annotated type (with its
    ``Field``/annotated-types constraints) and default; an annotation that does not resolve is Any."""
    cls = LOSSES.get(name)
    try:
        hints = typing.get_type_hints(cls.__init__, include_extras=True)
    except Exception:  # noqa: BLE001 - a forward reference that does not resolve: check the values only
        hints = {}
    params = list(inspect.signature(cls).parameters.values())[1:]  # [0] is ctx
    fields = {p.name: (hints.get(p.name, Any), p.default) for p in params}
    return create_model(f"{name}_options", __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True,
                                                                allow_inf_nan=False), **fields)


def _probe_context(teachers: tuple[str, ...], dim: int = 8, classes: int = 4, rows: int = 16,
                   embeddings: bool = True) -> LossContext:
    """A tiny synthetic context for running a loss constructor's own option checks (``embeddings``
    False: a bank like the online path's, without the teachers' embeddings)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(rows) % classes  # (M,) every class present
    bank = TeacherBank(embeddings={t: torch.randn(rows, dim, generator=g) for t in teachers} if embeddings else {},
                       logits={t: torch.randn(rows, classes, generator=g) for t in teachers},
                       labels=labels, sample_ids=torch.arange(rows))
    return LossContext(student_dim=dim, num_classes=classes, teacher_dims={t: dim for t in teachers}, bank=bank)


def _check_select(cfg: ExperimentConfig) -> list[str]:
    """DFND fields: select.* and distill.selection / distill.eval_data."""
    errs = []

    def mods_of(field: str, data: DataConfig) -> tuple[str, ...] | None:
        if data.name not in DATASETS:
            errs.append(f"{field}.name: {DATASETS.unknown_message(data.name)}")
        return dataset_modalities(data)

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
