"""The encoder contract and its registry.

An encoder maps a batch of one modality to ``(embedding, logits)`` in one forward pass; the
embedding is the penultimate feature (after global pooling, before the classifier), which is
what CRD/VID/... distil and what the embed stage stores in the shards.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from modalities.registry import Registry
from modalities.spec import ModalitySpec


class EncoderBuilder(Protocol):
    def __call__(self, spec: ModalitySpec, num_classes: int, **kwargs: Any) -> "Encoder": ...


ENCODERS: Registry[EncoderBuilder] = Registry("encoder")
"""Registered encoders. Metadata: ``input_kinds`` (tuple of ``"image"``/``"vector"``),
``test_shape`` (a small per-sample input shape the registry-wide tests use) and, for encoders that
take a fixed number of image channels, ``in_channels``."""


class Encoder(nn.Module):
    """Base class: subclasses set ``embed_dim`` and ``num_classes`` and implement ``forward_impl``.

    ``forward(x)`` takes (B, *spec.shape) and returns ``(embedding (B, embed_dim), logits (B, num_classes))``.
    ``forward_features(x)`` returns ``(feats, logits)``: the stage outputs, then the embedding last
    (RepDistiller's ``model(x, is_feat=True, preact=False)``), for feature-map distillation.

    Both run the one ``forward_impl``, so they cannot drift apart: ``forward`` passes no list, and the
    only extra work there is a ``feats is not None`` test per stage.
    """

    embed_dim: int
    num_classes: int

    def forward_impl(self, x: torch.Tensor, feats: list[torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward pass: returns ``(embedding, logits)`` and, when ``feats`` is a list, appends
        each stage output to it, then the embedding. A stage output, once appended, must not be
        changed in place by a later layer (an in-place ReLU may act only on a fresh tensor)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_impl(x, None)  # (B, embed_dim), (B, num_classes)

    def forward_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``(feats, logits)``: ``feats[:-1]`` the stage outputs (B, C_i, H_i, W_i) (or (B, D_i) for
        an MLP), ``feats[-1]`` the embedding (B, embed_dim), equal to ``forward(x)[0]``."""
        feats: list[torch.Tensor] = []
        _, logits = self.forward_impl(x, feats)
        return feats, logits  # [..., (B, embed_dim)], (B, num_classes)


def build_encoder(arch: str, spec: ModalitySpec, num_classes: int, **kwargs: Any) -> Encoder:
    """Build a registered encoder for inputs of ``spec``; errors name the arch and the modality."""
    builder = ENCODERS.get(arch)
    kinds = ENCODERS.meta(arch).get("input_kinds", ("image", "vector"))
    if spec.kind not in kinds:
        raise ValueError(
            f"encoder {arch!r} takes {'/'.join(kinds)} inputs, but modality {spec.name!r} is {spec.kind} "
            f"of shape {spec.shape}; encoders for {spec.kind} inputs: "
            f"{', '.join(n for n in ENCODERS.names() if spec.kind in ENCODERS.meta(n).get('input_kinds', ()))}"
        )
    channels = ENCODERS.meta(arch).get("in_channels")
    if channels is not None and spec.shape[0] != channels:
        raise ValueError(f"encoder {arch!r} takes {channels}-channel images, but modality {spec.name!r} has shape {spec.shape}")
    model = builder(spec, num_classes, **kwargs)
    if not isinstance(model, Encoder):
        raise TypeError(f"encoder builder {arch!r} returned {type(model).__name__}, not an Encoder")
    return model


def list_encoders(kind: str | None = None) -> list[str]:
    """Registered encoder names, optionally only those taking ``kind`` inputs."""
    return [n for n in ENCODERS.names() if kind is None or kind in ENCODERS.meta(n).get("input_kinds", ())]
