"""VID: Ahn, Hu, Damianou, Lawrence, Dai, "Variational Information Distillation for Knowledge
Transfer", CVPR 2019.

VID maximises a variational lower bound on the mutual information I(t; s) between a teacher
representation t and the student's s, with a Gaussian q(t | s) = N(mu(s), diag(var)):

    var_c = softplus(alpha_c) + eps                 (learned, homoscedastic: one per channel)
    NLL   = 0.5 * (log var_c + (t_bc - mu_c(s_b))^2 / var_c)      per element (b, c)

(the negative log-likelihood up to the constant 0.5 log 2 pi), as the reference
(RepDistiller ``VIDLoss``, whose ``log_scale`` is alpha here): the formula is
:func:`~ensemble_kd.losses.functional.vid`, which averages over every element (``channel_reduction:
mean``); ``sum`` (default, the paper's per-sample NLL of the vector) multiplies that by the
channels. alpha is initialised so that the VARIANCE starts at ``init_var``
(alpha = softplus^-1(init_var - eps)), 5.0 as the reference's ``init_pred_var``.

mu is a small trainable regressor of the student's penultimate embedding: Linear(d_s, d) by
default, or Linear-ReLU-Linear with ``hidden`` units. ``target`` picks what is regressed: the
teacher's penultimate ``embedding`` (the paper's VID-I applied to the last feature layer), its
``logits`` (the paper's VID-LP: teacher logit layer from the student's penultimate layer), or
``both`` (two terms, each with its own regressor and alphas, summed). Every teacher has its own
regressors and alphas; an ensemble is sum_k w_k * loss_k.

Differences from the reference, on purpose (docs/methods/vid.md): it regresses the pooled
penultimate embedding (the reference: the intermediate feature maps, with a conv1x1 - ReLU -
conv1x1 - ReLU - conv1x1 regressor without biases); the regressor is a Linear with bias (or one
hidden layer); the channel sum by default (the option is not called ``reduction``, which in
every loss means how teachers combine).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
from pydantic import NonNegativeInt, PositiveFloat  # option types and ranges, checked at config load (orchestration/checks.py)
from torch import nn

from ensemble_kd.losses._util import module_keys, weighted_teacher_sum
from ensemble_kd.losses.base import LOSSES, DistillInputs, LossContext, LossOutput, normalise_teacher_weights
from ensemble_kd.losses.functional import vid, vid_variance

Target = Literal["embedding", "logits", "both"]
ChannelReduction = Literal["sum", "mean"]


def inverse_softplus(y: float) -> float:
    """x with softplus(x) = y > 0: log(exp(y) - 1), written stably (y + log(1 - exp(-y)))."""
    return y + math.log(-math.expm1(-y))


def make_regressor(d_in: int, d_out: int, hidden: int) -> nn.Module:
    """mu(s): Linear(d_in, d_out), or Linear-ReLU-Linear when ``hidden`` > 0."""
    if hidden <= 0:
        return nn.Linear(d_in, d_out)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


class VIDHead(nn.Module):
    """One Gaussian q(t | s): a regressor for the mean and one alpha per target channel (the
    variance softplus(alpha) + eps)."""

    def __init__(self, d_in: int, d_out: int, hidden: int, init_var: float, eps: float) -> None:
        super().__init__()
        self.regressor = make_regressor(d_in, d_out, hidden)
        # the variance softplus(alpha) + eps starts at init_var, as the reference's init_pred_var
        self.alpha = nn.Parameter(torch.full((d_out,), inverse_softplus(init_var - eps)))  # (d_out,)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.regressor(s)  # (B, d_out)


@LOSSES.register("vid", needs_teachers=True, paper="Ahn et al., Variational Information Distillation, CVPR 2019")
class VIDLoss(nn.Module):
    """sum_k w_k * sum over the targets of the head's NLL (functional ``vid``, x d for ``sum``).

    Metrics: ``vid/<teacher>/loss`` (that teacher's unweighted term) and
    ``vid/<teacher>/sigma_emb|sigma_logits`` (the head's mean learned standard deviation
    sqrt(var_c) over the channels: how well t is predicted).
    """

    def __init__(self, ctx: LossContext, *, hidden: NonNegativeInt = 0, init_var: PositiveFloat = 5.0, eps: PositiveFloat = 1e-5,
                 target: Target = "embedding", channel_reduction: ChannelReduction = "sum",
                 teacher_weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        if eps <= 0:
            raise ValueError(f"vid: eps must be > 0, got {eps}")
        if init_var <= eps:
            raise ValueError(f"vid: init_var must be > eps ({eps}), got {init_var}")
        if target not in ("embedding", "logits", "both"):
            raise ValueError(f"vid: target must be 'embedding', 'logits' or 'both', got {target!r}")
        if channel_reduction not in ("sum", "mean"):
            raise ValueError(f"vid: channel_reduction must be 'sum' or 'mean', got {channel_reduction!r}")
        if hidden < 0 or int(hidden) != hidden:
            raise ValueError(f"vid: hidden must be an integer >= 0 (0 = a Linear regressor), got {hidden}")
        hidden, init_var, eps = int(hidden), float(init_var), float(eps)
        self.eps, self.target, self.channel_reduction = eps, target, channel_reduction
        self.teachers = ctx.teachers
        self.weights = normalise_teacher_weights(self.teachers, teacher_weights)
        self._key = module_keys("vid", self.teachers)
        # Only the heads a target uses exist, so every parameter gets a gradient (DDP-friendly).
        self.emb_heads = nn.ModuleDict()
        self.logit_heads = nn.ModuleDict()
        for name in self.teachers:
            if target in ("embedding", "both"):
                self.emb_heads[self._key[name]] = VIDHead(ctx.student_dim, ctx.teacher_dims[name], hidden, init_var, eps)
            if target in ("logits", "both"):
                self.logit_heads[self._key[name]] = VIDHead(ctx.student_dim, ctx.num_classes, hidden, init_var, eps)
        self.to(ctx.device)

    def _head_loss(self, head: VIDHead, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """s (B, d_s), t (B, d) -> the element mean of the NLL (the reference's), times d for ``sum``."""
        loss = vid(head(s), t, head.alpha, self.eps)  # mean over (B, d)
        return loss * t.shape[1] if self.channel_reduction == "sum" else loss

    def teacher_loss(self, name: str, x: DistillInputs) -> torch.Tensor:
        key, s = self._key[name], x.student_emb  # (B, d_s)
        total = s.new_zeros((), dtype=torch.float32)
        if key in self.emb_heads:
            total = total + self._head_loss(self.emb_heads[key], s, x.teacher_emb[name])  # t (B, d_t)
        if key in self.logit_heads:
            total = total + self._head_loss(self.logit_heads[key], s, x.teacher_logits[name])  # t (B, C)
        return total

    def forward(self, x: DistillInputs) -> LossOutput:
        metrics: dict[str, torch.Tensor] = {}

        def term(name: str) -> torch.Tensor:
            loss = self.teacher_loss(name, x)
            metrics[f"vid/{name}/loss"] = loss.detach()
            return loss

        total = weighted_teacher_sum(self.weights, term, x.student_emb)
        for name in self.teachers:
            for kind, heads in (("emb", self.emb_heads), ("logits", self.logit_heads)):
                if self._key[name] in heads:
                    var = vid_variance(heads[self._key[name]].alpha.detach(), self.eps)  # (d,)
                    metrics[f"vid/{name}/sigma_{kind}"] = var.sqrt().mean()
        return LossOutput(total, metrics)
