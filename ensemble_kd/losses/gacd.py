"""GACD: Bai et al., "Feature Distillation With Guided Adversarial Contrastive Learning"
(2020, arXiv:2009.09922).

CRD's contrastive objective (see :mod:`ensemble_kd.losses.crd`), with every anchor's terms
weighted by how much the teacher trusts that sample: w_i = p_teacher(y_i | x_i), the teacher's
softmax probability of the true class. A sample the teacher gets wrong pulls the student's
feature towards the teacher's little; one it is sure of pulls fully. Negatives come from other
classes (``negatives: class-aware``), and the reference preset is k = 16384 negatives, tau = 0.1.

Positives are relaxed by default (``positives: relaxed``, the seed paper's): the positive of
anchor i is another sample of its class, j != i with y_j = y_i, read from the memories (the
student memory in the teacher-anchor direction; in the student-anchor direction the teacher side
of row j: its bank embedding through the current teacher head in ``mode: exact``, the teacher
memory in ``mode: reference``). ``positives: own`` is CRD's positive, the anchor's own row.

The paper's other half, adversarial examples of the inputs, lives in the embed stage: with
``embed.adversarial.enabled`` each teacher stores PGD views of its inputs (and the deltas), made
by default on a self-supervised objective (:mod:`ensemble_kd.blocks.adversarial`); the student trains on
those same perturbed inputs, and this loss weights their anchors by the teacher's (lower)
confidence on them like any other row.

With an ensemble every teacher has its own CRD term, weighted per anchor by its own confidence.
The whole loss runs in float32 (float64 for float64 inputs) under autocast: half-precision inputs
are cast inside, and autocast is off for the scores, Z and NCE.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, PositiveInt  # option types and ranges, checked at config load (orchestration/checks.py)

from ensemble_kd.losses._util import as_float
from ensemble_kd.losses.base import LOSSES, DistillInputs, LossContext, LossOutput
from ensemble_kd.losses.crd import MODES, CRDLoss, Draws

POSITIVES = ("relaxed", "own")


def teacher_confidence(teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """GACD's anchor weights: w_i = softmax(t_i / T)[y_i], in [0, 1].

    teacher_logits (B, C), labels (B,) int64 -> (B,) float32, detached (the teacher is frozen: the
    weights are constants of the loss, not a path for gradients).
    """
    if temperature <= 0:
        raise ValueError(f"gacd: confidence_temperature must be > 0, got {temperature}")
    p = F.softmax(teacher_logits.detach().float() / temperature, dim=1)  # (B, C)
    return p.gather(1, labels.to(device=p.device, dtype=torch.long)[:, None])[:, 0]  # (B,)


def crd_mode(mode: str, positives: str) -> str:
    """The CRD mode that gives GACD's (``mode``, ``positives``): CRD's ``relax`` is ``exact`` with
    relaxed positives; ``reference`` keeps its name (GACD draws its relaxed positives itself)."""
    if mode not in MODES:
        raise ValueError(f"gacd: mode must be one of {MODES}, got {mode!r}")
    if positives not in POSITIVES:
        raise ValueError(f"gacd: positives must be one of {POSITIVES}, got {positives!r}")
    if mode == "relax" and positives == "own":
        raise ValueError("gacd: mode 'relax' is mode 'exact' with positives 'relaxed'; "
                         "with positives 'own' use mode 'exact'")
    return "relax" if (mode == "exact" and positives == "relaxed") else mode


@LOSSES.register("gacd", needs_teachers=True, paper="Bai et al., 2020, arXiv:2009.09922 (GACD)",
                 sweep_axes=("tau", "num_negatives"))
class GACDLoss(CRDLoss):
    """CRD with per-anchor teacher-confidence weights (one weight vector per teacher) and relaxed
    positives.

    forward(x) -> LossOutput: sum_t w_t * (loss_a + loss_b), each NCE term summing
    conf_t,i * (log D1_i + sum_j log D0_ij) over anchors i (``nce_loss`` with ``weights``).
    Metrics: CRD's, plus ``gacd/<teacher>/mean_weight`` (the batch mean of conf_t,i).
    Options are CRD's (listed here so configs are checked), with the paper's defaults
    (tau = 0.1, num_negatives = 16384, class-aware negatives in every ``mode``), plus
    ``positives`` (``relaxed``, the paper's: another sample of the anchor's class; ``own``: the
    anchor's own row, as CRD) and ``confidence_temperature`` (T of the softmax that gives the
    weights; 1 = the teacher's plain prediction). ``mode`` says what the teacher side of the
    student-anchor direction is, as CRD (``exact`` or ``reference``; ``relax`` is accepted as
    ``exact`` with relaxed positives). The weights multiply both directions' per-anchor terms in
    every mode; the loss is computed in float32 (see the module doc).
    """

    def __init__(self, ctx: LossContext, *, feat_dim: PositiveInt = 128, tau: PositiveFloat = 0.1, num_negatives: PositiveInt = 16384,
                 momentum: Annotated[float, Field(ge=0, le=1)] = 0.5, mode: str = "exact", positives: str = "relaxed",
                 negatives: str = "class-aware",
                 per_sample: bool = True, teacher_weights: Mapping[str, float] | None = None,
                 hard_pool: PositiveInt = 512, use_gpu_faiss: bool = False, teacher_head_grad: str = "teacher_anchor",
                 confidence_temperature: PositiveFloat = 1.0) -> None:
        if confidence_temperature <= 0:
            raise ValueError(f"gacd: confidence_temperature must be > 0, got {confidence_temperature}")
        super().__init__(ctx, feat_dim=feat_dim, tau=tau, num_negatives=num_negatives, momentum=momentum,
                         mode=crd_mode(mode, positives), negatives=negatives, per_sample=per_sample,
                         teacher_weights=teacher_weights, hard_pool=hard_pool, use_gpu_faiss=use_gpu_faiss,
                         teacher_head_grad=teacher_head_grad)
        self.positives = positives
        self.confidence_temperature = float(confidence_temperature)

    def draws(self, name: str, x: DistillInputs, index: torch.Tensor, step: int) -> Draws:
        """CRD's draws; in ``reference`` mode with relaxed positives, each anchor's positive is
        another row of its class (CRD's ``relax`` draw; given ``contrast_idx`` positives are kept)."""
        d = super().draws(name, x, index, step)
        if self.positives == "relaxed" and self.mode == "reference" and x.contrast_idx is None:
            d = dataclasses.replace(d, pos=self.samplers[name].sample_positives(index, step))  # (B,)
        return d

    def anchor_weights(self, name: str, x: DistillInputs) -> torch.Tensor:
        """(B,) softmax(teacher ``name``'s logits / T) at the true label, on the student's device."""
        logits = x.teacher_logits.get(name)
        if logits is None:  # the loop hands every teacher's logits; the bank has them otherwise
            logits = self.ctx_bank.logits[name][x.index.cpu().long()]
        return teacher_confidence(logits.to(x.student_emb.device), x.labels, self.confidence_temperature)  # (B,)

    def weight_metrics(self, name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return {f"gacd/{name}/mean_weight": w.detach().mean()}

    def forward(self, x: DistillInputs) -> LossOutput:
        # exp(dot / tau) at tau = 0.1 and NCE's near-equal logs need float32: cast what a student
        # under autocast hands (bf16/fp16) here, and keep autocast off for everything computed
        x = dataclasses.replace(x, student_emb=as_float(x.student_emb),
                                teacher_emb={n: as_float(t) for n, t in x.teacher_emb.items()},
                                teacher_logits={n: as_float(t) for n, t in x.teacher_logits.items()})
        with torch.autocast(x.student_emb.device.type, enabled=False):
            return super().forward(x)
