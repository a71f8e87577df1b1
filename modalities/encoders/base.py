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
"""Registered encoders. Metadata: ``input_kinds`` (tuple of ``"image"``/``"vector"``) and
``test_shape`` (a small per-sample input shape the registry-wide tests use)."""


class Encoder(nn.Module):
    """Base class: subclasses set ``embed_dim`` and ``num_classes`` and implement ``forward``.

    ``forward(x)`` takes (B, *spec.shape) and returns ``(embedding (B, embed_dim), logits (B, num_classes))``.
    """

    embed_dim: int
    num_classes: int

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


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
    model = builder(spec, num_classes, **kwargs)
    if not isinstance(model, Encoder):
        raise TypeError(f"encoder builder {arch!r} returned {type(model).__name__}, not an Encoder")
    return model


def list_encoders(kind: str | None = None) -> list[str]:
    """Registered encoder names, optionally only those taking ``kind`` inputs."""
    return [n for n in ENCODERS.names() if kind is None or kind in ENCODERS.meta(n).get("input_kinds", ())]
