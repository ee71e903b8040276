"""Datasets, batched tensor augmentation and loaders."""

from kdzoo.data.datasets import DataBundle, build_data, dataset_names, load_source
from kdzoo.data.tensor_loader import CropFlip, TensorBatchLoader

__all__ = ["CropFlip", "DataBundle", "TensorBatchLoader", "build_data", "dataset_names", "load_source"]
