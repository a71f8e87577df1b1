"""FitNets hint: Romero, Ballas, Kahou, Chassang, Gatta, Bengio, "FitNets: Hints for Thin Deep
Nets", ICLR 2015.

The hint loss makes a trainable regressor r of the student's guided layer predict the teacher's
hint layer: L_HT = 1/2 || u_h(x) - r(v_g(x)) ||^2. Here the hint and the guided layer are the
penultimate embeddings (what the shards store), and r = Linear(d_s, d_t), one per teacher.
As the reference implementation (RepDistiller ``HintLoss`` = ``nn.MSELoss``) the squared error is
averaged over the batch and the d_t channels (the paper's 1/2 and sum only rescale it; the
config's loss weight absorbs that). The paper's two-stage schedule (hint pre-training, then KD)
is a recipe, not a loss: here the hint is one term of the total loss. An ensemble is
sum_k w_k * MSE(r_k(s), t_k).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ensemble_kd.losses._util import module_keys, weighted_teacher_sum
from ensemble_kd.losses.base import LOSSES, DistillInputs, LossContext, LossOutput, normalise_teacher_weights
from ensemble_kd.losses.functional import hint


@LOSSES.register("fitnet", needs_teachers=True, paper="Romero et al., FitNets: Hints for Thin Deep Nets, ICLR 2015")
class FitNetLoss(nn.Module):
    """One Linear regressor per teacher; sum_k w_k * MSE(r_k(s), t_k)."""

    def __init__(self, ctx: LossContext, *, teacher_weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.teachers = ctx.teachers
        self.weights = normalise_teacher_weights(self.teachers, teacher_weights)
        self._key = module_keys("fitnet", self.teachers)
        self.regressors = nn.ModuleDict({self._key[n]: nn.Linear(ctx.student_dim, ctx.teacher_dims[n])
                                         for n in self.teachers})
        self.to(ctx.device)

    def forward(self, x: DistillInputs) -> LossOutput:
        def term(name: str) -> torch.Tensor:
            return hint(self.regressors[self._key[name]](x.student_emb), x.teacher_emb[name])  # r(s) (B, d_t)

        return LossOutput(weighted_teacher_sum(self.weights, term, x.student_emb))
