"""Multi-layer perceptrons for vector views (Rumelhart et al. 1986), with BatchNorm (Ioffe & Szegedy
2015) and optional dropout (Srivastava et al. 2014): ``[Linear - BatchNorm1d - ReLU - Dropout] * k``
then a linear classifier. Any input is flattened, so image views work too.

``forward_features`` gives each hidden layer's output (B, h_j) in order; the last hidden layer's
output is the embedding, so it appears once, last (with no hidden layer: just the flattened input).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from modalities.encoders.base import ENCODERS, Encoder
from modalities.spec import ModalitySpec


class MLP(Encoder):
    """Flatten, then hidden layers of widths ``hidden``; the embedding is the last hidden layer's output
    (or the flattened input when ``hidden`` is empty, i.e. a linear classifier)."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (256, 128), dropout: float = 0.0):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_features = in_features
        layers: list[nn.Module] = []
        d = in_features
        for h in hidden:
            layers += [nn.Linear(d, int(h), bias=False), nn.BatchNorm1d(int(h)), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = int(h)
        self.body = nn.Sequential(*layers)
        # every hidden layer but the last (Linear-BN-ReLU[-Dropout]) ends at these indices of self.body;
        # the last one's output is the embedding, which forward_features lists once, at the end
        self._layer_ends = frozenset(i - 1 for i, m in enumerate(layers) if isinstance(m, nn.Linear) and i > 0)
        self.embed_dim = d
        self.num_classes = num_classes
        self.fc = nn.Linear(d, num_classes)

    def forward_impl(self, x: torch.Tensor, feats: list[torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Features: each hidden layer's output, the last of which is the embedding (listed once)."""
        x = torch.flatten(x, 1)  # (B, D)
        if x.shape[1] != self.in_features:
            raise ValueError(f"MLP expects {self.in_features} input features per sample, got {x.shape[1]}")
        for i, layer in enumerate(self.body):  # what nn.Sequential.forward does, keeping layer ends
            x = layer(x)  # (B, hidden_j)
            if feats is not None and i in self._layer_ends:
                feats.append(x)
        if feats is not None:
            feats.append(x)  # the embedding: the last hidden layer's output (or the input, with no hidden layer)
        return x, self.fc(x)  # (B, embed_dim), (B, num_classes)


@ENCODERS.register("mlp", input_kinds=("vector", "image"), test_shape=(20,), family="mlp")
def mlp(
    spec: ModalitySpec, num_classes: int, hidden: Sequence[int] = (256, 128), dropout: float = 0.0, **kwargs: Any
) -> MLP:
    """MLP with hidden widths ``hidden`` (256, 128) and ``dropout`` (0.0) on the flattened input."""
    return MLP(spec.numel, num_classes, hidden=tuple(hidden), dropout=dropout, **kwargs)


@ENCODERS.register("mlp_wide", input_kinds=("vector", "image"), test_shape=(20,), family="mlp")
def mlp_wide(
    spec: ModalitySpec, num_classes: int, hidden: Sequence[int] = (1024, 512), dropout: float = 0.1, **kwargs: Any
) -> MLP:
    """Wider MLP: hidden (1024, 512), dropout 0.1 by default."""
    return MLP(spec.numel, num_classes, hidden=tuple(hidden), dropout=dropout, **kwargs)
