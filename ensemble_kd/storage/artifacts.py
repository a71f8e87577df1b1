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

Paths in an index are relative to the output folder when they lie inside it (``shards/<dir>``,
``students/<run>/student.pt``), so a folder that is moved or copied (another disk, another
machine, a cluster mount at another path) works in place and never reads the folder it came
from; a path outside it (a user's own teacher file) is recorded as given, absolute. The
artifacts in memory always hold absolute paths: :func:`write_index` records them relative and
:func:`read_index` resolves them against the folder it reads. An index written before this
(absolute paths throughout) still loads as it did; a recorded path of the folder's own layout
(``<old folder>/shards/<dir>``, ``selections/<id>``, ``students/<run>/...``,
``ray_results/<run>/...``) whose counterpart exists in this folder is read from this folder, even
where the old one still exists: the index was written for the folder it lies in, and these are
content-addressed or named per run. A teacher file (``<old>/teachers/<name>.pt``, which could as
well be a user's file in a folder named ``teachers``) is taken from here only when the recorded
one is gone.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ensemble_kd.core import layout
from ensemble_kd.core.files import atomic_write, read_json_manifest
from ensemble_kd.core.config import ConfigError

INDEX_DIR = layout.INDEX
INDEX_FORMAT = "ensemble-kd/index"
INDEX_VERSION = 1


class ArtifactIndexError(ConfigError):
    """An index file that is missing or unreadable; the message says which stage makes it."""


def index_path(output_dir: str | Path, name: str) -> Path:
    return Path(output_dir) / INDEX_DIR / f"{name}.json"


PATH_FIELDS = ("path", "dir", "student_path", "checkpoint_dir")  # the fields of an index that hold paths
PATH_LISTS = ("teachers", "shards")  # lists of records, each with path fields
OWN_FOLDERS = layout.OWN_FOLDERS  # an old index's paths re-rooted when here
TEACHER_FOLDER = "teachers"  # re-rooted only when the recorded file is gone


def recorded_path(path: str | Path, root: str | Path) -> str:
    """How an index records ``path``: relative to the output folder ``root`` (POSIX form) when it lies
    inside it, else absolute as given (a relative ``path`` counts from the working directory)."""
    p, r = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    for a, b in ((p, r), (p.resolve(), r.resolve())):  # as written, then with symlinks resolved
        try:
            return a.relative_to(b).as_posix()
        except ValueError:
            pass
    return str(p)


def resolved_path(value: str, root: str | Path) -> str:
    """The absolute path of an index's recorded ``value`` in the output folder ``root``: a relative one
    is joined to ``root``; an absolute one (an index written before paths were relative, or a file
    outside the folder) is kept, unless it lies in the folder's own layout under another folder and
    this folder has the same file (see the module's docstring)."""
    p, r = Path(value), Path(root)
    if not p.is_absolute():
        return str(r / p)
    parts = p.parts
    for i in range(len(parts) - 2, max(0, len(parts) - 4), -1):  # the nearest own folder, 1 or 2 levels up
        if parts[i] in OWN_FOLDERS or (parts[i] == TEACHER_FOLDER and i == len(parts) - 2):
            here = r.joinpath(*parts[i:])
            if here != p and here.exists() and (parts[i] != TEACHER_FOLDER or not p.exists()):
                return str(here)
            break
    return value


def summary_store(summary: dict[str, Any] | None, out: str | Path) -> str | None:
    """The MLflow store a ``summary.json`` names, as seen from the folder ``out`` it is in now.

    The summary records its store as an absolute URI (``sqlite:///<folder>/mlflow.db``) and the folder
    it was written in (``output_dir``; in summaries from before that key, the folder of its
    ``plot``). When that folder is not ``out`` (the folder was moved or copied), a SQLite store that
    lay inside it is taken from the same place in ``out``, so that a moved folder never reads the old
    one's database; a store elsewhere (``tracking.uri``, a server) is as recorded."""
    s = summary or {}
    uri = s.get("mlflow_tracking_uri")
    was = s.get("output_dir") or (str(Path(s["plot"]).parent) if s.get("plot") else None)
    if not isinstance(uri, str) or not uri.startswith("sqlite:///") or not isinstance(was, str):
        return uri
    db = Path(uri[len("sqlite:///"):].split("?", 1)[0])
    out = Path(os.path.abspath(out))
    if Path(was).resolve() == out.resolve():
        return uri
    try:
        rel = db.relative_to(was)
    except ValueError:
        return uri
    return f"sqlite:///{out / rel}"


def _map_paths(payload: dict[str, Any], fn) -> dict[str, Any]:
    """``payload`` with ``fn`` applied to every path field, at the top and in the record lists."""
    out = dict(payload)
    for k in PATH_FIELDS:
        if isinstance(out.get(k), str):
            out[k] = fn(out[k])
    for k in PATH_LISTS:
        if isinstance(out.get(k), list):
            out[k] = [_map_paths(x, fn) if isinstance(x, dict) else x for x in out[k]]
    return out


def write_index(output_dir: str | Path, name: str, payload: dict[str, Any]) -> Path:
    """Write ``index/<name>.json`` atomically, its paths inside ``output_dir`` recorded relative to it."""
    payload = _map_paths(payload, lambda v: recorded_path(v, output_dir))
    doc = {"format": INDEX_FORMAT, "version": INDEX_VERSION, **payload}
    return atomic_write(index_path(output_dir, name), lambda f: f.write(json.dumps(doc, indent=2).encode()))


def read_index(output_dir: str | Path, name: str, made_by: str) -> dict[str, Any]:
    """The payload of ``index/<name>.json``, its paths absolute in ``output_dir`` (:func:`resolved_path`);
    a missing or unreadable one names the verb that makes it."""
    p = index_path(output_dir, name)
    if not p.is_file():
        raise ArtifactIndexError(f"no {name} index at {p}: run `ensemble-kd {made_by}` first")
    d = read_json_manifest(p.parent, p.name, INDEX_FORMAT, INDEX_VERSION, ArtifactIndexError, f"{name} index",
                           hint=f" (run `ensemble-kd {made_by}`)")
    return _map_paths({k: v for k, v in d.items() if k not in ("format", "version")},
                      lambda v: resolved_path(v, output_dir))


@dataclass(frozen=True)
class TeacherRecord:
    """One frozen teacher as its checkpoint describes it."""

    name: str
    path: str  # the checkpoint file (absolute; in the index, relative to the output folder when inside it)
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
    dir: str  # the shard folder (absolute; in the index, relative to the output folder: shards/<dir>)
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

    dir: str  # the selection folder (absolute; in the index, relative: selections/<id>)
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
    student_path: str | None = None  # students/<run>/student.pt once finished (absolute; relative in the index)
    final_top1: float | None = None
    epochs: int = 0
    checkpoint_dir: str | None = None  # the folder of the final training state (state.pt, weights-only; relative in the index)
    mlflow_run_id: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("history")  # the history lives in the student checkpoint and MLflow
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudentRun:
        return cls(**{k: v for k, v in d.items() if k != "history"})
