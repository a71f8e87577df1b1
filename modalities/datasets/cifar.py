"""CIFAR-10 (``cifar10``) and CIFAR-100 (``cifar100``) read from the user's copy (``root``).

Layout: the standard "python version" archives, extracted:

* ``cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5`` (train), ``test_batch``,
  ``batches.meta`` (optional here: class names ``label_names``);
* ``cifar-100-python/``: ``train``, ``test``, ``meta`` (optional: ``fine_label_names``).

``root`` may be the folder that holds ``cifar-10-batches-py/`` (``cifar-100-python/``) or that
folder itself. Each file is a pickled dict with bytes keys: ``b"data"`` a uint8 (N, 3072) array
(row-major 3x32x32, channel planes R, G, B) and ``b"labels"`` (CIFAR-10) or ``b"fine_labels"``
(CIFAR-100, 100 classes; the 20 coarse labels are not used). Files are unpickled with a
restricted unpickler that only rebuilds numpy arrays, lists, bytes and numbers, so a hostile
file cannot run code. A missing directory/file or a malformed pickle raises
:class:`~modalities.datasets.base.DatasetError` naming the path and what is wrong.

Split: the official one. ``sample_id``: train = index in file order (``data_batch_1`` ..
``data_batch_5`` concatenated for CIFAR-10, ``train`` for CIFAR-100: 0..49999); test =
50000 + index in ``test_batch`` / ``test`` (50000..59999). Ids are unique across both splits.

The single modality ``image`` is a float32 (3, 32, 32) tensor: pixel / 255, then, with
``normalize=True`` (default), standardised per channel with the standard train-split
constants :data:`CIFAR10_MEAN`/:data:`CIFAR10_STD` (:data:`CIFAR100_MEAN`/:data:`CIFAR100_STD`),
the same for both splits. Images are kept in memory as uint8 (150 MB for the CIFAR-10 train
split) and converted per batch; the fingerprint hashes the uint8 pixels plus the
standardisation constants (which fully determine the float tensors).
"""
from __future__ import annotations

import hashlib
import importlib
import os
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from modalities.datasets.base import DATASETS, DatasetError, PairedDataset, StoredForm, check_split
from modalities.spec import ModalitySpec

CIFAR10_MEAN = (0.49139968, 0.48215841, 0.44653091)
CIFAR10_STD = (0.24703223, 0.24348513, 0.26158784)
CIFAR100_MEAN = (0.50707516, 0.48654887, 0.44091784)
CIFAR100_STD = (0.26733429, 0.25643846, 0.27615047)
TEST_ID_OFFSET = 50000
SIDE = 32


