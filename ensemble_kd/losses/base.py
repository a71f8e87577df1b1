"""The loss contract: every distillation method is a pure function plus a thin ``nn.Module``
registered by name. The training loop builds the configured losses from the registry and
calls each one the same way, so no method is special-cased in the loop.

A loss module is built with ``builder(ctx: LossContext, **kwargs)`` and called as
``module(x: DistillInputs) -> Tensor`` (a scalar). Trainable parts (CRD heads, VID regressors)
live inside the module, which the loop puts into the one trainable module next to the student.
A module may also define ``extra_metrics() -> dict[str, float]`` for logging.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ensemble_kd.registry import Registry


@dataclass
class DistillInputs:
    """What the loop hands every loss for one batch (B samples/views)."""

    student_emb: torch.Tensor  # (B, d_s) penultimate student feature
    student_logits: torch.Tensor  # (B, C)
    labels: torch.Tensor  # (B,) int64
    index: torch.Tensor  # (B,) int64: row of each sample in the train shards = its memory slot
    teacher_emb: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B, d_t)
    teacher_logits: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B, C)


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


@dataclass
class LossContext:
    """What a loss builder may use to size itself."""

    student_dim: int
    num_classes: int
    teacher_dims: dict[str, int]
    bank: TeacherBank
    seed: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def teachers(self) -> list[str]:
        return list(self.teacher_dims)

    @property
    def num_rows(self) -> int:
        return self.bank.num_rows


class LossBuilder(Protocol):
    def __call__(self, ctx: LossContext, **kwargs: Any) -> nn.Module: ...


LOSSES: Registry[LossBuilder] = Registry("loss")
"""Registered losses. Metadata: ``needs_teachers`` (bool), ``paper`` (citation string)."""


def build_loss(name: str, ctx: LossContext, **kwargs: Any) -> nn.Module:
    builder = LOSSES.get(name)
    if LOSSES.meta(name).get("needs_teachers", True) and not ctx.teacher_dims:
        raise ValueError(f"loss {name!r} needs at least one teacher, and this run has none")
    try:
        return builder(ctx, **kwargs)
    except TypeError as e:
        raise ValueError(f"loss {name!r}: bad options {sorted(kwargs)}: {e}") from None


def normalise_teacher_weights(names: list[str], weights: Mapping[str, float] | None) -> dict[str, float]:
    """Normalised per-teacher weights (uniform when None); errors name unknown teachers."""
    if not weights:
        return {n: 1.0 / len(names) for n in names}
    unknown = set(weights) - set(names)
    if unknown:
        raise ValueError(f"teacher weights name unknown teachers {sorted(unknown)}; teachers are {names}")
    w = {n: float(weights.get(n, 0.0)) for n in names}
    total = sum(w.values())
    if total <= 0 or any(v < 0 for v in w.values()):
        raise ValueError(f"teacher weights must be >= 0 and not all 0, got {w}")
    return {n: v / total for n, v in w.items()}


teacher_weights = normalise_teacher_weights  # short alias used by loss builders
