"""SP: Tung, Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019.

Samples that the teacher embeds alike should be embedded alike by the student. Per side, the
batch Gram matrix is row-wise L2 normalised: G = normalize(F F^T) (B, B); the loss is

    loss = ||G_t - G_s||_F^2 / B^2

as in the paper (eq. 4, one layer pair) and the reference (RepDistiller ``Similarity``). The paper
weights it with gamma = 3000 on CIFAR: that is the config's loss ``weight`` here. Gram matrices
are (B, B) whatever the dims: no trainable part. An ensemble is sum_k w_k * SP_k.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ensemble_kd.losses._util import as_float, weighted_teacher_sum
from ensemble_kd.losses.base import LOSSES, DistillInputs, LossContext, LossOutput, normalise_teacher_weights


def sp_gram(f: torch.Tensor) -> torch.Tensor:
    """f (B, d) -> (B, B) Gram matrix with L2-normalised rows (F.normalize's eps = 1e-12)."""
    return F.normalize(f @ f.t(), p=2, dim=1)


def sp_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """student_emb (B, d_s), teacher_emb (B, d_t) (any dims) -> scalar ||G_t - G_s||_F^2 / B^2."""
    s = as_float(student_emb)
    B = s.shape[0]
    diff = sp_gram(as_float(teacher_emb).to(s.dtype)) - sp_gram(s)  # (B, B)
    return (diff * diff).sum() / (B * B)


@LOSSES.register("sp", needs_teachers=True, paper="Tung & Mori, Similarity-Preserving Knowledge Distillation, ICCV 2019")
class SPLoss(nn.Module):
    def __init__(self, ctx: LossContext, *, teacher_weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.teachers = ctx.teachers
        self.weights = normalise_teacher_weights(self.teachers, teacher_weights)

    def forward(self, x: DistillInputs) -> LossOutput:
        return LossOutput(weighted_teacher_sum(
            self.weights, lambda n: sp_loss(x.student_emb, x.teacher_emb[n]), x.student_emb))
