"""Row-indexed access to a column stored as consecutive parts (memory-mapped Arrow record batches).

An Arrow IPC file of several record batches (or several part files) keeps each batch's column in
its own buffer, so the column as a whole is not one array. Concatenating the parts would copy the
whole column into the process's private memory, which is what a memory-mapped store exists to
avoid. :class:`PartedRows` keeps the parts as zero-copy views of the map and gathers only the rows
asked for: a batch's rows cost a copy of those rows, nothing else.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def as_torch(arr: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` on a (possibly read-only) array of a memory map, without torch's warning.
    The tensor is a read-only view of the map: writing to it is a bug."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


class PartedRows:
    """(R, *row_shape) rows kept as consecutive parts, each a numpy view (of a memory map).

    ``x[rows]`` (rows: a tensor, array or list of row numbers) returns a torch tensor of those
    rows (a copy of just them), as indexing a tensor would; ``shape``, ``dtype`` and ``len`` are a
    tensor's. :meth:`full` concatenates every part (a copy of the whole column: for callers that need
    all of it at once, such as a FAISS index).
    """

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        if not parts:
            raise ValueError("PartedRows needs at least one part")
        first = parts[0]
        for p in parts:
            if p.shape[1:] != first.shape[1:] or p.dtype != first.dtype:
                raise ValueError(f"parts differ in row shape or dtype: {p.shape[1:]} {p.dtype} vs {first.shape[1:]} {first.dtype}")
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in parts]).astype(np.int64)  # (P+1,) first row of each part
        self.row_shape = tuple(first.shape[1:])
        self.np_dtype = first.dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size((int(self.offsets[-1]), *self.row_shape))

    @property
    def dtype(self) -> torch.dtype:
        return as_torch(self.parts[0][:0]).dtype

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def take(self, rows: Any) -> np.ndarray:
        """The rows ``rows`` as a new numpy array (B, *row_shape)."""
        idx = rows.cpu().numpy() if torch.is_tensor(rows) else np.asarray(rows)
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        idx = np.where(idx < 0, idx + n, idx)
        if len(self.parts) == 1:
            return self.parts[0][idx]
        part = np.searchsorted(self.offsets[1:], idx, side="right")  # (B,) the part of each row
        order = np.argsort(part, kind="stable")  # (B,) rows grouped by part: one fancy index per part touched
        grouped = part[order]
        cuts = np.flatnonzero(grouped[1:] != grouped[:-1]) + 1
        out = np.empty((idx.size, *self.row_shape), dtype=self.np_dtype)
        for sel in np.split(order, cuts):
            k = part[sel[0]]
            out[sel] = self.parts[k][idx[sel] - self.offsets[k]]
        return out

    def __getitem__(self, rows: Any) -> torch.Tensor:
        if isinstance(rows, slice):
            rows = np.arange(len(self))[rows]
        return torch.from_numpy(self.take(rows))

    def full(self) -> torch.Tensor:
        """Every row, concatenated (a copy; zero-copy view when there is one part)."""
        if len(self.parts) == 1:
            return as_torch(self.parts[0])
        return torch.from_numpy(np.concatenate(self.parts))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self.full().numpy()
        return a if dtype is None else a.astype(dtype)

    def float(self) -> torch.Tensor:
        return self.full().float()


def full(x: torch.Tensor | PartedRows) -> torch.Tensor:
    """A column as one tensor (``x`` itself, or every part of a :class:`PartedRows` concatenated)."""
    return x.full() if isinstance(x, PartedRows) else x
