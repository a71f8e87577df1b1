"""NST: Huang, Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer",
arXiv:1707.01219, 2017.

Each channel's spatial activation pattern (its "selectivity", L2-normalised over H*W) is a sample of
a distribution; NST matches the student's distribution to the teacher's by the squared maximum mean
discrepancy with a polynomial kernel k(a, b) = (a . b)^2:

    MMD^2 = mean k(t, t) + mean k(s, s) - 2 mean k(s, t)    (over channel pairs, per sample, then the batch)

As the reference (RepDistiller ``NSTLoss``): the stage pairs are ``g_s[1:-1]`` against ``g_t[1:-1]``
(the intermediate stages), the larger map average-pooled to the smaller, channels may differ; the
t-t kernel term is detached (it is constant for the student); one value per pair, summed. The
reference trains it with weight beta = 50. An ensemble is sum_k w_k * NST_k.
"""
from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ensemble_kd.losses._featmaps import context_shapes, paired_maps, require_maps
from ensemble_kd.losses._util import weighted_teacher_sum
from ensemble_kd.losses.base import LOSSES, DistillInputs, LossContext, LossOutput, normalise_teacher_weights
from ensemble_kd.losses.functional import nst


@LOSSES.register("nst", needs_teachers=True, needs=("feature_maps",),
                 paper="Huang & Wang, Like What You Like: Neuron Selectivity Transfer, arXiv:1707.01219")
class NSTLoss(nn.Module):
    """sum_k w_k * sum over intermediate stage pairs of nst(student stage, teacher_k stage)."""

    def __init__(self, ctx: LossContext, *, teacher_weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.teachers = ctx.teachers
        self.weights = normalise_teacher_weights(self.teachers, teacher_weights)
        s_shapes, t_shapes = context_shapes("nst", ctx)
        for name in self.teachers:
            paired_maps("nst", name, s_shapes[1:-1], t_shapes[name][1:-1])

    def forward(self, x: DistillInputs) -> LossOutput:
        require_maps("nst", x, self.teachers)
        g_s = x.student_feats[1:-1]  # [(B, C_i, H_i, W_i)]

        def term(name: str):
            return sum(nst(s, t) for s, t in zip(g_s, x.teacher_feats[name][1:-1]))

        return LossOutput(weighted_teacher_sum(self.weights, term, x.student_logits))
