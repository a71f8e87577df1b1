"""Registered datasets; importing a module registers its entries."""
from modalities.datasets import cifar, digits, image_folder, mnist5k, uci_mfeat  # noqa: F401  (registration)
from modalities.datasets.base import DATASETS, DatasetError, PairedDataset, build_dataset, list_datasets

__all__ = ["DATASETS", "DatasetError", "PairedDataset", "build_dataset", "list_datasets"]
