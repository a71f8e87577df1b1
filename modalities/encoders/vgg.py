"""VGG with BatchNorm (Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition", ICLR 2015), in the CIFAR form of RepDistiller's ``models/vgg.py``: five conv blocks
(3x3 conv + BN + ReLU), 2x2 max-pools after blocks 0-2 (and after block 3 for 64-pixel-high inputs),
global average pooling and one ``Linear(512, num_classes)``.

``vgg8`` is cfg ``S`` = [[64], [128], [256], [512], [512]]; ``vgg11/13/16/19`` are cfgs A/B/D/E.
Module names (``block0..4``, ``classifier``) and Sequential indices follow RepDistiller. For small
inputs a max-pool is skipped when the map is already smaller than 2 in H or W, so any H, W >= 1 work.

RepDistiller drops each block's last ReLU and applies ``F.relu`` in ``forward``; here the ReLU stays
in the block (same parameters and keys, same outputs). ``forward_features`` gives RepDistiller's
``is_feat=True, preact=False`` list: the five blocks' outputs before pooling, then the embedding.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from modalities.encoders.base import ENCODERS, Encoder
from modalities.spec import ModalitySpec

CFG: dict[str, list[list[int]]] = {
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
    "S": [[64], [128], [256], [512], [512]],
}


def _make_block(cfg: Sequence[int], in_channels: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for v in cfg:
        layers.append(nn.Conv2d(in_channels, v, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        in_channels = v
    return nn.Sequential(*layers)


class VGG(Encoder):
    """CIFAR VGG over five conv blocks given by ``cfg`` (a list of five lists of widths)."""

    def __init__(
        self, cfg: Sequence[Sequence[int]], in_channels: int = 3, num_classes: int = 10, batch_norm: bool = True
    ) -> None:
        super().__init__()
        if len(cfg) != 5:
            raise ValueError(f"VGG cfg needs 5 blocks, got {len(cfg)}")
        widths = [in_channels] + [c[-1] for c in cfg]
        self.block0 = _make_block(cfg[0], widths[0], batch_norm)
        self.block1 = _make_block(cfg[1], widths[1], batch_norm)
        self.block2 = _make_block(cfg[2], widths[2], batch_norm)
        self.block3 = _make_block(cfg[3], widths[3], batch_norm)
        self.block4 = _make_block(cfg[4], widths[4], batch_norm)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.embed_dim = widths[5]
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.embed_dim, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    m.bias.data.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.weight.data.normal_(0, 0.01)
                m.bias.data.zero_()

    def _maybe_pool(self, x: torch.Tensor) -> torch.Tensor:
        """2x2 max-pool, skipped when H or W is already below 2 (small inputs)."""
        return x if min(x.shape[-2:]) < 2 else self.pool(x)

    def forward_impl(self, x: torch.Tensor, feats: list[torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Features as RepDistiller's ``is_feat=True, preact=False``: each block's (post-ReLU) output
        before its max-pool, then the embedding."""
        h = x.shape[2]
        for i, block in enumerate((self.block0, self.block1, self.block2)):
            x = block(x)  # (B, c_i, H/2^i, W/2^i)
            if feats is not None:
                feats.append(x)
            x = self._maybe_pool(x)  # (B, c_i, H/2^(i+1), W/2^(i+1)); a new tensor, feats[-1] is kept
        x = self.block3(x)  # (B, c3, H/8, W/8)
        if feats is not None:
            feats.append(x)
        if h == 64:  # as RepDistiller: one more pool for 64x64 (Tiny-ImageNet) inputs
            x = self._maybe_pool(x)  # (B, c3, H/16, W/16)
        x = self.block4(x)  # (B, c4, h', w')
        emb = torch.flatten(self.avgpool(x), 1)  # (B, c4)
        if feats is not None:
            feats += [x, emb]
        return emb, self.classifier(emb)  # (B, embed_dim), (B, num_classes)


def _register(name: str, cfg_key: str) -> None:
    def build(spec: ModalitySpec, num_classes: int, **kwargs: Any) -> VGG:
        return VGG(CFG[cfg_key], in_channels=spec.shape[0], num_classes=num_classes, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{name} with BatchNorm, cfg {CFG[cfg_key]} (RepDistiller ``{name}_bn``)."
    ENCODERS.register(name, input_kinds=("image",), test_shape=(3, 32, 32), family="cifar")(build)


for _name, _key in (("vgg8", "S"), ("vgg11", "A"), ("vgg13", "B"), ("vgg16", "D"), ("vgg19", "E")):
    _register(_name, _key)
