"""The data store: every dataset split as a content-addressed, memory-mapped Arrow table on disk.

A registered dataset (``modalities.DATASETS``: the shipped ones, CIFAR, image folders, a user's
table, a plugin's) is only the *source*. It is read once, streamed chunk by chunk into
``<output_dir>/data/`` and from then on every process (teacher training, embed tasks, both distill
paths, evaluation, export) reads that copy by row index through :class:`StoredDataset`, a
:class:`~modalities.PairedDataset` whose columns are zero-copy views of memory-mapped Arrow files
(one record batch per modality: one contiguous buffer, so a batch of rows is one numpy index).
No process holds the dataset in its own heap; the processes of a node share one copy through the
OS page cache, so a worker's private memory does not grow with the rows (``bench/data_scale.py``).

Layout under ``<output_dir>/data/``::

    <name>__<split>__<fp16>/               the split's content (fp16: its fingerprint's first 16 hex digits)
        manifest.json                      what it is: dataset, modalities (shape, stored dtype, transform, file)
        index.arrow                        sample_id, label: one record batch (zero-copy views)
        <modality>.arrow ...               one record batch each: the modality's rows, fixed_size_list<float32|uint8>
    <name>__<split>__<recipe16>.json       pointer: this recipe (name, split, root, kwargs) -> the folder above,
                                           with the source's stamp (file sizes and mtimes) when it was read

A modality is stored as the source gives it (:meth:`~modalities.PairedDataset.stored_forms`):
float32 rows, or images decoded at the configured size as uint8 with the transform (pixel / 255,
per-channel mean and std) in the manifest, applied per batch when read
(:meth:`modalities.datasets.base.StoredForm.decode`), so a stored split serves bit for bit the
tensors its source serves. Images are never kept encoded (PNG/JPEG): decoding per batch would cost
every step what decoding once costs at prepare time, and uint8 at training size (3 KB per 32x32
RGB image) is what the encoders read; a folder too large for that on disk is past this store.

Writing: a temp folder, then an atomic rename (``files.publish_dir``), so nothing half-written
is ever opened; two processes preparing the same split at once both succeed (the first rename
wins). The split's fingerprint is the source's own :meth:`~modalities.PairedDataset.fingerprint`
(the teacher shards' keys name it); the folder is named by it, so equal content is stored once.

Reading: :func:`prepare` (the driver: ``ensemble-kd data prepare`` and the start of every verb)
checks the source's stamp against the pointer (a changed source is read again) and the sha256 of
every file; :func:`open_split` (any process, a Ray worker included) follows the pointer and checks
sizes, schemas and row counts only (the driver has hashed the files), and prepares on first use
when no pointer exists yet. Where the store lives follows ``output_dir``: on a cluster, a folder
every node mounts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from ensemble_kd.core import layout
from ensemble_kd.core import owners
from ensemble_kd.core.files import atomic_write, file_sha256, naming_full_disk, publish_dir, read_json_manifest
from ensemble_kd.core.config import DataConfig
from ensemble_kd.core.shared_folder import in_ray_worker, not_shared
from modalities import DATASETS, PairedDataset, build_dataset
from modalities.datasets.base import SPLITS, DatasetError, StoredForm, stratified_split
from modalities.spec import ModalitySpec

FORMAT = "ensemble-kd/data"
POINTER_FORMAT = "ensemble-kd/data-pointer"
VERSION = 1
MANIFEST = "manifest.json"
INDEX_FILE = "index.arrow"
CHUNK_BYTES = 64 << 20  # rows are read from the source about this many bytes at a time (the writer's memory)
PROGRESS_ROWS = 50_000  # splits at least this long get a progress bar while they are written
CARVE_VERSION = 1  # how data.val_fraction picks its rows (stratified_split); a new way gets a new number


class DataStoreError(DatasetError):
    """A stored split that cannot be used (missing, truncated, damaged, foreign): names the file."""


def store_dir(output_dir: str | Path) -> Path:
    return layout.data(output_dir)


def recipe(data: DataConfig, split: str) -> dict[str, Any]:
    """What names a split before it is read: the dataset, split, root and builder options, and for
    a carved train or val split (``data.val_fraction``) the carve (absent otherwise: a recipe
    without one names the same pointer as before the carve existed)."""
    r = {"name": data.name, "split": split, "root": data.root, "kwargs": data.kwargs, "store_version": VERSION}
    if carved(data, split):
        r["val_carve"] = {"fraction": data.val_fraction, "seed": data.val_seed, "version": CARVE_VERSION}
    return r


def recipe_id(data: DataConfig, split: str) -> str:
    return hashlib.sha256(json.dumps(recipe(data, split), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stat_tree(path: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of a file, or of every non-hidden file under a folder."""
    if path.is_file():
        st = path.stat()
        return [(path.name, st.st_size, st.st_mtime_ns)]
    out = []
    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            p = os.path.join(dirpath, fn)
            st = os.stat(p)
            out.append((os.path.relpath(p, path), st.st_size, st.st_mtime_ns))
    return out


