"""A distributed, resumable sampler: every rank reads its slice of one global order.

The global order of an epoch is a permutation seeded by `(seed, epoch)`, the same for any number
of ranks. Rank r of W takes positions r, r+W, r+2W, ... of it, so with a per-rank batch b the
ranks' batches of step t together are exactly positions [t*b*W, (t+1)*b*W) of the global order:
the global batch equals a single-process batch of size b*W.

`state_dict()` stores the epoch and the number of samples consumed *globally*; `load_state_dict`
jumps straight there (O(1), nothing is iterated), also with a different number of ranks, as long
as the consumed count is a multiple of the new world size (true when resuming at a step boundary
with the same global batch).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

from torchgraft.errors import CheckpointError, ConfigError


class DistributedStatefulSampler(Sampler[int]):
    """Like `torch.utils.data.DistributedSampler`, plus exact O(1) resume (`state_dict`).

    `drop_last=True` drops the tail that does not divide evenly among ranks (training);
    `drop_last=False` pads by repeating the start of the order so every rank gets the same count.
    Iteration continues from the loaded position; after a full pass the epoch ends and the next
    `__iter__` starts epoch+1 automatically (or call `set_epoch`). The position advances as indices
    are drawn. A `DataLoader` with `num_workers > 0` draws `num_workers * prefetch_factor` batches
    ahead of training: use `num_workers=0` for exact resume, or subtract those from `consumed`.
    """

    def __init__(self, num_samples: int, *, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = True) -> None:
        if num_replicas is None or rank is None:
            from torchgraft.distributed.env import get_info

            info = get_info()
            num_replicas = info.world_size if num_replicas is None else num_replicas
            rank = info.rank if rank is None else rank
        if num_samples < 1:
            raise ConfigError("the dataset is empty; a sampler needs at least one sample")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ConfigError(f"sampler rank {rank} is outside 0..{num_replicas - 1}")
        if drop_last and num_samples < num_replicas:
            raise ConfigError(f"dataset has {num_samples} samples, fewer than the {num_replicas} ranks")
        self.num_total = int(num_samples)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.epoch = 0
        self.consumed = 0  # samples of this epoch consumed by all ranks together (global position)

    # -- sizes -------------------------------------------------------------------------------
    @property
    def global_len(self) -> int:
        """Samples per epoch over all ranks (after dropping or padding)."""
        w = self.num_replicas
        if self.drop_last:
            return (self.num_total // w) * w
        return -(-self.num_total // w) * w

    def __len__(self) -> int:
        """Samples this rank yields in a full epoch."""
        return self.global_len // self.num_replicas

    # -- order -------------------------------------------------------------------------------
    def global_order(self, epoch: int | None = None) -> torch.Tensor:
        """The epoch's global order (identical on every rank and for every world size)."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_total, generator=g)
        else:
            order = torch.arange(self.num_total)
        n = self.global_len
        if n > self.num_total:  # pad by wrapping around
            order = torch.cat([order, order[: n - self.num_total]])
        return order[:n]

    def __iter__(self) -> Iterator[int]:
        if self.consumed >= self.global_len:  # finished epoch: move on
            self.epoch += 1
            self.consumed = 0
        order = self.global_order()
        w = self.num_replicas
        start = self.consumed
        while start < self.global_len:
            # Advance the position before yielding, so a checkpoint taken after a batch was
            # drawn (and trained on) resumes after it.
            self.consumed = start + w
            yield int(order[start + self.rank])
            start += w

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning."""
        self.epoch = int(epoch)
        self.consumed = 0

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able position: epoch and global samples consumed (same on every rank)."""
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed,
                "num_samples": self.num_total, "shuffle": self.shuffle, "world_size": self.num_replicas}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved position (possibly saved with another number of ranks)."""
        try:
            epoch, consumed = int(state["epoch"]), int(state["consumed"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError("sampler state is missing 'epoch' / 'consumed'; the checkpoint "
                                  "was not written by this sampler") from None
        if int(state.get("num_samples", self.num_total)) != self.num_total:
            raise CheckpointError(f"sampler state is for a dataset of {state['num_samples']} samples, "
                                  f"this one has {self.num_total}; resume with the same data")
        if int(state.get("seed", self.seed)) != self.seed or bool(state.get("shuffle", self.shuffle)) != self.shuffle:
            raise CheckpointError("sampler state was saved with another seed/shuffle setting; "
                                  "resume with the same data config")
        if consumed % self.num_replicas != 0:
            raise CheckpointError(f"cannot split {consumed} consumed samples evenly over "
                                  f"{self.num_replicas} ranks; resume with a world size dividing it")
        self.epoch = epoch
        self.consumed = consumed
