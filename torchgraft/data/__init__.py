"""Datasets, tokenizers, packing and stateful loaders. Importing registers the built-in datasets."""
from torchgraft.data.registry import DataBundle, build_data, list_datasets, register_dataset
from torchgraft.data import digits as _digits  # noqa: F401,E402  (registers "digits")
from torchgraft.data import text as _text  # noqa: F401,E402  (registers "text")
from torchgraft.data import images as _images  # noqa: F401,E402  (registers "images")
from torchgraft.data import textclass as _textclass  # noqa: F401,E402  (registers "textclass")
from torchgraft.data import sft as _sft  # noqa: F401,E402  (registers "sft")

__all__ = ["DataBundle", "build_data", "list_datasets", "register_dataset"]
from torchgraft.data import preference as _preference  # noqa: F401,E402  (registers "preference")
