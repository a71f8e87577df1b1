"""The select stage (DFND): from the teachers' shards of an unlabeled pool and of their own
labelled test split, keep the pool rows the teachers are sure of, with their pseudo-labels.

Inputs are artifacts, not a config to re-plan: ``pool`` (each teacher's train-split shard of the
pool, from the embed stage) and ``teacher_test`` (each teacher's shard of its own test split, the
embed stage run on ``select.teacher_data``). The caller (the pipeline) runs the embed stage for
both. Output: a :class:`~ensemble_kd.storage.artifacts.SelectionRecord`, also recorded in
``<output_dir>/index/selection.json``.

The pool's own labels are never used for selecting or labelling; where the pool has them
(label >= 0) the pseudo-label accuracy is reported as a diagnostic only.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ensemble_kd.core import layout
from ensemble_kd.storage.artifacts import SelectionRecord, write_index
from ensemble_kd.core.config import ConfigError, DataConfig, SelectConfig, to_dict
from ensemble_kd.blocks.selection import class_accuracy, load_selection, select_confident, write_selection
from ensemble_kd.core.rows import full
from ensemble_kd.storage.shards import ShardSet


def _diagnostics(ps: ShardSet, sel) -> dict[str, Any]:
    """Pseudo-label accuracy against the pool's own labels, where it has them."""
    pool_labels = ps.labels[sel.rows]  # (K,) diagnostics only: never used to select or label
    has = pool_labels >= 0
    diag = float((sel.pseudo_labels[has] == pool_labels[has]).float().mean()) if bool(has.any()) else None
    pool_has = ps.labels >= 0
    diag_all = float((sel.pool_pseudo_labels[pool_has] == ps.labels[pool_has]).float().mean()) if bool(pool_has.any()) else None
    return {"pseudo_label_accuracy_selected": diag, "pseudo_label_accuracy_pool": diag_all,
            "note": "against the pool's own labels where it has them; never used to select or label"}


def require_teacher_data(scfg: SelectConfig) -> DataConfig:
    """``select.teacher_data``, refused when missing (its test split gives a_i)."""
    if scfg.teacher_data is None:
        raise ConfigError("select.teacher_data: required by `ensemble-kd select` (the teachers' own labelled dataset, "
                          "whose test split gives the per-class accuracy a_i)")
    return scfg.teacher_data


def run(pool: Mapping[str, str | Path], teacher_test: Mapping[str, str | Path], scfg: SelectConfig,
        output_dir: str | Path, log: Callable[[str], None] = print) -> SelectionRecord:
    """Select from ``pool`` (teacher -> pool train shard folder) with the per-class accuracy
    measured on ``teacher_test`` (teacher -> shard folder of the teachers' test split); write
    (or reuse) the selection under ``<output_dir>/selections``."""
    names = list(pool)
    if not names:
        raise ConfigError("select: no teachers: configure `teachers` (e.g. {name, checkpoint: PATH, modality})")
    teacher_data = require_teacher_data(scfg)
    ps = ShardSet.open([pool[n] for n in names])
    ts = ShardSet.open([teacher_test[n] for n in names])
    C = ps.first.num_classes
    if ts.first.num_classes != C:
        raise ConfigError(f"select.teacher_data: {teacher_data.name!r} has {ts.first.num_classes} classes, the teachers' logits {C}")

    sel = select_confident([full(ps.logits(n)) for n in names], scfg.fraction, scfg.per_class)
    acc, top1 = class_accuracy([full(ts.logits(n)) for n in names], ts.labels, C)
    per_teacher = {n: class_accuracy([full(ts.logits(n))], ts.labels, C)[1] for n in names}
    key = {"pool_shards": {n: ps.shards[n].manifest["shard_id"] for n in names},
           "teacher_test_shards": {n: ts.shards[n].manifest["shard_id"] for n in names},
           "teachers": names, "fraction": float(scfg.fraction), "per_class": bool(scfg.per_class), "num_classes": C}
    pm = ps.first.manifest
    manifest = {
        "teachers": names, "fraction": float(scfg.fraction), "per_class": bool(scfg.per_class), "num_classes": C,
        "num_rows": int(sel.rows.numel()), "pool_rows": len(ps),
        "counts_per_class": torch.bincount(sel.pseudo_labels, minlength=C).tolist(),
        "pool_counts_per_class": torch.bincount(sel.pool_pseudo_labels, minlength=C).tolist(),
        "class_accuracy": acc, "teacher_test_top1": {**per_teacher, "ensemble": top1},
        "teacher_data": to_dict(teacher_data),
        "dataset": dict(pm["dataset"]), "views": pm["views"],
        "source_shards": {n: {"shard_id": ps.shards[n].manifest["shard_id"], "dir": ps.shards[n].dir.name} for n in names},
        "teacher_test_shards": {n: {"shard_id": ts.shards[n].manifest["shard_id"], "dir": ts.shards[n].dir.name} for n in names},
        "diagnostics": _diagnostics(ps, sel),
    }
    path, reused = write_selection(layout.selections(output_dir), key, ps.sample_ids[sel.rows].numpy(), sel, manifest)
    m = load_selection(path).manifest
    log(f"selection {path}: {'reused' if reused else 'wrote'} {m['num_rows']} of {m['pool_rows']} rows "
        f"({'per class' if scfg.per_class else 'global'}, fraction {scfg.fraction}) scored by {names}")
    rec = SelectionRecord(str(path), m["selection_id"], m["num_rows"], m["pool_rows"], reused, m)
    write_index(output_dir, "selection", rec.to_dict())
    return rec
