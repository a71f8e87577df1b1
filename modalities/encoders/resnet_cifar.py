"""CIFAR ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, Sec. 4.2),
as defined in RepDistiller's ``models/resnet.py`` (Tian et al., "Contrastive Representation
Distillation", ICLR 2020): a 3x3 stem, three stages of ``n = (depth - 2) / 6`` BasicBlocks with
strides 1, 2, 2, global average pooling and a linear classifier.

``resnet{8..110}`` use widths [16, 16, 32, 64]; the ``x4`` variants use [32, 64, 128, 256]. Module
names (``conv1``, ``bn1``, ``layer1..3``, ``fc``, ``downsample``) follow RepDistiller. The only
change is ``AdaptiveAvgPool2d(1)`` instead of ``AvgPool2d(8)``, which is identical on 32x32 inputs
and lets any H, W >= 8 through.

``forward_features`` gives RepDistiller's ``is_feat=True, preact=False`` list: the stem's output,
each stage's output, then the pooled embedding.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modalities.encoders.base import ENCODERS, Encoder
from modalities.spec import ModalitySpec


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)  # (B, planes, H/s, W/s)
        out = self.relu(self.bn1(self.conv1(x)))  # (B, planes, H/s, W/s)
        out = self.bn2(self.conv2(out))  # (B, planes, H/s, W/s)
        return F.relu(out + residual)  # (B, planes, H/s, W/s)


class ResNetCIFAR(Encoder):
    """CIFAR ResNet of ``depth`` = 6n + 2 with widths ``num_filters`` = [stem, stage1, stage2, stage3]."""

    def __init__(self, depth: int, num_filters: Sequence[int], in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, 44, 56, 110, ...), got {depth}")
        if len(num_filters) != 4:
            raise ValueError(f"num_filters must be [stem, stage1, stage2, stage3], got {list(num_filters)}")
        n = (depth - 2) // 6
        block = BasicBlock
        self.depth = depth
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(in_channels, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, num_filters[1], n)
        self.layer2 = self._make_layer(block, num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(block, num_filters[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.embed_dim = num_filters[3] * block.expansion
        self.num_classes = num_classes
        self.fc = nn.Linear(self.embed_dim, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block: type[BasicBlock], planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_impl(self, x: torch.Tensor, feats: list[torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Features as RepDistiller's ``is_feat=True``: stem, layer1, layer2, layer3, embedding."""
        x = self.relu(self.bn1(self.conv1(x)))  # (B, f0, H, W)
        if feats is not None:
            feats.append(x)
        for layer in (self.layer1, self.layer2, self.layer3):
            x = layer(x)  # (B, f1, H, W), then (B, f2, H/2, W/2), then (B, f3, H/4, W/4)
            if feats is not None:
                feats.append(x)
        emb = torch.flatten(self.avgpool(x), 1)  # (B, f3)
        if feats is not None:
            feats.append(emb)
        return emb, self.fc(emb)  # (B, embed_dim), (B, num_classes)


def _register(name: str, depth: int, num_filters: Sequence[int]) -> None:
    def build(spec: ModalitySpec, num_classes: int, **kwargs: Any) -> ResNetCIFAR:
        return ResNetCIFAR(depth, num_filters, in_channels=spec.shape[0], num_classes=num_classes, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"CIFAR ResNet-{depth}, widths {list(num_filters)} (RepDistiller ``{name}``)."
    ENCODERS.register(name, input_kinds=("image",), test_shape=(3, 32, 32), family="cifar")(build)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register(f"resnet{_depth}", _depth, (16, 16, 32, 64))
_register("resnet8x4", 8, (32, 64, 128, 256))
_register("resnet32x4", 32, (32, 64, 128, 256))
