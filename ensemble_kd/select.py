"""DFND data selection: the confident rows of an unlabeled pool, labelled by the teachers.

Chen, Guo, Xu, Li, Xu, Xu, Wang, "Learning Student Networks in the Wild", CVPR 2021 (DFND). When
the teachers' training data is unavailable, a large unlabeled pool (``data``) is scored by the
teachers, the rows with the least label noise are kept and the teachers' argmax becomes their
label; the student then learns through a noisy adaptation matrix (``losses/dfnd.py``).

Pipeline of ``ensemble-kd select`` (:func:`run_select`):

1. the embed stage (:func:`ensemble_kd.embed.run_embed`, the SAME Ray actors) writes the pool's
   train-split teacher shards, exactly the shards ``ensemble-kd distill`` later trains on, and
   the teachers' shards of their own labelled test split (``select.teacher_data``);
2. :func:`select_confident` ranks the pool rows by the confidence of the ensemble-averaged
   probabilities (max prob; ranking by it is ranking by the teacher's cross-entropy with its own
   argmax, the paper's noise measure) and keeps the top ``fraction``, per pseudo-class by
   default (``per_class``): a global ranking over-represents the classes the teacher finds easy
   (on a shifted pool a few classes can take most of the top ranks), and the student then learns
   a skewed prior; the paper collects a balanced set for the same reason;
3. the per-class teacher accuracy a_i (recall of class i of the ensemble's argmax on the
   teachers' test split) initialises the diagonal of the adaptation matrix Q;
4. the selection is written as a content-addressed artifact::

       <output_dir>/selections/<id>/selection.arrow   sample_id, row, pseudo_label, confidence
       <output_dir>/selections/<id>/manifest.json     key, file size + sha256, source shard ids,
                                                      fraction, teachers, a_i, counts per class

   ``id`` = sha256 of the key (source shard ids, teacher test shard ids, fraction, per_class,
   teachers), so the same inputs reuse it; it is written into a temp directory and renamed.
   ``row`` is the row of the pool's train shards (the same in every teacher's shard: they are
   row-aligned); ``distill.selection`` points at the directory.

The pool's own labels are never used for selecting or labelling; where the pool has them
(label >= 0) the pseudo-label accuracy is reported as a diagnostic only.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from ensemble_kd import __version__
from ensemble_kd.checkpoint import atomic_write, file_sha256, publish_dir, read_json_manifest
from ensemble_kd.config import ConfigError, ExperimentConfig, from_dict, to_dict
from ensemble_kd.losses.base import TeacherBank
from ensemble_kd.shards import ShardError, ShardSet

FORMAT = "ensemble-kd/selection"
VERSION = 1
MANIFEST = "manifest.json"
TABLE = "selection.arrow"
SCHEMA = pa.schema([
    pa.field("sample_id", pa.int64(), nullable=False),
    pa.field("row", pa.int64(), nullable=False),
    pa.field("pseudo_label", pa.int64(), nullable=False),
    pa.field("confidence", pa.float32(), nullable=False),
])


class SelectionError(ShardError):
    """A selection that is missing, corrupt or does not match the shards; the message names its path."""


# ----------------------------------------------------------------------------------------------
# pure functions
# ----------------------------------------------------------------------------------------------
@dataclass
class Selected:
    rows: torch.Tensor  # (K,) int64 selected rows, ascending
    pseudo_labels: torch.Tensor  # (K,) int64 argmax of the ensemble-averaged probabilities
    confidences: torch.Tensor  # (K,) float32 max of the ensemble-averaged probabilities
    pool_pseudo_labels: torch.Tensor  # (M,) int64 pseudo-label of every pool row (for the counts)


def keep_count(n: int, fraction: float) -> int:
    """ceil(fraction * n), robust to float error (0.3 * 10 is 3.0000000000000004): a class with
    rows keeps at least one."""
    return min(n, int(math.ceil(round(fraction * n, 9))))


def ensemble_probs(logits: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """K tensors (M, C) of logits -> (M, C) weighted mean of the softmax probabilities (uniform by default)."""
    if not logits:
        raise ValueError("select: needs the logits of at least one teacher")
    K = len(logits)
    w = [1.0 / K] * K if weights is None else [float(x) for x in weights]
    if len(w) != K:
        raise ValueError(f"select: {len(w)} weights for {K} teachers")
    shape = tuple(logits[0].shape)
    if any(tuple(t.shape) != shape for t in logits) or len(shape) != 2:
        raise ValueError(f"select: every teacher's logits must be (M, C) of one shape, got {[tuple(t.shape) for t in logits]}")
    return sum(wk * F.softmax(t.float(), dim=1) for wk, t in zip(w, logits))  # (M, C)


def select_confident(logits: Sequence[torch.Tensor] | Mapping[str, torch.Tensor], fraction: float, per_class: bool = True,
                     weights: Sequence[float] | None = None) -> Selected:
    """DFND's confident selection over a pool of M rows.

    logits: K tensors (M, C) (or name -> tensor), one per teacher; fraction in (0, 1].
    p = weighted mean of softmax(logits_k) (M, C); confidence = max_c p, pseudo-label = argmax_c p.
    ``per_class``: within each pseudo-class c (n_c rows) keep the ceil(fraction * n_c) most
    confident rows; else the ceil(fraction * M) most confident overall. Ties keep the lower row.
    Returns the kept rows in ascending order with their pseudo-labels and confidences.
    """
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"select: fraction must be in (0, 1], got {fraction}")
    ls = list(logits.values()) if isinstance(logits, Mapping) else list(logits)
    p = ensemble_probs(ls, weights)  # (M, C)
    conf, pseudo = p.max(dim=1)  # (M,), (M,)
    order = torch.sort(conf, descending=True, stable=True).indices  # (M,) most confident first, ties by row
    if per_class:
        keep = []
        ranked_labels = pseudo[order]  # (M,)
        for c in range(p.shape[1]):
            rows_c = order[ranked_labels == c]  # (n_c,) class c, most confident first
            keep.append(rows_c[: keep_count(int(rows_c.numel()), fraction)])
        rows = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.int64)
    else:
        rows = order[: keep_count(int(conf.numel()), fraction)]
    rows = torch.sort(rows).values  # (K,) shard order
    return Selected(rows.long(), pseudo[rows].long(), conf[rows].float(), pseudo.long())


def class_accuracy(logits: Sequence[torch.Tensor], labels: torch.Tensor, num_classes: int,
                   weights: Sequence[float] | None = None) -> tuple[list[float], float]:
    """Per-class accuracy a_i = P(argmax p = i | y = i) of the ensemble on a labelled set, and its top-1.

    logits: K tensors (N, C); labels (N,). A class without samples gets the overall top-1.
    """
    pred = ensemble_probs(list(logits), weights).argmax(1)  # (N,)
    labels = labels.long()
    correct = pred == labels  # (N,)
    top1 = float(correct.float().mean()) if labels.numel() else 0.0
    acc = []
    for c in range(num_classes):
        m = labels == c
        acc.append(float(correct[m].float().mean()) if bool(m.any()) else top1)
    return acc, top1


def selection_id(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# the artifact
# ----------------------------------------------------------------------------------------------
@dataclass
class Selection:
    """A verified selection read back from disk."""

    dir: Path
    manifest: dict[str, Any]
    sample_ids: torch.Tensor  # (K,) int64
    rows: torch.Tensor  # (K,) int64 rows of the pool's train shards, ascending
    pseudo_labels: torch.Tensor  # (K,) int64
    confidences: torch.Tensor  # (K,) float32

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    @property
    def class_accuracy(self) -> list[float]:
        return list(self.manifest["class_accuracy"])


def write_selection(root: str | Path, key: dict[str, Any], sample_ids: np.ndarray, sel: Selected,
                    manifest: dict[str, Any]) -> tuple[Path, bool]:
    """Write ``root/<id>/`` atomically (temp dir, then rename); an existing one is verified and reused.

    Returns (directory, reused)."""
    sid = selection_id(key)
    root = Path(root)
    final = root / sid
    if final.exists():
        load_selection(final)  # refuses a corrupt one instead of silently reusing it
        return final, True
    tmp = root / f".{sid}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        table = pa.table({
            "sample_id": pa.array(np.asarray(sample_ids, dtype=np.int64)),
            "row": pa.array(sel.rows.numpy().astype(np.int64)),
            "pseudo_label": pa.array(sel.pseudo_labels.numpy().astype(np.int64)),
            "confidence": pa.array(sel.confidences.numpy().astype(np.float32)),
        }, schema=SCHEMA)

        def write_table(f) -> None:
            with pa.ipc.new_file(f, SCHEMA) as w:
                w.write_table(table)

        atomic_write(tmp / TABLE, write_table)
        full = {"format": FORMAT, "version": VERSION, "selection_id": sid, "key": key,
                "file": {"name": TABLE, "rows": table.num_rows, "bytes": (tmp / TABLE).stat().st_size,
                         "sha256": file_sha256(tmp / TABLE)},
                **manifest, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "ensemble_kd_version": __version__}
        atomic_write(tmp / MANIFEST, lambda f: f.write(json.dumps(full, indent=2).encode()))
        publish_dir(tmp, final, MANIFEST)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, False


def load_selection(path: str | Path) -> Selection:
    """Read and verify a selection directory (manifest, file size and sha256, schema, key hash, values)."""
    d = Path(path)
    mpath = d / MANIFEST
    m = read_json_manifest(d, MANIFEST, FORMAT, VERSION, SelectionError, "selection",
                           hint=" (make one with `ensemble-kd select`)")
    missing = [k for k in ("selection_id", "key", "file", "num_classes", "class_accuracy", "dataset", "source_shards")
               if k not in m]
    if missing:
        raise SelectionError(f"{mpath}: manifest lacks fields {missing}")
    if selection_id(m["key"]) != m["selection_id"]:
        raise SelectionError(f"{mpath}: its key hashes to {selection_id(m['key'])}, the manifest says {m['selection_id']} (edited?)")
    fpath = d / m["file"]["name"]
    if not fpath.is_file():
        raise SelectionError(f"selection file missing: {fpath}")
    if fpath.stat().st_size != m["file"]["bytes"] or file_sha256(fpath) != m["file"]["sha256"]:
        raise SelectionError(f"selection file {fpath} differs from its manifest (size or sha256): corrupt or overwritten")
    try:
        table = pa.ipc.open_file(pa.memory_map(str(fpath), "r")).read_all()
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise SelectionError(f"selection file {fpath} is unreadable: {e}") from None
    if not table.schema.equals(SCHEMA) or table.num_rows != m["file"]["rows"]:
        raise SelectionError(f"selection file {fpath}: schema or row count differs from the manifest's")
    cols = {n: torch.from_numpy(table.column(n).to_numpy().copy()) for n in SCHEMA.names}
    C, acc = int(m["num_classes"]), m["class_accuracy"]
    if len(acc) != C or any(not 0.0 <= float(a) <= 1.0 for a in acc):
        raise SelectionError(f"{mpath}: class_accuracy must be {C} values in [0, 1], got {acc}")
    if table.num_rows and (int(cols["pseudo_label"].min()) < 0 or int(cols["pseudo_label"].max()) >= C):
        raise SelectionError(f"selection file {fpath}: pseudo-labels outside [0, {C})")
    if table.num_rows and (int(cols["row"].min()) < 0 or bool((cols["row"][1:] <= cols["row"][:-1]).any())):
        raise SelectionError(f"selection file {fpath}: rows must be distinct, ascending and >= 0")
    return Selection(d, m, cols["sample_id"], cols["row"], cols["pseudo_label"], cols["confidence"])


def check_selection(sel: Selection, shard_manifests: Mapping[str, Mapping[str, Any]],
                    sample_ids: torch.Tensor | None = None) -> None:
    """Refuse a selection made on other shards than the train shards in use (both sides named).

    shard_manifests: teacher -> manifest of its train shard; sample_ids (R,): their row sample ids."""
    m = sel.manifest
    errs = []
    for name, sm in shard_manifests.items():
        if sm["dataset"]["fingerprint"] != m["dataset"]["fingerprint"]:
            errs.append(f"dataset: the selection was made on {m['dataset']['name']}/{m['dataset']['split']} "
                        f"({m['dataset']['fingerprint'][:16]}), shard of {name!r} holds {sm['dataset']['name']}/"
                        f"{sm['dataset']['split']} ({sm['dataset']['fingerprint'][:16]})")
        if sm["views"] != m.get("views"):
            errs.append(f"views: the selection's view recipe {m.get('views')} differs from {name!r}'s shard {sm['views']}")
        if sm["num_rows"] != m.get("pool_rows"):
            errs.append(f"rows: the selection was made on {m.get('pool_rows')} rows, {name!r}'s shard has {sm['num_rows']}")
        src = m["source_shards"].get(name)
        if src is not None and src["shard_id"] != sm["shard_id"]:
            errs.append(f"teacher {name!r}: the selection was scored on shard {src['shard_id']}, this run's shard is "
                        f"{sm['shard_id']} (another checkpoint or recipe)")
    if not errs and sample_ids is not None and len(sel):
        if int(sel.rows.max()) >= len(sample_ids) or not torch.equal(sample_ids[sel.rows], sel.sample_ids):
            errs.append("sample_id: the selection's (row, sample_id) pairs do not match the shards'")
    if errs:
        raise SelectionError(f"selection {sel.dir} does not match the train shards:\n  " + "\n  ".join(dict.fromkeys(errs)))


@dataclass
class SelectedBank(TeacherBank):
    """A :class:`TeacherBank` restricted to a selection's rows (row r = the r-th selected shard row),
    with the pseudo-labels as ``labels``; ``selection`` is the selection's manifest (its a_i), read
    by the ``dfnd`` loss builder so the loss never reads files."""

    selection: dict[str, Any] = field(default_factory=dict)


def restrict_bank(bank: TeacherBank, sel: Selection) -> SelectedBank:
    """The bank's selected rows (copies: a gather), labelled with the pseudo-labels."""
    r = sel.rows
    return SelectedBank(embeddings={n: e[r] for n, e in bank.embeddings.items()},
                        logits={n: t[r] for n, t in bank.logits.items()},
                        labels=sel.pseudo_labels.clone(), sample_ids=bank.sample_ids[r].clone(),
                        selection=dict(sel.manifest))


