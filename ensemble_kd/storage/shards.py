"""Arrow shards of teacher outputs: schema, atomic writer, memory-mapped reader, manifest.

Layout: one directory per (teacher, split), named ``<teacher>__<split>__<shard_id>``::

    manifest.json          what the shard is (key, dims, views, parts with sizes and sha256)
    part-00000.arrow       Arrow IPC *file* format, uncompressed, so it memory-maps zero-copy

A row is one (sample, view): ``sample_id:int64, label:int64, view:int32, aug_top:int16,
aug_left:int16, aug_flip:bool, <teacher>.embedding: fixed_size_list<float32|float16>[d],
<teacher>.logits: fixed_size_list<float32>[C]``, and in shards with adversarial views (GACD)
``<teacher>.adv_delta: fixed_size_list<float32>[prod(input shape)]``: the PGD perturbation the
teacher added to that row's replayed view (all zeros on normal rows). Rows are sample-major in
dataset order, so two teachers' shards of the same split and view recipe are row-aligned and
join without a hash join (:class:`ShardSet` checks that they are).

``shard_id`` = sha256 of the :class:`ShardKey` (teacher name + checkpoint content hash +
dataset fingerprint + split + view recipe + dtype): the same inputs give the same id, so a
rerun finds and reuses the shard. A shard is written into a hidden temp directory and renamed
to its final name only once every part and the manifest are on disk, so a crash never leaves
something that looks whole. Several writers may fill one temp directory (the embed stage's
workers, each a row range, under distinct part names): :func:`publish_shard` then renames the
parts in row order and writes the one manifest.

Every open verifies: each part's size, Arrow structure and row count, and its sha256 against the
manifest (one sequential read of the part; the training that follows reads every byte of it
anyway), so bytes damaged in place (same size) are refused
with the path and both digests instead of training on them. A process hashes a given file
(same inode, size and mtime) once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ensemble_kd import __version__
from ensemble_kd.core import owners
from ensemble_kd.core.files import atomic_write, file_sha256, naming_full_disk, publish_dir, read_json_manifest
from ensemble_kd.core.errors import ProjectError
from ensemble_kd.core.shared_folder import in_ray_worker, not_shared
from ensemble_kd.core.rows import PartedRows, as_torch

FORMAT = "ensemble-kd/shard"
VERSION = 1
MANIFEST = "manifest.json"
_ROW_FIELDS = ("sample_id", "label", "view", "aug_top", "aug_left", "aug_flip", "embedding", "logits")


class ShardError(ValueError, ProjectError):
    """Base of shard errors; the message names the file or directory."""


class ShardMismatchError(ShardError):
    """A shard whose manifest does not match what the run expects (names both sides)."""


class ShardCorruptError(ShardError):
    """A shard whose files are missing, truncated or unreadable."""


@dataclass(frozen=True)
class ShardKey:
    """Everything that decides a shard's content; its hash is the shard id."""

    teacher: str
    checkpoint_sha256: str
    dataset: str
    split: str
    dataset_fingerprint: str
    views: dict[str, Any]
    embedding_dtype: str

    @property
    def shard_id(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def dirname(self) -> str:
        return f"{self.teacher}__{self.split}__{self.shard_id}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def emb_col(teacher: str) -> str:
    return f"{teacher}.embedding"


def logit_col(teacher: str) -> str:
    return f"{teacher}.logits"


def adv_col(teacher: str) -> str:
    return f"{teacher}.adv_delta"


def make_schema(teacher: str, embed_dim: int, num_classes: int, embedding_dtype: str, adv_dim: int = 0) -> pa.Schema:
    """The shard schema; ``adv_dim`` > 0 adds the adversarial-delta column (shards without
    adversarial views keep the original schema, so older shards read unchanged)."""
    et = pa.float16() if embedding_dtype == "float16" else pa.float32()
    adv = [pa.field(adv_col(teacher), pa.list_(pa.float32(), adv_dim), nullable=False)] if adv_dim > 0 else []
    return pa.schema(
        [
            pa.field("sample_id", pa.int64(), nullable=False),
            pa.field("label", pa.int64(), nullable=False),
            pa.field("view", pa.int32(), nullable=False),
            pa.field("aug_top", pa.int16(), nullable=False),
            pa.field("aug_left", pa.int16(), nullable=False),
            pa.field("aug_flip", pa.bool_(), nullable=False),
            pa.field(emb_col(teacher), pa.list_(et, embed_dim), nullable=False),
            pa.field(logit_col(teacher), pa.list_(pa.float32(), num_classes), nullable=False),
            *adv,
        ]
    )


def _fixed_list(x: np.ndarray, dtype: pa.DataType) -> pa.FixedSizeListArray:
    x = np.ascontiguousarray(x)  # (R, d)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), type=dtype), x.shape[1])


class PartWriter:
    """Writes rows of one shard as Arrow part files into an existing folder: the part writer of
    :class:`ShardWriter` (a whole shard) and of each embed worker (one row range of a shard).

    Each part file holds exactly one record batch, so every column of a part is one contiguous
    buffer in the file and reads back zero-copy (memory bounded by one part: about 2 x
    rows_per_part x row bytes while a part is flushed). Parts are cut at the shard's global
    multiples of ``rows_per_part`` (``first_row``: the shard row of this writer's first row), so a
    writer that starts on such a multiple writes the very parts, byte for byte, that one writer of
    the whole shard writes there; a range that starts or ends between two multiples gets a shorter
    part at that end. Part ``j`` is named ``name.format(j)``.
    """

    def __init__(self, folder: str | Path, key: ShardKey, embed_dim: int, num_classes: int, rows_per_part: int = 65536,
                 adv_dim: int = 0, first_row: int = 0, name: str = "part-{:05d}.arrow") -> None:
        self.folder, self.key, self.name = Path(folder), key, name
        self.adv_dim = int(adv_dim)  # > 0: every row carries an adv_delta (PGD perturbation, 0 on normal rows)
        self.schema = make_schema(key.teacher, embed_dim, num_classes, key.embedding_dtype, self.adv_dim)
        self._fields = _ROW_FIELDS + (("adv_delta",) if self.adv_dim else ())
        self.embed_dim, self.num_classes, self.rows_per_part = embed_dim, num_classes, rows_per_part
        self._emb_type = self.schema.field(emb_col(key.teacher)).type.value_type
        self._emb_np = np.float16 if key.embedding_dtype == "float16" else np.float32
        self.parts: list[dict[str, Any]] = []  # {"file", "rows", "bytes", "sha256"} in row order
        self._buf: list[dict[str, np.ndarray]] = []
        self._buf_rows = 0
        self._next_row = first_row  # the shard row of the first buffered row
        self.num_rows = 0

    def _flush_part(self, rows: int) -> None:
        """Write the first ``rows`` buffered rows as one part file (one record batch)."""
        cat = {k: np.concatenate([b[k] for b in self._buf]) if self._buf else np.zeros((0,)) for k in self._fields}
        if not self._buf:  # an empty shard still gets one part carrying the schema
            width = {"embedding": self.embed_dim, "logits": self.num_classes, "adv_delta": self.adv_dim}
            cat = {k: np.zeros((0, width[k]) if k in width else (0,)) for k in self._fields}
        head = {k: v[:rows] for k, v in cat.items()}
        rest = {k: v[rows:] for k, v in cat.items()}
        self._buf = [rest] if len(rest["sample_id"]) else []
        self._buf_rows = len(rest["sample_id"])
        self._next_row += rows
        cols = [
            pa.array(head["sample_id"].astype(np.int64)), pa.array(head["label"].astype(np.int64)),
            pa.array(head["view"].astype(np.int32)), pa.array(head["aug_top"].astype(np.int16)),
            pa.array(head["aug_left"].astype(np.int16)), pa.array(head["aug_flip"].astype(bool)),
            _fixed_list(head["embedding"].astype(self._emb_np).reshape(-1, self.embed_dim), self._emb_type),
            _fixed_list(head["logits"].astype(np.float32).reshape(-1, self.num_classes), pa.float32()),
        ]
        if self.adv_dim:  # float32: exactly the tensor the teacher added, so the replay is bit-exact
            cols.append(_fixed_list(head["adv_delta"].astype(np.float32).reshape(-1, self.adv_dim), pa.float32()))
        batch = pa.RecordBatch.from_arrays(cols, schema=self.schema)
        name = self.name.format(len(self.parts))
        path = self.folder / name
        with naming_full_disk(path), pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, self.schema) as w:
            w.write_batch(batch)
        self.parts.append({"file": name, "rows": batch.num_rows, "bytes": path.stat().st_size, "sha256": file_sha256(path)})

    def write(self, sample_id: np.ndarray, label: np.ndarray, view: np.ndarray, aug_top: np.ndarray,
              aug_left: np.ndarray, aug_flip: np.ndarray, embedding: np.ndarray, logits: np.ndarray,
              adv_delta: np.ndarray | None = None) -> None:
        """Append R rows: ids/labels/view params (R,), embedding (R, d), logits (R, C); adv_delta
        (R, adv_dim), required exactly when the writer has ``adv_dim`` > 0."""
        R = len(sample_id)
        if (adv_delta is not None) != bool(self.adv_dim) or (adv_delta is not None and adv_delta.shape != (R, self.adv_dim)):
            got = None if adv_delta is None else adv_delta.shape
            raise ValueError(f"shard {self.key.dirname}: got adv_delta {got} for {R} rows, expected "
                             f"{(R, self.adv_dim) if self.adv_dim else None} (writer adv_dim={self.adv_dim})")
        if embedding.shape != (R, self.embed_dim) or logits.shape != (R, self.num_classes):
            raise ValueError(f"shard {self.key.dirname}: got embedding {embedding.shape} and logits {logits.shape} for {R} rows, "
                             f"expected (R, {self.embed_dim}) and (R, {self.num_classes})")
        self._buf.append({
            "sample_id": np.asarray(sample_id), "label": np.asarray(label), "view": np.asarray(view),
            "aug_top": np.asarray(aug_top), "aug_left": np.asarray(aug_left), "aug_flip": np.asarray(aug_flip),
            "embedding": np.asarray(embedding), "logits": np.asarray(logits),
            **({"adv_delta": np.asarray(adv_delta)} if self.adv_dim else {}),
        })
        self._buf_rows += R
        self.num_rows += R
        while self._buf_rows >= (cut := self.rows_per_part - self._next_row % self.rows_per_part):
            self._flush_part(cut)  # up to the next global multiple of rows_per_part

    def close(self) -> list[dict[str, Any]]:
        """Write the buffered rest as a last part (a writer that got no row writes one empty part, so
        an empty shard still carries its schema); the parts' descriptors in row order."""
        if self._buf_rows or not self.parts:
            self._flush_part(self._buf_rows)
        return self.parts

    def abort(self) -> None:
        self._buf, self._buf_rows = [], 0


