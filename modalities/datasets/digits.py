"""scikit-learn's handwritten digits (``digits``): 1797 grey 8x8 images, 10 classes.

Source: :func:`sklearn.datasets.load_digits` (the UCI optical recognition test set, shipped
inside scikit-learn, so nothing is downloaded). Raw pixel values are integers 0-16.

Split: fixed, ``stratified_split(labels, 0.25, seed=0)`` over the 1797 rows: 25 % of every
class goes to ``test`` (450 samples), the rest to ``train`` (1347). ``sample_id`` is the row
number in ``load_digits()`` (0..1796), so ids are unique across both splits.

The single modality ``image`` is a float32 (1, 8, 8) tensor: raw / 16 (in [0, 1]), then, with
``normalize=True`` (default), standardised with the mean and std of all train-split pixels
(one channel; the same numbers for both splits, see :func:`channel_stats`).

``image_size=S`` resizes to (1, S, S) with bilinear interpolation
(``torch.nn.functional.interpolate``, ``align_corners=False``, antialiased when shrinking),
e.g. ``image_size=28`` to feed digits to a teacher trained on 28x28 MNIST. The standardisation
constants stay the native-resolution train statistics (standardising is per-channel affine and
bilinear weights sum to one, so resizing before or after it gives the same tensor).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from modalities.datasets.base import DATASETS, ArrayDataset, DatasetError, check_split, stratified_split

NAME = "digits"
TEST_FRACTION = 0.25
SEED = 0
MAX_VALUE = 16.0


# ----------------------------------------------------------------------------------------------
# helpers shared with the other in-memory image datasets (mnist5k imports them)
# ----------------------------------------------------------------------------------------------
def per_channel_stats(images: np.ndarray, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (population) std per channel of ``scale * images`` ((N, C, H, W)), as float32 (C,) arrays.

    Accumulated in float64 one channel at a time; a constant channel gets std 1.
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise DatasetError(f"cannot compute channel statistics of an array of shape {images.shape}")
    mean = np.empty(images.shape[1], dtype=np.float64)
    std = np.empty(images.shape[1], dtype=np.float64)
    for c in range(images.shape[1]):
        ch = images[:, c].astype(np.float64) * scale
        mean[c] = ch.mean()
        std[c] = ch.std()
    std[std <= 0] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


def resize_images(x: np.ndarray, image_size: int | None) -> np.ndarray:
    """Bilinear resize of float (N, C, H, W) to (N, C, S, S); ``None`` (or the same size) is a no-op."""
    if image_size is None:
        return x
    size = check_image_size(image_size)
    if x.shape[2:] == (size, size):
        return x
    shrink = size < x.shape[2] or size < x.shape[3]
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return out.numpy()


def check_image_size(image_size: int) -> int:
    if isinstance(image_size, bool) or int(image_size) != image_size or int(image_size) < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    return int(image_size)


def standardize(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(x - mean) / std per channel of float (N, C, H, W) images."""
    return ((x - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)).astype(np.float32)


def split_image_dataset(
    name: str,
    split: str,
    images01: np.ndarray,
    labels: np.ndarray,
    is_test: np.ndarray,
    num_classes: int,
    normalize: bool,
    image_size: int | None,
) -> ArrayDataset:
    """One split of an in-memory image set: ``images01`` are all rows as float32 (N, C, H, W) in [0, 1].

    ``sample_id`` is the row number; standardisation uses the train rows' channel statistics.
    """
    check_split(name, split)
    rows = np.flatnonzero(is_test if split == "test" else ~is_test)
    x = images01[rows]
    if normalize:
        mean, std = per_channel_stats(images01[~is_test])
        x = standardize(x, mean, std)
    x = resize_images(x, image_size)
    return ArrayDataset(name, split, {"image": x}, labels[rows], rows.astype(np.int64), num_classes, {"image": "image"})


# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def load_raw() -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` exactly as scikit-learn gives them: float64 (1797, 8, 8) in 0..16, int64 (1797,)."""
    from sklearn.datasets import load_digits  # here, not at the top: only this dataset needs it (a 1-3 s import)

    d = load_digits()
    images = np.asarray(d.images, dtype=np.float64)
    labels = np.asarray(d.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def split_mask() -> np.ndarray:
    """The recorded split: boolean (1797,) mask of test rows."""
    return stratified_split(load_raw()[1], TEST_FRACTION, SEED)


def channel_stats() -> tuple[np.ndarray, np.ndarray]:
    """The standardisation constants: mean and std (shape (1,)) of the train split scaled to [0, 1]."""
    images, _ = load_raw()
    return per_channel_stats((images[~split_mask()] / MAX_VALUE)[:, None].astype(np.float32))


@DATASETS.register(NAME, needs_root=False, modalities=("image",), num_classes=10)
def digits(split: str, root: str | None = None, normalize: bool = True, image_size: int | None = None) -> ArrayDataset:
    images, labels = load_raw()
    x = (images / MAX_VALUE).astype(np.float32)[:, None]  # (N, 1, 8, 8)
    return split_image_dataset(NAME, split, x, labels, split_mask(), 10, normalize, image_size)
