"""torchgraft.peft: LoRA / DoRA adapters for any nn.Module, saved in the Hugging Face PEFT layout."""
from torchgraft.peft.adapter_io import adapter_state_dict, load_adapter, save_adapter
from torchgraft.peft.lora import (
    LoRAConv2d,
    LoRAEmbedding,
    LoRALayer,
    LoRALinear,
    apply_lora,
    disabled,
    lora_layers,
    merge,
    trainable_fraction,
    unload,
    unmerge,
)

__all__ = [
    "LoRAConv2d", "LoRAEmbedding", "LoRALayer", "LoRALinear", "adapter_state_dict", "apply_lora",
    "disabled", "load_adapter", "lora_layers", "merge", "save_adapter", "trainable_fraction", "unload",
    "unmerge",
]