def new_temp_dir(root: str | Path, key: ShardKey) -> Path:
    """The hidden temp directory a shard is written into, claimed by this process
    (:func:`ensemble_kd.core.owners.temp_dir`: a killed writer's is swept at the next start)."""
    return owners.temp_dir(root, key.dirname)


def shard_manifest(key: ShardKey, embed_dim: int, num_classes: int, extra: dict[str, Any], adv_dim: int,
                   parts: list[dict[str, Any]], num_samples: int, dataset_name: str) -> dict[str, Any]:
    """The manifest of a shard made of ``parts`` (in row order; ``extra``: more teacher fields)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "shard_id": key.shard_id,
        "key": key.to_dict(),
        "teacher": {"name": key.teacher, "embed_dim": embed_dim, "num_classes": num_classes, **extra,
                    **({"adv_dim": adv_dim} if adv_dim else {})},
        "dataset": {"name": dataset_name, "split": key.split, "fingerprint": key.dataset_fingerprint, "num_samples": num_samples},
        "views": key.views,
        "embedding_dtype": key.embedding_dtype,
        "num_rows": sum(p["rows"] for p in parts),
        "columns": {"embedding": emb_col(key.teacher), "logits": logit_col(key.teacher),
                    **({"adv_delta": adv_col(key.teacher)} if adv_dim else {})},
        "parts": parts,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "ensemble_kd_version": __version__,
    }


def publish_shard(tmp: Path, final: Path, key: ShardKey, embed_dim: int, num_classes: int, extra: dict[str, Any],
                  adv_dim: int, parts: list[dict[str, Any]], num_samples: int, dataset_name: str) -> dict[str, Any]:
    """Finish the shard written into the temp directory ``tmp``: rename ``parts`` (their files in
    ``tmp``, in row order, written by one writer or by several under distinct names) to
    ``part-00000.arrow``, ... (a rename keeps the bytes, so the recorded sha256 stays right), write
    the manifest, and publish ``tmp`` as ``final`` atomically. Returns the manifest."""
    final_parts = []
    for i, p in enumerate(parts):
        name = f"part-{i:05d}.arrow"
        if p["file"] != name:
            os.rename(tmp / p["file"], tmp / name)  # sources never use the part- prefix, so no clash
        final_parts.append({**p, "file": name})
    manifest = shard_manifest(key, embed_dim, num_classes, extra, adv_dim, final_parts, num_samples, dataset_name)
    atomic_write(tmp / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2).encode()))
    owners.release(tmp)  # a published shard has no writer
    publish_dir(tmp, final, MANIFEST)
    return manifest


class ShardWriter:
    """Writes one shard into a temp directory and publishes it atomically on :meth:`close`.

    Rows are buffered until ``rows_per_part`` and each part file holds exactly one record batch
    (:class:`PartWriter`). Use as a context manager: an exception inside the ``with`` removes the
    temp directory.
    """

    def __init__(self, root: str | Path, key: ShardKey, embed_dim: int, num_classes: int,
                 rows_per_part: int = 65536, extra: dict[str, Any] | None = None, adv_dim: int = 0) -> None:
        self.root, self.key = Path(root), key
        self.final = self.root / key.dirname
        self.tmp = new_temp_dir(self.root, key)
        self.parts = PartWriter(self.tmp, key, embed_dim, num_classes, rows_per_part, adv_dim)
        self.adv_dim, self.schema = self.parts.adv_dim, self.parts.schema
        self.embed_dim, self.num_classes, self.rows_per_part = embed_dim, num_classes, rows_per_part
        self.extra = extra or {}

    @property
    def num_rows(self) -> int:
        return self.parts.num_rows

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self.abort()

    def write(self, sample_id: np.ndarray, label: np.ndarray, view: np.ndarray, aug_top: np.ndarray,
              aug_left: np.ndarray, aug_flip: np.ndarray, embedding: np.ndarray, logits: np.ndarray,
              adv_delta: np.ndarray | None = None) -> None:
        """Append R rows (see :meth:`PartWriter.write`)."""
        self.parts.write(sample_id, label, view, aug_top, aug_left, aug_flip, embedding, logits, adv_delta)

    def close(self, num_samples: int, dataset_name: str) -> dict[str, Any]:
        """Finish the parts, write the manifest, and rename the temp dir to the final name."""
        return publish_shard(self.tmp, self.final, self.key, self.embed_dim, self.num_classes, self.extra, self.adv_dim,
                             self.parts.close(), num_samples, dataset_name)

    def abort(self) -> None:
        self.parts.abort()
        shutil.rmtree(self.tmp, ignore_errors=True)


def read_manifest(shard_dir: str | Path) -> dict[str, Any]:
    if in_ray_worker() and not Path(shard_dir).exists():  # the driver published it: this node does not share the folder
        raise not_shared(shard_dir, Path(shard_dir).parent, "the shard")
    return read_json_manifest(shard_dir, MANIFEST, FORMAT, VERSION, ShardCorruptError, "shard")


def check_manifest(shard_dir: str | Path, expected: ShardKey) -> dict[str, Any]:
    """The shard's manifest, refused with both sides named if it does not match ``expected``."""
    m = read_manifest(shard_dir)
    got = m.get("key", {})
    diffs = [
        f"{k}: manifest has {got.get(k)!r}, this run expects {v!r}"
        for k, v in expected.to_dict().items()
        if got.get(k) != v
    ]
    if m.get("shard_id") != expected.shard_id:
        diffs.append(f"shard_id: manifest has {m.get('shard_id')!r}, this run expects {expected.shard_id!r}")
    recorded = (m.get("teacher") or {}).get("checkpoint_sha256")
    if recorded is not None and recorded != expected.checkpoint_sha256:  # the teacher record must agree with the key
        diffs.append(f"teacher.checkpoint_sha256: manifest has {recorded!r}, this run expects {expected.checkpoint_sha256!r}")
    if diffs:
        raise ShardMismatchError(f"shard {shard_dir} does not match this run:\n  " + "\n  ".join(diffs))
    return m


