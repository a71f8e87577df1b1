"""Registered datasets; importing a module registers its entries."""
from modalities.datasets import cifar, digits, image_folder, mnist5k, uci_mfeat  # noqa: F401  (registration)
from modalities.datasets import table  # noqa: F401  (registration: a user's Parquet/Arrow table)
from modalities.datasets import paired_folder  # noqa: F401  (registration: paired image folders)
from modalities.datasets import synthetic  # noqa: F401  (registration)
from modalities.datasets.base import (DATASETS, DatasetError, PairedDataset, StoredForm, build_dataset, dataset_modalities,
                                      list_datasets)

__all__ = ["DATASETS", "DatasetError", "PairedDataset", "StoredForm", "build_dataset", "dataset_modalities", "list_datasets"]
