"""Cross-entropy of the student's logits with the labels (the supervised term of every recipe)."""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field  # option types and ranges, checked at config load (checks.py)
from torch import nn

from ensemble_kd.losses.base import LOSSES, DistillInputs, LossContext, LossOutput


def ce_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """logits (B, C), labels (B,) -> scalar mean cross-entropy."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


@LOSSES.register("ce", needs_teachers=False, paper="cross-entropy with the labels")
class CELoss(nn.Module):
    def __init__(self, ctx: LossContext, *, label_smoothing: Annotated[float, Field(ge=0, le=1)] = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"ce: label_smoothing must be in [0, 1], got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)

    def forward(self, x: DistillInputs) -> LossOutput:
        return LossOutput(ce_loss(x.student_logits, x.labels, self.label_smoothing))
