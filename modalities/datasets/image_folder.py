"""A generic folder of labelled images (``image-folder``), torchvision ``ImageFolder`` style.

Layout under ``root``::

    root/train/<class>/<image files>     root/test/<class>/<image files>

Classes are the sorted names of the (non-hidden) subfolders of ``root/train``; a class's label
is its position in that list, so ``num_classes`` depends on the data (the registry records
``num_classes=None``). Image files are found recursively inside each class folder by extension
(:data:`IMAGE_EXTENSIONS`, case-insensitive; hidden files and other files are ignored). The test
split may lack classes, but a folder under ``root/test`` that is not a train class raises
:class:`~modalities.datasets.base.DatasetError`; so do a missing or empty ``root``,
``root/train``, ``root/test`` or train class folder, and an unreadable image (naming the file).

Split: the folders. ``sample_id``: train = position of the file in the sorted order of the
paths relative to ``root/train`` (posix ``class/name.png``); test = ``10**9`` + position in
the sorted order of the paths relative to ``root/test``. Ids are unique across both splits.

Building a split lists the files; images are decoded only when rows are asked for (PIL,
converted to RGB for ``channels=3`` or grey ``L`` for ``channels=1``, then resized to
``image_size`` x ``image_size`` with PIL's antialiased bilinear filter, aspect ratio not kept).
The data store (``ensemble_kd.storage.datastore``) decodes each file once, a batch at a time, and keeps it
as uint8 at that size (3 KB per 32x32 RGB image), so the folder may be larger than memory. The
single modality ``image`` is a float32 (channels, image_size, image_size) tensor: pixel / 255,
then, with ``normalize=True`` (default), standardised per channel with ``mean``/``std`` if given,
else with the per-channel mean and std of the train split at that size and channel count (one
decoding pass over the train files, one image in memory at a time, from exact integer sums; so
building ``test`` reads the train images too; the result is cached per folder contents). The
fingerprint hashes the relative paths and the bytes of every file (read without decoding), the
class names, and the standardisation constants.
"""
from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from modalities.datasets.base import DATASETS, DatasetError, PairedDataset, StoredForm, check_split
from modalities.datasets.digits import check_image_size
from modalities.spec import ModalitySpec

NAME = "image-folder"
TEST_ID_OFFSET = 10**9
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)


