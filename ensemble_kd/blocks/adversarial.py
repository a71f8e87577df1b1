"""PGD adversarial views for GACD (Bai et al., 2020, arXiv:2009.09922), made once at embed time.

The embed stage perturbs each stored input with projected gradient descent against the frozen
teacher (Madry et al., ICLR 2018: L_inf ball, signed-gradient ascent, optional uniform random
start) and stores the perturbation ``delta`` in the shard next to the teacher's outputs on
``x + delta``. The student's pipeline adds that same stored ``delta`` to the replayed view, so it
trains on the very input the teacher embedded (see :class:`~ensemble_kd.training.data.DistillData`).

What PGD ascends (``objective``):
- ``self-supervised`` (default, as GACD): no label is used. Each row's perturbed view is pushed
  away from its own clean view in the teacher's feature space: the loss is
  -cos(f(x + delta), f(x)), f the teacher's embedding (the first output of an encoder; the logits
  of a plain classifier). This is the positive-pair term of an instance-wise contrastive attack
  (RoCL, Kim et al., NeurIPS 2020); the in-batch negatives are left out on purpose, so a row's
  delta depends on that row only (a stored shard must not depend on the embed batch size). Its
  gradient is 0 at delta = 0 (the clean view is its own best match), hence it needs the random
  start.
- ``ce``: the teacher's cross-entropy at the true label (Madry et al.'s supervised attack).

Inputs are the modality's standardised tensors, so ``epsilon`` is in standardised units and no
pixel-range clamp is applied (the valid range of a standardised input is not known here).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ensemble_kd.blocks.memory import stable_seed

OBJECTIVES = ("self-supervised", "ce")


def _logits(out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Encoders return (embedding, logits); a plain classifier returns logits."""
    return out[1] if isinstance(out, (tuple, list)) else out


def _random_start(x: torch.Tensor, epsilon: float,
                  generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """Uniform draws in [-epsilon, epsilon], shaped like x (B, *shape), drawn on the CPU so the
    same seeds give the same start on any device."""
    if generator is None or isinstance(generator, torch.Generator):
        u = torch.rand(x.shape, generator=generator, dtype=torch.float32)  # (B, *shape)
    else:
        if len(generator) != x.shape[0]:
            raise ValueError(f"pgd_perturb: got {len(generator)} generators for {x.shape[0]} rows")
        u = torch.stack([torch.rand(x.shape[1:], generator=g, dtype=torch.float32) for g in generator])  # (B, *shape)
    return ((2.0 * u - 1.0) * epsilon).to(device=x.device, dtype=x.dtype)


def _features(out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The feature the self-supervised objective compares: an encoder's embedding, else the logits."""
    f = out[0] if isinstance(out, (tuple, list)) else out
    return f.reshape(f.shape[0], -1).float()  # (B, d)


def pgd_objective(model: nn.Module, x_adv: torch.Tensor, objective: str, y: torch.Tensor | None = None,
                  clean_features: torch.Tensor | None = None) -> torch.Tensor:
    """The scalar PGD ascends, summed over rows (summed, not averaged: the sign of each row's
    gradient is the same and no row's gradient underflows).

    ``ce``: sum_b CE(logits_b, y_b), y (B,) int64. ``self-supervised``: sum_b -cos(f(x_adv)_b,
    clean_features_b), clean_features (B, d) the teacher's features of the unperturbed inputs.
    """
    out = model(x_adv)
    if objective == "ce":
        return F.cross_entropy(_logits(out).float(), y, reduction="sum")
    return -F.cosine_similarity(_features(out), clean_features, dim=1).sum()  # (B,) summed


def pgd_perturb(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, epsilon: float, steps: int,
                step_size: float, generator: torch.Generator | Sequence[torch.Generator] | None = None,
                random_start: bool = True, objective: str = "self-supervised") -> torch.Tensor:
    """L_inf PGD (Madry et al., 2018) that maximises ``objective`` (see the module doc) of the frozen model.

    x: (B, *shape) float inputs; y: (B,) int64 true labels (``ce`` only; None is fine otherwise).
    ``model(x)`` returns logits (B, C) or (embedding, logits). ``generator``: one
    ``torch.Generator`` for the batch, or one per row (position-independent starts: the embed
    stage seeds one per (seed, sample_id, view)); only used with ``random_start``. Each step:
    delta <- clip(delta + step_size * sign(grad), -eps, eps).

    The model stays frozen: it runs in eval mode (its previous mode is restored) and gradients
    are taken w.r.t. the input only (``torch.autograd.grad``: no parameter ``.grad`` is touched).
    Returns delta (B, *shape), detached, with |delta| <= epsilon: the exact tensor to add to x.
    """
    if epsilon <= 0:
        raise ValueError(f"pgd_perturb: epsilon must be > 0, got {epsilon}")
    if steps < 1:
        raise ValueError(f"pgd_perturb: steps must be >= 1, got {steps}")
    if step_size <= 0:
        raise ValueError(f"pgd_perturb: step_size must be > 0, got {step_size}")
    if objective not in OBJECTIVES:
        raise ValueError(f"pgd_perturb: objective must be one of {OBJECTIVES}, got {objective!r}")
    if objective == "self-supervised" and not random_start:
        raise ValueError("pgd_perturb: the self-supervised objective needs random_start (its gradient is 0 at delta = 0)")
    if objective == "ce" and y is None:
        raise ValueError("pgd_perturb: the ce objective needs the labels y")
    x = x.detach()
    y = None if y is None else y.to(device=x.device, dtype=torch.long)
    delta = _random_start(x, epsilon, generator) if random_start else torch.zeros_like(x)  # (B, *shape)
    was_training = model.training
    model.eval()  # BN statistics and dropout frozen: each row's perturbation is independent of the batch
    try:
        clean = None
        if objective == "self-supervised":
            with torch.no_grad():
                clean = _features(model(x))  # (B, d) the target each row is pushed away from
        with torch.enable_grad():  # the embed stage runs under no_grad
            for _ in range(steps):
                delta.requires_grad_(True)
                loss = pgd_objective(model, x + delta, objective, y, clean)
                (grad,) = torch.autograd.grad(loss, delta)  # (B, *shape): w.r.t. the input only
                delta = (delta.detach() + step_size * grad.sign()).clamp_(-epsilon, epsilon)
    finally:
        model.train(was_training)
    return delta.detach()


def row_generators(seed: int, sample_ids: np.ndarray, views: np.ndarray) -> list[torch.Generator]:
    """One CPU generator per (sample_id, view) row, seeded from (seed, sample_id, view) only, so a
    row's random start does not depend on its batch or position (any batch size replays it)."""
    return [torch.Generator().manual_seed(stable_seed("pgd", seed, int(s), int(v))) for s, v in zip(sample_ids, views)]
