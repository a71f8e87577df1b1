"""The dataset contract and its registry.

A dataset yields samples ``{"sample_id": int, "label": int, "inputs": {modality: tensor}}``:
a stable id (the join key between the student's data and the teachers' shards), a label, and
one tensor per named modality (several paired views of the same object for multi-view data).
Splits are fixed and recorded, so that the same name + split always means the same samples.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch

from modalities.errors import ProjectError
from modalities.registry import Registry
from modalities.spec import ModalitySpec

SPLITS = ("train", "test")


class DatasetBuilder(Protocol):
    def __call__(self, split: str, root: str | None = None, **kwargs: Any) -> "PairedDataset": ...


DATASETS: Registry[DatasetBuilder] = Registry("dataset")
"""Registered datasets. Metadata: ``needs_root`` (bool: data come from a user directory),
``modalities`` (tuple of modality names, for a dataset whose modalities are fixed), ``num_classes``,
and, for a dataset whose modalities depend on its config, ``modalities_of``: a callable
``(root, **kwargs) -> names`` that says which modalities ``build_dataset(name, split, root,
**kwargs)`` would serve without reading any rows (a table's schema, synthetic's options,
paired-folder's sub-folders), so that a config naming a modality the dataset lacks is refused
before any work (:func:`dataset_modalities`); ``splits``, for a dataset that may serve more splits
than :data:`SPLITS` (a table's ``val`` rows)."""


class DatasetError(ValueError, ProjectError):
    """A dataset that cannot be read: names the file or directory and what is wrong."""


@dataclass(frozen=True)
class StoredForm:
    """How one modality is kept on disk (the data store) and turned back into the float32 tensor
    the encoders read: ``float32`` rows as they are, or ``uint8`` rows (decoded images) divided by
    ``divisor``, then standardised per channel with ``mean``/``std`` when given. :meth:`decode` is
    the one implementation of that transform (the in-memory uint8 datasets call it too), so a
    stored dataset serves bit for bit the tensors its source served."""

    dtype: Literal["float32", "uint8"] = "float32"
    divisor: float | None = None  # uint8: pixel / divisor (255.0)
    mean: tuple[float, ...] | None = None  # per channel, after the division
    std: tuple[float, ...] | None = None

    def decode(self, rows: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """(B, numel) stored rows -> (B, *shape) float32 (a new tensor)."""
        x = rows.reshape(rows.shape[0], *shape)
        if self.dtype == "float32":
            return x.to(torch.float32, copy=True)
        x = x.to(torch.float32).div_(float(self.divisor or 1.0))
        if self.mean is not None:
            c = len(self.mean)
            m = torch.tensor(self.mean, dtype=torch.float32).view(1, c, *([1] * (x.dim() - 2)))
            s = torch.tensor(self.std, dtype=torch.float32).view(1, c, *([1] * (x.dim() - 2)))
            x = x.sub_(m).div_(s)
        return x

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "divisor": self.divisor,
                "mean": None if self.mean is None else list(self.mean), "std": None if self.std is None else list(self.std)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StoredForm":
        mean, std = d.get("mean"), d.get("std")
        return cls(d.get("dtype", "float32"), d.get("divisor"), None if mean is None else tuple(float(v) for v in mean),
                   None if std is None else tuple(float(v) for v in std))


class PairedDataset(torch.utils.data.Dataset):
    """Base class of every dataset: samples with ids, labels and named modality tensors.

    Subclasses set ``name``, ``split``, ``num_classes``, ``modalities`` (name -> ModalitySpec),
    ``sample_ids`` (N,) int64 and ``labels`` (N,) int64, and implement ``_inputs(index)``. A
    dataset whose classes have names sets ``classes`` (name i is class i: a table's string labels,
    an image folder's class folders): the data store keeps it in the split's manifest and
    ``ensemble-kd data prepare`` shows it (:func:`class_names`).
    """

    name: str
    split: str
    num_classes: int
    modalities: dict[str, ModalitySpec]
    sample_ids: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.sample_ids.shape[0])

    def _inputs(self, index: np.ndarray, modalities: Sequence[str]) -> dict[str, torch.Tensor]:
        """Batch of inputs for the rows ``index`` (positions, not ids): name -> (B, *shape)."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict[str, Any]:
        idx = np.asarray([i])
        return {
            "sample_id": int(self.sample_ids[i]),
            "label": int(self.labels[i]),
            "inputs": {k: v[0] for k, v in self._inputs(idx, list(self.modalities)).items()},
        }

    def get_batch(self, index: Sequence[int] | np.ndarray, modalities: Sequence[str] | None = None) -> dict[str, Any]:
        """Vectorised access for the rows at positions ``index``.

        Returns ``{"sample_id": (B,) int64, "label": (B,) int64, "inputs": {m: (B, *shape)}}``.
        """
        idx = np.asarray(index, dtype=np.int64)
        mods = list(self.modalities) if modalities is None else list(modalities)
        for m in mods:
            self.spec(m)
        return {
            "sample_id": torch.from_numpy(self.sample_ids[idx].copy()),
            "label": torch.from_numpy(self.labels[idx].copy()),
            "inputs": self._inputs(idx, mods),
        }

    def stored_forms(self) -> dict[str, StoredForm]:
        """How each modality is written to the data store (default: float32 rows as served)."""
        return {m: StoredForm() for m in self.modalities}

    def stored_batch(self, index: Sequence[int] | np.ndarray, modalities: Sequence[str]) -> dict[str, np.ndarray]:
        """The rows at positions ``index`` in their stored form: name -> (B, numel) array of the
        :meth:`stored_forms` dtype, such that ``form.decode`` gives back :meth:`get_batch`'s tensors."""
        idx = np.asarray(index, dtype=np.int64)
        x = self._inputs(idx, list(modalities))
        return {m: np.ascontiguousarray(x[m].reshape(len(idx), -1).numpy(), dtype=np.float32) for m in modalities}

    def spec(self, modality: str) -> ModalitySpec:
        try:
            return self.modalities[modality]
        except KeyError:
            raise ValueError(
                f"dataset {self.name!r} has no modality {modality!r}; it has: {', '.join(self.modalities)}"
            ) from None

    def positions_of(self, sample_ids: np.ndarray) -> np.ndarray:
        """Row positions of the given sample ids (raises naming the first unknown id)."""
        order = np.argsort(self.sample_ids, kind="stable")
        sorted_ids = self.sample_ids[order]
        pos = np.searchsorted(sorted_ids, sample_ids)
        pos = np.clip(pos, 0, len(sorted_ids) - 1)
        bad = sorted_ids[pos] != sample_ids
        if bad.any():
            raise KeyError(f"dataset {self.name!r} ({self.split}) has no sample_id {int(np.asarray(sample_ids)[bad][0])}")
        return order[pos]

    def fingerprint(self) -> str:
        """Content hash of this split: name, split, ids, labels and the modality data."""
        h = hashlib.sha256()
        h.update(f"{self.name}|{self.split}|{self.num_classes}".encode())
        for m, spec in sorted(self.modalities.items()):
            h.update(f"|{m}:{spec.kind}:{spec.shape}".encode())
        h.update(np.ascontiguousarray(self.sample_ids, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
        self._hash_content(h)
        return h.hexdigest()

    def _hash_content(self, h: "hashlib._Hash") -> None:
        """Feed the modality data into ``h``; subclasses with lazily-read data may hash files instead."""
        for start in range(0, len(self), 4096):
            batch = self._inputs(np.arange(start, min(start + 4096, len(self))), sorted(self.modalities))
            for m in sorted(batch):
                h.update(batch[m].contiguous().numpy().tobytes())

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "split": self.split,
            "num_samples": len(self),
            "num_classes": self.num_classes,
            "modalities": {m: {"kind": s.kind, "shape": list(s.shape)} for m, s in self.modalities.items()},
        }


class ArrayDataset(PairedDataset):
    """A dataset held in memory as one float32 array per modality (all the shipped data)."""

    def __init__(
        self,
        name: str,
        split: str,
        arrays: Mapping[str, np.ndarray],
        labels: np.ndarray,
        sample_ids: np.ndarray,
        num_classes: int,
        kinds: Mapping[str, str],
    ) -> None:
        n = len(labels)
        if len(sample_ids) != n or any(len(a) != n for a in arrays.values()):
            raise DatasetError(f"dataset {name!r}: arrays, labels and sample_ids differ in length")
        if len(np.unique(sample_ids)) != n:
            raise DatasetError(f"dataset {name!r}: sample_ids are not unique")
        self.name, self.split, self.num_classes = name, split, int(num_classes)
        self.labels = np.ascontiguousarray(labels, dtype=np.int64)
        self.sample_ids = np.ascontiguousarray(sample_ids, dtype=np.int64)
        self._arrays = {m: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for m, a in arrays.items()}
        self.modalities = {
            m: ModalitySpec(m, kinds[m], tuple(int(s) for s in a.shape[1:])) for m, a in self._arrays.items()  # type: ignore[arg-type]
        }

    def _inputs(self, index: np.ndarray, modalities: Sequence[str]) -> dict[str, torch.Tensor]:
        idx = torch.from_numpy(np.ascontiguousarray(index, dtype=np.int64))
        return {m: self._arrays[m].index_select(0, idx) for m in modalities}

    def _hash_content(self, h: "hashlib._Hash") -> None:
        for m in sorted(self._arrays):
            h.update(self._arrays[m].numpy().tobytes())


def check_split(name: str, split: str, splits: Sequence[str] = SPLITS) -> None:
    """``splits``: the dataset's (train and test; a table's also val, see ``DATASETS``' ``splits``)."""
    if split not in splits:
        raise ValueError(f"dataset {name!r}: unknown split {split!r}; splits are {', '.join(splits)}")


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean (N,) mask of test rows: ``test_fraction`` of each class, chosen by ``seed``."""
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        k = int(round(len(rows) * test_fraction))
        is_test[rng.permutation(rows)[:k]] = True
    return is_test


def build_dataset(name: str, split: str, root: str | None = None, **kwargs: Any) -> PairedDataset:
    """Build a registered dataset's split; ``root`` is the data directory for on-disk datasets."""
    builder = DATASETS.get(name)
    check_split(name, split, DATASETS.meta(name).get("splits") or SPLITS)
    if DATASETS.meta(name).get("needs_root") and not root:
        raise ValueError(f"dataset {name!r} reads its files from a directory: set data.root")
    return builder(split, root=root, **kwargs)


def dataset_modalities(name: str, root: str | None = None, kwargs: Mapping[str, Any] | None = None
                       ) -> tuple[str, ...] | None:
    """The modality names dataset ``name`` serves with this ``root`` and ``kwargs`` (``data.root``,
    ``data.kwargs``), found cheaply: its ``modalities_of`` (metadata; a file's schema, a folder's
    listing, the options: never the rows), else its fixed ``modalities``. None where it cannot say:
    an unknown dataset, one that declares neither, or a source that cannot be read now (a missing
    file, a bad option: building the split reports that, naming the file or option)."""
    if name not in DATASETS:
        return None
    meta = DATASETS.meta(name)
    of = meta.get("modalities_of")
    if callable(of):
        try:
            names = of(root, **dict(kwargs or {}))
        except Exception:  # noqa: BLE001 - the data layer reports an unreadable source with its own message
            return None
    else:
        names = meta.get("modalities")
    if names is None or isinstance(names, str):
        return None
    return tuple(str(n) for n in names) or None


def chosen_modalities(dataset: str, modalities: Any, what: str) -> tuple[str, ...]:
    """``data.kwargs.modalities`` as a tuple, refused unless it is a list (``what``: of what names)."""
    if isinstance(modalities, str) or not isinstance(modalities, Sequence):
        raise DatasetError(f"{dataset}: data.kwargs.modalities must be a list of {what}, got {modalities!r}")
    return tuple(modalities)


def class_names(classes: Sequence[str], limit: int = 10) -> str:
    """``cat=0, dog=1, ...``: each class name with its class number, the first ``limit`` of them
    (then how many more)."""
    shown = ", ".join(f"{c}={i}" for i, c in enumerate(classes[:limit]))
    return shown + (f", ... ({len(classes) - limit} more, {len(classes)} in all)" if len(classes) > limit else "")


def list_datasets() -> list[str]:
    return DATASETS.names()
