"""DFND's noisy adaptation: Chen, Guo, Xu, Li, Xu, Xu, Wang, "Learning Student Networks in the Wild"
(Data-Free Noisy Distillation), CVPR 2021. Reference code: huawei-noah/Data-Efficient-Model-Compression
(``DFND/``), whose noise layer is ``noise_adaptation`` (C, C-1) and ``noisy()``.

The student trains on pool rows labelled by the teachers' argmax (``ensemble-kd select``); those
pseudo-labels are noisy. The student's clean prediction p_s = softmax(s) goes through a noise
model Q (C x C, Q_ij = P(noisy label j | true class i)) before the cross-entropy with the noisy
labels, so the student itself is fitted to the clean classes:

    q    = p_s @ Q                 (B, C)  the predicted distribution of the *noisy* label
    loss = -mean_b log q[b, y~_b]

Q as the reference builds it: the diagonal is *fixed* at the teacher's accuracy a_i (not
trained), and only the off-diagonals are learned, through V (C, C-1), initialised to 0:

    Q_ii = a_i,   (Q_ij)_{j != i} = (1 - a_i) * softmax(V_i)     (row i's C-1 other columns, in order)

so every row is a distribution at every step (a_i + (1 - a_i) * 1 = 1) and Q starts with the
error shared evenly. V is trained by its own parameter group (:meth:`DFNDLoss.param_groups`, read
by the loop's optimiser): its own lr (``q_lr``, the reference's Adam lr 1e-3) and no weight
decay (the student's weight decay would pull V to 0, i.e. Q towards the even split). At test time
the student's own logits are used (Q only models noise). It is used together with KD
(``losses: [dfnd, kd]``), hence ``needs_teachers``.

a_i, per class (the reference uses one accuracy for every class; a single float here does the
same), comes from the ``class_accuracy`` option, else from the selection manifest at the
``selection`` path option, else from the selection the run trains on (``LossContext.selection``,
the manifest of ``distill.selection``: its ``class_accuracy``, the ensemble's recall of each
class on the teachers' labelled test split). Files are read at construction, never in forward.
Metric: ``dfnd/q_diag_mean`` (the mean of Q's diagonal, the modelled rate of right pseudo-labels:
now the constant mean of a_i, kept under its name for dashboards and comparisons).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ensemble_kd.losses.base import LOSSES, DistillInputs, LossContext, LossOutput
from ensemble_kd.blocks.selection import load_selection

Q_LR = 1e-3  # the reference's optimiser of the noise layer: Adam(lr=0.001), no weight decay


def accuracy_vector(class_accuracy: float | Sequence[float], num_classes: int) -> torch.Tensor:
    """(C,) float64 a_i, checked: one value per class in [0, 1] (a single value: every class)."""
    C = int(num_classes)
    if C < 2:
        raise ValueError(f"dfnd: needs at least 2 classes, got {C}")
    if isinstance(class_accuracy, (int, float)):
        class_accuracy = [float(class_accuracy)] * C
    a = torch.as_tensor([float(x) for x in class_accuracy], dtype=torch.float64)  # (C,)
    if a.shape != (C,):
        raise ValueError(f"dfnd: class_accuracy must have {C} values (one per class), got {len(a)}")
    if bool(((a < 0) | (a > 1) | torch.isnan(a)).any()):
        raise ValueError(f"dfnd: class_accuracy values must be in [0, 1], got {a.tolist()}")
    return a


def off_diagonal_columns(num_classes: int) -> torch.Tensor:
    """(C, C-1) int64: column of Q of row i's k-th off-diagonal entry (0..C-1 without i, in order)."""
    C = int(num_classes)
    k = torch.arange(C - 1)[None, :]  # (1, C-1)
    i = torch.arange(C)[:, None]  # (C, 1)
    return k + (k >= i).long()  # (C, C-1): skip the diagonal


def noise_matrix(v: torch.Tensor, class_accuracy: torch.Tensor) -> torch.Tensor:
    """Q (C, C) from the learned off-diagonal logits v (C, C-1) and the fixed diagonal a (C,):
    Q_ii = a_i and row i's other entries (1 - a_i) * softmax(v_i), in column order (the
    reference's ``noisy()``). Every row sums to 1; gradients reach v only."""
    C = class_accuracy.shape[0]
    a = class_accuracy.to(v)  # (C,)
    off = F.softmax(v, dim=1) * (1.0 - a)[:, None]  # (C, C-1)
    q = torch.zeros(C, C, dtype=v.dtype, device=v.device).scatter(1, off_diagonal_columns(C).to(v.device), off)
    return q + torch.diag(a)  # (C, C)


def initial_q(class_accuracy: float | Sequence[float], num_classes: int) -> torch.Tensor:
    """(C, C) Q at the start (v = 0): diagonal a_i, the rest of row i shares 1 - a_i evenly."""
    a = accuracy_vector(class_accuracy, num_classes)
    return noise_matrix(torch.zeros(int(num_classes), int(num_classes) - 1, dtype=torch.float64), a).float()


def noisy_adaptation_loss(student_logits: torch.Tensor, labels: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """student_logits (B, C), labels (B,) int64 noisy (pseudo) labels, Q (C, C) row-stochastic.

    Returns the scalar mean over the batch of -log (softmax(student_logits) @ Q)[b, labels_b].
    """
    p_s = F.softmax(student_logits.float(), dim=1)  # (B, C) clean-class prediction
    q = p_s @ Q.float()  # (B, C) predicted noisy-label distribution
    return F.nll_loss(torch.log(q.clamp_min(torch.finfo(q.dtype).tiny)), labels.long())


def class_accuracy_of(ctx: LossContext, class_accuracy: float | Sequence[float] | None,
                      selection: str | None) -> float | Sequence[float]:
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
    """The noisy adaptation term. Trainable: ``v`` (C, C-1), Q's off-diagonal logits, in its own
    optimiser group (:meth:`param_groups`); buffer: ``class_accuracy`` (C,), Q's fixed diagonal."""

    def __init__(self, ctx: LossContext, *, class_accuracy: float | Sequence[float] | None = None,
                 selection: str | None = None, q_lr: float = Q_LR) -> None:
        super().__init__()
        if not q_lr > 0:
            raise ValueError(f"dfnd: q_lr must be > 0, got {q_lr}")
        a = accuracy_vector(class_accuracy_of(ctx, class_accuracy, selection), ctx.num_classes)  # (C,)
        self.register_buffer("class_accuracy", a.float())  # (C,) Q's diagonal, fixed (saved with the state)
        self.v = nn.Parameter(torch.zeros(ctx.num_classes, ctx.num_classes - 1))  # (C, C-1) as the reference
        self.q_lr = float(q_lr)
        self.to(ctx.device)

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimiser group of Q's off-diagonal logits: lr ``q_lr``, no weight decay (see the module doc)."""
        return [{"params": [self.v], "lr": self.q_lr, "weight_decay": 0.0}]

    @property
    def Q(self) -> torch.Tensor:  # (C, C), every row a distribution
        return noise_matrix(self.v.float(), self.class_accuracy)

    def forward(self, x: DistillInputs) -> LossOutput:
        Q = self.Q  # (C, C)
        return LossOutput(noisy_adaptation_loss(x.student_logits, x.labels, Q),
                          {"dfnd/q_diag_mean": Q.detach().diagonal().mean()})