def source_stamp(data: DataConfig) -> str:
    """A cheap signature of a source's bytes, read without decoding anything: the sizes and
    modification times of the files under ``data.root`` (or of the root file), and of the builder's
    module and the package data beside it (shipped datasets, plugins). A change makes
    :func:`prepare` read the source again; an unchanged stamp reuses the stored split."""
    builder = DATASETS.get(data.name)
    h = hashlib.sha256()
    try:
        mod = Path(inspect.getsourcefile(builder) or "")
    except TypeError:
        mod = Path("")
    files: list[tuple[str, int, int]] = _stat_tree(mod) if mod.is_file() else []
    shipped = mod.parent.parent / "data" if mod.is_file() else None
    if not data.root and shipped is not None and shipped.is_dir():
        files += [("data/" + f, s, t) for f, s, t in _stat_tree(shipped)]
    if data.root:
        root = Path(data.root)
        if not root.exists():
            raise DatasetError(f"dataset {data.name!r}: data.root {root} does not exist")
        files += [("root/" + f, s, t) for f, s, t in _stat_tree(root)]
    h.update(json.dumps(files).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------
def _np_dtype(form: StoredForm) -> type:
    return np.uint8 if form.dtype == "uint8" else np.float32


def _arrow_type(form: StoredForm) -> pa.DataType:
    return pa.uint8() if form.dtype == "uint8" else pa.float32()


def _column_schema(m: str, form: StoredForm, spec: ModalitySpec) -> pa.Schema:
    return pa.schema([pa.field(m, pa.list_(_arrow_type(form), spec.numel), nullable=False)])


def _index_schema() -> pa.Schema:
    return pa.schema([pa.field("sample_id", pa.int64(), nullable=False), pa.field("label", pa.int64(), nullable=False)])


def _write_batch(path: Path, schema: pa.Schema, arrays: list[pa.Array]) -> dict[str, Any]:
    batch = pa.RecordBatch.from_arrays(arrays, schema=schema)
    with naming_full_disk(path), pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as w:
        w.write_batch(batch)
    return {"file": path.name, "rows": batch.num_rows, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def chunk_rows(specs: dict[str, ModalitySpec], forms: dict[str, StoredForm], chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per read of the source: about ``chunk_bytes`` of stored data."""
    row = sum(s.numel * np.dtype(_np_dtype(forms[m])).itemsize for m, s in specs.items())
    return max(1, chunk_bytes // max(1, row))


def write_split(src: PairedDataset, root: Path, fingerprint: str, source: dict[str, Any],
                part_bytes: int = CHUNK_BYTES, progress: Callable[[int], None] | None = None) -> Path:
    """Stream ``src`` into ``root/<name>__<split>__<fp16>`` (temp folder, then rename); returns the
    folder. Each modality becomes ONE record batch (``<modality>.arrow``: one contiguous buffer, so a
    reader gathers any rows with one index, whatever the row count). Rows are read from the source
    ``part_bytes`` at a time into a file-backed scratch map of the whole column (the kernel writes it
    back as it goes: the writer's private memory is one chunk), which Arrow then writes out zero-copy;
    the scratch is deleted, so the disk holds the column twice only while it is written.
    ``progress(rows)`` after each chunk."""
    final = root / f"{src.name}__{src.split}__{fingerprint[:16]}"
    if (final / MANIFEST).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = owners.temp_dir(root, final.name)  # a killed writer's is swept at the next start
    try:
        specs, forms = dict(src.modalities), src.stored_forms()
        mods = sorted(specs)
        n, step = len(src), chunk_rows(specs, forms, part_bytes)
        scratch = {m: np.lib.format.open_memmap(tmp / f".{m}.scratch.npy", mode="w+", dtype=_np_dtype(forms[m]),
                                                shape=(n, specs[m].numel)) if n else
                   np.zeros((0, specs[m].numel), dtype=_np_dtype(forms[m])) for m in mods}  # (N, numel) each
        for start in range(0, n, step):
            stop = min(start + step, n)
            rows = src.stored_batch(np.arange(start, stop), mods)
            for m in mods:
                x = np.asarray(rows[m])
                if x.shape != (stop - start, specs[m].numel):
                    raise DatasetError(f"dataset {src.name!r} ({src.split}): modality {m!r} gave rows of shape {x.shape}, "
                                       f"expected {(stop - start, specs[m].numel)}")
                scratch[m][start:stop] = x  # (B, numel), cast to the stored dtype
            if progress is not None:
                progress(stop - start)
        columns = {}
        for m in mods:
            flat = pa.py_buffer(np.ascontiguousarray(scratch[m]).reshape(-1))  # zero-copy view of the scratch map
            values = pa.Array.from_buffers(_arrow_type(forms[m]), n * specs[m].numel, [None, flat])
            columns[m] = _write_batch(tmp / f"{m}.arrow", _column_schema(m, forms[m], specs[m]),
                                      [pa.FixedSizeListArray.from_arrays(values, specs[m].numel)])
            del flat, values
            scratch[m] = None
            (tmp / f".{m}.scratch.npy").unlink(missing_ok=True)
        index = _write_batch(tmp / INDEX_FILE, _index_schema(),
                             [pa.array(np.asarray(src.sample_ids, dtype=np.int64)), pa.array(np.asarray(src.labels, dtype=np.int64))])
        manifest = {
            "format": FORMAT, "version": VERSION,
            "dataset": {"name": src.name, "split": src.split, "num_classes": int(src.num_classes), "num_samples": n,
                        "fingerprint": fingerprint, "classes": getattr(src, "classes", None),
                        "splits": list(getattr(src, "source_splits", SPLITS))},  # a table's own `val` rows show here
            "modalities": {m: {"kind": specs[m].kind, "shape": list(specs[m].shape), **forms[m].to_dict(),
                               "file": columns[m]} for m in mods},
            "index": index, "source": source,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        atomic_write(tmp / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2).encode()))
        owners.release(tmp)
        publish_dir(tmp, final, MANIFEST)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------
def read_manifest(folder: str | Path) -> dict[str, Any]:
    return read_json_manifest(folder, MANIFEST, FORMAT, VERSION, DataStoreError, "stored dataset",
                              hint=" (`ensemble-kd data prepare` writes it)")


def _open_batch(path: Path, entry: dict[str, Any], schema: pa.Schema, verify: bool) -> pa.RecordBatch:
    if not path.is_file():
        raise DataStoreError(f"stored dataset file missing: {path}")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise DataStoreError(f"stored dataset file {path} is {size} bytes, its manifest says {entry['bytes']}: "
                             "truncated or overwritten")
    if verify:
        got = file_sha256(path)
        if got != entry.get("sha256"):
            raise DataStoreError(f"stored dataset file {path} is damaged: its sha256 is {got[:16]}..., its manifest "
                                 f"says {str(entry.get('sha256'))[:16]}... (`ensemble-kd data prepare` rewrites it)")
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        if not reader.schema.equals(schema) or reader.num_record_batches != 1:
            raise DataStoreError(f"stored dataset file {path}: schema or record batches differ from the manifest's")
        batch = reader.get_batch(0)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise DataStoreError(f"stored dataset file {path} is unreadable: {e}") from None
    if batch.num_rows != entry["rows"]:
        raise DataStoreError(f"stored dataset file {path} has {batch.num_rows} rows, its manifest says {entry['rows']}")
    return batch


def _fixed_rows(arr: pa.Array) -> np.ndarray:
    """A fixed_size_list column as a zero-copy (R, width) numpy view of the map."""
    width = arr.type.list_size
    return arr.flatten().to_numpy(zero_copy_only=True).reshape(-1, width)


class StoredDataset(PairedDataset):
    """A split of the data store, memory-mapped: ``sample_ids`` and ``labels`` are zero-copy views
    of ``index.arrow``, each modality a zero-copy (N, numel) view of its one-batch file; a batch
    copies just its rows and decodes them (:class:`~modalities.datasets.base.StoredForm`)."""

    def __init__(self, folder: str | Path, verify: bool = True) -> None:
        self.dir = Path(folder)
        self.verified = bool(verify)  # every file's sha256 checked on this open
        self.manifest = m = read_manifest(self.dir)
        d = m["dataset"]
        self.name, self.split, self.num_classes = d["name"], d["split"], int(d["num_classes"])
        self.classes = d.get("classes")
        self.source_splits = tuple(d.get("splits") or SPLITS)  # the splits its source has (stores from before: train, test)
        self._fingerprint = d["fingerprint"]
        self.modalities = {k: ModalitySpec(k, v["kind"], tuple(v["shape"])) for k, v in m["modalities"].items()}
        self.forms = {k: StoredForm.from_dict(v) for k, v in m["modalities"].items()}
        index = _open_batch(self.dir / INDEX_FILE, m["index"], _index_schema(), verify)
        self.sample_ids = index.column(0).to_numpy(zero_copy_only=True)
        self.labels = index.column(1).to_numpy(zero_copy_only=True)
        self._rows: dict[str, np.ndarray] = {}  # modality -> (N, numel) view of the map
        for k, v in m["modalities"].items():
            entry = v.get("file") or {}
            if entry.get("file") != f"{k}.arrow":  # a name beside the manifest, nothing else
                raise DataStoreError(f"stored dataset {self.dir}: manifest entry of modality {k!r} is malformed")
            batch = _open_batch(self.dir / entry["file"], entry, _column_schema(k, self.forms[k], self.modalities[k]), verify)
            self._rows[k] = _fixed_rows(batch.column(0))
        n = len(self.sample_ids)
        if n != d["num_samples"] or any(len(r) != n for r in self._rows.values()):
            raise DataStoreError(f"stored dataset {self.dir}: row counts differ from the manifest's {d['num_samples']}")

    def _take(self, m: str, index) -> np.ndarray:
        return self._rows[m][np.asarray(index, dtype=np.int64)]  # (B, numel): a copy of just these rows

    def _inputs(self, index: np.ndarray, modalities: Sequence[str]) -> dict[str, torch.Tensor]:
        return {m: self.forms[m].decode(torch.from_numpy(self._take(m, index)), self.modalities[m].shape)
                for m in modalities}

    def stored_forms(self) -> dict[str, StoredForm]:
        return dict(self.forms)

    def stored_batch(self, index, modalities) -> dict[str, np.ndarray]:
        return {m: self._take(m, index) for m in modalities}

    def fingerprint(self) -> str:
        return self._fingerprint


# ----------------------------------------------------------------------------------------------
# the validation carve: data.val_fraction of each class of train, as stored splits of their own
# ----------------------------------------------------------------------------------------------
def carved(data: DataConfig, split: str) -> bool:
    """Whether ``split`` of ``data`` is a part of the train split carved by ``data.val_fraction``."""
    return bool(data.val_fraction) and split in ("train", "val")


def has_val(data: DataConfig, output_dir: str | Path) -> bool:
    """Whether ``data`` has a validation split: a carve (``data.val_fraction``) or the source's own
    ``val`` rows (a table's), as its stored train split records them (opened, or prepared in a
    driver that has not yet)."""
    return bool(data.val_fraction) or "val" in open_split(data, "train", output_dir).source_splits


def carve_rows(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, val rows), each (N_part,) int64 in the split's order: ``round(n_c * fraction)``
    rows of each class c to val, drawn by ``seed`` (the same draw as the shipped datasets' own
    stratified test splits)."""
    is_val = stratified_split(np.asarray(labels), fraction, seed)  # (N,) bool
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


class CarvedSplit(PairedDataset):
    """The source of a carved split: rows ``rows`` of the stored full train split ``base`` (served
    as stored there, bit for bit), named ``split`` (train: what is left; val). Its fingerprint is
    the base's with the carve, so the teachers' shards of the rest are keyed apart from the full
    split's; ``carve`` is the record kept in the manifest and the pointer."""

    def __init__(self, base: StoredDataset, rows: np.ndarray, split: str, carve: dict[str, Any]) -> None:
        self._base, self._rows, self.carve = base, np.asarray(rows, dtype=np.int64), carve  # (N,) rows of base
        self.name, self.split, self.num_classes, self.classes = base.name, split, base.num_classes, base.classes
        self.modalities = dict(base.modalities)
        self.sample_ids = base.sample_ids[self._rows]  # (N,) int64
        self.labels = base.labels[self._rows]  # (N,) int64
        self.source_splits = (*SPLITS, "val")

    def _inputs(self, index: np.ndarray, modalities: Sequence[str]) -> dict[str, torch.Tensor]:
        return self._base._inputs(self._rows[np.asarray(index, dtype=np.int64)], modalities)

    def stored_forms(self) -> dict[str, StoredForm]:
        return self._base.stored_forms()

    def stored_batch(self, index, modalities) -> dict[str, np.ndarray]:
        return self._base.stored_batch(self._rows[np.asarray(index, dtype=np.int64)], modalities)

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"carve-v{CARVE_VERSION}|{self._base.fingerprint()}|{self.split}|".encode())
        h.update(json.dumps({k: self.carve[k] for k in ("fraction", "seed")}).encode())
        h.update(self._rows.tobytes())
        return h.hexdigest()


def carve_split(base: StoredDataset, data: DataConfig, split: str) -> CarvedSplit:
    """Part ``split`` (train or val) of the stored full train split ``base``, carved by
    ``data.val_fraction`` and ``data.val_seed``; refused, naming the field, where the carve leaves
    val or a class's train rows empty, or the source has ``val`` rows of its own."""
    f = data.val_fraction
    if "val" in base.source_splits:
        raise DatasetError(f"data.val_fraction: dataset {data.name!r} ({data.root}) has `val` rows of its own; "
                           "set data.val_fraction: 0 to use them, or drop them to carve from train")
    train, val = carve_rows(base.labels, f, data.val_seed)
    classes, total = np.unique(base.labels, return_counts=True)
    in_val = np.bincount(base.labels[val], minlength=int(classes.max()) + 1)[classes]  # (C,) val rows per class
    if not len(val):
        raise DatasetError(f"data.val_fraction: {f:g} of each class of the {len(base)} train rows of {data.name!r} "
                           "rounds to no validation row; raise it (or set 0: no validation split)")
    if (in_val == total).any():
        c = int(classes[np.argmax(in_val == total)])
        raise DatasetError(f"data.val_fraction: {f:g} carves every train row of class {c} "
                           f"({int(total[np.argmax(in_val == total)])} rows) into val; lower it")
    carve = {"version": CARVE_VERSION, "fraction": f, "seed": data.val_seed, "method": "stratified",
             "base": {"dir": base.dir.name, "fingerprint": base.fingerprint(), "rows": len(base)},
             "train_rows": len(train), "val_rows": len(val),
             "val_per_class": {str(int(c)): int(k) for c, k in zip(classes, in_val)},
             "val_sample_ids_sha256": hashlib.sha256(np.ascontiguousarray(base.sample_ids[val], dtype=np.int64).tobytes()).hexdigest()}
    return CarvedSplit(base, train if split == "train" else val, split, carve)


def _source(data: DataConfig, split: str, output_dir: str | Path, log: Callable[[str], None] | None) -> PairedDataset:
    """What a split is read from: the registered dataset, or for a carved split the stored full
    train split (prepared first: the carve is drawn from the same rows every time)."""
    if carved(data, split):
        whole = dataclasses.replace(data, val_fraction=0.0, val_seed=0)
        return carve_split(prepare(whole, "train", output_dir, log), data, split)
    return build_dataset(data.name, split, data.root, **data.kwargs)


# ----------------------------------------------------------------------------------------------
# pointers: recipe -> stored folder
# ----------------------------------------------------------------------------------------------
def _pointer_path(root: Path, data: DataConfig, split: str) -> Path:
    return root / f"{data.name}__{split}__{recipe_id(data, split)}.json"


def _read_pointer(path: Path) -> dict[str, Any] | None:
    try:
        p = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(p, dict) or p.get("format") != POINTER_FORMAT or not isinstance(p.get("dir"), str):
        return None
    if "/" in p["dir"] or p["dir"].startswith("."):  # a folder name beside the pointer, nothing else
        return None
    return p


_OPEN: dict[tuple[str, str], StoredDataset] = {}  # (pointer path, folder) -> the split, opened once per process
_LOCK = threading.Lock()


def prepare(data: DataConfig, split: str, output_dir: str | Path, log: Callable[[str], None] | None = None,
            verify: bool = True) -> StoredDataset:
    """The stored split of ``data`` (read from its source and written when missing or when the
    source changed; reused otherwise, with every file's sha256 checked when ``verify``: once per
    process). ``log`` hears of writes and rewrites (a reuse is silent)."""
    root = store_dir(output_dir)
    ptr_path = _pointer_path(root, data, split)
    stamp = source_stamp(data)
    ptr = _read_pointer(ptr_path)
    if ptr is not None and ptr.get("stamp") == stamp and (root / ptr["dir"] / MANIFEST).is_file():
        folder = root / ptr["dir"]
        with _LOCK:
            done = _OPEN.get((str(ptr_path), ptr["dir"]))
        if done is not None and done.verified >= verify:  # this process has checked it already
            return done
        try:
            ds = StoredDataset(folder, verify=verify)
        except DataStoreError as e:  # damaged bytes: never used, written again from the source
            if log:
                log(f"data {folder.name}: rewriting, the stored copy is damaged: {e}")
            _discard(folder)
        else:
            with _LOCK:
                _OPEN[(str(ptr_path), ptr["dir"])] = ds
            return ds
    t0 = time.perf_counter()
    src = _source(data, split, output_dir, log)
    fp = src.fingerprint()
    # a bar on a terminal for splits that take a while to write (a small one would only add a line;
    # disable=None: none when the output is not a terminal)
    with tqdm(total=len(src), desc=f"data {data.name}/{split}", unit="row", leave=False,
              disable=True if len(src) < PROGRESS_ROWS else None) as bar:
        carve = {"carve": src.carve} if isinstance(src, CarvedSplit) else {}
        folder = write_split(src, root, fp, {"recipe": recipe(data, split), "stamp": stamp, **carve}, progress=bar.update)
    del src
    ds = StoredDataset(folder, verify=False)  # just written (or published by a concurrent writer and hashed then)
    ds.verified = True
    pointer = {"format": POINTER_FORMAT, "version": VERSION, "recipe": recipe(data, split), "stamp": stamp,
               "dir": folder.name, "fingerprint": fp, **carve}
    atomic_write(ptr_path, lambda f: f.write(json.dumps(pointer, indent=2, default=str).encode()))
    if log:
        how = f", carved by data.val_fraction {data.val_fraction:g}" if carved(data, split) else ""
        log(f"data {data.name}/{split}: wrote {folder} ({len(ds)} rows{how} in {time.perf_counter() - t0:.1f}s)")
    with _LOCK:
        _OPEN[(str(ptr_path), folder.name)] = ds
    return ds


def open_split(data: DataConfig, split: str, output_dir: str | Path) -> StoredDataset:
    """The stored split of ``data`` for any process: follows the pointer the driver's
    :func:`prepare` wrote (sizes, schemas and rows checked; one open per process), or prepares the
    split on first use when there is none."""
    root = store_dir(output_dir)
    ptr_path = _pointer_path(root, data, split)
    ptr = _read_pointer(ptr_path)
    if ptr is None:
        if in_ray_worker():  # the driver prepared it before any work: this node does not see its folder
            raise not_shared(ptr_path, output_dir, "the data store's pointer")
        return prepare(data, split, output_dir)
    key = (str(ptr_path), ptr["dir"])
    with _LOCK:
        ds = _OPEN.get(key)
    if ds is None:
        try:
            ds = StoredDataset(root / ptr["dir"], verify=False)
        except DataStoreError:
            if in_ray_worker() and not (root / ptr["dir"]).is_dir():
                raise not_shared(root / ptr["dir"], output_dir, "the data store") from None
            return prepare(data, split, output_dir)
        with _LOCK:
            _OPEN[key] = ds
    return ds


def prepare_all(data: DataConfig, splits: Sequence[str], output_dir: str | Path,
                log: Callable[[str], None] | None = None) -> dict[str, StoredDataset]:
    return {s: prepare(data, s, output_dir, log) for s in splits}


def _discard(folder: Path) -> None:
    gone = folder.parent / f".{folder.name}.damaged-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(folder, gone)
    except FileNotFoundError:
        return
    shutil.rmtree(gone, ignore_errors=True)
