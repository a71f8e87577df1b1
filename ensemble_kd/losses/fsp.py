"""FSP: Yim, Joo, Bae, Kim, "A Gift from Knowledge Distillation: Fast Optimization, Network
Minimization and Transfer Learning", CVPR 2017.

The "flow" between two consecutive stages of one network is their FSP (Gram) matrix,
G_ij = mean_hw f1_i(hw) f2_j(hw) (B, C1, C2), the larger map average-pooled to the smaller; the
student's flow matrices are pulled to the teacher's, mean squared difference per consecutive pair,
summed. As the reference (RepDistiller ``FSP``): the stage lists are the encoders' feature lists
without the embedding, ``g[:-1]`` (the stem included), student and teacher must have the same number
of stages and the same channels at each (an error names both otherwise).

The staging is the reference's (and the paper's): FSP trains the student alone in an initial
stage of ``init_epochs`` epochs, then the term is 0 (``train_student.py`` runs ``init`` with the FSP
criterion for ``--init_epochs`` = 30, then ``loss_kd = 0``). Here the stage is chosen by
``DistillInputs.epoch``: the term is FSP while ``epoch < init_epochs`` and 0 after (``after_init``
keeps it; the reference's "can also add loss to this stage"). What differs: the other configured
terms (CE, KD) keep training the student during those epochs, and the init epochs are epochs of
the run (and of its learning-rate schedule), where the reference runs them before its 240 with their
own constant-lr SGD over the student's feature modules. An ensemble is sum_k w_k * FSP_k.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ensemble_kd.losses._featmaps import context_shapes, paired_maps, require_maps
from ensemble_kd.losses._util import weighted_teacher_sum
from ensemble_kd.losses.base import LOSSES, DistillInputs, LossContext, LossOutput, normalise_teacher_weights
from ensemble_kd.losses.functional import fsp


@LOSSES.register("fsp", needs_teachers=True, needs=("feature_maps",),
                 paper="Yim et al., A Gift from Knowledge Distillation (FSP), CVPR 2017")
class FSPLoss(nn.Module):
    """sum_k w_k * sum over consecutive stage pairs of fsp(student maps, teacher_k maps), in the init epochs."""

    def __init__(self, ctx: LossContext, *, init_epochs: int = 30, after_init: bool = False,
                 teacher_weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        if int(init_epochs) != init_epochs or init_epochs < 0:
            raise ValueError(f"fsp: init_epochs must be an integer >= 0, got {init_epochs}")
        self.init_epochs, self.after_init = int(init_epochs), bool(after_init)
        self.teachers = ctx.teachers
        self.weights = normalise_teacher_weights(self.teachers, teacher_weights)
        s_shapes, t_shapes = context_shapes("fsp", ctx)
        for name in self.teachers:
            # every stage map; the embedding is not one
            for i, (a, b) in enumerate(paired_maps("fsp", name, s_shapes[:-1], t_shapes[name][:-1], first=0)):
                if a[0] != b[0]:
                    raise ValueError(f"fsp: stage {i} has {a[0]} channels in the student and {b[0]} in teacher "
                                     f"{name!r}: FSP matrices need equal channels (the reference refuses this too)")

    def active(self, epoch: int) -> bool:
        return epoch < self.init_epochs or self.after_init

    def forward(self, x: DistillInputs) -> LossOutput:
        require_maps("fsp", x, self.teachers)
        if not self.active(x.epoch):
            return LossOutput(x.student_logits.new_zeros((), dtype=torch.float32))
        g_s = x.student_feats[:-1]  # [(B, C_i, H_i, W_i)]
        loss = weighted_teacher_sum(self.weights, lambda n: sum(fsp(g_s, x.teacher_feats[n][:-1])), x.student_logits)
        return LossOutput(loss)
