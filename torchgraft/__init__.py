"""torchgraft: build large models out of PyTorch modules, train them, fine-tune them."""
from __future__ import annotations

__version__ = "0.1.0"

from torchgraft.errors import TorchgraftError
from torchgraft.models.registry import build, get_config, list_models, materialize

__all__ = ["TorchgraftError", "build", "get_config", "list_models", "materialize", "__version__"]
