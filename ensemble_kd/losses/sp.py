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

from torch import nn

from ensemble_kd.losses._util import weighted_teacher_sum
from ensemble_kd.losses.base import LOSSES, DistillInputs, LossContext, LossOutput, normalise_teacher_weights
from ensemble_kd.losses.functional import sp


@LOSSES.register("sp", needs_teachers=True, paper="Tung & Mori, Similarity-Preserving Knowledge Distillation, ICCV 2019")
class SPLoss(nn.Module):
    def __init__(self, ctx: LossContext, *, teacher_weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.teachers = ctx.teachers
        self.weights = normalise_teacher_weights(self.teachers, teacher_weights)

    def forward(self, x: DistillInputs) -> LossOutput:
        return LossOutput(weighted_teacher_sum(
            self.weights, lambda n: sp(x.student_emb, x.teacher_emb[n]), x.student_emb))
