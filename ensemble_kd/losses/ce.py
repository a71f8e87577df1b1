"""Cross-entropy of the student's logits with the labels (the supervised term of every recipe).

With a label subset (``distill.labels``, ``DistillInputs.labelled``) it averages over the labelled
rows of the batch only; a batch without one gives 0 (and no gradient), never NaN."""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field  # option types and ranges, checked at config load (orchestration/checks.py)
from torch import nn

from ensemble_kd.losses.base import LOSSES, DistillInputs, LossContext, LossOutput


def ce_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """logits (B, C), labels (B,) -> scalar mean cross-entropy."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def masked_ce_loss(logits: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor,
                   label_smoothing: float = 0.0) -> torch.Tensor:
    """logits (B, C), labels (B,), labelled (B,) bool -> scalar mean cross-entropy over the labelled
    rows (0 when there is none). The other rows' labels are never read: they may be pseudo-labels or -1."""
    m = labelled.to(logits.device)
    safe = torch.where(m, labels, torch.zeros_like(labels))  # (B,) a valid class index on every row
    per_row = F.cross_entropy(logits.float(), safe, label_smoothing=label_smoothing, reduction="none")  # (B,)
    return torch.where(m, per_row, torch.zeros_like(per_row)).sum() / m.sum().clamp_min(1)


@LOSSES.register("ce", needs_teachers=False, paper="cross-entropy with the labels")
class CELoss(nn.Module):
    def __init__(self, ctx: LossContext, *, label_smoothing: Annotated[float, Field(ge=0, le=1)] = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"ce: label_smoothing must be in [0, 1], got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)

    def forward(self, x: DistillInputs) -> LossOutput:
        if x.labelled is None:
            return LossOutput(ce_loss(x.student_logits, x.labels, self.label_smoothing))
        loss = masked_ce_loss(x.student_logits, x.labels, x.labelled, self.label_smoothing)
        return LossOutput(loss, {"ce/labelled_rows": x.labelled.detach().float().sum()})
