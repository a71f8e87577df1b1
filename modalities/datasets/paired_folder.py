"""Folders of images of several paired modalities (``paired-folder``): one image per modality per
sample, e.g. an RGB photo and a depth map, or a visible and a thermal frame, of the same object.

Layout under ``root``::

    root/<modality>/<split>/<class>/<sample>.<ext>        e.g. root/rgb/train/cat/0001.png
                                                                root/depth/train/cat/0001.png

Modalities are the sorted names of the (non-hidden) subfolders of ``root``, or the list given as
``modalities``. Image files are found recursively inside each class folder by extension (those of
``image-folder``: png, jpg, jpeg, bmp, gif, tif, tiff, webp, ppm, pgm, pbm, pnm; any case; hidden
files and other files ignored).

Pairing rule: the files of one sample are the files whose path relative to
``root/<modality>/<split>``, without its extension, is the same in every modality: ``cat/0001``
pairs ``rgb/train/cat/0001.png`` with ``depth/train/cat/0001.jpg`` (extensions may differ
between modalities, so PNG depth maps pair with JPEG photos). A sample present in one modality and
not in another is a :class:`~modalities.datasets.base.DatasetError` naming the file and the
modality folder that lacks it; so is a sample filed under a different class in another modality
(naming both files), two files of one sample in one modality (``0001.png`` and ``0001.jpg``),
and class folders that differ between modalities.

Classes are the sorted class folder names of the train split (the same in every modality); a
class's label is its position in that list. The test split may lack classes, not add any.

Split: the folders. ``sample_id``: train = position of the sample in the sorted order of its
paired path (``class/name``); test = ``10**9`` + its position in the test split's sorted order,
as in ``image-folder``. Ids are unique across both splits.

Each modality is decoded like ``image-folder`` (PIL, converted to RGB for ``channels=3`` or grey
for ``channels=1``, resized to ``image_size`` x ``image_size`` with the antialiased bilinear filter,
aspect ratio not kept) only when rows are asked for: the data store decodes each file once, a
batch at a time, and keeps it as uint8 (so the folders may be larger than memory). A modality is
served as a float32 (channels, image_size, image_size) tensor: pixel / 255, then with
``normalize=True`` (default) standardised per channel with that modality's train-split mean and
std at that size (one streamed decoding pass over the train files, one image in memory at a time;
building ``test`` reads the train images too; cached per folder contents). ``image_size`` and
``channels`` are one value for every modality or a mapping per modality, e.g.
``{channels: {rgb: 3, depth: 1}}``. The fingerprint hashes, per modality, the relative paths and
bytes of every file, the class names and the transform.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from modalities.datasets.base import DATASETS, DatasetError, PairedDataset, StoredForm, check_split, chosen_modalities
from modalities.datasets.digits import check_image_size
from modalities.datasets.image_folder import (IMAGE_EXTENSIONS, TEST_ID_OFFSET, _decode, _file_digest, _subdirs,
                                              streamed_stats)
from modalities.spec import ModalitySpec

NAME = "paired-folder"


class PairedImageDataset(PairedDataset):
    """Paired image files of several modalities, row-aligned, decoded lazily: ``paths[m][i]`` is row
    i's file of modality ``m`` (relative to ``root/<m>/<split>``). Nothing is decoded until rows are
    asked for; the data store reads the split once, a batch of files at a time, so the folders may
    be larger than memory."""

    def __init__(self, split: str, labels: np.ndarray, sample_ids: np.ndarray, classes: Sequence[str],
                 forms: Mapping[str, StoredForm], paths: Mapping[str, Sequence[str]], root: str,
                 sizes: Mapping[str, int], channels: Mapping[str, int]) -> None:
        self.name, self.split, self.num_classes = NAME, split, len(classes)
        self.classes = list(classes)
        self.labels = np.ascontiguousarray(labels, dtype=np.int64)
        self.sample_ids = np.ascontiguousarray(sample_ids, dtype=np.int64)
        self._forms = dict(forms)
        self.root = root
        self.paths = {m: list(p) for m, p in paths.items()}  # relative to root/<m>/<split>, in row order
        self._size, self._channels = dict(sizes), dict(channels)
        self.modalities = {m: ModalitySpec(m, "image", (self._channels[m], self._size[m], self._size[m])) for m in self.paths}

    def _file(self, m: str, i: int) -> str:
        return os.path.join(self.root, m, self.split, *self.paths[m][i].split("/"))

    def stored_forms(self) -> dict[str, StoredForm]:
        return dict(self._forms)

    def stored_batch(self, index, modalities) -> dict[str, np.ndarray]:
        idx = np.asarray(index, dtype=np.int64).reshape(-1)
        out = {}
        for m in modalities:
            rows = np.empty((idx.size, self.modalities[m].numel), dtype=np.uint8)  # (B, C*S*S)
            for k, i in enumerate(idx):
                rows[k] = _decode(self._file(m, int(i)), self._size[m], self._channels[m])[0].reshape(-1)
            out[m] = rows
        return out

    def _inputs(self, index: np.ndarray, modalities: Sequence[str]) -> dict[str, torch.Tensor]:
        rows = self.stored_batch(index, modalities)  # name -> (B, C*S*S) uint8
        return {m: self._forms[m].decode(torch.from_numpy(rows[m]), self.modalities[m].shape) for m in modalities}

    def _hash_content(self, h: "hashlib._Hash") -> None:
        """The class names, each modality's transform, and every file's relative path and sha256 (its
        bytes, read without decoding)."""
        h.update(b"|resize:pil-bilinear|classes:" + "\x00".join(self.classes).encode())
        for m in sorted(self.paths):
            h.update(f"|{m}:{self._forms[m].to_dict()}".encode())
            for i, rel in enumerate(self.paths[m]):
                h.update(b"|" + rel.encode() + b"\x00" + _file_digest(self._file(m, i)))


# ----------------------------------------------------------------------------------------------
def _modalities(root: str, modalities: Sequence[str] | None) -> list[str]:
    if not os.path.isdir(root):
        raise DatasetError(f"{NAME}: data directory {root} does not exist")
    found = _subdirs(root)
    if modalities is None:
        if not found:
            raise DatasetError(f"{NAME}: {root} has no modality folders (expected {root}/<modality>/<split>/<class>/...)")
        return found
    if isinstance(modalities, str) or not modalities:
        raise DatasetError(f"{NAME}: data.kwargs.modalities must be a non-empty list of folder names, got {modalities!r}")
    for m in modalities:
        if m not in found:
            raise DatasetError(f"{NAME}: {root} has no modality folder {m!r} (it has: {', '.join(found) or 'none'})")
    return list(dict.fromkeys(modalities))


def _per_modality(value: Any, mods: list[str], what: str) -> dict[str, Any]:
    """One value for every modality, or a mapping that names each."""
    if isinstance(value, Mapping):
        missing = [m for m in mods if m not in value]
        if missing:
            raise DatasetError(f"{NAME}: data.kwargs.{what} lacks modalities {', '.join(missing)}")
        return {m: value[m] for m in mods}
    return {m: value for m in mods}


def _classes(root: str, mods: list[str]) -> list[str]:
    """The train split's class folders, which every modality must share."""
    per = {}
    for m in mods:
        d = os.path.join(root, m, "train")
        if not os.path.isdir(d):
            raise DatasetError(f"{NAME}: missing folder {d} (expected {root}/{m}/train/<class>/...)")
        per[m] = _subdirs(d)
        if not per[m]:
            raise DatasetError(f"{NAME}: {d} has no class subfolders (expected {d}/<class>/<image files>)")
    first = mods[0]
    for m in mods[1:]:
        if per[m] != per[first]:
            a, b = os.path.join(root, first, "train"), os.path.join(root, m, "train")
            extra = [(c, b, a) for c in per[m] if c not in per[first]] + [(c, a, b) for c in per[first] if c not in per[m]]
            c, has, lacks = extra[0]
            raise DatasetError(f"{NAME}: class folders differ between modalities: {has} has class {c!r}, {lacks} has "
                               "not; every modality needs the same class folders")
    return per[first]


