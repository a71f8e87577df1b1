"""torchvision classification models as encoders, registered as ``torchvision/<name>``.

Each is built with ``torchvision.models.get_model(name, weights=None, num_classes=...)``: weights
are never downloaded (a machine may have no network, and a teacher's weights are the user's file).
The encoder adopts the torchvision model's children under their own names, so its state_dict keys
are torchvision's own, in torchvision's order: ``torch.save(tv_model.state_dict(), f)`` loads as is.
The models take 3-channel images of any size (ImageNet layout: a stride-32 network; on 32x32 inputs
the last stages run on 1x1 maps, which is fine for tests and for small-image teachers).

Two layouts cover the registered names:

- ResNet (``resnet*``; ``resnext*``/``wide_resnet*`` share it): stem conv-BN-ReLU, max-pool,
  ``layer1..4``, average pool, ``fc``. Features: the stem's output (before the max-pool), each
  layer's output, then the embedding (timm's ``features_only`` choice).
- Feature stack (MobileNetV2/V3, EfficientNet): ``features`` (a Sequential), global average pool,
  ``classifier``. Features: the last ``features`` entry at each resolution (found once, from the
  strides), then the embedding. The embedding is the last Linear's input, taken before the dropout
  that precedes it (as ``cnn_small``'s), so in train mode it is not dropped out.
"""
from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modalities.encoders.base import ENCODERS, Encoder
from modalities.spec import ModalitySpec

RESNETS = ("resnet18", "resnet34", "resnet50")
FEATURE_STACKS = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0")
"""Registered names. Other torchvision models of the same two layouts (resnet101/152, resnext*,
wide_resnet*, efficientnet_b1..b7, efficientnet_v2_*) work unchanged by adding their names here; they
are left out to keep the registry-wide CPU tests, which build every encoder, short."""


def _adopt(encoder: nn.Module, tv: nn.Module) -> None:
    """Register ``tv``'s children on ``encoder`` under the same names and in the same order, so the
    state_dict keys (and their order) are torchvision's."""
    own = [n for n, _ in tv.named_parameters(recurse=False)] + [n for n, _ in tv.named_buffers(recurse=False)]
    if own:  # e.g. ViT's class token: not a layout this module knows
        raise TypeError(f"{type(tv).__name__} holds tensors of its own ({own}); not a supported layout")
    for name, child in tv.named_children():
        encoder.add_module(name, child)


def _strided(module: nn.Module) -> bool:
    """True when ``module`` lowers the resolution (a conv or pool with a stride above 1 inside it)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            stride = m.stride if isinstance(m.stride, tuple) else (m.stride,)
            if max(stride) > 1:
                return True
    return False


class TorchvisionResNet(Encoder):
    """A torchvision ``ResNet`` (BasicBlock or Bottleneck, expansion e) as an encoder."""

    def __init__(self, tv: nn.Module) -> None:
        super().__init__()
        _adopt(self, tv)
        self.embed_dim = int(self.fc.in_features)
        self.num_classes = int(self.fc.out_features)

    def forward_impl(self, x: torch.Tensor, feats: list[torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))  # (B, 64, H/2, W/2)
        if feats is not None:
            feats.append(x)
        x = self.maxpool(x)  # (B, 64, H/4, W/4); a new tensor, so feats[-1] is kept
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            # (B, 64e, H/4, W/4), (B, 128e, H/8, W/8), (B, 256e, H/16, W/16), (B, 512e, H/32, W/32)
            x = layer(x)
            if feats is not None:
                feats.append(x)
        emb = torch.flatten(self.avgpool(x), 1)  # (B, 512e)
        if feats is not None:
            feats.append(emb)
        return emb, self.fc(emb)  # (B, embed_dim), (B, num_classes)


class TorchvisionFeatureStack(Encoder):
    """A torchvision ``features`` -> average pool -> ``classifier`` model as an encoder."""

    def __init__(self, tv: nn.Module) -> None:
        super().__init__()
        _adopt(self, tv)
        head = list(self.classifier)
        if not isinstance(head[-1], nn.Linear):
            raise TypeError(f"{type(tv).__name__}: the classifier does not end in a Linear layer")
        split = len(head) - 1
        while split > 0 and isinstance(head[split - 1], nn.Dropout):
            split -= 1
        # classifier[:split] makes the embedding; the dropouts up to the last Linear are applied out
        # of place (torchvision's are in place, which would drop out the returned embedding too)
        self._split = split
        self._dropout_p = tuple(float(m.p) for m in head[split:-1])
        ends = [i - 1 for i, m in enumerate(self.features) if i > 0 and _strided(m)]
        self._stage_ends = frozenset(ends + [len(self.features) - 1])
        self.embed_dim = int(head[-1].in_features)
        self.num_classes = int(head[-1].out_features)

    def _head(self) -> Iterator[nn.Module]:
        return islice(self.classifier, self._split)

    def forward_impl(self, x: torch.Tensor, feats: list[torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        for i, block in enumerate(self.features):
            x = block(x)  # (B, C_i, H/s_i, W/s_i), s_i up to 32
            if feats is not None and i in self._stage_ends:
                feats.append(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # (B, C_last); torchvision's avgpool
        for layer in self._head():
            x = layer(x)  # (B, hidden) (MobileNetV3's Linear-Hardswish)
        emb = x  # (B, embed_dim)
        if feats is not None:
            feats.append(emb)
        for p in self._dropout_p:
            x = F.dropout(x, p, self.training)  # (B, embed_dim), out of place: emb is kept
        return emb, self.classifier[-1](x)  # (B, embed_dim), (B, num_classes)


def _register(name: str, cls: type[Encoder]) -> None:
    def build(spec: ModalitySpec, num_classes: int, **kwargs: Any) -> Encoder:
        if "weights" in kwargs:
            raise ValueError(f"torchvision/{name}: weights are never downloaded; save the model's state_dict "
                             "to a file and give it as the teacher's checkpoint")
        # here, not at the top: `import torchvision.models` costs seconds that every process
        # importing `modalities` (each Ray worker and Tune trial) would pay, and only these
        # encoders need it
        from torchvision.models import get_model

        return cls(get_model(name, weights=None, num_classes=num_classes, **kwargs))

    build.__name__ = build.__qualname__ = f"torchvision_{name}"
    build.__doc__ = f"torchvision ``{name}`` (weights=None); kwargs go to ``torchvision.models.get_model``."
    ENCODERS.register(f"torchvision/{name}", input_kinds=("image",), in_channels=3, test_shape=(3, 32, 32),
                      family="torchvision")(build)


for _name in RESNETS:
    _register(_name, TorchvisionResNet)
for _name in FEATURE_STACKS:
    _register(_name, TorchvisionFeatureStack)
