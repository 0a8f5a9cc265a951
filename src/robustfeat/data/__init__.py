"""Datasets, downloads and on-device batching for robustfeat."""

from .datasets import DATASETS, Dataset, load_dataset, read_idx, resolve_data_dir
from .download import DataError, download_file, md5_file, safe_extract, verify_md5
from .loader import DeviceLoader, augment_batch, batch_starts, to_float_images, train_val_split

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "DeviceLoader",
    "augment_batch",
    "batch_starts",
    "download_file",
    "load_dataset",
    "md5_file",
    "read_idx",
    "resolve_data_dir",
    "safe_extract",
    "to_float_images",
    "train_val_split",
    "verify_md5",
]
