"""UCI Multiple Features (``uci-mfeat``): the embedded default dataset.

2000 handwritten digits (200 per class), each described by six paired views of the same
digit, so every sample carries six modalities; a teacher on one view and a student on another
is cross-modal distillation on real paired data. Shipped inside the package
(``modalities/data/uci_mfeat.npz``; source, citation and licence in ``modalities/data/README.md``).

Views: ``fou`` (76 Fourier coefficients), ``fac`` (216 profile correlations), ``kar`` (64
Karhunen-Loeve coefficients), ``pix`` (240 pixel averages: a 1x16x15 image, values 0-6),
``zer`` (47 Zernike moments), ``mor`` (6 morphological features).

Split: fixed and recorded in the data file (``is_test``): 50 test samples per class (500),
150 train per class (1500), drawn once with ``stratified_split(labels, 0.25, seed=0)``.
``sample_id`` is the row number in the original UCI files (class-major: ids 200c..200c+199 are
digit c). Vector views are standardised with the train split's mean and std (``normalize``);
``pix`` is scaled to [0, 1].
"""
from __future__ import annotations

import functools
from importlib import resources

import numpy as np

from modalities.datasets.base import DATASETS, ArrayDataset, DatasetError

VIEWS = ("fou", "fac", "kar", "pix", "zer", "mor")
DATA_FILE = "uci_mfeat.npz"


@functools.lru_cache(maxsize=1)
def load_raw() -> dict[str, np.ndarray]:
    """The shipped arrays exactly as stored (raw UCI values as float32, labels, is_test)."""
    path = resources.files("modalities") / "data" / DATA_FILE
    try:
        with resources.as_file(path) as p, np.load(p) as z:
            raw = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise DatasetError(f"uci-mfeat: cannot read the shipped data file {path}: {e}") from e
    missing = set(VIEWS + ("labels", "is_test")) - set(raw)
    if missing:
        raise DatasetError(f"uci-mfeat: {path} lacks arrays {sorted(missing)}")
    return raw


@DATASETS.register("uci-mfeat", needs_root=False, modalities=VIEWS, num_classes=10)
def uci_mfeat(split: str, root: str | None = None, normalize: bool = True) -> ArrayDataset:
    raw = load_raw()
    labels = raw["labels"].astype(np.int64)
    is_test = raw["is_test"].astype(bool)
    rows = np.flatnonzero(is_test if split == "test" else ~is_test)
    train = ~is_test
    arrays: dict[str, np.ndarray] = {}
    for v in VIEWS:
        x = raw[v].astype(np.float32)
        if v == "pix":
            x = (x / 6.0).reshape(-1, 1, 16, 15)
        elif normalize:
            mean, std = x[train].mean(0), x[train].std(0)
            x = (x - mean) / np.where(std > 0, std, 1.0)
        arrays[v] = x[rows]
    kinds = {v: ("image" if v == "pix" else "vector") for v in VIEWS}
    return ArrayDataset("uci-mfeat", split, arrays, labels[rows], rows.astype(np.int64), 10, kinds)
