"""MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018)
in the CIFAR form of RepDistiller's ``models/mobilenetv2.py``: a stride-2 3x3 stem, seven stages of
inverted residual blocks (expansion ``T``), a 1x1 conv to 1280 channels, global average pooling and
a linear classifier. The registered ``MobileNetV2`` is RepDistiller's ``mobile_half``
(``T=6``, ``width_mult=0.5``).

Module names (``conv1``, ``blocks``, ``conv2``, ``classifier.0``) follow RepDistiller.
``AdaptiveAvgPool2d(1)`` replaces ``AvgPool2d(input_size // 16, ceil_mode=True)`` (identical on
32x32), so any H, W >= 1 work.

``forward_features`` gives RepDistiller's ``is_feat=True`` list: the stem's output, the outputs of
blocks 1, 2, 4 and 6, then the pooled embedding.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from modalities.encoders.base import ENCODERS, Encoder
from modalities.spec import ModalitySpec

FEATURE_BLOCKS = frozenset({1, 2, 4, 6})
"""Blocks whose outputs ``forward_features`` returns, RepDistiller's f1..f4: the last block at each
resolution, (B, 24w, H/2, W/2), (B, 32w, H/4, W/4), (B, 96w, H/8, W/8), (B, 320w, H/16, W/16)
for ``width_mult`` w."""


def conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def conv_1x1_bn(inp: int, oup: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expand - 3x3 depthwise - 1x1 linear projection, residual when shape is kept."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.use_res_connect = stride == 1 and inp == oup
        hidden = inp * expand_ratio
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),  # pw
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),  # dw
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),  # pw-linear
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)  # (B, oup, H/s, W/s)
        return x + out if self.use_res_connect else out  # (B, oup, H/s, W/s)


class MobileNetV2(Encoder):
    """CIFAR MobileNetV2 with expansion ``expand_ratio`` (RepDistiller's ``T``) and ``width_mult``."""

    def __init__(
        self, in_channels: int = 3, num_classes: int = 10, width_mult: float = 0.5, expand_ratio: int = 6
    ) -> None:
        super().__init__()
        setting = [
            # t, c, n, s
            [1, 16, 1, 1],
            [expand_ratio, 24, 2, 1],
            [expand_ratio, 32, 3, 2],
            [expand_ratio, 64, 4, 2],
            [expand_ratio, 96, 3, 1],
            [expand_ratio, 160, 3, 2],
            [expand_ratio, 320, 1, 1],
        ]
        input_channel = int(32 * width_mult)
        self.conv1 = conv_bn(in_channels, input_channel, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in setting:
            output_channel = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(input_channel, output_channel, stride, t))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_1x1_bn(input_channel, self.last_channel)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.embed_dim = self.last_channel
        self.num_classes = num_classes
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / fan))
                if m.bias is not None:
                    m.bias.data.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.weight.data.normal_(0, 0.01)
                m.bias.data.zero_()

    def forward_impl(self, x: torch.Tensor, feats: list[torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Features as RepDistiller's ``is_feat=True``: conv1 and blocks 1, 2, 4, 6 (the last block
        at each resolution), then the embedding."""
        x = self.conv1(x)  # (B, 32w, H/2, W/2)
        if feats is not None:
            feats.append(x)
        for i, block in enumerate(self.blocks):
            x = block(x)  # (B, c_i, ., .), final (B, 320w, H/16, W/16)
            if feats is not None and i in FEATURE_BLOCKS:
                feats.append(x)
        x = self.conv2(x)  # (B, 1280, H/16, W/16)
        emb = torch.flatten(self.avgpool(x), 1)  # (B, 1280)
        if feats is not None:
            feats.append(emb)
        return emb, self.classifier(emb)  # (B, embed_dim), (B, num_classes)


@ENCODERS.register("MobileNetV2", input_kinds=("image",), test_shape=(3, 32, 32), family="cifar")
def mobilenetv2(spec: ModalitySpec, num_classes: int, **kwargs: Any) -> MobileNetV2:
    """RepDistiller's ``MobileNetV2`` entry (``mobile_half``); kwargs ``width_mult`` (0.5), ``expand_ratio`` (6)."""
    return MobileNetV2(in_channels=spec.shape[0], num_classes=num_classes, **kwargs)
