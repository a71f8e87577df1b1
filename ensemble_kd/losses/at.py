"""AT: attention transfer. Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the
Performance of Convolutional Neural Networks via Attention Transfer", ICLR 2017.

The student's spatial attention maps (mean over channels of |f|^p, L2-normalised) are pulled
towards the teacher's at the intermediate stages. As the reference (RepDistiller ``Attention``, p = 2):
the stage pairs are the feature lists without their first (the stem) and last (the embedding)
entries, ``g_s[1:-1]`` against ``g_t[1:-1]``, one ``at`` term per pair (a larger map pooled to the
smaller), summed; the reference trains it with weight beta = 1000. It reads feature maps, so it
runs on the online data path only. An ensemble is sum_k w_k * AT(student, teacher_k).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import PositiveFloat  # option types and ranges, checked at config load (orchestration/checks.py)
from torch import nn

from ensemble_kd.losses._util import weighted_teacher_sum
from ensemble_kd.losses.base import LOSSES, DistillInputs, LossContext, LossOutput, normalise_teacher_weights
from ensemble_kd.losses.functional import at


def at_stages(g_s: list[torch.Tensor], g_t: list[torch.Tensor], p: float = 2.0) -> list[torch.Tensor]:
    """One AT value per intermediate stage pair (``g[1:-1]`` of each side); the lists must pair up."""
    s, t = g_s[1:-1], g_t[1:-1]
    if len(s) != len(t):
        raise ValueError(f"at: the student has {len(s)} intermediate stages, the teacher {len(t)}: they must pair up")
    return [at(a, b, p) for a, b in zip(s, t)]


@LOSSES.register("at", needs_teachers=True, needs=("feature_maps",),
                 paper="Zagoruyko & Komodakis, Paying More Attention to Attention, ICLR 2017")
class ATLoss(nn.Module):
    """sum_k w_k * sum over stage pairs of at(student stage, teacher_k stage)."""

    def __init__(self, ctx: LossContext, *, p: PositiveFloat = 2.0, teacher_weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        if not p > 0:
            raise ValueError(f"at: p must be > 0, got {p}")
        self.p = float(p)
        self.teachers = ctx.teachers
        self.weights = normalise_teacher_weights(self.teachers, teacher_weights)

    def forward(self, x: DistillInputs) -> LossOutput:
        if x.student_feats is None or any(n not in x.teacher_feats for n in self.teachers):
            raise ValueError("at: needs the student's and every teacher's feature maps (the online data path)")
        loss = weighted_teacher_sum(self.weights, lambda n: sum(at_stages(x.student_feats, x.teacher_feats[n], self.p)),
                                    x.student_logits)
        return LossOutput(loss)
