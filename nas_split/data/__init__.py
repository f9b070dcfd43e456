"""Datasets for nas-split: a registry of loaders with deterministic train/val/test splits.

``create_dataset(name, seed=0, root=None, **options) -> DataSplits``; ``list_datasets()`` names them.
Bundled or generated (no download): ``digits``, ``digits-points``, ``shapes3d``.  From files: ``fashion-mnist``
(IDX, Debian's ``dataset-fashion-mnist``), ``fashion-mnist-points``, ``modelnet40`` (HDF5), ``cifar10`` /
``cifar100`` (python pickles; torchvision downloads them when asked).
"""
from . import images, points  # noqa: F401 - registration side effects
from ._registry import (
                        DataFormatError,
                        DataNotFoundError,
                        DatasetInfo,
                        DataSplits,
                        UnknownDatasetError,
                        create_dataset,
                        dataset_info,
                        list_datasets,
                        register_dataset,
)

__all__ = ["DataFormatError", "DataNotFoundError", "DatasetInfo", "DataSplits", "UnknownDatasetError", "create_dataset",
           "dataset_info", "list_datasets", "register_dataset"]
