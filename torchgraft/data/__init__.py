"""Datasets, tokenizers, packing and stateful loaders. Importing registers the built-in datasets."""
from torchgraft.data.registry import DataBundle, build_data, list_datasets, register_dataset

__all__ = ["DataBundle", "build_data", "list_datasets", "register_dataset"]
