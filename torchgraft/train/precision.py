"""Mixed precision in the trainer: autocast contexts (CPU and CUDA) and the fp16 gradient scaler,
for a `trainer.precision` name of the one vocabulary, `torchgraft.precision`."""
from __future__ import annotations

import contextlib

import torch

from torchgraft.precision import precision


def autocast(name: str, device: torch.device) -> contextlib.AbstractContextManager:
    """`torch.autocast` in the precision's compute dtype on `device`; a no-op when it is not mixed."""
    prec = precision(name, "trainer.precision")
    if not prec.mixed:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=prec.compute)


def make_grad_scaler(name: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling against underflow; bf16 and fp32 do not."""
    if not precision(name, "trainer.precision").needs_grad_scaler:
        return None
    return torch.amp.GradScaler(device.type)
