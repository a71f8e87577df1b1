"""KD: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network" (2015).

loss = T^2 * KL(p_t || p_s), p = softmax(logits / T), averaged over the batch. The T^2 keeps the
gradient scale independent of T. For an ensemble of K teachers, ``reduction`` chooses:

- ``mean_probs``: p_t = sum_k w_k softmax(t_k / T) (w uniform by default: the ensemble's
  averaged prediction, the usual ensemble-KD target);
- ``per_teacher``: sum_k w_k T^2 KL(softmax(t_k / T) || p_s) (one KD term per teacher).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from pydantic import PositiveFloat  # option types and ranges, checked at config load (orchestration/checks.py)
from torch import nn

from ensemble_kd.losses._util import as_float
from ensemble_kd.losses.base import (
    LOSSES, DistillInputs, LossContext, LossOutput, Reduction, check_reduction, normalise_teacher_weights,
)
from ensemble_kd.losses.functional import kd, kd_to_target


def kd_loss(student_logits: torch.Tensor, teacher_logits: Sequence[torch.Tensor], temperature: float = 4.0,
            weights: Sequence[float] | None = None, reduction: Reduction = "mean_probs") -> torch.Tensor:
    """student_logits (B, C); teacher_logits: K tensors (B, C); weights: K floats summing to 1
    (uniform when None). Returns the scalar KD loss of the ensemble (batch mean, scaled by T^2):
    :func:`~ensemble_kd.losses.functional.kd` per teacher, or against the averaged target."""
    K = len(teacher_logits)
    if K == 0:
        raise ValueError("kd_loss needs at least one teacher")
    check_reduction("kd", reduction)
    w = list(weights) if weights is not None else [1.0 / K] * K
    s = as_float(student_logits)
    T = float(temperature)
    if reduction == "per_teacher":
        total = s.new_zeros(())
        for t, wk in zip(teacher_logits, w):
            if wk != 0.0:  # a zero-weight teacher's term is not even computed
                total = total + wk * kd(s, t, T)
        return total
    target = sum(wk * F.softmax(as_float(t).to(s.dtype) / T, dim=1) for t, wk in zip(teacher_logits, w))  # (B, C)
    return kd_to_target(s, target, T)


@LOSSES.register("kd", needs_teachers=True, paper="Hinton et al., 2015")
class KDLoss(nn.Module):
    def __init__(self, ctx: LossContext, *, temperature: PositiveFloat = 4.0, reduction: Reduction = "mean_probs",
                 teacher_weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"kd: temperature must be > 0, got {temperature}")
        check_reduction("kd", reduction)
        self.teachers = ctx.teachers
        self.temperature, self.reduction = float(temperature), reduction
        self.weights = normalise_teacher_weights(self.teachers, teacher_weights)

    def forward(self, x: DistillInputs) -> LossOutput:
        return LossOutput(kd_loss(x.student_logits, [x.teacher_logits[n] for n in self.teachers], self.temperature,
                                  [self.weights[n] for n in self.teachers], self.reduction))
