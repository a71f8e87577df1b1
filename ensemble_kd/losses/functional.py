"""The distillation formulas, each written once as a pure function with the reference's semantics.

RepDistiller (github.com/HobbitLong/RepDistiller) is the reference; tests/test_reference_*.py
replay its own outputs (tests/fixtures/repdistiller/). The registered loss modules call these.
Shapes: B batch, C channels, H x W a feature map.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ensemble_kd.losses._util import as_float


def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W): the L2-normalised spatial attention mean_c |f|^p (Zagoruyko &
    Komodakis; the reference's ``Attention.at``: ``f.pow(p).mean(1)``, signed for odd p as there)."""
    return F.normalize(f.pow(p).mean(1).view(f.size(0), -1))


def pool_to_smaller(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The larger of two (B, C, H, W) maps average-pooled to the smaller's square size (the
    reference's rule for maps of different resolutions; it assumes square maps)."""
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    return f_s, f_t


def at(f_s: torch.Tensor, f_t: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention transfer for one pair of maps: f_s (B, C_s, H_s, W_s), f_t (B, C_t, H_t, W_t)
    (channels may differ; the larger map is pooled to the smaller) -> scalar
    mean_{b, hw} (at(f_s) - at(f_t))^2 (the reference's ``Attention.at_loss``; the gradient flows
    into both sides, as there)."""
    f_s, f_t = pool_to_smaller(as_float(f_s), as_float(f_t))
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()