class ImageFolderDataset(PairedDataset):
    """A listed image folder, decoded lazily: ``root`` (the split folder), ``paths`` (relative posix
    paths, in row order), ``classes``, and the per-channel ``mean``/``std`` ((1, C, 1, 1) float32, or
    None). Nothing is decoded until rows are asked for (``stored_batch``, ``get_batch``): the data
    store reads the split once, a batch of files at a time, so a folder larger than memory works."""

    def __init__(self, name: str, split: str, labels: np.ndarray, sample_ids: np.ndarray, num_classes: int, *,
                 root: str, paths: Sequence[str], classes: Sequence[str], image_size: int, channels: int,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        self.name, self.split, self.num_classes = name, split, int(num_classes)
        self.labels = np.ascontiguousarray(labels, dtype=np.int64)
        self.sample_ids = np.ascontiguousarray(sample_ids, dtype=np.int64)
        self.root, self.paths, self.classes = root, list(paths), list(classes)
        self.image_size, self.channels = int(image_size), int(channels)
        self.modalities = {"image": ModalitySpec("image", "image", (self.channels, self.image_size, self.image_size))}
        if mean is not None:
            m = np.asarray(mean, dtype=np.float32).reshape(-1)
            sd = np.asarray(std, dtype=np.float32).reshape(-1)
            if m.shape != (self.channels,) or sd.shape != (self.channels,) or not np.all(sd > 0):
                raise ValueError(f"{NAME}: mean and std need {self.channels} values (std > 0), got {list(m)} and {list(sd)}")
            self.mean: torch.Tensor | None = torch.from_numpy(m).view(1, -1, 1, 1)
            self.std: torch.Tensor | None = torch.from_numpy(sd).view(1, -1, 1, 1)
        else:
            self.mean = self.std = None

    def stored_forms(self) -> dict[str, StoredForm]:
        if self.mean is None:
            return {"image": StoredForm("uint8", 255.0)}
        return {"image": StoredForm("uint8", 255.0, tuple(float(v) for v in self.mean.reshape(-1)),
                                    tuple(float(v) for v in self.std.reshape(-1)))}

    def _decode_rows(self, index) -> np.ndarray:
        """(B, C*S*S) uint8: the files at positions ``index``, decoded and resized."""
        idx = np.asarray(index, dtype=np.int64).reshape(-1)
        out = np.empty((idx.size, self.channels * self.image_size * self.image_size), dtype=np.uint8)
        for k, i in enumerate(idx):
            out[k] = _decode(os.path.join(self.root, *self.paths[i].split("/")), self.image_size, self.channels)[0].reshape(-1)
        return out

    def stored_batch(self, index, modalities) -> dict[str, np.ndarray]:
        rows = self._decode_rows(index)
        return {m: rows for m in modalities}

    def _inputs(self, index: np.ndarray, modalities: Sequence[str]) -> dict[str, torch.Tensor]:
        x = self.stored_forms()["image"].decode(torch.from_numpy(self._decode_rows(index)), self.modalities["image"].shape)
        return {m: x for m in modalities}

    def _hash_content(self, h: "hashlib._Hash") -> None:
        """The transform, the class names, and every file's relative path and sha256 (its bytes,
        read without decoding)."""
        if self.mean is None:
            h.update(b"|pixel/255")
        else:
            h.update(b"|pixel/255|mean" + self.mean.numpy().tobytes() + b"|std" + self.std.numpy().tobytes())
        h.update(b"|resize:pil-bilinear|classes:" + "\x00".join(self.classes).encode())
        for rel in self.paths:
            h.update(b"|" + rel.encode() + b"\x00" + _file_digest(os.path.join(self.root, *rel.split("/"))))


# ----------------------------------------------------------------------------------------------
def _subdirs(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _split_dir(root: str, split: str) -> str:
    if not os.path.isdir(root):
        raise DatasetError(f"{NAME}: data directory {root} does not exist")
    d = os.path.join(root, split)
    if not os.path.isdir(d):
        raise DatasetError(f"{NAME}: missing folder {d} (expected {root}/train/<class>/... and {root}/test/<class>/...)")
    return d


def train_classes(root: str) -> list[str]:
    d = _split_dir(root, "train")
    classes = _subdirs(d)
    if not classes:
        raise DatasetError(f"{NAME}: {d} has no class subfolders (expected {d}/<class>/<image files>)")
    return classes


def _list_images(split_dir: str, classes: list[str], require_each: bool) -> tuple[list[str], np.ndarray]:
    """Sorted relative paths of the images under ``split_dir/<class>/`` and their labels."""
    index = {c: i for i, c in enumerate(classes)}
    found = _subdirs(split_dir)
    unknown = [c for c in found if c not in index]
    if unknown:
        raise DatasetError(
            f"{NAME}: {split_dir} has class folders that are not in the train split: {', '.join(unknown)} "
            f"(train classes: {', '.join(classes)})"
        )
    paths: list[tuple[str, int]] = []
    for c in found:
        n_before = len(paths)
        for dirpath, dirnames, filenames in os.walk(os.path.join(split_dir, c), followlinks=True):
            dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
            for fn in filenames:
                if fn.startswith(".") or os.path.splitext(fn)[1].lower() not in IMAGE_EXTENSIONS:
                    continue
                rel = os.path.relpath(os.path.join(dirpath, fn), split_dir).replace(os.sep, "/")
                paths.append((rel, index[c]))
        if require_each and len(paths) == n_before:
            raise DatasetError(f"{NAME}: class folder {os.path.join(split_dir, c)} has no image files")
    if not paths:
        raise DatasetError(f"{NAME}: no image files under {split_dir} (expected {split_dir}/<class>/<image files>)")
    paths.sort()
    return [p for p, _ in paths], np.asarray([y for _, y in paths], dtype=np.int64)


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DatasetError(f"{NAME}: cannot read image file {path}: {e}") from e


def _file_digest(path: str) -> bytes:
    return hashlib.sha256(_read_bytes(path)).digest()


def _decode(path: str, image_size: int, channels: int) -> tuple[np.ndarray, bytes]:
    """One file -> (uint8 (C, S, S), sha256 digest of its bytes)."""
    data = _read_bytes(path)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            im = im.convert("L" if channels == 1 else "RGB")
            if im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as e:  # PIL raises many kinds: UnidentifiedImageError, OSError, SyntaxError, ...
        raise DatasetError(f"{NAME}: cannot decode image file {path}: {type(e).__name__}: {e}") from e
    arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr), hashlib.sha256(data).digest()


def streamed_stats(split_dir: str, paths: Sequence[str], image_size: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) std of pixel / 255 over the files, decoded one at a time
    (memory: one image): exact integer sums of the pixels and of their squares, so the result does
    not depend on the order or on how many images there are. A constant channel gets std 1."""
    n = 0
    s = np.zeros(channels, dtype=np.int64)  # (C,) sum of pixel values
    q = np.zeros(channels, dtype=np.int64)  # (C,) sum of squared pixel values
    for rel in paths:
        img = _decode(os.path.join(split_dir, *rel.split("/")), image_size, channels)[0].astype(np.int64)  # (C, S, S)
        s += img.sum(axis=(1, 2))
        q += (img * img).sum(axis=(1, 2))
        n += image_size * image_size
    if n == 0:
        raise DatasetError(f"{NAME}: no images under {split_dir} to compute channel statistics from")
    mean = s / n  # (C,) float64, in pixel units
    var = np.maximum(q / n - mean * mean, 0.0)
    std = np.sqrt(var) / 255.0
    std[std <= 0] = 1.0
    return (mean / 255.0).astype(np.float32), std.astype(np.float32)


_STATS_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def train_stats(root: str, image_size: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of the train split's images (pixel / 255) at this size and channel count."""
    classes = train_classes(root)
    d = os.path.join(root, "train")
    paths, _ = _list_images(d, classes, True)
    signature = []
    for rel in paths:
        st = os.stat(os.path.join(d, *rel.split("/")))
        signature.append((rel, st.st_size, st.st_mtime_ns))
    key = (os.path.abspath(d), image_size, channels, tuple(signature))
    if key not in _STATS_CACHE:
        if len(_STATS_CACHE) > 16:
            _STATS_CACHE.clear()
        _STATS_CACHE[key] = streamed_stats(d, paths, image_size, channels)
    return _STATS_CACHE[key]


@DATASETS.register(NAME, needs_root=True, modalities=("image",), num_classes=None)
def image_folder(
    split: str,
    root: str | None = None,
    image_size: int = 32,
    channels: int = 3,
    normalize: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ImageFolderDataset:
    check_split(NAME, split)
    if not root:
        raise ValueError(f"dataset {NAME!r} reads its files from a directory: set data.root")
    image_size = check_image_size(image_size)
    if channels not in (1, 3):
        raise ValueError(f"{NAME}: channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    if (mean is None) != (std is None):
        raise ValueError(f"{NAME}: give both mean and std, or neither")
    root = os.path.expanduser(os.fspath(root))
    classes = train_classes(root)
    split_dir = _split_dir(root, split)
    paths, labels = _list_images(split_dir, classes, split == "train")
    if normalize and mean is None:
        mean, std = train_stats(root, image_size, channels)  # one decoding pass over the train files
    ids = np.arange(len(labels), dtype=np.int64) + (TEST_ID_OFFSET if split == "test" else 0)
    return ImageFolderDataset(
        NAME, split, labels, ids, len(classes), root=split_dir, paths=paths, classes=classes,
        image_size=image_size, channels=channels, mean=mean if normalize else None, std=std if normalize else None,
    )
