"""VID on feature maps, as the paper: Ahn, Hu, Damianou, Lawrence, Dai, "Variational Information
Distillation for Knowledge Transfer", CVPR 2019.

At each intermediate stage pair the teacher's map t (B, C_t, H, W) is modelled given the student's
map s by a Gaussian with a mean from a regressor of s and a learned per-channel variance,

    mu  = conv1x1 - ReLU - conv1x1 - ReLU - conv1x1 (s)       (C_s -> C_t -> C_t -> C_t, no bias)
    var = softplus(log_scale) + eps                           (C_t,), init_pred_var at the start
    loss = mean_{b,c,h,w} 0.5 * ((t - mu)^2 / var + log var)

and the negative log-likelihoods of the pairs are summed. As the reference (RepDistiller ``VIDLoss``,
the authors' code): the pairs are ``g_s[1:-1]`` against ``g_t[1:-1]``, the larger map is pooled to the
smaller *before* the regressor, softplus(log_scale) + eps is the *variance* (``init_pred_var = 5`` is a
variance of 5), the regressor's middle width is the teacher's channels, and the reference trains it
with weight beta = 1. The ``vid`` loss is the embedding variant (shard path). Every teacher has its
own regressors and scales; an ensemble is sum_k w_k * VID_k.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ensemble_kd.losses._featmaps import context_shapes, paired_maps, require_maps
from ensemble_kd.losses._util import module_keys, weighted_teacher_sum
from ensemble_kd.losses.base import LOSSES, DistillInputs, LossContext, LossOutput, normalise_teacher_weights
from ensemble_kd.losses.functional import pool_to_smaller, vid


def conv1x1(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1, padding=0, bias=False)


class VIDMapHead(nn.Module):
    """One stage pair's Gaussian: the reference's regressor and per-channel ``log_scale``."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, init_pred_var: float, eps: float) -> None:
        super().__init__()
        self.regressor = nn.Sequential(conv1x1(c_in, c_mid), nn.ReLU(), conv1x1(c_mid, c_mid), nn.ReLU(),
                                       conv1x1(c_mid, c_out))
        # softplus(log_scale) + eps = init_pred_var at the start: the reference's log(exp(v - eps) - 1)
        self.log_scale = nn.Parameter(torch.full((c_out,), math.log(math.expm1(init_pred_var - eps))))

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor, eps: float) -> torch.Tensor:
        f_s, f_t = pool_to_smaller(f_s, f_t)  # pooled before the regressor, as the reference
        return vid(self.regressor(f_s), f_t, self.log_scale, eps)  # mu (B, C_t, H, W)


@LOSSES.register("vid_map", needs_teachers=True, needs=("feature_maps",),
                 paper="Ahn et al., Variational Information Distillation, CVPR 2019")
class VIDMapLoss(nn.Module):
    """sum_k w_k * sum over intermediate stage pairs of the Gaussian NLL of teacher_k's map.

    Metrics: ``vid_map/<teacher>/var`` (the heads' mean learned variance: how well the maps are predicted).
    """

    def __init__(self, ctx: LossContext, *, init_pred_var: float = 5.0, eps: float = 1e-5,
                 teacher_weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        if eps <= 0:
            raise ValueError(f"vid_map: eps must be > 0, got {eps}")
        if init_pred_var <= eps:
            raise ValueError(f"vid_map: init_pred_var must be > eps ({eps}), got {init_pred_var}")
        self.eps = float(eps)
        self.teachers = ctx.teachers
        self.weights = normalise_teacher_weights(self.teachers, teacher_weights)
        self._key = module_keys("vid_map", self.teachers)
        s_shapes, t_shapes = context_shapes("vid_map", ctx)
        self.heads = nn.ModuleDict()
        for name in self.teachers:
            pairs = paired_maps("vid_map", name, s_shapes[1:-1], t_shapes[name][1:-1])
            self.heads[self._key[name]] = nn.ModuleList(
                [VIDMapHead(a[0], b[0], b[0], float(init_pred_var), self.eps) for a, b in pairs])
        self.to(ctx.device)

    def forward(self, x: DistillInputs) -> LossOutput:
        require_maps("vid_map", x, self.teachers)
        g_s = x.student_feats[1:-1]  # [(B, C_i, H_i, W_i)]

        def term(name: str) -> torch.Tensor:
            heads = self.heads[self._key[name]]
            return sum(h(s, t, self.eps) for h, s, t in zip(heads, g_s, x.teacher_feats[name][1:-1]))

        loss = weighted_teacher_sum(self.weights, term, x.student_logits)
        metrics = {f"vid_map/{n}/var": torch.stack([F.softplus(h.log_scale.detach()).mean() + self.eps
                                                    for h in self.heads[self._key[n]]]).mean()
                   for n in self.teachers}
        return LossOutput(loss, metrics)
