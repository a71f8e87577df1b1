"""AB: Heo, Lee, Yun, Choi, "Knowledge Transfer via Distillation of Activation Boundaries Formed by
Hidden Neurons", AAAI 2019.

The student learns where the teacher's neurons switch on: at each intermediate stage a connector
(the reference's ConvReg without ReLU, or nothing when channels and size already match) maps the
student's map to the teacher's shape, and the alternative L2 (a hinge with margin m on each side of
0) pushes each connected neuron past +m where the teacher's is active (t > 0) and below -m where it
is not. Per stage pair i of n: criterion * 2^(i - n + 1) / B * 3 / 1000 (the deepest pair weighs 1),
summed.

How it maps to the reference (RepDistiller ``ABLoss``, ``Connector``, the ``abound`` branch of
``train_student.py`` and ``helper/pretrain.py``):

- Stage pairs ``g_s[1:-1]`` against ``g_t[1:-1]``, margin 1.0, the weights and scaling above.
- Initialisation stage: the reference trains the connectors and the student's feature modules with
  the AB loss alone for ``--init_epochs`` (30) epochs before distillation, then freezes the
  connectors and drops the term (``loss_kd = 0``; the student then trains with CE and KD). Here the
  stage is chosen by ``DistillInputs.epoch``: the term is AB while ``epoch < init_epochs``, trained by
  the run's optimiser with the student, and an exact zero after (the connectors stay in the graph with
  a zero coefficient, so DDP sees every parameter used; only weight decay then acts on them, and they
  are never read again).
- Differences: the init epochs are epochs of the run, so the other configured terms (CE, KD) train
  the student meanwhile, under the run's learning-rate schedule (the reference: AB alone, its own
  constant-lr SGD, before its 240 epochs; set ``distill.epochs`` to 240 + ``init_epochs`` for as many
  distillation epochs). The reference reads pre-activation maps (``preact=True``); the encoders here
  give the stage outputs after their ReLU. The teacher's side is unchanged by that (t > 0 holds for
  the same neurons before and after a ReLU); the student's connector reads the rectified map.

Every teacher has its own connectors; an ensemble is sum_k w_k * AB_k.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ensemble_kd.losses._featmaps import ConvReg, context_shapes, paired_maps, require_maps, zero_touching
from ensemble_kd.losses._util import module_keys, weighted_teacher_sum
from ensemble_kd.losses.base import LOSSES, DistillInputs, LossContext, LossOutput, normalise_teacher_weights
from ensemble_kd.losses.functional import ab


def connector(s: tuple[int, ...], t: tuple[int, ...]) -> nn.Module:
    """The reference's Connector entry: nothing when channels and height agree, else ConvReg without ReLU."""
    return nn.Identity() if s[0] == t[0] and s[1] == t[1] else ConvReg(s, t, use_relu=False)


@LOSSES.register("ab", needs_teachers=True, needs=("feature_maps",),
                 paper="Heo et al., Knowledge Transfer via Distillation of Activation Boundaries, AAAI 2019")
class ABLoss(nn.Module):
    """Init epochs (``epoch < init_epochs``): sum_k w_k * sum_i ab(connector_ki(student stage i), teacher_k stage i);
    0 after."""

    def __init__(self, ctx: LossContext, *, init_epochs: int = 30, margin: float = 1.0,
                 teacher_weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        if int(init_epochs) != init_epochs or init_epochs < 0:
            raise ValueError(f"ab: init_epochs must be an integer >= 0, got {init_epochs}")
        if margin < 0:
            raise ValueError(f"ab: margin must be >= 0, got {margin}")
        self.init_epochs, self.margin = int(init_epochs), float(margin)
        self.teachers = ctx.teachers
        self.weights = normalise_teacher_weights(self.teachers, teacher_weights)
        self._key = module_keys("ab", self.teachers)
        s_shapes, t_shapes = context_shapes("ab", ctx)
        self.connectors = nn.ModuleDict()
        for name in self.teachers:
            pairs = paired_maps("ab", name, s_shapes[1:-1], t_shapes[name][1:-1])
            try:
                self.connectors[self._key[name]] = nn.ModuleList([connector(a, b) for a, b in pairs])
            except ValueError as e:
                raise ValueError(f"ab: teacher {name!r}: {e}") from None
        self.to(ctx.device)

    def initialising(self, epoch: int) -> bool:
        return epoch < self.init_epochs

    def forward(self, x: DistillInputs) -> LossOutput:
        require_maps("ab", x, self.teachers)
        if not self.initialising(x.epoch):
            return LossOutput(zero_touching(self.connectors.parameters(), x.student_logits))
        g_s = x.student_feats[1:-1]  # [(B, C_i, H_i, W_i)]

        def term(name: str) -> torch.Tensor:
            conn = self.connectors[self._key[name]]
            return sum(ab([c(s) for c, s in zip(conn, g_s)], x.teacher_feats[name][1:-1], self.margin))

        return LossOutput(weighted_teacher_sum(self.weights, term, x.student_logits))
