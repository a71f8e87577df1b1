"""PGD adversarial views for GACD (Bai et al., 2020, arXiv:2009.09922), made once at embed time.

The embed stage perturbs each stored input with projected gradient descent against the frozen
teacher (Madry et al., ICLR 2018: L_inf ball, signed-gradient ascent on the teacher's
cross-entropy at the true label, optional uniform random start) and stores the perturbation
``delta`` in the shard next to the teacher's outputs on ``x + delta``. The student's pipeline
adds that same stored ``delta`` to the replayed view, so it trains on the very input the teacher
embedded (see :class:`~ensemble_kd.data.DistillData`).

Inputs are the modality's standardised tensors, so ``epsilon`` is in standardised units and no
pixel-range clamp is applied (the valid range of a standardised input is not known here).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ensemble_kd.memory import stable_seed


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


def pgd_perturb(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float, steps: int, step_size: float,
                generator: torch.Generator | Sequence[torch.Generator] | None = None,
                random_start: bool = True) -> torch.Tensor:
    """L_inf PGD (Madry et al., 2018) that maximises the frozen model's cross-entropy on ``y``.

    x: (B, *shape) float inputs; y: (B,) int64 true labels. ``model(x)`` returns logits (B, C) or
    (embedding, logits). ``generator``: one ``torch.Generator`` for the batch, or one per row
    (position-independent starts: the embed stage seeds one per (seed, sample_id, view)); only
    used with ``random_start``. Each step: delta <- clip(delta + step_size * sign(grad), -eps, eps).

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
    x = x.detach()
    y = y.to(device=x.device, dtype=torch.long)
    delta = _random_start(x, epsilon, generator) if random_start else torch.zeros_like(x)  # (B, *shape)
    was_training = model.training
    model.eval()  # BN statistics and dropout frozen: each row's perturbation is independent of the batch
    try:
        with torch.enable_grad():  # the embed stage runs under no_grad
            for _ in range(steps):
                delta.requires_grad_(True)
                # summed, not averaged: the sign is the same and no row's gradient underflows
                loss = F.cross_entropy(_logits(model(x + delta)).float(), y, reduction="sum")
                (grad,) = torch.autograd.grad(loss, delta)  # (B, *shape): w.r.t. the input only
                delta = (delta.detach() + step_size * grad.sign()).clamp_(-epsilon, epsilon)
    finally:
        model.train(was_training)
    return delta.detach()


def row_generators(seed: int, sample_ids: np.ndarray, views: np.ndarray) -> list[torch.Generator]:
    """One CPU generator per (sample_id, view) row, seeded from (seed, sample_id, view) only, so a
    row's random start does not depend on its batch or position (any batch size replays it)."""
    return [torch.Generator().manual_seed(stable_seed("pgd", seed, int(s), int(v))) for s, v in zip(sample_ids, views)]
