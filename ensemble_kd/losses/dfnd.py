"""DFND's noisy adaptation: Chen, Guo, Xu, Li, Xu, Xu, Wang, "Learning Student Networks in the Wild"
(Data-Free Noisy Distillation), CVPR 2021.

The student trains on pool rows labelled by the teachers' argmax (``ensemble-kd select``); those
pseudo-labels are noisy. The student's clean prediction p_s = softmax(s) goes through a noise
model Q (C x C, Q_ij = P(noisy label j | true class i)) before the cross-entropy with the noisy
labels, so the student itself is fitted to the clean classes:

    q    = p_s @ Q                 (B, C)  the predicted distribution of the *noisy* label
    loss = -mean_b log q[b, y~_b]

Q is trainable and its rows always stay probability distributions: Q = softmax(W, dim=1). It
starts from the teachers' per-class accuracy a_i on their own test split (the recall of class i,
i.e. P(noisy = i | true = i)): Q0_ii = a_i, Q0_ij = (1 - a_i) / (C - 1) (the error shared evenly),
W0 = log Q0 (entries floored at 1e-6, so an a_i of 1 stays finite). Q is trained by the same
optimiser as the student. At test time the student's own logits are used (Q only models noise).
It is used together with KD (``losses: [dfnd, kd]``), hence ``needs_teachers``.

a_i comes from the ``class_accuracy`` option, else from the selection manifest at the
``selection`` path option, else from the selection the run trains on (``LossContext.selection``,
the manifest of ``distill.selection``). Files are read at construction, never in forward.
Metric: ``dfnd/q_diag_mean`` (the mean of Q's diagonal: the modelled rate of correct pseudo-labels).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ensemble_kd.losses.base import LOSSES, DistillInputs, LossContext, LossOutput
from ensemble_kd.selection import load_selection

Q_FLOOR = 1e-6  # smallest entry of the initial Q (log of it is W0)


def initial_q(class_accuracy: Sequence[float], num_classes: int) -> torch.Tensor:
    """(C, C) row-stochastic matrix: diagonal a_i, the rest of row i shares 1 - a_i evenly."""
    a = torch.as_tensor([float(x) for x in class_accuracy], dtype=torch.float64)  # (C,)
    C = int(num_classes)
    if C < 2:
        raise ValueError(f"dfnd: needs at least 2 classes, got {C}")
    if a.shape != (C,):
        raise ValueError(f"dfnd: class_accuracy must have {C} values (one per class), got {len(a)}")
    if bool(((a < 0) | (a > 1) | torch.isnan(a)).any()):
        raise ValueError(f"dfnd: class_accuracy values must be in [0, 1], got {a.tolist()}")
    q = ((1.0 - a) / (C - 1))[:, None].expand(C, C).clone()  # (C, C) off-diagonal share
    q[torch.arange(C), torch.arange(C)] = a
    return q.float()


def noisy_adaptation_loss(student_logits: torch.Tensor, labels: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """student_logits (B, C), labels (B,) int64 noisy (pseudo) labels, Q (C, C) row-stochastic.

    Returns the scalar mean over the batch of -log (softmax(student_logits) @ Q)[b, labels_b].
    """
    p_s = F.softmax(student_logits.float(), dim=1)  # (B, C) clean-class prediction
    q = p_s @ Q.float()  # (B, C) predicted noisy-label distribution
    return F.nll_loss(torch.log(q.clamp_min(torch.finfo(q.dtype).tiny)), labels.long())


def class_accuracy_of(ctx: LossContext, class_accuracy: Sequence[float] | None, selection: str | None) -> Sequence[float]:
    """a_i from the first source that is given: the option, the selection at ``selection``, the run's."""
    if class_accuracy is not None:
        return class_accuracy
    if selection is not None:
        return load_selection(selection).class_accuracy
    if ctx.selection is not None:
        return ctx.selection["class_accuracy"]
    raise ValueError("dfnd: needs the teachers' per-class accuracy: train on a selection (distill.selection, "
                     "made by `ensemble-kd select`), or set the loss option class_accuracy or selection")


@LOSSES.register("dfnd", needs_teachers=True, paper="Chen et al., CVPR 2021 (DFND: Learning Student Networks in the Wild)")
class DFNDLoss(nn.Module):
    """The noisy adaptation term; ``w`` (C, C) is the trainable parameter, Q = softmax(w, dim=1)."""

    def __init__(self, ctx: LossContext, *, class_accuracy: Sequence[float] | None = None,
                 selection: str | None = None) -> None:
        super().__init__()
        q0 = initial_q(class_accuracy_of(ctx, class_accuracy, selection), ctx.num_classes)  # (C, C)
        self.w = nn.Parameter(torch.log(q0.clamp_min(Q_FLOOR)))  # (C, C) softmax(log Q0) = Q0 (rows sum to 1)
        self.to(ctx.device)

    @property
    def Q(self) -> torch.Tensor:  # (C, C), every row a distribution
        return F.softmax(self.w.float(), dim=1)

    def forward(self, x: DistillInputs) -> LossOutput:
        Q = self.Q  # (C, C)
        return LossOutput(noisy_adaptation_loss(x.student_logits, x.labels, Q),
                          {"dfnd/q_diag_mean": Q.detach().diagonal().mean()})