def _list(split_dir: str, classes: list[str]) -> dict[str, str]:
    """Paired path (``class/name``, no extension) -> relative file path, for one modality's split."""
    if not os.path.isdir(split_dir):
        raise DatasetError(f"{NAME}: missing folder {split_dir}")
    unknown = [c for c in _subdirs(split_dir) if c not in classes]
    if unknown:
        raise DatasetError(f"{NAME}: {split_dir} has class folders that are not in the train split: "
                           f"{', '.join(unknown)} (train classes: {', '.join(classes)})")
    out: dict[str, str] = {}
    for c in _subdirs(split_dir):
        for dirpath, dirnames, filenames in os.walk(os.path.join(split_dir, c), followlinks=True):
            dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
            for fn in sorted(filenames):
                stem, ext = os.path.splitext(fn)
                if fn.startswith(".") or ext.lower() not in IMAGE_EXTENSIONS:
                    continue
                rel = os.path.relpath(os.path.join(dirpath, fn), split_dir).replace(os.sep, "/")
                key = rel[: len(rel) - len(ext)]
                if key in out:
                    raise DatasetError(f"{NAME}: {os.path.join(split_dir, out[key])} and {os.path.join(split_dir, rel)} "
                                       "are the same sample twice (one file per sample per modality)")
                out[key] = rel
    return out


