"""RKD: Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019.

The student matches relations between the samples of a batch rather than the samples:

- distance-wise: psi_D(i, j) = ||f_i - f_j|| / mu, mu = the mean distance over the pairs i != j;
  L_D = mean_{i,j} huber(psi_D^s(i, j) - psi_D^t(i, j));
- angle-wise: psi_A(i, j, k) = <e_ij, e_kj>, e_ij = (f_i - f_j) / ||f_i - f_j|| (the cosine of
  the angle at j); L_A = mean_{i,j,k} huber(psi_A^s - psi_A^t);

loss = w_dist * L_D + w_angle * L_A, with the paper's / reference's w_dist = 25, w_angle = 50.
huber is PyTorch's smooth_l1 (delta 1). As the reference (github.com/lenscloth/RKD, RepDistiller
``RKDLoss``): the means run over all B^2 pairs / B^3 triplets including the zero diagonal
terms, the squared distances are clamped at eps = 1e-12 before the square root, and the
teacher's relations are constants. Relations need no equal dims: no trainable part. An ensemble
is sum_k w_k * RKD_k.
"""
from __future__ import annotations

from collections.abc import Mapping

from pydantic import NonNegativeFloat, PositiveFloat  # option types and ranges, checked at config load (orchestration/checks.py)
from torch import nn

from ensemble_kd.losses._util import weighted_teacher_sum
from ensemble_kd.losses.base import LOSSES, DistillInputs, LossContext, LossOutput, normalise_teacher_weights
from ensemble_kd.losses.functional import rkd


@LOSSES.register("rkd", needs_teachers=True, paper="Park et al., Relational Knowledge Distillation, CVPR 2019")
class RKDLoss(nn.Module):
    def __init__(self, ctx: LossContext, *, w_dist: NonNegativeFloat = 25.0, w_angle: NonNegativeFloat = 50.0, eps: PositiveFloat = 1e-12,
                 teacher_weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        if w_dist < 0 or w_angle < 0 or w_dist + w_angle == 0:
            raise ValueError(f"rkd: w_dist and w_angle must be >= 0 and not both 0, got {w_dist}, {w_angle}")
        if eps <= 0:
            raise ValueError(f"rkd: eps must be > 0, got {eps}")
        self.teachers = ctx.teachers
        self.weights = normalise_teacher_weights(self.teachers, teacher_weights)
        self.w_dist, self.w_angle, self.eps = float(w_dist), float(w_angle), float(eps)

    def forward(self, x: DistillInputs) -> LossOutput:
        if x.student_emb.shape[0] < 2:
            raise ValueError(f"rkd: relations need a batch of >= 2 samples, got {x.student_emb.shape[0]}")
        return LossOutput(weighted_teacher_sum(
            self.weights, lambda n: rkd(x.student_emb, x.teacher_emb[n], self.w_dist, self.w_angle, eps=self.eps),
            x.student_emb))
