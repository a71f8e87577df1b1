"""SP on the last feature map, as the reference: Tung, Mori, "Similarity-Preserving Knowledge
Distillation", ICCV 2019.

The formula is ``sp``'s (a row-normalised (B, B) Gram matrix per side, ||G_t - G_s||_F^2 / B^2), but
applied where RepDistiller applies it: to the last stage map before pooling (``feat[-2]``, flattened
to (B, C*H*W)), not to the pooled embedding the ``sp`` loss reads on the shard path. The reference
trains it with weight gamma = 3000. No trainable part; channels and sizes may differ (each side's
Gram matrix is (B, B)). An ensemble is sum_k w_k * SP_k.
"""
from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ensemble_kd.losses._featmaps import check_map, context_shapes, require_maps
from ensemble_kd.losses._util import weighted_teacher_sum
from ensemble_kd.losses.base import LOSSES, DistillInputs, LossContext, LossOutput, normalise_teacher_weights
from ensemble_kd.losses.functional import sp


@LOSSES.register("sp_map", needs_teachers=True, needs=("feature_maps",),
                 paper="Tung & Mori, Similarity-Preserving Knowledge Distillation, ICCV 2019")
class SPMapLoss(nn.Module):
    """sum_k w_k * sp(student's last map, teacher_k's last map)."""

    def __init__(self, ctx: LossContext, *, teacher_weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.teachers = ctx.teachers
        self.weights = normalise_teacher_weights(self.teachers, teacher_weights)
        s_shapes, t_shapes = context_shapes("sp_map", ctx)
        check_map("sp_map", "the student's last stage", s_shapes[-2] if len(s_shapes) > 1 else s_shapes[-1])
        for name in self.teachers:
            t = t_shapes[name]
            check_map("sp_map", f"teacher {name!r}'s last stage", t[-2] if len(t) > 1 else t[-1])

    def forward(self, x: DistillInputs) -> LossOutput:
        require_maps("sp_map", x, self.teachers)
        f_s = x.student_feats[-2]  # (B, C_s, H_s, W_s): the last map before pooling
        loss = weighted_teacher_sum(self.weights, lambda n: sp(f_s, x.teacher_feats[n][-2]), x.student_logits)
        return LossOutput(loss)
