"""The teacher bank: every teacher output of the train shards, row-aligned (row r = memory slot r).

Built by the data layer from the shards (or a selection of their rows) and handed to the loss
builders through ``LossContext.bank``: CRD-style losses read the raw teacher embeddings of their
negatives from it, and the negative samplers its labels.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass
class TeacherBank:
    """All teacher outputs of the train shards, row-aligned (row r = memory slot r).

    ``embeddings``/``logits`` are read-only tensors (zero-copy views of the shards where possible).
    """

    embeddings: Mapping[str, torch.Tensor]  # name -> (M, d_t)
    logits: Mapping[str, torch.Tensor]  # name -> (M, C)
    labels: torch.Tensor  # (M,) int64
    sample_ids: torch.Tensor  # (M,) int64

    @property
    def num_rows(self) -> int:
        return int(self.labels.shape[0])

    @property
    def teachers(self) -> list[str]:
        return list(self.embeddings)
