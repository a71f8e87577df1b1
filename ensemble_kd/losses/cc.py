"""CC: Peng, Jin, Liu, Zhou, Wu, Liu, Li, Zhang, "Correlation Congruence for Knowledge
Distillation", ICCV 2019.

The student matches the teacher's correlation between the samples of a batch. ``kernel`` picks
the correlation:

- ``reference`` (default): RepDistiller's ``Correlation`` (the code its author restructured from
  the CC authors'), :func:`~ensemble_kd.losses.functional.cc`: with delta = |f_s - f_t| (B, d) on
  the embedded features, loss = mean_{b < B-1} sum_c delta_{b,c} delta_{b+1,c} (consecutive
  samples of the batch).
- ``taylor``: the paper's generalised kernel (Knowledge-Distillation-Zoo's ``CC``): unit rows,
  C_ij = sum_{p=0..P} exp(-2 gamma) (2 gamma)^p / p! (f_i . f_j)^p (the P-order Taylor
  expansion of the Gaussian RBF kernel), loss = ||C_t - C_s||^2 / B^2; ``gamma`` (0.4) and
  ``order`` (P = 2) apply to it only.

As RepDistiller's CC setup, each side first goes through a trainable linear embedding to
``feat_dim`` = 128 (``embed: both``; RepDistiller's ``LinearEmbed``, loss weight beta = 0.02
there); ``embed: student`` embeds only the student (the teacher's correlation then stays that
of its fixed embeddings) and ``embed: none`` uses the raw embeddings (``reference`` then needs
equal dims). With ``both`` the teacher-side head is learned jointly, as in RepDistiller. Every
teacher has its own heads; an ensemble is sum_k w_k * CC_k. (The paper's full objective adds KD
and CE: separate loss terms here.)
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import NonNegativeInt, PositiveFloat, PositiveInt  # option types and ranges, checked at config load (orchestration/checks.py)
from torch import nn

from ensemble_kd.losses._util import as_float, module_keys, weighted_teacher_sum
from ensemble_kd.losses.base import LOSSES, DistillInputs, LossContext, LossOutput, normalise_teacher_weights
from ensemble_kd.losses.functional import cc

Embed = Literal["both", "student", "none"]
Kernel = Literal["reference", "taylor"]


def taylor_correlation(f: torch.Tensor, gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    """f (B, d) -> (B, B) P-order Taylor approximation of the Gaussian RBF kernel of the unit rows
    (``kernel: taylor`` only; not RepDistiller's formula)."""
    f = F.normalize(f, p=2, dim=1)  # (B, d)
    sim = f @ f.t()  # (B, B) cosine similarities
    corr = torch.zeros_like(sim)
    for p in range(order + 1):
        corr = corr + math.exp(-2.0 * gamma) * (2.0 * gamma) ** p / math.factorial(p) * sim.pow(p)
    return corr  # (B, B)


def taylor_cc(student_emb: torch.Tensor, teacher_emb: torch.Tensor, gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    """student_emb (B, d_s), teacher_emb (B, d_t) (any dims) -> scalar ||C_t - C_s||^2 / B^2."""
    s = as_float(student_emb)
    c_s = taylor_correlation(s, gamma, order)  # (B, B)
    c_t = taylor_correlation(as_float(teacher_emb).to(s.dtype), gamma, order)  # (B, B)
    return F.mse_loss(c_s, c_t)


@LOSSES.register("cc", needs_teachers=True, paper="Peng et al., Correlation Congruence for Knowledge Distillation, ICCV 2019")
class CCLoss(nn.Module):
    """Per teacher: optional linear heads, then the ``kernel``'s CC; sum_k w_k * CC_k."""

    def __init__(self, ctx: LossContext, *, gamma: PositiveFloat = 0.4, order: NonNegativeInt = 2, feat_dim: PositiveInt = 128,
                 embed: Embed = "both", kernel: Kernel = "reference",
                 teacher_weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        if gamma <= 0:
            raise ValueError(f"cc: gamma must be > 0, got {gamma}")
        if order < 0 or int(order) != order:
            raise ValueError(f"cc: order must be an integer >= 0, got {order}")
        if kernel not in ("reference", "taylor"):
            raise ValueError(f"cc: kernel must be 'reference' or 'taylor', got {kernel!r}")
        if embed not in ("both", "student", "none"):
            raise ValueError(f"cc: embed must be 'both', 'student' or 'none', got {embed!r}")
        if embed != "none" and (feat_dim < 1 or int(feat_dim) != feat_dim):
            raise ValueError(f"cc: feat_dim must be an integer >= 1, got {feat_dim}")
        if kernel == "reference" and embed != "both":  # delta = |f_s - f_t| needs one dim on both sides
            s_dim = int(feat_dim) if embed == "student" else ctx.student_dim
            bad = {n: d for n, d in ctx.teacher_dims.items() if d != s_dim}
            if bad:
                raise ValueError(f"cc: kernel 'reference' with embed {embed!r} compares the student's {s_dim} dims "
                                 f"with the teacher's: teachers {bad} differ (use embed 'both' or kernel 'taylor')")
        self.gamma, self.order, self.embed, self.kernel = float(gamma), int(order), embed, kernel
        self.teachers = ctx.teachers
        self.weights = normalise_teacher_weights(self.teachers, teacher_weights)
        feat_dim = int(feat_dim)
        self._key = module_keys("cc", self.teachers)
        self.embed_s = nn.ModuleDict()
        self.embed_t = nn.ModuleDict()
        for n in self.teachers:
            if embed in ("both", "student"):
                self.embed_s[self._key[n]] = nn.Linear(ctx.student_dim, feat_dim)
            if embed == "both":
                self.embed_t[self._key[n]] = nn.Linear(ctx.teacher_dims[n], feat_dim)
        self.to(ctx.device)

    def teacher_loss(self, name: str, x: DistillInputs) -> torch.Tensor:
        key = self._key[name]
        s, t = x.student_emb, x.teacher_emb[name].to(x.student_emb.dtype)  # (B, d_s), (B, d_t)
        if key in self.embed_s:
            s = self.embed_s[key](s)  # (B, feat_dim)
        if key in self.embed_t:
            t = self.embed_t[key](t)  # (B, feat_dim)
        if self.kernel == "taylor":
            return taylor_cc(s, t, self.gamma, self.order)
        return cc(s, t)

    def forward(self, x: DistillInputs) -> LossOutput:
        return LossOutput(weighted_teacher_sum(self.weights, lambda n: self.teacher_loss(n, x), x.student_emb))
