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

Images are decoded eagerly when the split is built (PIL, converted to RGB for ``channels=3`` or
grey ``L`` for ``channels=1``, then resized to ``image_size`` x ``image_size`` with PIL's
antialiased bilinear filter, aspect ratio not kept) and held as uint8, which suits small and
medium folders (a million 32x32 RGB images take 3 GB). The single modality ``image`` is a
float32 (channels, image_size, image_size) tensor: pixel / 255, then, with ``normalize=True``
(default), standardised per channel with ``mean``/``std`` if given, else with the per-channel
mean and std of the train split at that size and channel count (so building ``test`` reads the
train images too; the result is cached per folder contents). The fingerprint hashes the
relative paths and the bytes of every file (digests taken when the file was read), the class
names, and the standardisation constants.
"""
from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from modalities.datasets.base import DATASETS, DatasetError, check_split
from modalities.datasets.cifar import UInt8ImageDataset
from modalities.datasets.digits import check_image_size, per_channel_stats

NAME = "image-folder"
TEST_ID_OFFSET = 10**9
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)


class ImageFolderDataset(UInt8ImageDataset):
    """Decoded images plus what they were read from: ``root`` (the split folder), ``paths``
    (relative posix paths, in row order) and ``classes``."""

    def __init__(self, *args, root: str, paths: Sequence[str], digests: Sequence[bytes], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.root = root
        self.paths = list(paths)
        self._digests = list(digests)

    def _hash_content(self, h: "hashlib._Hash") -> None:
        self._hash_transform(h)
        h.update(b"|resize:pil-bilinear|classes:" + "\x00".join(self.classes or []).encode())
        for rel, digest in zip(self.paths, self._digests):
            h.update(b"|" + rel.encode() + b"\x00" + digest)


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


def _decode(path: str, image_size: int, channels: int) -> tuple[np.ndarray, bytes]:
    """One file -> (uint8 (C, S, S), sha256 digest of its bytes)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DatasetError(f"{NAME}: cannot read image file {path}: {e}") from e
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


def _read_split(split_dir: str, classes: list[str], require_each: bool, image_size: int, channels: int):
    paths, labels = _list_images(split_dir, classes, require_each)
    images = np.empty((len(paths), channels, image_size, image_size), dtype=np.uint8)
    digests = []
    for i, rel in enumerate(paths):
        images[i], digest = _decode(os.path.join(split_dir, *rel.split("/")), image_size, channels)
        digests.append(digest)
    return images, labels, paths, digests


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
        images = _read_split(d, classes, True, image_size, channels)[0]
        mean, std = per_channel_stats(images, scale=1.0 / 255.0)
        if len(_STATS_CACHE) > 16:
            _STATS_CACHE.clear()
        _STATS_CACHE[key] = (mean, std)
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
    images, labels, paths, digests = _read_split(split_dir, classes, split == "train", image_size, channels)
    if normalize and mean is None:
        if split == "train":
            mean, std = per_channel_stats(images, scale=1.0 / 255.0)
        else:
            mean, std = train_stats(root, image_size, channels)
    ids = np.arange(len(labels), dtype=np.int64) + (TEST_ID_OFFSET if split == "test" else 0)
    return ImageFolderDataset(
        NAME, split, images, labels, ids, len(classes),
        mean=mean if normalize else None, std=std if normalize else None, classes=classes,
        root=split_dir, paths=paths, digests=digests,
    )
