"""Model FLOPs and MFU: FLOPs counted once with torch's FlopCounterMode, divided by the device's peak.

Peaks are dense (no sparsity) vendor numbers per dtype, matched on `torch.cuda.get_device_name`;
an unknown device gets no MFU (only achieved FLOP/s), never a guessed number.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

T = 1e12
# name substring -> peak FLOP/s per precision ("fp32" = plain FP32, "tf32" = TF32 tensor cores)
KNOWN_PEAKS: dict[str, dict[str, float]] = {
    "B200": {"bf16": 2250 * T, "fp16": 2250 * T, "tf32": 1100 * T, "fp32": 80 * T},
    "H200": {"bf16": 989.4 * T, "fp16": 989.4 * T, "tf32": 494.7 * T, "fp32": 66.9 * T},
    "GH200": {"bf16": 989.4 * T, "fp16": 989.4 * T, "tf32": 494.7 * T, "fp32": 66.9 * T},
    "H100 NVL": {"bf16": 835.5 * T, "fp16": 835.5 * T, "tf32": 417.8 * T, "fp32": 60 * T},
    "H100 PCIe": {"bf16": 756.5 * T, "fp16": 756.5 * T, "tf32": 378 * T, "fp32": 51.2 * T},
    "H100": {"bf16": 989.4 * T, "fp16": 989.4 * T, "tf32": 494.7 * T, "fp32": 66.9 * T},  # SXM
    "H800": {"bf16": 989.4 * T, "fp16": 989.4 * T, "tf32": 494.7 * T, "fp32": 66.9 * T},
    "A100": {"bf16": 312 * T, "fp16": 312 * T, "tf32": 156 * T, "fp32": 19.5 * T},
    "A800": {"bf16": 312 * T, "fp16": 312 * T, "tf32": 156 * T, "fp32": 19.5 * T},
    "L40S": {"bf16": 362 * T, "fp16": 362 * T, "tf32": 183 * T, "fp32": 91.6 * T},
    "L4": {"bf16": 121 * T, "fp16": 121 * T, "tf32": 60 * T, "fp32": 30.3 * T},
    "A10G": {"bf16": 70 * T, "fp16": 70 * T, "tf32": 35 * T, "fp32": 31.2 * T},
    "A10": {"bf16": 125 * T, "fp16": 125 * T, "tf32": 62.5 * T, "fp32": 31.2 * T},
    "RTX 4090": {"bf16": 165.2 * T, "fp16": 165.2 * T, "tf32": 82.6 * T, "fp32": 82.6 * T},
    "RTX 3090": {"bf16": 71 * T, "fp16": 71 * T, "tf32": 35.6 * T, "fp32": 35.6 * T},
    "V100": {"fp16": 125 * T, "fp32": 15.7 * T},
    "T4": {"fp16": 65 * T, "fp32": 8.1 * T},
    "MI300X": {"bf16": 1307.4 * T, "fp16": 1307.4 * T, "tf32": 653.7 * T, "fp32": 163.4 * T},
    "MI250X": {"bf16": 383 * T, "fp16": 383 * T, "fp32": 47.9 * T},
}


def peak_flops(device_name: str, precision: str) -> float | None:
    """Peak FLOP/s of a device (by name) for 'fp32' | 'tf32' | 'bf16' | 'fp16', or None if unknown."""
    for key in sorted(KNOWN_PEAKS, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return KNOWN_PEAKS[key].get(precision)
    return None


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    """Detected peak of a CUDA device for the run's precision (TF32 when fp32 matmuls use it)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32:
        precision = "tf32"
    return peak_flops(torch.cuda.get_device_name(device), precision)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmuls/convolutions/attention run by `fn()` (forward and backward if it does both)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def step_flops(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module], torch.Tensor], precision: str,
               device: torch.device) -> int:
    """FLOPs of one forward + backward of `loss_fn(model)`, counted in eval mode (no dropout) and
    leaving no gradients behind."""
    from torchgraft.train.precision import autocast

    def fwd_bwd() -> None:
        with autocast(precision, device):
            loss = loss_fn(model)
        loss.backward()

    was_training = model.training
    model.eval()
    try:
        return count_flops(fwd_bwd)
    finally:
        model.train(was_training)
        for p in model.parameters():
            p.grad = None
