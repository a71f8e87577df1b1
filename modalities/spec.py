"""What a modality tensor looks like: the contract between datasets and encoders."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ModalitySpec:
    """Shape and kind of one named input of a dataset sample (one sensory modality or view)."""

    name: str
    """Name of the modality inside its dataset, e.g. ``"pix"`` or ``"image"``."""
    kind: Literal["image", "vector"]
    """``image``: a (C, H, W) float tensor; ``vector``: a (D,) float tensor."""
    shape: tuple[int, ...]
    """Per-sample tensor shape, without the batch dimension."""

    def __post_init__(self) -> None:
        want = 3 if self.kind == "image" else 1
        if self.kind not in ("image", "vector") or len(self.shape) != want:
            raise ValueError(f"modality {self.name!r}: kind {self.kind!r} needs a shape of rank {want}, got {self.shape}")

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n
