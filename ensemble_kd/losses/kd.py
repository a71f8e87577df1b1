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
from pydantic import PositiveFloat  # option types and ranges, checked at config load (checks.py)
from torch import nn

from ensemble_kd.losses.base import (
    LOSSES, DistillInputs, LossContext, LossOutput, Reduction, check_reduction, normalise_teacher_weights,
)


def kd_loss(student_logits: torch.Tensor, teacher_logits: Sequence[torch.Tensor], temperature: float = 4.0,
            weights: Sequence[float] | None = None, reduction: Reduction = "mean_probs") -> torch.Tensor:
    """student_logits (B, C); teacher_logits: K tensors (B, C); weights: K floats summing to 1.

    Returns the scalar KD loss (batch mean, scaled by T^2).
    """
    K = len(teacher_logits)
    if K == 0:
        raise ValueError("kd_loss needs at least one teacher")
    check_reduction("kd", reduction)
    w = torch.as_tensor(list(weights) if weights is not None else [1.0 / K] * K, dtype=torch.float32,
                        device=student_logits.device)  # (K,)
    T = float(temperature)
    log_ps = F.log_softmax(student_logits.float() / T, dim=1)  # (B, C)
    pt = torch.stack([F.softmax(t.float() / T, dim=1) for t in teacher_logits])  # (K, B, C)
    if reduction == "mean_probs":
        target = (w[:, None, None] * pt).sum(0)  # (B, C) the ensemble's prediction
        return F.kl_div(log_ps, target, reduction="batchmean") * T * T
    kl = torch.stack([F.kl_div(log_ps, pt[k], reduction="batchmean") for k in range(K)])  # (K,)
    return (w * kl).sum() * T * T


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
