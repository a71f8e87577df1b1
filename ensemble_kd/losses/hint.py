"""FitNet's hint on a chosen stage map: Romero, Ballas, Kahou, Chassang, Gatta, Bengio, "FitNets:
Hints for Thin Deep Nets", ICLR 2015.

A trainable regressor r maps the student's guided stage map to the teacher's hint stage map, and
the hint loss is the mean squared error MSE(r(f_s), f_t), averaged over the batch and every element
as the reference (RepDistiller ``HintLoss`` = ``nn.MSELoss`` after ``ConvReg``; the paper's 1/2 and
sum only rescale it). ``stage`` picks the index into the encoders' feature lists, the reference's
``--hint_layer`` (default 2: the second residual group's output of its CIFAR resnets); it must be a
map on both sides. The regressor is the reference's ConvReg (conv by the size ratio, BN, ReLU), one
per teacher. The reference trains it with weight beta = 100, with the regressor trained alongside
the student from the start (no separate hint stage, like here). The ``fitnet`` loss is the
embedding-level variant (shard path). An ensemble is sum_k w_k * MSE(r_k(f_s), f_t_k).
"""
from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ensemble_kd.losses._featmaps import ConvReg, check_map, context_shapes, require_maps
from ensemble_kd.losses._util import module_keys, weighted_teacher_sum
from ensemble_kd.losses.base import LOSSES, DistillInputs, LossContext, LossOutput, normalise_teacher_weights
from ensemble_kd.losses.functional import hint


@LOSSES.register("hint", needs_teachers=True, needs=("feature_maps",),
                 paper="Romero et al., FitNets: Hints for Thin Deep Nets, ICLR 2015")
class HintLoss(nn.Module):
    """One ConvReg per teacher; sum_k w_k * hint(r_k(student stage), teacher_k stage)."""

    def __init__(self, ctx: LossContext, *, stage: int = 2, teacher_weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        if int(stage) != stage:
            raise ValueError(f"hint: stage must be an integer index into the feature lists, got {stage}")
        self.stage = int(stage)
        self.teachers = ctx.teachers
        self.weights = normalise_teacher_weights(self.teachers, teacher_weights)
        self._key = module_keys("hint", self.teachers)
        s_shapes, t_shapes = context_shapes("hint", ctx)
        s = self._shape_at("the student", s_shapes)
        self.regressors = nn.ModuleDict()
        for name in self.teachers:
            t = self._shape_at(f"teacher {name!r}", t_shapes[name])
            try:
                self.regressors[self._key[name]] = ConvReg(s, t, use_relu=True)
            except ValueError as e:
                raise ValueError(f"hint: stage {self.stage}, teacher {name!r}: {e}") from None
        self.to(ctx.device)

    def _shape_at(self, who: str, shapes: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
        if not -len(shapes) <= self.stage < len(shapes):
            raise ValueError(f"hint: stage {self.stage} is out of range: {who} has {len(shapes)} feature outputs "
                             f"{list(shapes)}")
        check_map("hint", f"stage {self.stage} of {who}", shapes[self.stage])
        return shapes[self.stage]

    def forward(self, x: DistillInputs) -> LossOutput:
        require_maps("hint", x, self.teachers)
        f_s = x.student_feats[self.stage]  # (B, C_s, H_s, W_s)

        def term(name: str):
            return hint(self.regressors[self._key[name]](f_s), x.teacher_feats[name][self.stage])  # (B, C_t, H_t, W_t)

        return LossOutput(weighted_teacher_sum(self.weights, term, x.student_logits))
