"""Building blocks shared by the feature-map losses (not a loss; nothing registered here): the
checks that the maps and their shapes are there, and the reference's convolutional regressor.

A stage list is what an encoder's ``forward_features`` returns: the stage maps, then the embedding
last (RepDistiller's ``is_feat`` list). Shapes are per sample: (C, H, W) for a map, (d,) for the
embedding (``LossContext.student_feat_shapes`` / ``teacher_feat_shapes``).
"""
from __future__ import annotations

import torch
from torch import nn

from ensemble_kd.losses.base import DistillInputs, LossContext

Shapes = tuple[tuple[int, ...], ...]


def context_shapes(loss: str, ctx: LossContext) -> tuple[Shapes, dict[str, Shapes]]:
    """(student stage shapes, teacher name -> stage shapes) from the context; a clear error when the
    loop did not fill them (a feature-map loss runs on the online data path only)."""
    s, t = ctx.student_feat_shapes, ctx.teacher_feat_shapes
    missing = [n for n in ctx.teachers if t is None or n not in t]
    if s is None or missing:
        raise ValueError(f"{loss}: needs the stage shapes of the student and of every teacher "
                         f"(LossContext.student_feat_shapes/teacher_feat_shapes, filled by the loop on the online "
                         f"data path); missing: {'student' if s is None else ''}{' ' if s is None and missing else ''}"
                         f"{', '.join(missing)}")
    return tuple(map(tuple, s)), {n: tuple(map(tuple, t[n])) for n in ctx.teachers}


def require_maps(loss: str, x: DistillInputs, teachers: list[str]) -> None:
    if x.student_feats is None or any(n not in x.teacher_feats for n in teachers):
        raise ValueError(f"{loss}: needs the student's and every teacher's feature maps (the online data path)")


def check_map(loss: str, what: str, shape: tuple[int, ...]) -> None:
    """A stage a loss reads must be a map (C, H, W), not the embedding or an MLP's vector."""
    if len(shape) != 3:
        raise ValueError(f"{loss}: {what} has shape {shape}, not a feature map (C, H, W)")


def check_pairs(loss: str, teacher: str, s: Shapes, t: Shapes) -> None:
    if len(s) != len(t):
        raise ValueError(f"{loss}: the student has {len(s)} stage maps to pair, teacher {teacher!r} {len(t)}: "
                         f"they must pair up (student {list(s)}, teacher {list(t)})")


def paired_maps(loss: str, teacher: str, s: Shapes, t: Shapes, first: int = 1) -> list[tuple[tuple[int, ...], ...]]:
    """The student's and teacher ``teacher``'s stage shapes paired up, each checked to be a map;
    ``first``: the number of the first stage in the messages."""
    check_pairs(loss, teacher, s, t)
    for i, (a, b) in enumerate(zip(s, t), start=first):
        check_map(loss, f"student stage {i}", a)
        check_map(loss, f"teacher {teacher!r} stage {i}", b)
    return list(zip(s, t))


class ConvReg(nn.Module):
    """The reference's ``ConvReg`` (FitNet's regressor, AB's connector): a student map (C_s, H_s, W_s)
    -> the teacher's (C_t, H_t, W_t) by a stride-2 3x3 conv (H_s = 2 H_t), a stride-2 4x4 transposed
    conv (2 H_s = H_t) or a (1 + H_s - H_t) x (1 + W_s - W_t) conv (H_s >= H_t), then BN and,
    with ``use_relu``, ReLU. The conv has no bias: the reference's is cancelled by the BN right after it
    (a train-mode BN subtracts the batch mean, so that bias only ever gets a zero gradient). The BN keeps
    no running statistics: a loss's parts run in training mode only (the reference never reads them),
    and under DDP each rank's would differ."""

    def __init__(self, s_shape: tuple[int, ...], t_shape: tuple[int, ...], use_relu: bool = True) -> None:
        super().__init__()
        (s_c, s_h, s_w), (t_c, t_h, t_w) = s_shape, t_shape
        if s_h == 2 * t_h:
            self.conv: nn.Module = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1, bias=False)
        elif s_h * 2 == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1, bias=False)
        elif s_h >= t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w), bias=False)
        else:
            raise ValueError(f"no regressor from a student map {s_shape} to a teacher map {t_shape} "
                             f"(the reference's ConvReg: the student's H must be 2x, 1/2x or >= the teacher's)")
        self.bn = nn.BatchNorm2d(t_c, track_running_stats=False)
        self.use_relu = use_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))  # (B, C_t, H_t, W_t)
        return torch.relu(x) if self.use_relu else x


def zero_touching(params, like: torch.Tensor) -> torch.Tensor:
    """A 0-d zero that depends on ``params``: a term whose trainable parts sit out this stage still
    puts them in the graph, so under DDP (no ``find_unused_parameters``) every parameter gets a
    gradient, an exact zero, each step."""
    total = like.new_zeros((), dtype=torch.float32 if like.dtype != torch.float64 else torch.float64)
    for p in params:
        total = total + 0.0 * p.sum()
    return total
