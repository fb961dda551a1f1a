"""The `distributed:` section of a run config (plain dataclass: no torch.distributed import here).

The run config keeps the section as a plain mapping (so `torchgraft.train` does not depend on this
package); `distributed_config` validates it when the distributed engine reads it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torchgraft.config import from_dict


@dataclass
class DistributedConfig:
    """How a run is spread over processes (launch them with `--nproc N` or torchrun).

    strategy: none (one process, or plain replicas without gradient sync: not useful), ddp
      (replicate + all-reduce), fsdp (FSDP2: parameters, gradients and optimizer state sharded).
      With several processes and strategy none, ddp is used.
    activation_checkpointing: none | full | k (every k-th block) - recompute instead of store.
    mixed_precision (fsdp): bf16 | fp16 | none - compute dtype of the gathered parameters;
      gradients are reduced in fp32 and master weights stay fp32. ddp uses trainer.precision.
    cpu_offload (fsdp): keep sharded parameters, gradients and optimizer state on the CPU.
    block_pattern: regex of the module names to shard / checkpoint as blocks (default: the
      children of a ModuleList named blocks / layers / h).
    """

    strategy: Literal["none", "ddp", "fsdp"] = "none"
    activation_checkpointing: str | int = "none"
    mixed_precision: str = "none"
    cpu_offload: bool = False
    block_pattern: str | None = None


def distributed_config(section: dict[str, Any] | DistributedConfig | None) -> DistributedConfig:
    """The validated `distributed:` section (unknown keys and wrong types fail with one line)."""
    if isinstance(section, DistributedConfig):
        return section
    return from_dict(DistributedConfig, dict(section or {}), prefix="distributed")