def _column_numpy(col: pa.ChunkedArray) -> np.ndarray:
    """A column as numpy: zero-copy for one chunk, concatenated (a copy) for several."""
    chunks = [c for c in col.chunks if len(c)] or col.chunks[:1]
    if pa.types.is_fixed_size_list(col.type):
        width = col.type.list_size
        parts = [c.flatten().to_numpy(zero_copy_only=True).reshape(-1, width) for c in chunks] if chunks else [np.zeros((0, width))]
    else:
        parts = [c.to_numpy(zero_copy_only=c.type != pa.bool_()) for c in chunks] if chunks else [np.zeros(0)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


_VERIFIED: dict[tuple[str, int, int, int], str] = {}  # (path, inode, size, mtime_ns) -> sha256 hashed by this process


def verify_part(path: Path, expected_sha256: str) -> None:
    """Refuse a part whose sha256 differs from its manifest's, naming the file and both digests.
    A process hashes a given file (same inode, size and mtime) once."""
    st = path.stat()
    k = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    got = _VERIFIED.get(k) or file_sha256(path)
    if got != expected_sha256:
        raise ShardCorruptError(f"shard part {path} is damaged: its sha256 is {got[:16]}..., its manifest says "
                                f"{str(expected_sha256)[:16]}... (bytes changed since it was written; "
                                "`ensemble-kd embed` rewrites it)")
    _VERIFIED[k] = got


class Shard:
    """One teacher's shard, memory-mapped. For a one-part shard (up to ``rows_per_part`` rows) the
    tensors are zero-copy, read-only views of the file, shared by every process through the page
    cache; for several parts the column accessors concatenate the parts (a copy).

    Opening checks the manifest, that every part exists with the recorded size (a truncated
    file is reported with its path), its sha256 against the manifest (``verify``, on by
    default: see the module doc for the cost), that Arrow can read it, and its schema and row
    counts. ``verify=False`` skips only the hash (``shards inspect`` without ``--verify``).
    """

    def __init__(self, shard_dir: str | Path, verify: bool = True) -> None:
        self.dir = Path(shard_dir)
        self.manifest = m = read_manifest(self.dir)
        self.teacher: str = m["teacher"]["name"]
        self.embed_dim: int = m["teacher"]["embed_dim"]
        self.num_classes: int = m["teacher"]["num_classes"]
        self.adv_dim: int = int(m["teacher"].get("adv_dim", 0))  # 0: no adversarial views (and older shards)
        expected_schema = make_schema(self.teacher, self.embed_dim, self.num_classes, m["embedding_dtype"], self.adv_dim)
        batches: list[pa.RecordBatch] = []
        for part in m["parts"]:
            path = self.dir / part["file"]
            if not path.is_file():
                raise ShardCorruptError(f"shard part missing: {path}")
            size = path.stat().st_size
            if size != part["bytes"]:
                raise ShardCorruptError(f"shard part {path} is {size} bytes, its manifest says {part['bytes']}: truncated or overwritten")
            if verify:
                verify_part(path, part.get("sha256", ""))
            try:
                reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
                if not reader.schema.equals(expected_schema):
                    raise ShardCorruptError(f"shard part {path}: schema {reader.schema} differs from the manifest's")
                part_batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
            except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
                raise ShardCorruptError(f"shard part {path} is unreadable: {e}") from None
            rows = sum(b.num_rows for b in part_batches)
            if rows != part["rows"]:
                raise ShardCorruptError(f"shard part {path} has {rows} rows, its manifest says {part['rows']}")
            batches.extend(part_batches)
        self.table = pa.Table.from_batches(batches, schema=expected_schema)
        if self.table.num_rows != m["num_rows"]:
            raise ShardCorruptError(f"shard {self.dir} has {self.table.num_rows} rows, its manifest says {m['num_rows']}")

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    @property
    def key(self) -> dict[str, Any]:
        return self.manifest["key"]

    def column(self, name: str) -> torch.Tensor:
        """A column as one tensor: zero-copy for a one-part shard, the parts concatenated otherwise."""
        return as_torch(_column_numpy(self.table.column(name)))

    def rows(self, name: str) -> torch.Tensor | PartedRows:
        """A wide column (embeddings, logits, deltas) for row-indexed reads: the zero-copy tensor of a
        one-part shard, else a :class:`~ensemble_kd.core.rows.PartedRows` over the parts' zero-copy views
        (``x[rows]`` gathers just those rows), so a many-part shard is never copied whole."""
        col = self.table.column(name)
        chunks = [c for c in col.chunks if len(c)] or col.chunks[:1]
        if len(chunks) <= 1:
            return self.column(name)
        width = col.type.list_size
        return PartedRows([c.flatten().to_numpy(zero_copy_only=True).reshape(-1, width) for c in chunks])

    @property
    def sample_ids(self) -> torch.Tensor:  # (R,) int64
        return self.column("sample_id")

    @property
    def labels(self) -> torch.Tensor:  # (R,) int64
        return self.column("label")

    @property
    def views(self) -> dict[str, torch.Tensor]:
        """View parameters per row: view (R,), top (R,), left (R,), flip (R,) bool."""
        return {"view": self.column("view"), "top": self.column("aug_top"), "left": self.column("aug_left"), "flip": self.column("aug_flip")}

    @property
    def embeddings(self) -> torch.Tensor | PartedRows:  # (R, d) float32|float16
        return self.rows(emb_col(self.teacher))

    @property
    def logits(self) -> torch.Tensor | PartedRows:  # (R, C) float32
        return self.rows(logit_col(self.teacher))

    @property
    def adv_delta(self) -> torch.Tensor | PartedRows | None:
        """(R, prod(input shape)) float32 PGD perturbations (0 on normal rows), or None without adversarial views."""
        return self.rows(adv_col(self.teacher)) if self.adv_dim else None

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        ids = self.table.column("sample_id")
        views = self.table.column("view")
        return {
            "dir": str(self.dir),
            "shard_id": m["shard_id"],
            "teacher": m["teacher"],
            "dataset": m["dataset"],
            "views": {**m["views"], "distinct": sorted(set(views.to_pylist())) if self.num_rows else []},
            "embedding_dtype": m["embedding_dtype"],
            "rows": self.num_rows,
            "samples": len(set(ids.to_pylist())),
            "sample_id_min": min(ids.to_pylist()) if self.num_rows else None,
            "sample_id_max": max(ids.to_pylist()) if self.num_rows else None,
            "bytes": sum(p["bytes"] for p in m["parts"]),
            "parts": len(m["parts"]),
        }


class ShardSet:
    """Several teachers' shards of one split, joined row by row on (sample_id, view)."""

    def __init__(self, shards: Iterable[Shard]) -> None:
        self.shards = {s.teacher: s for s in shards}
        if not self.shards:
            raise ShardError("a ShardSet needs at least one shard")
        first = next(iter(self.shards.values()))
        for s in self.shards.values():
            if s.manifest["dataset"]["fingerprint"] != first.manifest["dataset"]["fingerprint"]:
                raise ShardMismatchError(f"shards {first.dir} and {s.dir} come from different datasets or splits "
                                         f"({first.manifest['dataset']} vs {s.manifest['dataset']})")
            if s.manifest["views"] != first.manifest["views"]:
                raise ShardMismatchError(f"shards {first.dir} and {s.dir} have different view recipes: "
                                         f"{first.manifest['views']} vs {s.manifest['views']}")
            if not (torch.equal(s.sample_ids, first.sample_ids) and torch.equal(s.column("view"), first.column("view"))):
                raise ShardMismatchError(f"shards {first.dir} and {s.dir} are not row-aligned on (sample_id, view)")
        self.first = first

    @classmethod
    def open(cls, dirs: Iterable[str | Path], verify: bool = True) -> ShardSet:
        return cls(Shard(d, verify=verify) for d in dirs)

    @property
    def teachers(self) -> list[str]:
        return list(self.shards)

    @property
    def sample_ids(self) -> torch.Tensor:
        return self.first.sample_ids

    @property
    def labels(self) -> torch.Tensor:
        return self.first.labels

    @property
    def views(self) -> dict[str, torch.Tensor]:
        return self.first.views

    def embeddings(self, teacher: str) -> torch.Tensor | PartedRows:
        return self.shards[teacher].embeddings

    def logits(self, teacher: str) -> torch.Tensor | PartedRows:
        return self.shards[teacher].logits

    def adv_delta(self, teacher: str) -> torch.Tensor | PartedRows | None:
        return self.shards[teacher].adv_delta

    def __len__(self) -> int:
        return self.first.num_rows


def discard_shard(shard_dir: Path) -> None:
    """Remove a damaged shard so that it can be written again: renamed to a hidden name first
    (atomic: readers and a concurrent embed never see half a directory), then deleted."""
    gone = shard_dir.parent / f".{shard_dir.name}.damaged-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(shard_dir, gone)
    except FileNotFoundError:  # a concurrent embed discarded it first
        return
    shutil.rmtree(gone, ignore_errors=True)


def find_shards(root: str | Path) -> list[Path]:
    """Published shard directories under ``root`` (or ``root`` itself if it is one)."""
    root = Path(root)
    if (root / MANIFEST).is_file():
        return [root]
    if not root.is_dir():
        raise ShardError(f"no shard directory at {root}")
    return sorted(p.parent for p in root.glob(f"*/{MANIFEST}") if not p.parent.name.startswith("."))


def inspect(root: str | Path, verify: bool = False) -> dict[str, Any]:
    """JSON-able summary of every shard under ``root``: teachers, dims, rows, views, ids."""
    shards = [Shard(d, verify=verify).summary() for d in find_shards(root)]
    return {
        "root": str(root),
        "num_shards": len(shards),
        "teachers": sorted({s["teacher"]["name"] for s in shards}),
        "shards": shards,
    }
