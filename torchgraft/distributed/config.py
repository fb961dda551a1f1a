"""The `distributed:` section of a run config. The dataclass lives with the other sections in
`torchgraft.train.config` (so the whole config is parsed and checked once, before torch is imported);
it is re-exported here, where the distributed engine reads it."""
from __future__ import annotations

from typing import Any

from torchgraft.config import from_dict
from torchgraft.train.config import DistributedConfig

__all__ = ["DistributedConfig", "distributed_config"]


def distributed_config(section: dict[str, Any] | DistributedConfig | None) -> DistributedConfig:
    """The validated `distributed:` section (unknown keys and wrong types fail with one line)."""
    if isinstance(section, DistributedConfig):
        return section
    return from_dict(DistributedConfig, dict(section or {}), prefix="distributed")