# ----------------------------------------------------------------------------------------------
# the stage
# ----------------------------------------------------------------------------------------------
def selection_teachers(cfg: ExperimentConfig) -> list[str]:
    """Teachers that rank and label the pool: distill.teachers (the ones the student then learns
    from, so `ensemble-kd distill` finds every train shard it needs), else every teacher."""
    return list(cfg.distill.teachers or [t.name for t in cfg.teachers])


def _narrow(cfg: ExperimentConfig, teachers: list[str], split: str, data: dict | None = None) -> ExperimentConfig:
    d = to_dict(cfg)
    d["teachers"] = [to_dict(cfg.teacher(n)) for n in teachers]
    d["embed"]["splits"] = [split]
    if data is not None:  # the teachers' own test split: one clean view, nothing else
        d["data"] = data
        for k in ("views", "adversarial"):
            d["embed"].pop(k, None)
    # only data, teachers and embed plan the shards; the rest is reset so the narrowed config
    # validates (a student reading a modality of this dataset, no losses needing teachers)
    for k in ("select", "run", "tune"):
        d.pop(k, None)
    d["distill"] = {"student": {"arch": cfg.distill.student.arch, "modality": cfg.teacher(teachers[0]).modality}}
    return from_dict(d, "<select>")


@dataclass
class SelectResult:
    dir: Path
    reused: bool
    manifest: dict[str, Any]


