"""Registered encoders; importing a module registers its entries."""
from modalities.encoders import (  # noqa: F401  (registration)
    mlp, mobilenetv2, resnet_cifar, small_cnn, torchvision_models, vgg, wrn)
from modalities.encoders.base import ENCODERS, Encoder, build_encoder, list_encoders

__all__ = ["ENCODERS", "Encoder", "build_encoder", "list_encoders"]
