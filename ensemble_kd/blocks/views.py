"""Augmented views that can be replayed exactly.

A "consistent teacher" (Beyer et al., 2022) only helps when the student sees the very view the
teacher saw. The embed stage draws each view's crop offsets and flip once, stores them in the
shard next to the teacher's outputs, and the student's pipeline calls :func:`apply_view` with
the stored parameters, so teacher and student inputs are identical tensors.

A view is (top, left, flip) on a zero-padded image: pad by ``pad`` pixels on every side, crop
back to (H, W) at (top, left) with 0 <= top, left <= 2*pad, then mirror horizontally if flip.
top = left = pad and flip = False is the identity (the clean view).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ensemble_kd.core.config import AdversarialConfig, ViewsConfig, to_dict


@dataclass(frozen=True)
class ViewParams:
    """Per-row view parameters, (R,) arrays."""

    view: np.ndarray  # (R,) int32: view index, 0..V-1
    top: np.ndarray  # (R,) int16: crop offset in the padded image
    left: np.ndarray  # (R,) int16
    flip: np.ndarray  # (R,) bool


def draw_views(sample_ids: np.ndarray, num_views: int, pad: int, flip: bool, include_clean: bool, seed: int) -> ViewParams:
    """Parameters for ``num_views`` views of every sample, rows ordered sample-major.

    Each sample's draws depend only on (seed, sample_id, view), not on its position, so any
    subset or order of samples gets the same views.
    """
    ids = np.asarray(sample_ids, dtype=np.int64)
    n = len(ids)
    view = np.tile(np.arange(num_views, dtype=np.int32), n)  # (n*V,)
    rid = np.repeat(ids, num_views)
    # A counter-based hash (splitmix64) of (seed, id, view): position-independent and vectorised.
    with np.errstate(over="ignore"):
        z = (rid.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (view.astype(np.uint64) << np.uint64(40)) ^ np.uint64(seed & 0xFFFFFFFF)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    span = np.uint64(2 * pad + 1)
    top = (z % span).astype(np.int16)
    left = ((z >> np.uint64(16)) % span).astype(np.int16)
    flp = ((z >> np.uint64(32)) & np.uint64(1)).astype(bool) if flip else np.zeros(len(z), dtype=bool)
    if include_clean:
        clean = view == 0
        top[clean], left[clean], flp[clean] = pad, pad, False
    return ViewParams(view, top, left, flp)


def identity_views(sample_ids: np.ndarray, pad: int) -> ViewParams:
    n = len(sample_ids)
    return ViewParams(np.zeros(n, np.int32), np.full(n, pad, np.int16), np.full(n, pad, np.int16), np.zeros(n, bool))


def apply_view(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor, pad: int) -> torch.Tensor:
    """Replay views on a batch of images.

    x: (B, C, H, W); top, left: (B,) int; flip: (B,) bool. Returns (B, C, H, W).
    """
    if x.dim() != 4:
        raise ValueError(f"apply_view needs (B, C, H, W) images, got shape {tuple(x.shape)}")
    B, C, H, W = x.shape
    if pad == 0 and not bool(flip.any()):
        return x
    xp = F.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p), zeros outside
    dev = x.device
    rows = top.to(dev, torch.long)[:, None] + torch.arange(H, device=dev)  # (B, H)
    cols = left.to(dev, torch.long)[:, None] + torch.arange(W, device=dev)  # (B, W)
    cols = torch.where(flip.to(dev)[:, None], cols.flip(1), cols)  # mirrored read = horizontal flip
    b = torch.arange(B, device=dev)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)


def view_recipe(views: ViewsConfig, adversarial: AdversarialConfig | None = None) -> dict[str, Any]:
    """The view recipe stored in a shard and hashed into its id. It is the same for every teacher
    of a run: vector modalities are not augmented, their V rows per sample are identity views,
    which keeps them row-aligned with the image teachers of the same ensemble. Enabled
    adversarial views add an ``adversarial`` entry (so they change the shard id); disabled ones
    add nothing, so shards made before adversarial views existed keep their ids."""
    recipe = to_dict(views)
    if adversarial is not None and adversarial.enabled:
        recipe["adversarial"] = to_dict(adversarial)
    return recipe


def num_adv_views(recipe: dict[str, Any]) -> int:
    """Adversarial views per sample in a shard of this (stored) view recipe; 0 for none."""
    adv = recipe.get("adversarial") or {}
    return int(adv.get("num_views", 0)) if adv.get("enabled") else 0
