"""DKD: Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022.

KD splits into a target-class term and a non-target-class term; DKD weights them freely. With
p = softmax(z / T), y the label, b = [p_y, 1 - p_y] (binary) and p^ = softmax over the classes
other than y:

    TCKD = KL(b^t || b^s),  NCKD = KL(p^t || p^s)
    loss = (alpha * TCKD + beta * NCKD) * T^2       (averaged over the batch)

Defaults alpha = 1, beta = 8, T = 4 (the reference mdistiller's CIFAR-100 setting). As the
reference, NCKD's softmaxes mask the target class by subtracting 1000 from its logit.

Warm-up (``warmup_epochs`` = W > 0, the paper's and mdistiller's linear warm-up, W = 20 there):
the loss is multiplied by min(1, (epoch + 1) / W), epoch 0-based, so epoch 0 gets 1/W and
epochs >= W - 1 the full loss (mdistiller's min(epoch / W, 1) with its 1-based epochs). W = 0
(default): no warm-up. Without it, a large beta can swamp CE in the first epochs.

Ensembles (``reduction``):
- ``mean_probs`` (default): one DKD against the ensemble, whose logits at temperature T are the
  log of the weighted average of the teachers' probabilities at T, as KD's ``mean_probs``:
  z^ens = T log sum_k w_k softmax(z_k / T), so softmax(z^ens / T) = sum_k w_k softmax(z_k / T)
  (and NCKD's non-target softmax is that average renormalised over the other classes). For one
  teacher this is z minus a per-row constant, so it equals plain DKD.
- ``per_teacher``: sum_k w_k * DKD(student, teacher k).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from pydantic import NonNegativeFloat, NonNegativeInt, PositiveFloat  # option types and ranges, checked at config load (orchestration/checks.py)
from torch import nn

from ensemble_kd.losses._util import as_float
from ensemble_kd.losses.base import (
    LOSSES, DistillInputs, LossContext, LossOutput, Reduction, check_reduction, normalise_teacher_weights,
)

MASK = 1000.0  # the reference's target-class mask for the non-target softmax


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              temperature: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """student_logits (B, C), teacher_logits (B, C), labels (B,) -> (TCKD, NCKD), each a scalar
    batch mean, without the T^2 factor."""
    s = as_float(student_logits)
    t = as_float(teacher_logits).to(s.dtype)
    T = float(temperature)
    gt = F.one_hot(labels.long(), s.shape[1]).to(torch.bool)  # (B, C)
    p_s, p_t = F.softmax(s / T, dim=1), F.softmax(t / T, dim=1)  # (B, C)
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * ~gt).sum(1)], dim=1)  # (B, 2) [p_y, 1 - p_y]
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * ~gt).sum(1)], dim=1)  # (B, 2)
    # clamp: a saturated softmax (1 - p_y == 0) would give log 0 = -inf and 0 * inf = nan
    tckd = F.kl_div(torch.log(b_s.clamp_min(torch.finfo(b_s.dtype).tiny)), b_t, reduction="batchmean")
    # Non-target distributions: the target logit pushed to -1000/T-ish, so its probability is ~0.
    log_q_s = F.log_softmax(s / T - MASK * gt, dim=1)  # (B, C)
    q_t = F.softmax(t / T - MASK * gt, dim=1)  # (B, C)
    nckd = F.kl_div(log_q_s, q_t, reduction="batchmean")
    return tckd, nckd


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> torch.Tensor:
    """One teacher: (alpha * TCKD + beta * NCKD) * T^2. Shapes as :func:`dkd_terms`; a scalar."""
    tckd, nckd = dkd_terms(student_logits, teacher_logits, labels, temperature)
    return (alpha * tckd + beta * nckd) * temperature ** 2


def ensemble_logits(teacher_logits: Sequence[torch.Tensor], weights: Sequence[float],
                    temperature: float = 1.0) -> torch.Tensor:
    """K tensors (B, C), K weights summing to 1 -> (B, C) T log sum_k w_k softmax(z_k / T): logits
    whose softmax at T is the teachers' weighted average at T (stably, by logsumexp over the
    teachers; zero-weight teachers are left out)."""
    T = float(temperature)
    parts = [math.log(w) + F.log_softmax(as_float(z) / T, dim=1) for z, w in zip(teacher_logits, weights) if w > 0]
    if not parts:
        raise ValueError("dkd: every teacher weight is 0")
    return T * torch.logsumexp(torch.stack(parts), dim=0)  # (B, C)


def dkd_ensemble_loss(student_logits: torch.Tensor, teacher_logits: Sequence[torch.Tensor], labels: torch.Tensor,
                      weights: Sequence[float] | None = None, alpha: float = 1.0, beta: float = 8.0,
                      temperature: float = 4.0, reduction: Reduction = "mean_probs") -> torch.Tensor:
    """student_logits (B, C); teacher_logits: K tensors (B, C); labels (B,); weights: K floats
    summing to 1 (uniform when None). Returns the scalar DKD loss of the ensemble (see module doc)."""
    K = len(teacher_logits)
    if K == 0:
        raise ValueError("dkd needs at least one teacher")
    check_reduction("dkd", reduction)
    w = list(weights) if weights is not None else [1.0 / K] * K
    if reduction == "mean_probs":
        z_ens = ensemble_logits(teacher_logits, w, temperature)  # (B, C) the average taken at T
        return dkd_loss(student_logits, z_ens, labels, alpha, beta, temperature)
    total = as_float(student_logits).new_zeros(())  # per_teacher
    for z, wk in zip(teacher_logits, w):
        if wk > 0:
            total = total + wk * dkd_loss(student_logits, z, labels, alpha, beta, temperature)
    return total


def warmup_factor(epoch: int, warmup_epochs: int) -> float:
    """The linear warm-up: min(1, (epoch + 1) / warmup_epochs) for the 0-based ``epoch``; 1 when
    ``warmup_epochs`` is 0 (no warm-up)."""
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, (epoch + 1) / warmup_epochs)


@LOSSES.register("dkd", needs_teachers=True, paper="Zhao et al., Decoupled Knowledge Distillation, CVPR 2022")
class DKDLoss(nn.Module):
    def __init__(self, ctx: LossContext, *, alpha: NonNegativeFloat = 1.0, beta: NonNegativeFloat = 8.0, temperature: PositiveFloat = 4.0,
                 reduction: Reduction = "mean_probs", teacher_weights: Mapping[str, float] | None = None,
                 warmup_epochs: NonNegativeInt = 0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"dkd: temperature must be > 0, got {temperature}")
        if alpha < 0 or beta < 0:
            raise ValueError(f"dkd: alpha and beta must be >= 0, got {alpha}, {beta}")
        check_reduction("dkd", reduction)
        if warmup_epochs < 0 or int(warmup_epochs) != warmup_epochs:
            raise ValueError(f"dkd: warmup_epochs must be an integer >= 0 (0 = no warm-up), got {warmup_epochs}")
        self.teachers = ctx.teachers
        self.weights = normalise_teacher_weights(self.teachers, teacher_weights)
        self.alpha, self.beta, self.temperature, self.reduction = float(alpha), float(beta), float(temperature), reduction
        self.warmup_epochs = int(warmup_epochs)

    def forward(self, x: DistillInputs) -> LossOutput:
        loss = dkd_ensemble_loss(x.student_logits, [x.teacher_logits[n] for n in self.teachers], x.labels,
                                 [self.weights[n] for n in self.teachers], self.alpha, self.beta,
                                 self.temperature, self.reduction)
        return LossOutput(loss * warmup_factor(x.epoch, self.warmup_epochs))