def run_select(cfg: ExperimentConfig, checkpoints: Mapping[str, str | Path], progress: bool = True,
               log=print) -> SelectResult:
    """Embed the pool (and the teachers' test split) through the embed stage's Ray actors, select,
    and write (or reuse) the selection. Needs Ray initialised; ``checkpoints``: teacher -> path."""
    from ensemble_kd.embed import run_embed

    s = cfg.select
    if s.teacher_data is None:
        raise ConfigError("select.teacher_data: required by `ensemble-kd select` (the teachers' own labelled dataset, "
                          "whose test split gives the per-class accuracy a_i)")
    names = selection_teachers(cfg)
    if not names:
        raise ConfigError("select: no teachers: configure `teachers` (e.g. {name, checkpoint: PATH, modality})")
    missing = [n for n in names if n not in checkpoints]
    if missing:
        raise ConfigError(f"select: no checkpoint given for teachers {missing}")
    pool = run_embed(_narrow(cfg, names, "train"), {n: Path(checkpoints[n]) for n in names}, progress=progress, log=log)
    test = run_embed(_narrow(cfg, names, "test", to_dict(s.teacher_data)), {n: Path(checkpoints[n]) for n in names},
                     progress=progress, log=log)
    pool_dirs = {r.teacher: r.dir for r in pool}
    test_dirs = {r.teacher: r.dir for r in test}
    ps = ShardSet.open([pool_dirs[n] for n in names])
    ts = ShardSet.open([test_dirs[n] for n in names])
    C = ps.first.num_classes
    if ts.first.num_classes != C:
        raise ConfigError(f"select.teacher_data: {s.teacher_data.name!r} has {ts.first.num_classes} classes, the teachers' logits {C}")

    sel = select_confident([ps.logits(n) for n in names], s.fraction, s.per_class)
    acc, top1 = class_accuracy([ts.logits(n) for n in names], ts.labels, C)
    per_teacher = {n: class_accuracy([ts.logits(n)], ts.labels, C)[1] for n in names}
    pool_labels = ps.labels[sel.rows]  # (K,) diagnostics only: never used to select or label
    has = pool_labels >= 0
    diag = float((sel.pseudo_labels[has] == pool_labels[has]).float().mean()) if bool(has.any()) else None
    pool_has = ps.labels >= 0
    diag_all = float((sel.pool_pseudo_labels[pool_has] == ps.labels[pool_has]).float().mean()) if bool(pool_has.any()) else None

    key = {"pool_shards": {n: ps.shards[n].manifest["shard_id"] for n in names},
           "teacher_test_shards": {n: ts.shards[n].manifest["shard_id"] for n in names},
           "teachers": names, "fraction": float(s.fraction), "per_class": bool(s.per_class), "num_classes": C}
    pm = ps.first.manifest
    manifest = {
        "teachers": names, "fraction": float(s.fraction), "per_class": bool(s.per_class), "num_classes": C,
        "num_rows": int(sel.rows.numel()), "pool_rows": len(ps),
        "counts_per_class": torch.bincount(sel.pseudo_labels, minlength=C).tolist(),
        "pool_counts_per_class": torch.bincount(sel.pool_pseudo_labels, minlength=C).tolist(),
        "class_accuracy": acc, "teacher_test_top1": {**per_teacher, "ensemble": top1},
        "teacher_data": to_dict(s.teacher_data),
        "dataset": dict(pm["dataset"]), "views": pm["views"],
        "source_shards": {n: {"shard_id": ps.shards[n].manifest["shard_id"], "dir": ps.shards[n].dir.name} for n in names},
        "teacher_test_shards": {n: {"shard_id": ts.shards[n].manifest["shard_id"], "dir": ts.shards[n].dir.name} for n in names},
        "diagnostics": {"pseudo_label_accuracy_selected": diag, "pseudo_label_accuracy_pool": diag_all,
                        "note": "against the pool's own labels where it has them; never used to select or label"},
    }
    path, reused = write_selection(Path(cfg.output_dir) / "selections", key, ps.sample_ids[sel.rows].numpy(), sel, manifest)
    m = load_selection(path).manifest
    log(f"selection {path}: {'reused' if reused else 'wrote'} {m['num_rows']} of {m['pool_rows']} rows "
        f"({'per class' if s.per_class else 'global'}, fraction {s.fraction}) scored by {names}")
    return SelectResult(path, reused, m)
