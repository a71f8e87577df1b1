"""Small conv nets for tiny images (8x8 digits, 16x15 faces, 28x28 MNIST-like, 32x32 colour).

Plain conv-BN-ReLU stacks in the style of the classic LeNet/VGG-like MNIST baselines (LeCun et al.
1998; Simonyan & Zisserman 2015), with 2x2 max-pools skipped once a map is below 2 pixels and
``AdaptiveAvgPool2d(1)`` at the end, so any H, W >= 1 work. ``width`` sets the first layer's width.

- ``cnn_small``: conv(w) - conv(2w) - pool - conv(4w); embedding 4w (default w=16 -> 64).
- ``cnn_medium``: [conv(w) x2 - pool] - [conv(2w) x2 - pool] - conv(4w); embedding 4w (w=32 -> 128).

``forward_features`` keeps, as for VGG, the last conv-BN-ReLU output at each resolution (before each
pool, and the last one), then the embedding: ``cnn_small`` (B, 2w, H, W), (B, 4w, H/2, W/2), (B, 4w);
``cnn_medium`` (B, w, H, W), (B, 2w, H/2, W/2), (B, 4w, H/4, W/4), (B, 4w).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from modalities.encoders.base import ENCODERS, Encoder
from modalities.spec import ModalitySpec


class _SafePool(nn.Module):
    """2x2 max-pool that passes maps smaller than 2 in H or W through unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if min(x.shape[-2:]) < 2 else self.pool(x)  # (B, C, H/2, W/2)


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(Encoder):
    """Conv-BN-ReLU stack; ``plan`` lists widths, with ``"M"`` for a (safe) 2x2 max-pool."""

    def __init__(self, plan: Sequence[int | str], in_channels: int = 1, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in plan:
            if v == "M":
                layers.append(_SafePool())
            else:
                layers += _conv_bn_relu(c, int(v))
                c = int(v)
        self.features = nn.Sequential(*layers)
        # a stage ends before each pool and at the end: the indices whose outputs forward_features keeps
        self._stage_ends = frozenset([i - 1 for i, m in enumerate(layers) if isinstance(m, _SafePool) and i > 0]
                                     + [len(layers) - 1])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.embed_dim = c
        self.num_classes = num_classes
        self.fc = nn.Linear(c, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_impl(self, x: torch.Tensor, feats: list[torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Features: the last conv-BN-ReLU output at each resolution (before each pool, and the last
        one), then the embedding."""
        for i, layer in enumerate(self.features):  # what nn.Sequential.forward does, keeping stage ends
            x = layer(x)  # (B, C_i, H_i, W_i)
            if feats is not None and i in self._stage_ends:
                feats.append(x)
        emb = torch.flatten(self.avgpool(x), 1)  # (B, C)
        if feats is not None:
            feats.append(emb)
        return emb, self.fc(self.dropout(emb))  # (B, embed_dim), (B, num_classes)


@ENCODERS.register("cnn_small", input_kinds=("image",), test_shape=(1, 8, 8), family="small")
def cnn_small(spec: ModalitySpec, num_classes: int, width: int = 16, dropout: float = 0.0, **kwargs: Any) -> SmallCNN:
    """Three conv layers (w, 2w, pool, 4w); for 8x8 to 28x28 images. kwargs ``width``, ``dropout``."""
    w = int(width)
    return SmallCNN([w, 2 * w, "M", 4 * w], spec.shape[0], num_classes, dropout=dropout, **kwargs)


@ENCODERS.register("cnn_medium", input_kinds=("image",), test_shape=(1, 28, 28), family="small")
def cnn_medium(spec: ModalitySpec, num_classes: int, width: int = 32, dropout: float = 0.0, **kwargs: Any) -> SmallCNN:
    """Five conv layers (w, w, pool, 2w, 2w, pool, 4w); for 16x16 to 32x32 images. kwargs ``width``, ``dropout``."""
    w = int(width)
    return SmallCNN([w, w, "M", 2 * w, 2 * w, "M", 4 * w], spec.shape[0], num_classes, dropout=dropout, **kwargs)
