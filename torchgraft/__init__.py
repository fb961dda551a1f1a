"""torchgraft: build large models out of PyTorch modules, train them, fine-tune them."""
from __future__ import annotations

__version__ = "0.1.0"

from torchgraft.errors import TorchgraftError

__all__ = ["TorchgraftError", "__version__"]

# Lazily imported public names: {name: module}. Add entries here rather than importing eagerly:
# `import torchgraft` must not import torch, so that `torchgraft --help` and config errors are instant.
_LAZY: dict[str, str] = {
    "build": "torchgraft.models.registry",
    "get_config": "torchgraft.models.registry",
    "list_models": "torchgraft.models.registry",
    "materialize": "torchgraft.models.registry",
    "transfer": "torchgraft.tools.transfer",
    "TransferReport": "torchgraft.tools.transfer",
    "freeze": "torchgraft.tools.freeze",
    "unfreeze": "torchgraft.tools.freeze",
    "param_groups": "torchgraft.tools.param_groups",
    "grow": "torchgraft.tools.grow",
    "load_hf": "torchgraft.interop.hf",
    "save_hf": "torchgraft.interop.hf",
    "run_training": "torchgraft.recipes.training",
    "load_checkpoint": "torchgraft.train",
    "export": "torchgraft.interop.export",
    "onnx_generate": "torchgraft.interop.onnx_generate",
    "summary": "torchgraft.tools.summary",
    "measure_flops": "torchgraft.tools.flops",
    "estimate_memory": "torchgraft.tools.memory",
    "apply_lora": "torchgraft.peft.lora",
    "load_model": "torchgraft.interop.artifacts",
    "resolve": "torchgraft.checkpoint.artifact",
}
__all__ += list(_LAZY)


def __getattr__(name: str):  # PEP 562: import heavy/circular pieces on first use
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name == "peft":
        import importlib

        return importlib.import_module("torchgraft.peft")
    raise AttributeError(f"module 'torchgraft' has no attribute {name!r}")
