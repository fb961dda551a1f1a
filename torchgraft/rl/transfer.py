"""Move a policy into a policy for a changed game, whose observation size may differ.

`transfer_policy(src, dst)` is `torchgraft.transfer` with one extra shape policy on the layers that
read the observation (`dst.input_layers()`, i.e. `parts().input_layer` and the critic's first
layer): the columns of shared observation features are copied and new columns start at zero, so
the destination computes exactly what the source did on the features both games share, and
dropped features are simply not read. Everything else is copied by name and shape; the report
lists each tensor (`adapted` for the input layers).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchgraft.tools.adapt import PolicyMismatch
from torchgraft.tools.transfer import Source, TransferReport, transfer


def input_columns(src: torch.Tensor, dst: torch.Tensor, name: str) -> tuple[torch.Tensor, str]:
    """(out, in) weights differing in `in` only: keep the shared input columns, zero the new ones."""
    if src.dim() != 2 or dst.dim() != 2 or src.shape[0] != dst.shape[0]:
        raise PolicyMismatch("input adaptation needs Linear weights (out, in) differing in `in` only")
    keep = min(src.shape[1], dst.shape[1])
    out = torch.zeros(dst.shape, dtype=torch.float32)
    out[:, :keep] = src[:, :keep].float()
    change = (f"{dst.shape[1] - src.shape[1]} new input(s) start at 0" if dst.shape[1] > src.shape[1]
              else f"{src.shape[1] - dst.shape[1]} input(s) dropped")
    return out.to(dst.dtype), f"input layer: observations {src.shape[1]} -> {dst.shape[1]}, kept {keep}, {change}"


def transfer_policy(src: Source, dst: nn.Module, **kwargs: Any) -> TransferReport:
    """`torchgraft.transfer(src, dst, ...)` with the observation-reading layers adapted."""
    layers = dst.input_layers() if hasattr(dst, "input_layers") else []
    policies = {f"{name}.weight": input_columns for name in layers}
    policies.update(kwargs.pop("policies", None) or {})
    return transfer(src, dst, policies=policies, **kwargs)
