"""Registered encoders; importing a module registers its entries."""
from modalities.encoders import mlp, mobilenetv2, resnet_cifar, small_cnn, vgg, wrn  # noqa: F401  (registration)
from modalities.encoders.base import ENCODERS, Encoder, build_encoder, list_encoders

__all__ = ["ENCODERS", "Encoder", "build_encoder", "list_encoders"]
