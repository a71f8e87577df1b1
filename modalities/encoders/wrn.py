"""Wide Residual Networks (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016), as defined
in RepDistiller's ``models/wrn.py``: pre-activation BasicBlocks, ``n = (depth - 4) / 6`` blocks per
stage, widths [16, 16k, 32k, 64k], final BN-ReLU, global average pooling, linear classifier.

Module names (``conv1``, ``block1..3.layer``, ``bn1``, ``fc``, ``convShortcut``) follow
RepDistiller. ``AdaptiveAvgPool2d(1)`` replaces ``avg_pool2d(out, 8)`` (identical on 32x32), so any
H, W >= 8 work.

``forward_features`` gives RepDistiller's ``is_feat=True, preact=False`` list: conv1's output, each
block group's output (before the final BN-ReLU), then the pooled embedding.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modalities.encoders.base import ENCODERS, Encoder
from modalities.spec import ModalitySpec


class BasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, plus (1x1 conv) shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.convShortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))  # (B, in, H, W)
        out = self.relu2(self.bn2(self.conv1(pre)))  # (B, out, H/s, W/s)
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)  # (B, out, H/s, W/s)
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)  # (B, out, H/s, W/s)
        return shortcut + out  # (B, out, H/s, W/s)


class NetworkBlock(nn.Module):
    """``nb_layers`` BasicBlocks; the first changes width and stride."""

    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(nb_layers)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)  # (B, out, H/s, W/s)


class WideResNet(Encoder):
    """WRN-``depth``-``widen_factor``; depth must be 6n + 4."""

    def __init__(
        self, depth: int, widen_factor: int, in_channels: int = 3, num_classes: int = 10, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4 (10, 16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, ch[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.embed_dim = ch[3]
        self.num_classes = num_classes
        self.fc = nn.Linear(ch[3], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / fan))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def forward_impl(self, x: torch.Tensor, feats: list[torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Features as RepDistiller's ``is_feat=True, preact=False``: conv1, block1, block2, block3
        (each before the next block's BN-ReLU), embedding."""
        x = self.conv1(x)  # (B, 16, H, W)
        if feats is not None:
            feats.append(x)
        for block in (self.block1, self.block2, self.block3):
            x = block(x)  # (B, 16k, H, W), then (B, 32k, H/2, W/2), then (B, 64k, H/4, W/4)
            if feats is not None:
                feats.append(x)
        x = self.relu(self.bn1(x))  # (B, 64k, H/4, W/4); bn1 makes a new tensor, so feats[-1] is kept
        emb = torch.flatten(self.avgpool(x), 1)  # (B, 64k)
        if feats is not None:
            feats.append(emb)
        return emb, self.fc(emb)  # (B, embed_dim), (B, num_classes)


def _register(depth: int, widen_factor: int) -> None:
    name = f"wrn_{depth}_{widen_factor}"

    def build(spec: ModalitySpec, num_classes: int, **kwargs: Any) -> WideResNet:
        return WideResNet(depth, widen_factor, in_channels=spec.shape[0], num_classes=num_classes, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"WRN-{depth}-{widen_factor} (RepDistiller ``{name}``); kwargs: ``drop_rate``."
    ENCODERS.register(name, input_kinds=("image",), test_shape=(3, 32, 32), family="cifar")(build)


for _d, _k in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register(_d, _k)
