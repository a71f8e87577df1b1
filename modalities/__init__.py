"""Datasets and encoders per sensory modality, each registered by name.

Importing this package registers everything: ``modalities.DATASETS`` and ``modalities.ENCODERS``.
"""
from modalities.datasets import DATASETS, PairedDataset, build_dataset, list_datasets
from modalities.encoders import ENCODERS, Encoder, build_encoder, list_encoders
from modalities.spec import ModalitySpec

__all__ = [
    "DATASETS",
    "ENCODERS",
    "Encoder",
    "ModalitySpec",
    "PairedDataset",
    "build_dataset",
    "build_encoder",
    "list_datasets",
    "list_encoders",
]
