"""Mixed precision: autocast contexts (CPU and CUDA) and the fp16 gradient scaler."""
from __future__ import annotations

import contextlib
from typing import Literal

import torch

Precision = Literal["fp32", "bf16", "fp16"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    """`torch.autocast` for bf16/fp16 on `device`; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def make_grad_scaler(precision: Precision, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling against underflow; bf16 and fp32 do not."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)