class UInt8ImageDataset(PairedDataset):
    """Images held as uint8 (N, C, H, W), served as float32 ``pixel / 255``, standardised per
    channel with ``mean``/``std`` when given. One modality, ``image``."""

    def __init__(
        self,
        name: str,
        split: str,
        images: np.ndarray,
        labels: np.ndarray,
        sample_ids: np.ndarray,
        num_classes: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        n = len(labels)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise DatasetError(f"dataset {name!r}: images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}")
        if len(sample_ids) != n or len(images) != n:
            raise DatasetError(f"dataset {name!r}: images, labels and sample_ids differ in length")
        if len(np.unique(sample_ids)) != n:
            raise DatasetError(f"dataset {name!r}: sample_ids are not unique")
        self.name, self.split, self.num_classes = name, split, int(num_classes)
        self.labels = np.ascontiguousarray(labels, dtype=np.int64)
        self.sample_ids = np.ascontiguousarray(sample_ids, dtype=np.int64)
        self.classes = list(classes) if classes is not None else None
        self._images = torch.from_numpy(np.ascontiguousarray(images))
        c = images.shape[1]
        if (mean is None) != (std is None):
            raise ValueError(f"dataset {name!r}: give both mean and std, or neither")
        if mean is not None:
            m = np.asarray(mean, dtype=np.float32).reshape(-1)
            s = np.asarray(std, dtype=np.float32).reshape(-1)
            if m.shape != (c,) or s.shape != (c,) or not np.all(s > 0):
                raise ValueError(f"dataset {name!r}: mean and std need {c} values (std > 0), got {list(m)} and {list(s)}")
            self.mean: torch.Tensor | None = torch.from_numpy(m).view(1, c, 1, 1)
            self.std: torch.Tensor | None = torch.from_numpy(s).view(1, c, 1, 1)
        else:
            self.mean = self.std = None
        self.modalities = {"image": ModalitySpec("image", "image", tuple(int(v) for v in images.shape[1:]))}

    def stored_forms(self) -> dict[str, StoredForm]:
        mean = None if self.mean is None else tuple(float(v) for v in self.mean.reshape(-1))
        std = None if self.std is None else tuple(float(v) for v in self.std.reshape(-1))
        return {"image": StoredForm("uint8", 255.0, mean, std)}

    def stored_batch(self, index, modalities) -> dict[str, np.ndarray]:
        idx = torch.from_numpy(np.ascontiguousarray(index, dtype=np.int64))
        return {m: self._images.index_select(0, idx).reshape(len(idx), -1).numpy() for m in modalities}

    def _inputs(self, index: np.ndarray, modalities: Sequence[str]) -> dict[str, torch.Tensor]:
        idx = torch.from_numpy(np.ascontiguousarray(index, dtype=np.int64))
        rows = self._images.index_select(0, idx)  # (B, C, H, W) uint8
        x = self.stored_forms()["image"].decode(rows.reshape(len(idx), -1), rows.shape[1:])
        return {m: x for m in modalities}

    def _hash_transform(self, h: "hashlib._Hash") -> None:
        if self.mean is None:
            h.update(b"|pixel/255")
        else:
            h.update(b"|pixel/255|mean" + self.mean.numpy().tobytes() + b"|std" + self.std.numpy().tobytes())

    def _hash_content(self, h: "hashlib._Hash") -> None:
        self._hash_transform(h)
        h.update(self._images.numpy().tobytes())


# ----------------------------------------------------------------------------------------------
# reading the pickles
# ----------------------------------------------------------------------------------------------
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the globals needed to rebuild numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (only numpy arrays are allowed)")
        if module.startswith("numpy.core."):  # pickles written by numpy 1.x; numpy 2 renamed it
            alt = "numpy._core." + module[len("numpy.core."):]
            try:
                return getattr(importlib.import_module(alt), name)
            except (ImportError, AttributeError):
                pass
        return super().find_class(module, name)


def _unpickle(path: str, name: str) -> dict[Any, Any]:
    if not os.path.isfile(path):
        raise DatasetError(f"{name}: missing file {path}")
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except OSError as e:
        raise DatasetError(f"{name}: cannot read {path}: {e}") from e
    except Exception as e:  # any unpickling failure: truncated, not a pickle, forbidden global...
        raise DatasetError(f"{name}: {path} is not a valid CIFAR pickle: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict):
        raise DatasetError(f"{name}: {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def _field(d: dict[Any, Any], key: str, path: str, name: str) -> Any:
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    have = ", ".join(repr(k) for k in d)
    raise DatasetError(f"{name}: {path} lacks key {key.encode()!r} (has: {have})")


def _read_batch(path: str, name: str, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One pickle -> (uint8 (N, 3, 32, 32), int64 (N,))."""
    d = _unpickle(path, name)
    data = _field(d, "data", path, name)
    labels = _field(d, label_key, path, name)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * SIDE * SIDE:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{name}: {path}: 'data' must be a uint8 (N, 3072) array, got {desc}")
    try:
        y = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{name}: {path}: '{label_key}' is not a list of integers: {e}") from e
    if len(y) != len(data):
        raise DatasetError(f"{name}: {path}: {len(data)} images but {len(y)} labels")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DatasetError(f"{name}: {path}: labels must lie in 0..{num_classes - 1}, found {y.min()}..{y.max()}")
    return data.reshape(-1, 3, SIDE, SIDE), y


def _read_names(path: str, name: str, key: str, num_classes: int) -> list[str] | None:
    """Class names from the meta file, or None where the file is absent."""
    if not os.path.exists(path):
        return None
    names = _field(_unpickle(path, name), key, path, name)
    if not isinstance(names, (list, tuple)) or len(names) != num_classes:
        raise DatasetError(f"{name}: {path}: '{key}' must list {num_classes} class names")
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names]


def resolve_dir(root: str | None, folder: str, name: str) -> str:
    """``root/folder`` if it exists, else ``root`` itself (the user pointed at the batches folder)."""
    if not root:
        raise ValueError(f"dataset {name!r} reads its files from a directory: set data.root")
    root = os.path.expanduser(os.fspath(root))
    if not os.path.isdir(root):
        raise DatasetError(f"{name}: data directory {root} does not exist (expected it to hold {folder}/)")
    sub = os.path.join(root, folder)
    return sub if os.path.isdir(sub) else root


def _load(
    name: str,
    split: str,
    root: str | None,
    folder: str,
    files: dict[str, list[str]],
    label_key: str,
    num_classes: int,
    meta: tuple[str, str],
    mean: Sequence[float],
    std: Sequence[float],
    normalize: bool,
) -> UInt8ImageDataset:
    check_split(name, split)
    d = resolve_dir(root, folder, name)
    missing = [f for f in files[split] if not os.path.isfile(os.path.join(d, f))]
    if missing:
        raise DatasetError(
            f"{name}: missing {', '.join(os.path.join(d, f) for f in missing)} "
            f"(root must be the folder holding {folder}/ or {folder}/ itself)"
        )
    parts = [_read_batch(os.path.join(d, f), name, label_key, num_classes) for f in files[split]]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    ids = np.arange(len(labels), dtype=np.int64) + (TEST_ID_OFFSET if split == "test" else 0)
    classes = _read_names(os.path.join(d, meta[0]), name, meta[1], num_classes)
    return UInt8ImageDataset(
        name, split, images, labels, ids, num_classes,
        mean=mean if normalize else None, std=std if normalize else None, classes=classes,
    )


CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR100_FILES = {"train": ["train"], "test": ["test"]}


@DATASETS.register("cifar10", needs_root=True, modalities=("image",), num_classes=10)
def cifar10(split: str, root: str | None = None, normalize: bool = True) -> UInt8ImageDataset:
    return _load(
        "cifar10", split, root, "cifar-10-batches-py", CIFAR10_FILES, "labels", 10,
        ("batches.meta", "label_names"), CIFAR10_MEAN, CIFAR10_STD, normalize,
    )


@DATASETS.register("cifar100", needs_root=True, modalities=("image",), num_classes=100)
def cifar100(split: str, root: str | None = None, normalize: bool = True) -> UInt8ImageDataset:
    return _load(
        "cifar100", split, root, "cifar-100-python", CIFAR100_FILES, "fine_labels", 100,
        ("meta", "fine_label_names"), CIFAR100_MEAN, CIFAR100_STD, normalize,
    )
