"""PKT: Passalis, Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer",
ECCV 2018.

Each side's embeddings define conditional probabilities between the samples of a batch through
a cosine-similarity kernel: K_ij = (cos(f_i, f_j) + 1) / 2, p_{j|i} = K_ij / sum_j K_ij. The
student matches the teacher's distribution: KL(P_t || P_s). As the reference implementation
(RepDistiller ``PKT.cosine_similarity_loss``, eps = 1e-7):

    loss = mean_{i,j} p^t_{j|i} * log((p^t_{j|i} + eps) / (p^s_{j|i} + eps))

i.e. the per-row KL summed over j and averaged over the B rows, divided once more by B (the
reference's ``torch.mean`` over the (B, B) matrix); the diagonal (i = j) is kept, as there.
The kernel works on any embedding sizes: no trainable part. An ensemble is sum_k w_k * PKT_k.
"""
from __future__ import annotations

from collections.abc import Mapping

from pydantic import PositiveFloat  # option types and ranges, checked at config load (orchestration/checks.py)
from torch import nn

from ensemble_kd.losses._util import weighted_teacher_sum
from ensemble_kd.losses.base import LOSSES, DistillInputs, LossContext, LossOutput, normalise_teacher_weights
from ensemble_kd.losses.functional import pkt


@LOSSES.register("pkt", needs_teachers=True, paper="Passalis & Tefas, Probabilistic Knowledge Transfer, ECCV 2018")
class PKTLoss(nn.Module):
    def __init__(self, ctx: LossContext, *, eps: PositiveFloat = 1e-7, teacher_weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        if eps <= 0:
            raise ValueError(f"pkt: eps must be > 0, got {eps}")
        self.teachers, self.eps = ctx.teachers, float(eps)
        self.weights = normalise_teacher_weights(self.teachers, teacher_weights)

    def forward(self, x: DistillInputs) -> LossOutput:
        return LossOutput(weighted_teacher_sum(
            self.weights, lambda n: pkt(x.student_emb, x.teacher_emb[n], eps=self.eps), x.student_emb))
