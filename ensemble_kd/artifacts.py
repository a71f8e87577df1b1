"""The typed artifacts the stages hand each other, and their index files.

Each stage takes explicit inputs and returns one of these small handles; the pipeline and the CLI
verbs pass them on. A stage also records its artifact as a JSON index under
``<output_dir>/index/`` so a later CLI verb picks up where an earlier one left off
(``ensemble-kd embed`` then ``ensemble-kd distill``) without re-planning the earlier stage:

    teachers stage  -> TeacherSet      index/teachers.json
    embed stage     -> ShardIndex      index/shards.json
    select stage    -> SelectionRecord index/selection.json
    distill stage   -> StudentRun      index/distill.json (written when the run starts, then when it ends)

The index files hold paths and hashes only (never code, never pickles) and are written
atomically. The artifacts they point at (checkpoints, shards, selections) verify themselves on
open (content hashes, manifests); an index is a pointer, not a source of truth.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ensemble_kd.checkpoint import atomic_write, read_json_manifest
from ensemble_kd.config import ConfigError

INDEX_DIR = "index"
INDEX_FORMAT = "ensemble-kd/index"
INDEX_VERSION = 1


class ArtifactIndexError(ConfigError):
    """An index file that is missing or unreadable; the message says which stage makes it."""


def index_path(output_dir: str | Path, name: str) -> Path:
    return Path(output_dir) / INDEX_DIR / f"{name}.json"


def write_index(output_dir: str | Path, name: str, payload: dict[str, Any]) -> Path:
    doc = {"format": INDEX_FORMAT, "version": INDEX_VERSION, **payload}
    return atomic_write(index_path(output_dir, name), lambda f: f.write(json.dumps(doc, indent=2).encode()))


def read_index(output_dir: str | Path, name: str, made_by: str) -> dict[str, Any]:
    """The payload of ``index/<name>.json``; a missing or unreadable one names the verb that makes it."""
    p = index_path(output_dir, name)
    if not p.is_file():
        raise ArtifactIndexError(f"no {name} index at {p}: run `ensemble-kd {made_by}` first")
    d = read_json_manifest(p.parent, p.name, INDEX_FORMAT, INDEX_VERSION, ArtifactIndexError, f"{name} index",
                           hint=f" (run `ensemble-kd {made_by}`)")
    return {k: v for k, v in d.items() if k not in ("format", "version")}


@dataclass(frozen=True)
class TeacherRecord:
    """One frozen teacher as its checkpoint describes it."""

    name: str
    path: str  # the checkpoint file (absolute)
    arch: str
    modality: str
    content_hash: str  # ensemble-kd files: sha256 of weights + arch + modality; others: of the file's bytes
    test_top1: float | None = None
    dataset: str | None = None
    format: str = "ensemble-kd"  # ensemble-kd | repdistiller | state_dict (teacher_checkpoint.FORMATS)
    arch_kwargs: dict[str, Any] = field(default_factory=dict)  # foreign files: the encoder options to build it with


@dataclass(frozen=True)
class TeacherSet:
    """Name -> teacher record, in the config's order (the teachers stage's artifact)."""

    teachers: dict[str, TeacherRecord]

    def __getitem__(self, name: str) -> TeacherRecord:
        try:
            return self.teachers[name]
        except KeyError:
            raise ConfigError(f"no teacher {name!r} in this teacher set; it has {list(self.teachers)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.teachers)

    def __len__(self) -> int:
        return len(self.teachers)

    def items(self):
        return self.teachers.items()

    def subset(self, names: list[str] | tuple[str, ...]) -> TeacherSet:
        return TeacherSet({n: self[n] for n in names})

    def paths(self) -> dict[str, Path]:
        return {n: Path(t.path) for n, t in self.teachers.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"teachers": [asdict(t) for t in self.teachers.values()]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TeacherSet:
        return cls({t["name"]: TeacherRecord(**t) for t in d["teachers"]})


@dataclass(frozen=True)
class ShardRecord:
    """One (teacher, split) shard folder."""

    teacher: str
    split: str
    dir: str
    shard_id: str
    rows: int
    reused: bool = False
    seconds: float = 0.0


@dataclass(frozen=True)
class ShardIndex:
    """Every shard the embed stage wrote or reused (the embed stage's artifact)."""

    shards: tuple[ShardRecord, ...] = ()

    def __len__(self) -> int:
        return len(self.shards)

    def __iter__(self) -> Iterator[ShardRecord]:
        return iter(self.shards)

    def dirs(self, split: str, teachers: list[str] | tuple[str, ...] | None = None) -> dict[str, str]:
        """teacher -> shard folder of ``split`` (for ``teachers``, in their order; each must exist)."""
        have = {s.teacher: s.dir for s in self.shards if s.split == split}
        names = list(have) if teachers is None else list(teachers)
        missing = [n for n in names if n not in have]
        if missing:
            raise ArtifactIndexError(f"no {split} shard of teacher(s) {missing} in the shard index (it has "
                              f"{sorted(have)}): run `ensemble-kd embed` with them")
        return {n: have[n] for n in names}

    def merged(self, other: ShardIndex) -> ShardIndex:
        """This index with ``other``'s records replacing those of the same (teacher, split)."""
        keep = {(s.teacher, s.split): s for s in self.shards}
        keep.update({(s.teacher, s.split): s for s in other.shards})
        return ShardIndex(tuple(keep.values()))

    def to_dict(self) -> dict[str, Any]:
        return {"shards": [asdict(s) for s in self.shards]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardIndex:
        return cls(tuple(ShardRecord(**s) for s in d["shards"]))


@dataclass(frozen=True)
class SelectionRecord:
    """A DFND selection folder (the select stage's artifact)."""

    dir: str
    selection_id: str
    num_rows: int
    pool_rows: int
    reused: bool = False
    manifest: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SelectionRecord:
        return cls(**d)


@dataclass(frozen=True)
class StudentRun:
    """One distillation (the distill stage's artifact)."""

    run_name: str
    student_path: str | None = None  # students/<run>/student.pt once finished
    final_top1: float | None = None
    epochs: int = 0
    checkpoint_dir: str | None = None  # the folder of the final training state (state.pt, weights-only)
    mlflow_run_id: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("history")  # the history lives in the student checkpoint and MLflow
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudentRun:
        return cls(**{k: v for k, v in d.items() if k != "history"})
