"""Your own paired modalities as a table (``table``): one Parquet or Arrow file, no code.

Config::

    data:
      name: table
      root: path/to/samples.parquet        # or an Arrow IPC file, or a folder of them
      kwargs: {modalities: [spectrum, image], num_classes: 3}   # both optional

``root`` is a Parquet file, an Arrow IPC file (the file format, ``.arrow``/``.feather`` v2; the
stream format is accepted too), or a folder: then every file directly in it whose name ends in
``.parquet``, ``.arrow``, ``.feather`` or ``.ipc`` (any case; hidden files skipped), sorted by
name and concatenated. Their schemas must agree (column names and types; metadata ignored).

One row per sample, with these columns:

* ``sample_id``: integer, unique across the whole table (both splits). It is the key that joins
  the student's rows to the teachers' outputs, so keep it stable when you regenerate the file.
* ``label``: integer class, ``0 .. num_classes - 1``, or a string (the class name; a pandas
  categorical too): the distinct names of the whole table, sorted (code point order, as Python
  sorts strings), are classes 0, 1, ...; the data store keeps the names in each split's manifest
  (``dataset.classes``) and ``ensemble-kd data prepare`` shows them (``classes: cat=0, dog=1``).
  Every class needs at least one train row: a gap in the integer labels (0, 1, 3) or a class only
  test or val rows have is refused unless ``num_classes`` is given.
* ``split``: string (or dictionary-encoded string, e.g. a pandas categorical), ``train``,
  ``test`` or ``val``. Train and test must have rows; ``val`` rows, where there are any, are the
  validation split that selection uses (Tune, compare, export --arm). Rows of a split keep the table's order.
* one column per modality (every other column, unless ``modalities`` picks some), one of:

  - a fixed-size list of numbers, ``pa.list_(pa.float32(), D)``: a vector view, kind ``vector``,
    shape ``(D,)``;
  - a list of numbers of the same length ``D`` in every row (what pandas writes for a column of
    1-d numpy arrays): a vector view ``(D,)`` too;
  - an Arrow fixed-shape tensor (``arrow.fixed_shape_tensor``, ``pa.fixed_shape_tensor`` /
    ``pa.FixedShapeTensorArray.from_numpy_ndarray``): rank 3 ``(C, H, W)`` is kind ``image``
    (an image, or any grid-shaped view: a spectrogram, a sensor map), rank 2 ``(H, W)`` is an
    ``image`` of shape ``(1, H, W)``, rank 1 ``(D,)`` a ``vector``. The tensor must be stored in
    row-major order (permutation ``[0, 1, ..]``): pyarrow records another permutation for a
    transposed view, and even for ``x[:, None]``, so pass it a fresh array, ``x.copy()``.

  Values: ``float16``/``float32``/``float64`` are served (and stored) as float32, as they are
  (float64 rounds to float32; standardise them yourself if the encoder wants that); ``uint8``
  values are pixels: stored as uint8 and served as ``pixel / 255`` in [0, 1]. Other value types
  (integers other than uint8, strings, nested lists) are refused: cast them
  (``pc.cast(col, pa.list_(pa.float32(), D))``). No nulls, NaNs or infinities.

A pandas index column that pandas wrote beside the data (``df.to_parquet`` of a DataFrame with a
non-default index) is not a modality.

Options (``data.kwargs``): ``modalities``, a list of column names to serve (default: every column
but ``sample_id``, ``label``, ``split``); ``num_classes`` (default: the largest label over the
whole table + 1, the same for every split; given, it also keeps classes without train rows; with
string labels it may only be their number of names).

Validation: everything is checked when a split is built (``ensemble-kd data prepare``, or the
first verb that reads the data), for the whole table at once, before anything is written, and each
problem is a :class:`~modalities.datasets.base.DatasetError` of one line naming the file, the
column and, for a bad value, the row (``row`` is the 0-based row number within that file, with its
``sample_id`` where it has one): a missing ``sample_id``/``label``/``split`` column, a duplicated sample_id
(both rows named), a null sample_id or label, a label out of range or negative, a class without
a train row (without ``num_classes``), a label column neither integer nor string, a split other than
train/test/val, a modality column of an unusable type (or a list column whose length differs from the
first row's), a null, NaN or infinite value in a modality, a split without rows, a file that is not
Parquet/Arrow, files whose schemas differ (both named).

Scale: the table may be larger than memory. Only ``sample_id``, ``label`` and ``split`` are read
whole (about 17 bytes a row); the modality columns are streamed, a bounded chunk at a time
(:data:`CHUNK_BYTES`): Arrow IPC files are memory-mapped (uncompressed ones are read without a
copy), Parquet files are read by row group through a streaming reader that resumes where the last
read stopped, so the data store's consecutive reads cost one pass over the file. The stream format
and compressed IPC files decode each record batch whole, so keep batches moderate there.

Fingerprint: sha256 of the files' bytes (streamed, in order), with the split, its ids and labels,
the chosen columns (kind and shape), ``num_classes`` and the class names of string labels: the same content gives the same
fingerprint without decoding the data, and any change to a file gives a new one.
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from modalities.datasets.base import (DATASETS, DatasetError, PairedDataset, StoredForm, check_split, chosen_modalities,
                                      class_names)
from modalities.spec import ModalitySpec

NAME = "table"
EXTENSIONS = (".parquet", ".arrow", ".feather", ".ipc")
KEY_COLUMNS = ("sample_id", "label", "split")
TABLE_SPLITS = ("train", "test", "val")  # what the split column may hold; val is optional (a validation split)
CHUNK_BYTES = 16 << 20  # modality bytes decoded at once while validating or reading (bounds memory)
_PARQUET_BUFFER = 1 << 20  # Parquet pages are read through a buffer this big, not whole column chunks


# ----------------------------------------------------------------------------------------------
# columns
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Column:
    """How one modality column is read: ``layout`` ``fixed`` (fixed-size list), ``list``
    (variable-size list of one length everywhere) or ``tensor`` (fixed-shape tensor); ``value``
    ``float`` or ``uint8``; ``shape`` the served per-sample shape."""

    name: str
    kind: str
    shape: tuple[int, ...]
    value: str
    layout: str

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))

    def form(self) -> StoredForm:
        return StoredForm("uint8", 255.0) if self.value == "uint8" else StoredForm("float32")


_WANT = ("a modality column must be a fixed-size list of floats (pa.list_(pa.float32(), D)), a list of floats "
         "of one length in every row, or an arrow.fixed_shape_tensor of rank 1-3 (float or uint8 values)")


def _value_kind(t: pa.DataType) -> str | None:
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_uint8(t):
        return "uint8"
    return None


def _describe(field: pa.Field, path: str) -> _Column:
    """A schema field as a modality column (a list's length comes from the data: 0 here)."""
    t, where = field.type, f"{NAME}: {path}: column {field.name!r}"
    if isinstance(t, pa.FixedShapeTensorType):
        shape, value = tuple(int(s) for s in t.shape), _value_kind(t.value_type)
        if value is None:
            raise DatasetError(f"{where} is a tensor of {t.value_type}; {_WANT}")
        if t.permutation is not None and list(t.permutation) != list(range(len(shape))):
            raise DatasetError(f"{where} is a tensor with permutation {list(t.permutation)} (from a transposed or "
                               "re-strided numpy array); write it in row-major order: "
                               "pa.FixedShapeTensorArray.from_numpy_ndarray(x.copy())")
        if len(shape) == 3:
            kind = "image"
        elif len(shape) == 2:
            kind, shape = "image", (1, *shape)
        elif len(shape) == 1:
            kind = "vector"
        else:
            raise DatasetError(f"{where} is a tensor of rank {len(shape)} (shape {list(shape)}); a modality is rank 1 "
                               "(a vector), 2 (H, W) or 3 (C, H, W)")
        if min(shape) < 1:
            raise DatasetError(f"{where} is a tensor of shape {list(shape)}, which holds no values")
        return _Column(field.name, kind, shape, value, "tensor")
    if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
        value = _value_kind(t.value_type)
        if value is None:
            hint = (" (for an image use an arrow.fixed_shape_tensor column)" if pa.types.is_fixed_size_list(t.value_type)
                    or pa.types.is_list(t.value_type) else "")
            raise DatasetError(f"{where} is {t}{hint}; {_WANT}")
        if pa.types.is_fixed_size_list(t):
            if t.list_size < 1:
                raise DatasetError(f"{where} is a fixed-size list of size 0, which holds no values")
            return _Column(field.name, "vector", (int(t.list_size),), value, "fixed")
        return _Column(field.name, "vector", (0,), value, "list")
    raise DatasetError(f"{where} is {t}; {_WANT}")


def _storage(arr: pa.Array) -> pa.Array:
    return arr.storage if isinstance(arr, pa.ExtensionArray) else arr


def _to_rows(arr: pa.Array, col: _Column) -> np.ndarray:
    """A (validated) modality chunk -> (R, numel) numpy rows of the stored dtype (float32 or uint8);
    a zero-copy view where the file holds exactly that (memory-mapped float32 or uint8)."""
    flat = _storage(arr).flatten()  # (R * numel,) the values of these rows (a slice's offset respected)
    v = flat.to_numpy(zero_copy_only=False)
    v = v.astype(np.float32, copy=False) if col.value == "float" else v
    return v.reshape(len(arr), col.numel)  # (R, numel)


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------
@dataclass
class _File:
    """One input file: its format, schema, reader and rows per segment (Parquet row group or
    Arrow record batch); ``start`` is the global row of its first row."""

    path: str
    fmt: str  # "parquet" | "arrow" (IPC file) | "arrow-stream"
    schema: pa.Schema
    reader: Any  # pq.ParquetFile | pa.ipc.RecordBatchFileReader | list[pa.RecordBatch]
    seg_rows: list[int]
    start: int = 0

    @property
    def num_rows(self) -> int:
        return int(sum(self.seg_rows))

    def batch(self, seg: int) -> pa.RecordBatch:
        """Arrow only: record batch ``seg`` (zero-copy from the map when uncompressed)."""
        return self.reader[seg] if self.fmt == "arrow-stream" else self.reader.get_batch(seg)


def _list_files(root: str) -> list[str]:
    if not os.path.exists(root):
        raise DatasetError(f"{NAME}: data.root {root} does not exist")
    if not os.path.isdir(root):
        return [root]
    files = sorted(e.name for e in os.scandir(root)
                   if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(EXTENSIONS))
    if not files:
        raise DatasetError(f"{NAME}: folder {root} has no {'/'.join(EXTENSIONS)} files")
    return [os.path.join(root, f) for f in files]


def _open(path: str) -> _File:
    """Open one file by its content (magic bytes), not its extension."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise DatasetError(f"{NAME}: cannot read {path}: {e}") from None
    try:
        if head[:4] == b"PAR1":
            pf = pq.ParquetFile(path, memory_map=True, buffer_size=_PARQUET_BUFFER)
            return _File(path, "parquet", pf.schema_arrow, pf,
                         [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
        if head[:6] == b"ARROW1":
            reader = pa.ipc.open_file(pa.memory_map(path, "r"))
            return _File(path, "arrow", reader.schema, reader, [])  # rows per batch: read with the keys
        if head[:4] == b"\xff\xff\xff\xff":
            batches = list(pa.ipc.open_stream(pa.memory_map(path, "r")))
            schema = batches[0].schema if batches else pa.ipc.open_stream(pa.memory_map(path, "r")).schema
            return _File(path, "arrow-stream", schema, batches, [b.num_rows for b in batches])
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"{NAME}: {path} is not a readable Parquet or Arrow IPC file: {e}") from None
    raise DatasetError(f"{NAME}: {path} is not a Parquet or Arrow IPC file (it starts with {head!r}); "
                       "write it with pyarrow.parquet.write_table or pyarrow.feather.write_feather")


def _same_schema(a: _File, b: _File) -> None:
    if a.schema.equals(b.schema, check_metadata=False):
        return
    ta = {f.name: f.type for f in a.schema}
    tb = {f.name: f.type for f in b.schema}
    diff = next((n for n in list(ta) + list(tb) if ta.get(n) != tb.get(n)), None)
    what = (f"column {diff!r} is {ta.get(diff, 'missing')} in the first, {tb.get(diff, 'missing')} in the second"
            if diff is not None else f"columns in a different order: {a.schema.names} vs {b.schema.names}")
    raise DatasetError(f"{NAME}: {a.path} and {b.path} have different schemas ({what}); every file of a table folder "
                       "needs the same columns and types")


# ----------------------------------------------------------------------------------------------
# the table (both splits, validated)
# ----------------------------------------------------------------------------------------------
@dataclass
class _Cursor:
    """Where the last Parquet read stopped: the batch held (starting at row ``pos`` of the row
    group) and the iterator after it, so a read that starts there continues instead of restarting."""

    key: tuple
    pos: int
    batch: pa.RecordBatch | None
    it: Iterator[pa.RecordBatch]


class _Table:
    """Every file of ``root``, validated: the key columns in memory (``ids``, ``labels``,
    ``split_of``, ``is_test``: (N,) over the whole table in file order), the modality columns read on demand."""

    def __init__(self, root: str, modalities: Sequence[str] | None, num_classes: int | None) -> None:
        self.root = root
        self.files = [_open(p) for p in _list_files(root)]
        for f in self.files[1:]:
            _same_schema(self.files[0], f)
        first = self.files[0]
        for c in KEY_COLUMNS:
            if first.schema.get_field_index(c) < 0:
                raise DatasetError(f"{NAME}: {first.path} has no column {c!r} (columns: {', '.join(first.schema.names)}); "
                                   "a table needs sample_id, label, split and one column per modality")
        self.columns = self._choose(modalities)
        self._lock = threading.Lock()
        self._cursor: _Cursor | None = None
        self._digest: bytes | None = None
        self._read_keys()
        self.num_classes = self._check_keys(num_classes)
        self._check_values()
        self.specs = {c.name: ModalitySpec(c.name, c.kind, c.shape) for c in self.columns}  # type: ignore[arg-type]

    # -- where rows are ---------------------------------------------------------------------
    def _file_row(self, g: int) -> tuple[str, int]:
        """(file, row within it) of global row ``g``."""
        f = self.files[int(np.searchsorted(self.file_start, g, side="right")) - 1]
        return f.path, g - f.start

    def _where(self, g: int, column: str) -> str:
        """``table: FILE: column 'c', row r (sample_id s)`` for global row ``g``."""
        path, r = self._file_row(g)
        return f"{NAME}: {path}: column {column!r}, row {r} (sample_id {int(self.ids[g])})"

    # -- schema ----------------------------------------------------------------------------------
    def _choose(self, modalities: Sequence[str] | None) -> list[_Column]:
        first = self.files[0]
        fields = {f.name: f for f in first.schema}
        if modalities is None:
            pandas_index = {c for c in (first.schema.pandas_metadata or {}).get("index_columns", []) if isinstance(c, str)}
            names = [n for n in first.schema.names if n not in KEY_COLUMNS and n not in pandas_index]
            if not names:
                raise DatasetError(f"{NAME}: {first.path} has no modality columns (columns: {', '.join(first.schema.names)}); "
                                   "add one column per modality beside sample_id, label, split")
        else:
            names = list(dict.fromkeys(modalities))
            for n in names:
                if n in KEY_COLUMNS:
                    raise DatasetError(f"{NAME}: data.kwargs.modalities names {n!r}, which is a key column, not a modality")
                if n not in fields:
                    others = [c for c in first.schema.names if c not in KEY_COLUMNS]
                    raise DatasetError(f"{NAME}: {first.path} has no column {n!r} (data.kwargs.modalities); "
                                       f"its modality columns: {', '.join(others) or 'none'}")
        return [_describe(fields[n], first.path) for n in names]

    # -- pass 1: sample_id, label, split --------------------------------------------------------
    def _key_table(self, f: _File) -> pa.Table:
        try:
            if f.fmt == "parquet":
                return f.reader.read(columns=list(KEY_COLUMNS), use_threads=False)
            if f.fmt == "arrow":
                idx = [f.schema.get_field_index(c) for c in KEY_COLUMNS]
                keys = pa.ipc.open_file(pa.memory_map(f.path, "r"), options=pa.ipc.IpcReadOptions(included_fields=idx))
                batches = [keys.get_batch(i) for i in range(keys.num_record_batches)]
                f.seg_rows = [b.num_rows for b in batches]
                return pa.Table.from_batches(batches, schema=keys.schema).select(list(KEY_COLUMNS))
            return pa.Table.from_batches(f.reader, schema=f.schema).select(list(KEY_COLUMNS))
        except (pa.ArrowException, OSError) as e:
            raise DatasetError(f"{NAME}: {f.path} is damaged or unreadable: {e}") from None

    def _read_keys(self) -> None:
        ids, labels, splits, starts, seg_start, self.seg_file, self.seg_local = [], [], [], [], [0], [], []
        row = 0
        for fi, f in enumerate(self.files):
            t = self._key_table(f)
            f.start = row
            starts.append(row)
            for s, n in enumerate(f.seg_rows):
                seg_start.append(seg_start[-1] + n)
                self.seg_file.append(fi)
                self.seg_local.append(s)
            fid = self._integers(f, t.column("sample_id").combine_chunks(), "sample_id")
            ids.append(fid)
            labels.append(self._label_column(f, t.column("label").combine_chunks(), fid))
            splits.append(self._split(f, t.column("split").combine_chunks(), fid))  # (n,) split codes
            row += t.num_rows
        self.file_start = np.asarray(starts, dtype=np.int64)  # (F,) global row of each file's first row
        self.seg_start = np.asarray(seg_start, dtype=np.int64)  # (S + 1,) segment boundaries, global rows
        self.ids = np.concatenate(ids)  # (N,) int64
        self.labels, self.classes = self._class_ids(labels)  # (N,) int64; the class names of string labels, else None
        self.split_of = np.concatenate(splits)  # (N,) int8: index into TABLE_SPLITS
        self.is_test = self.split_of == TABLE_SPLITS.index("test")  # (N,) bool
        if self.seg_start[-1] != len(self.ids):
            raise DatasetError(f"{NAME}: {self.root}: the files' segments hold {self.seg_start[-1]} rows, their key "
                               f"columns {len(self.ids)}: a damaged file")

    def _label_column(self, f: _File, arr: pa.Array, ids: np.ndarray) -> np.ndarray | pa.Array:
        """The label column: (n,) int64 classes, or, for strings (a pandas categorical too), the
        (n,) string array as it is (the class of a name depends on every file's names)."""
        if isinstance(arr, pa.DictionaryArray):
            arr = arr.dictionary_decode()
        if pa.types.is_integer(arr.type):
            return self._integers(f, arr, "label", ids)
        if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
            raise DatasetError(f"{NAME}: {f.path}: column 'label' is {arr.type}; it must hold integer classes 0..C-1 "
                               "or strings (class names, numbered in sorted order)")
        if arr.null_count:
            r = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
            raise DatasetError(f"{NAME}: {f.path}: column 'label', row {r} (sample_id {int(ids[r])}): null label; "
                               "every row needs one")
        return arr.cast(pa.large_string())

    @staticmethod
    def _class_ids(parts: list) -> tuple[np.ndarray, list[str] | None]:
        """The labels of every file as (N,) int64 classes, and the class names: for string labels the
        distinct names in sorted order (code point order, as Python sorts them), name i = class i;
        None for integer labels."""
        if not parts or isinstance(parts[0], np.ndarray):
            return (np.concatenate(parts) if parts else np.zeros(0, np.int64)), None
        names = pa.concat_arrays(parts)  # (N,) strings
        classes = pc.unique(names)
        classes = classes.take(pc.array_sort_indices(classes))
        return pc.index_in(names, value_set=classes).to_numpy(zero_copy_only=False).astype(np.int64), classes.to_pylist()

    def _integers(self, f: _File, arr: pa.Array, column: str, ids: np.ndarray | None = None) -> np.ndarray:
        """An integer key column as (n,) int64 (``ids``: the file's sample_ids, to name rows by)."""
        if isinstance(arr, pa.DictionaryArray):
            arr = arr.dictionary_decode()
        if not pa.types.is_integer(arr.type):
            raise DatasetError(f"{NAME}: {f.path}: column {column!r} is {arr.type}; it must hold integers (int64)")
        if arr.null_count:
            r = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
            sid = "" if ids is None else f" (sample_id {int(ids[r])})"
            raise DatasetError(f"{NAME}: {f.path}: column {column!r}, row {r}{sid}: null {column}; every row needs one")
        x = arr.to_numpy(zero_copy_only=False)
        if x.dtype == np.uint64 and len(x) and x.max() > np.iinfo(np.int64).max:
            r = int(np.argmax(x > np.iinfo(np.int64).max))
            raise DatasetError(f"{NAME}: {f.path}: column {column!r}, row {r}: {column} {int(x[r])} does not fit int64")
        return x.astype(np.int64)

    def _split(self, f: _File, arr: pa.Array, ids: np.ndarray) -> np.ndarray:
        """The split column as (n,) int8 codes: the index of each row's split in :data:`TABLE_SPLITS`."""
        if isinstance(arr, pa.DictionaryArray):
            arr = arr.dictionary_decode()
        if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
            raise DatasetError(f"{NAME}: {f.path}: column 'split' is {arr.type}; it must hold the strings 'train', 'test' or 'val'")
        code = np.full(len(arr), -1, dtype=np.int8)  # (n,) -1: none of them
        for i, name in enumerate(TABLE_SPLITS):
            code[pc.fill_null(pc.equal(arr, name), False).to_numpy(zero_copy_only=False)] = i
        bad = np.flatnonzero(code < 0)
        if len(bad):
            r = int(bad[0])
            raise DatasetError(f"{NAME}: {f.path}: column 'split', row {r} (sample_id {int(ids[r])}): split "
                               f"{arr[r].as_py()!r} is not 'train', 'test' or 'val'")
        return code

    def _check_keys(self, num_classes: int | None) -> int:
        ids, labels = self.ids, self.labels
        order = np.argsort(ids, kind="stable")
        dup = np.flatnonzero(ids[order][1:] == ids[order][:-1])
        if len(dup):
            a, b = int(order[dup[0]]), int(order[dup[0] + 1])  # a < b: the stable sort keeps file order
            (pa_, ra), (pb, rb) = self._file_row(a), self._file_row(b)
            raise DatasetError(f"{NAME}: {pb}: column 'sample_id', row {rb}: sample_id {int(ids[b])} is already used by "
                               f"row {ra} of {pa_}; sample_ids must be unique across the table")
        if len(labels) and labels.min() < 0:
            g = int(np.argmax(labels < 0))
            raise DatasetError(f"{self._where(g, 'label')}: label {int(labels[g])} is negative; labels are classes "
                               "0..C-1 (or strings, class names): renumber them from 0")
        if self.classes is not None and num_classes is not None and num_classes != len(self.classes):
            raise DatasetError(f"{NAME}: {self.files[0].path}: column 'label' holds {len(self.classes)} class names "
                               f"({class_names(self.classes)}) and data.kwargs.num_classes is {num_classes}; set it to "
                               f"{len(self.classes)} or leave it out: string labels have one class per name")
        given = num_classes is not None
        if num_classes is None:
            num_classes = int(labels.max()) + 1 if len(labels) else 0
        elif len(labels) and labels.max() >= num_classes:
            g = int(np.argmax(labels >= num_classes))
            raise DatasetError(f"{self._where(g, 'label')}: label {int(labels[g])} is out of range 0..{num_classes - 1} "
                               f"(data.kwargs.num_classes: {num_classes})")
        for split in ("train", "test"):  # val is optional: a validation split where the table has one
            if not (self.split_of == TABLE_SPLITS.index(split)).any():
                files = self.files[0].path if len(self.files) == 1 else f"{self.root} ({len(self.files)} files)"
                raise DatasetError(f"{NAME}: {files}: column 'split' has no {split!r} rows ({len(ids)} rows in all); "
                                   "both splits need rows")
        if not given:
            self._check_train_classes(num_classes)
        return int(num_classes)

    def _check_train_classes(self, num_classes: int) -> None:
        """Refuse a class of ``0..num_classes-1`` that no train row has (a gap in the integer labels,
        or a class only test or val rows have): no model could learn it. ``data.kwargs.num_classes``
        keeps such a class on purpose (this check runs only without it)."""
        train = self.split_of == TABLE_SPLITS.index("train")  # (N,) bool
        missing = np.flatnonzero(np.bincount(self.labels[train], minlength=num_classes) == 0)
        if not len(missing):
            return
        k = int(missing[0])
        label = f"label {self.classes[k]!r}" if self.classes is not None else f"label {k}"
        rows = np.flatnonzero(self.labels == k)  # (r,) rows of other splits with it
        if len(rows):
            where = " and ".join(TABLE_SPLITS[i] for i in np.unique(self.split_of[rows]))
            raise DatasetError(f"{self._where(int(rows[0]), 'label')}: {label} is in no train row (only {where} rows "
                               f"have it), so no model can learn class {k}; give it train rows, or set "
                               f"data.kwargs.num_classes: {num_classes} to keep it as it is")
        g = int(np.argmax(self.labels))  # the first row with the largest label: it makes the range 0..max
        raise DatasetError(f"{self._where(g, 'label')}: label {int(self.labels[g])} makes the classes 0..{num_classes - 1}, "
                           f"but no row has label {k}; number the classes 0..C-1 without gaps, or set "
                           f"data.kwargs.num_classes: {num_classes} to keep class {k} empty")

    # -- pass 2: modality values, streamed ------------------------------------------------------
    def _chunk_rows(self, columns: Sequence[_Column]) -> int:
        return max(1, CHUNK_BYTES // max(1, sum(8 * max(c.numel, 1) for c in columns)))  # 8: float64 at most

    def _check_values(self) -> None:
        lists = [c for c in self.columns if c.layout == "list"]
        if lists and len(self.ids):  # a list column's length: its first row's
            first = next(s for s in range(len(self.seg_file)) if self.seg_start[s + 1] > self.seg_start[s])
            _, batch = next(self._scan(first, 0, 1, [c.name for c in lists], 1))
            widths = {}
            for c in lists:
                arr = batch.column(c.name)
                if arr.null_count:
                    raise DatasetError(f"{self._where(0, c.name)}: null value; every row needs one")
                widths[c.name] = int(pc.list_value_length(arr)[0].as_py())
                if widths[c.name] < 1:
                    raise DatasetError(f"{self._where(0, c.name)}: an empty list; a vector needs at least one value")
            self.columns = [_Column(c.name, c.kind, (widths[c.name],), c.value, c.layout) if c.layout == "list" else c
                            for c in self.columns]
        names, step = [c.name for c in self.columns], self._chunk_rows(self.columns)
        for s in range(len(self.seg_file)):
            n = int(self.seg_start[s + 1] - self.seg_start[s])
            for off, batch in self._scan(s, 0, n, names, step):
                for c in self.columns:
                    self._check_chunk(batch.column(c.name), c, int(self.seg_start[s]) + off)

    def _check_chunk(self, arr: pa.Array, c: _Column, g0: int) -> None:
        """Nulls, ragged lengths, NaN/inf in one chunk whose first row is global row ``g0``."""
        st = _storage(arr)
        if st.null_count:
            g = g0 + int(np.flatnonzero(st.is_null().to_numpy(zero_copy_only=False))[0])
            raise DatasetError(f"{self._where(g, c.name)}: null value; every row needs one")
        if c.layout == "list":
            lengths = pc.list_value_length(st).to_numpy(zero_copy_only=False)  # (R,)
            if (lengths != c.numel).any():
                r = int(np.argmax(lengths != c.numel))
                raise DatasetError(f"{self._where(g0 + r, c.name)}: a list of {int(lengths[r])} values where the first "
                                   f"row has {c.numel}; a vector column needs one length in every row")
        flat = st.flatten()
        if flat.null_count:
            g = g0 + int(np.flatnonzero(flat.is_null().to_numpy(zero_copy_only=False))[0]) // c.numel
            raise DatasetError(f"{self._where(g, c.name)}: a null value inside the row; every value must be a number")
        if c.value == "float":
            finite = np.isfinite(flat.to_numpy(zero_copy_only=False))  # (R * numel,)
            if not finite.all():
                i = int(np.argmin(finite))
                v = flat[i].as_py()
                at = (f"position {i % c.numel}" if c.kind == "vector"
                      else f"index {tuple(int(k) for k in np.unravel_index(i % c.numel, c.shape))} of {c.shape}")
                raise DatasetError(f"{self._where(g0 + i // c.numel, c.name)}: value {v} at {at}; "
                                   "modality values must be finite (no NaN or infinity)")

    # -- reading ---------------------------------------------------------------------------------
    def _scan(self, s: int, lo: int, hi: int, names: Sequence[str], step: int) -> Iterator[tuple[int, pa.RecordBatch]]:
        """Chunks ``(offset, batch)`` of segment ``s`` covering its rows ``[lo, hi)`` (a chunk may
        start before ``lo`` or end after ``hi``; ``offset`` is its first row within the segment)."""
        f, seg = self.files[self.seg_file[s]], self.seg_local[s]
        try:
            if f.fmt != "parquet":
                batch = f.batch(seg).select(list(names))
                for start in range(lo, hi, step):
                    yield start, batch.slice(start, min(step, hi - start))
                return
            key = (s, tuple(names), step)
            c = self._cursor
            if c is None or c.key != key or c.pos > lo:
                it = f.reader.iter_batches(batch_size=step, row_groups=[seg], columns=list(names), use_threads=False)
                c = self._cursor = _Cursor(key, 0, None, iter(it))
            while True:
                if c.batch is None:
                    c.batch = next(c.it, None)
                    if c.batch is None:
                        return
                end = c.pos + c.batch.num_rows
                if end > lo:
                    yield c.pos, c.batch
                if end >= hi:
                    return  # the batch stays held: the next consecutive read starts in it
                c.pos, c.batch = end, None
        except (pa.ArrowException, OSError) as e:
            self._cursor = None
            raise DatasetError(f"{NAME}: {f.path} is damaged or unreadable: {e}") from None

    def gather(self, rows: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Stored rows of the sorted global rows ``rows``: name -> (B, numel) float32 or uint8.
        Reads only the segments that hold them, a bounded chunk at a time."""
        cols = [c for c in self.columns if c.name in set(names)]
        out = {c.name: np.empty((len(rows), c.numel), dtype=np.uint8 if c.value == "uint8" else np.float32)
               for c in cols}  # (B, numel) each
        if not len(rows):
            return out
        step = self._chunk_rows(cols)
        segs = np.searchsorted(self.seg_start, rows, side="right") - 1  # (B,) segment of each row
        cuts = [0, *(np.flatnonzero(np.diff(segs)) + 1).tolist(), len(rows)]
        with self._lock:
            for k0, k1 in zip(cuts[:-1], cuts[1:]):
                s = int(segs[k0])
                local = rows[k0:k1] - self.seg_start[s]  # (b,) sorted rows within the segment
                for off, batch in self._scan(s, int(local[0]), int(local[-1]) + 1, [c.name for c in cols], step):
                    j0, j1 = np.searchsorted(local, [off, off + batch.num_rows])
                    if j1 > j0:
                        pick = local[j0:j1] - off
                        for c in cols:
                            out[c.name][k0 + j0:k0 + j1] = _to_rows(batch.column(c.name), c)[pick]
        return out

    def digest(self) -> bytes:
        """sha256 of every file's bytes, in order (streamed; once per table)."""
        if self._digest is None:
            h = hashlib.sha256()
            for f in self.files:
                h.update(f"|{os.path.getsize(f.path)}|".encode())
                with open(f.path, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
            self._digest = h.digest()
        return self._digest


_TABLES: dict[tuple, _Table] = {}  # the last tables built, so a table's second split does not read it again
_TABLES_LOCK = threading.Lock()


def _stamp(root: str) -> tuple:
    paths = _list_files(root)
    return tuple((os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths)


def _table(root: str, modalities: tuple[str, ...] | None, num_classes: int | None) -> _Table:
    """The validated table of ``root`` (built once for both splits while its files are unchanged)."""
    key = (_stamp(root), modalities, num_classes)
    with _TABLES_LOCK:
        t = _TABLES.get(key)
    if t is None:
        t = _Table(root, modalities, num_classes)
        with _TABLES_LOCK:
            if len(_TABLES) >= 2:
                _TABLES.pop(next(iter(_TABLES)))
            _TABLES[key] = t
    return t


# ----------------------------------------------------------------------------------------------
class TableDataset(PairedDataset):
    """One split of a validated table: ``sample_ids``/``labels`` in memory, modality rows read
    from the files on demand (:meth:`stored_batch`, and :meth:`_inputs` through the same decode
    as the data store)."""

    def __init__(self, table: _Table, split: str) -> None:
        self._table = table
        self.name, self.split, self.num_classes = NAME, split, table.num_classes
        self.classes = table.classes  # string labels: the class names, name i = class i (kept in the manifest)
        self._rows = np.flatnonzero(table.split_of == TABLE_SPLITS.index(split))  # (N,) global rows, file order
        self.source_splits = tuple(s for i, s in enumerate(TABLE_SPLITS) if (table.split_of == i).any())
        if not len(self._rows):  # only val can be empty (train and test are checked with the table)
            raise DatasetError(f"{NAME}: {table.root}: column 'split' has no {split!r} rows")
        self.sample_ids = table.ids[self._rows]  # (N,) int64
        self.labels = table.labels[self._rows]  # (N,) int64
        self.modalities = dict(table.specs)
        self._forms = {c.name: c.form() for c in table.columns}
        self.files = [f.path for f in table.files]

    def stored_forms(self) -> dict[str, StoredForm]:
        return dict(self._forms)

    def stored_batch(self, index: Sequence[int] | np.ndarray, modalities: Sequence[str]) -> dict[str, np.ndarray]:
        g = self._rows[np.asarray(index, dtype=np.int64)]  # (B,) global rows, in the order asked
        for m in modalities:
            self.spec(m)
        if len(g) < 2 or bool((np.diff(g) >= 0).all()):
            return self._table.gather(g, modalities)
        order = np.argsort(g, kind="stable")
        got = self._table.gather(g[order], modalities)
        out = {}
        for m, x in got.items():  # back to the order asked
            out[m] = np.empty_like(x)
            out[m][order] = x
        return out

    def _inputs(self, index: np.ndarray, modalities: Sequence[str]) -> dict[str, torch.Tensor]:
        rows = self.stored_batch(index, modalities)
        return {m: self._forms[m].decode(torch.from_numpy(rows[m]), self.modalities[m].shape) for m in modalities}

    def _hash_content(self, h: "hashlib._Hash") -> None:
        h.update(b"|table-v1|files:" + self._table.digest())
        for c in self._table.columns:
            h.update(f"|{c.name}:{c.layout}:{c.value}".encode())
        if self.classes is not None:  # string labels: the names each class number stands for
            h.update(b"|classes:" + "\x00".join(self.classes).encode())


def _schema(path: str) -> pa.Schema:
    """One file's schema, read from its footer or first message (no rows), by its magic bytes."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"PAR1":
        return pq.read_schema(path, memory_map=True)
    if head[:6] == b"ARROW1":
        return pa.ipc.open_file(pa.memory_map(path, "r")).schema
    if head[:4] == b"\xff\xff\xff\xff":
        return pa.ipc.open_stream(pa.memory_map(path, "r")).schema
    raise DatasetError(f"{NAME}: {path} is not a Parquet or Arrow IPC file")


def modalities_of(root: str | None, modalities: Sequence[str] | None = None, **_: Any) -> tuple[str, ...]:
    """The modality columns the table at ``root`` serves, from the first file's schema alone (no
    rows read): ``modalities`` when given, else every column but the keys and a pandas index.
    (Everything else is checked when a split is built.)"""
    if not root:
        raise DatasetError(f"dataset {NAME!r} reads a Parquet or Arrow file (or a folder of them): set data.root")
    if modalities is not None:
        return chosen_modalities(NAME, modalities, "column names")
    schema = _schema(_list_files(os.path.expanduser(os.fspath(root)))[0])
    pandas_index = {c for c in (schema.pandas_metadata or {}).get("index_columns", []) if isinstance(c, str)}
    return tuple(n for n in schema.names if n not in KEY_COLUMNS and n not in pandas_index)


@DATASETS.register(NAME, needs_root=True, modalities=None, num_classes=None, modalities_of=modalities_of,
                   splits=TABLE_SPLITS)
def table(split: str, root: str | None = None, modalities: Sequence[str] | None = None,
          num_classes: int | None = None) -> TableDataset:
    """A split of the Parquet/Arrow table at ``root`` (see the module docstring for the format)."""
    check_split(NAME, split, TABLE_SPLITS)
    if not root:
        raise ValueError(f"dataset {NAME!r} reads a Parquet or Arrow file (or a folder of them): set data.root")
    if modalities is not None and (isinstance(modalities, str) or not isinstance(modalities, Sequence) or not modalities
                                   or not all(isinstance(m, str) for m in modalities)):
        raise DatasetError(f"{NAME}: data.kwargs.modalities must be a non-empty list of column names, got {modalities!r}")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1):
        raise DatasetError(f"{NAME}: data.kwargs.num_classes must be a positive integer, got {num_classes!r}")
    mods = None if modalities is None else tuple(modalities)
    return TableDataset(_table(os.path.expanduser(os.fspath(root)), mods, num_classes), split)
