"""DFND selections: the confident rows of an unlabeled pool, labelled by the teachers; the pure
selection functions and the selection's file format.

Chen, Guo, Xu, Li, Xu, Xu, Wang, "Learning Student Networks in the Wild", CVPR 2021 (DFND). When
the teachers' training data is unavailable, a large unlabeled pool is scored by the teachers, the
rows with the least label noise are kept and the teachers' argmax becomes their label; the student
then learns through a noisy adaptation matrix (``losses/dfnd.py``). The select stage
(``stages/select.py``) runs this on the pool's shards.

- :func:`select_confident` ranks the pool rows by the confidence of the ensemble-averaged
  probabilities (max prob; ranking by it is ranking by the teacher's cross-entropy with its own
  argmax, the paper's noise measure) and keeps the top ``fraction``, per pseudo-class by default
  (``per_class``): a global ranking over-represents the classes the teacher finds easy (on a
  shifted pool a few classes can take most of the top ranks), and the student then learns a skewed
  prior; the paper collects a balanced set for the same reason;
- :func:`class_accuracy` gives the per-class teacher accuracy a_i (recall of class i of the
  ensemble's argmax on the teachers' test split), which initialises the diagonal of Q;
- a selection is a content-addressed folder::

       <output_dir>/selections/<id>/selection.arrow   sample_id, row, pseudo_label, confidence
       <output_dir>/selections/<id>/manifest.json     key, file size + sha256, source shard ids,
                                                      fraction, teachers, a_i, counts per class

  ``id`` = sha256 of the key (source shard ids, teacher test shard ids, fraction, per_class,
  teachers), so the same inputs reuse it; it is written into a temp directory and renamed.
  ``row`` is the row of the pool's train shards (the same in every teacher's shard: they are
  row-aligned); ``distill.selection`` points at the directory.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from ensemble_kd import __version__
from ensemble_kd.core.files import atomic_write, file_sha256, publish_dir, read_json_manifest
from ensemble_kd.blocks.bank import TeacherBank
from ensemble_kd.storage.shards import ShardError

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


def restrict_bank(bank: TeacherBank, sel: Selection) -> TeacherBank:
    """The bank's selected rows (copies: a gather), labelled with the pseudo-labels."""
    r = sel.rows
    return TeacherBank(embeddings={n: e[r] for n, e in bank.embeddings.items()},
                       logits={n: t[r] for n, t in bank.logits.items()},
                       labels=sel.pseudo_labels.clone(), sample_ids=bank.sample_ids[r].clone())