def _pair(root: str, split: str, mods: list[str], classes: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Sorted paired paths of the split and, per modality, the file of each (row order)."""
    files = {m: _list(os.path.join(root, m, split), classes) for m in mods}
    for a in mods:
        for b in mods:
            if a == b:
                continue
            by_name_b = {k.split("/", 1)[1]: k for k in files[b]}  # name without its class -> paired path
            for key, rel in files[a].items():
                if key in files[b]:
                    continue
                fa = os.path.join(root, a, split, rel)
                other = by_name_b.get(key.split("/", 1)[1])
                if other is not None and other not in files[a]:  # the same name under another class, unpaired in a
                    fb = os.path.join(root, b, split, files[b][other])
                    raise DatasetError(f"{NAME}: {fa} is class {key.split('/')[0]!r} but its pair {fb} is class "
                                       f"{other.split('/')[0]!r}; a sample has one class in every modality")
                raise DatasetError(f"{NAME}: {fa} has no pair in modality folder {os.path.join(root, b, split)} "
                                   f"(expected {os.path.join(root, b, split, key)}.<image extension>)")
    keys = sorted(files[mods[0]])
    if not keys:
        raise DatasetError(f"{NAME}: no image files under {os.path.join(root, mods[0], split)}")
    return keys, {m: [files[m][k] for k in keys] for m in mods}


_STATS: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _train_stats(root: str, m: str, rels: list[str], size: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean/std (pixel / 255) of modality ``m``'s train images, from one streamed pass
    (one image in memory at a time), cached per file listing."""
    sig = []
    for r in rels:
        st = os.stat(os.path.join(root, m, "train", *r.split("/")))
        sig.append((r, st.st_size, st.st_mtime_ns))
    key = (os.path.abspath(root), m, size, channels, tuple(sig))
    if key not in _STATS:
        if len(_STATS) > 16:
            _STATS.clear()
        _STATS[key] = streamed_stats(os.path.join(root, m, "train"), rels, size, channels)
    return _STATS[key]


def modalities_of(root: str | None, modalities: Sequence[str] | None = None, **_: Any) -> tuple[str, ...]:
    """The modality folders the dataset at ``root`` serves: ``modalities`` when given, else the
    sub-folders of ``root`` (a listing of one folder; the files are checked when a split is built)."""
    if not root:
        raise ValueError(f"dataset {NAME!r} reads its files from a directory: set data.root")
    if modalities is not None:
        return chosen_modalities(NAME, modalities, "folder names")
    return tuple(_modalities(os.path.expanduser(os.fspath(root)), None))


@DATASETS.register(NAME, needs_root=True, modalities=None, num_classes=None, modalities_of=modalities_of)
def paired_folder(split: str, root: str | None = None, modalities: Sequence[str] | None = None,
                  image_size: int | Mapping[str, int] = 32, channels: int | Mapping[str, int] = 3,
                  normalize: bool = True) -> PairedImageDataset:
    """A split of the paired image folders at ``root`` (see the module docstring for the layout)."""
    check_split(NAME, split)
    if not root:
        raise ValueError(f"dataset {NAME!r} reads its files from a directory: set data.root")
    root = os.path.expanduser(os.fspath(root))
    mods = _modalities(root, modalities)
    try:
        sizes = {m: check_image_size(s) for m, s in _per_modality(image_size, mods, "image_size").items()}
    except ValueError as e:
        raise DatasetError(f"{NAME}: {e}") from None
    chans = _per_modality(channels, mods, "channels")
    for m, c in chans.items():
        if c not in (1, 3):
            raise DatasetError(f"{NAME}: channels of {m!r} must be 1 (grey) or 3 (RGB), got {c!r}")
    classes = _classes(root, mods)
    keys, rels = _pair(root, split, mods, classes)
    train_rels = rels if split == "train" else (_pair(root, "train", mods, classes)[1] if normalize else None)
    forms = {}
    for m in mods:
        mean = std = None
        if normalize:  # one decoding pass over the train files of this modality
            mean, std = _train_stats(root, m, train_rels[m], sizes[m], chans[m])
            mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        forms[m] = StoredForm("uint8", 255.0, mean, std)
    index = {c: i for i, c in enumerate(classes)}
    labels = np.asarray([index[k.split("/", 1)[0]] for k in keys], dtype=np.int64)  # (N,)
    ids = np.arange(len(keys), dtype=np.int64) + (TEST_ID_OFFSET if split == "test" else 0)  # (N,)
    return PairedImageDataset(split, labels, ids, classes, forms, rels, root, sizes, chans)
