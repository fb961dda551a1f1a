"""Stateful, O(1)-resumable batch sampling.

`StatefulSampler` turns (seed, epoch) into a fixed permutation and hands out batches of indices;
its whole state is `{"epoch", "index"}`, so resuming jumps straight to the next unseen batch without
iterating through the consumed part of the epoch. `rank` / `world_size` shard each epoch's
permutation so a distributed run can reuse it unchanged.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from torchgraft.errors import CheckpointError, ConfigError


class DictTensorDataset(Dataset):
    """Rows of equally long tensors as dicts; `get_batch(indices)` gathers a whole batch at once."""

    def __init__(self, **tensors: torch.Tensor):
        if not tensors:
            raise ValueError("DictTensorDataset needs at least one tensor")
        lengths = {len(t) for t in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"all tensors need the same first dimension, got {sorted(lengths)}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: t[i] for k, t in self.tensors.items()}

    def get_batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: t[indices] for k, t in self.tensors.items()}


class StatefulSampler:
    """Batches of dataset indices with an exact, O(1) saved position.

    Each epoch's order is `randperm(num_samples)` from a generator seeded by (seed, epoch), so it
    depends on nothing else (not the global RNG, not how many batches were drawn before).
    """

    def __init__(self, num_samples: int, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        per_rank = num_samples // world_size
        if drop_last and per_rank < batch_size:
            raise ConfigError(f"batch size {batch_size} is larger than the training set "
                              f"({per_rank} examples per rank); lower trainer.batch_size")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.per_rank = per_rank
        self.batches_per_epoch = per_rank // batch_size if drop_last else -(-per_rank // batch_size)
        self.epoch = 0
        self.index = 0  # batches already handed out in `epoch`
        self._order: torch.Tensor | None = None
        self._order_epoch = -1

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if self._order_epoch != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
                order = torch.randperm(self.num_samples, generator=g)
            else:
                order = torch.arange(self.num_samples)
            self._order = order[self.rank: self.per_rank * self.world_size: self.world_size]
            self._order_epoch = epoch
        return self._order

    def next_indices(self) -> torch.Tensor:
        """Indices of the next batch (rolls over to the next epoch when one is used up)."""
        if self.index >= self.batches_per_epoch:
            self.epoch += 1
            self.index = 0
        order = self._epoch_order(self.epoch)
        start = self.index * self.batch_size
        self.index += 1
        return order[start: start + self.batch_size]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "num_samples": self.num_samples,
                "batch_size": self.batch_size, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("num_samples", "batch_size", "seed", "world_size"):
            if key in state and state[key] != getattr(self, key):
                raise CheckpointError(
                    f"cannot resume: the checkpoint's data loader had {key}={state[key]}, this run has "
                    f"{getattr(self, key)}; resume with the same data and trainer settings")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


class _BatchKeys:
    """The batches of keys a `StatefulSampler` will hand out from its current position, as a
    `batch_sampler` for a torch DataLoader (its workers decode ahead; the sampler's own position
    only moves when the trainer takes a batch, so the saved state stays exact)."""

    def __init__(self, sampler: StatefulSampler, with_epoch: bool):
        self.sampler = copy.copy(sampler)  # a private cursor; the original is not advanced here
        self.with_epoch = with_epoch

    def __iter__(self) -> Iterator[list[Any]]:
        s = self.sampler
        while True:
            idx = s.next_indices()
            yield [(s.epoch, int(i)) for i in idx] if self.with_epoch else [int(i) for i in idx]


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not fight the training process for cores


def item_keys(dataset: Dataset, epoch: int, indices: torch.Tensor) -> list[Any]:
    """What to index `dataset` with: `(epoch, i)` for datasets that draw per-epoch randomness
    (augmentation seeded by (seed, epoch, index), see `epoch_keys`), else plain `i`."""
    if getattr(dataset, "epoch_keys", False):
        return [(epoch, int(i)) for i in indices]
    return [int(i) for i in indices]


class StatefulLoader:
    """Endless iterator of collated batches drawn with a `StatefulSampler`.

    `num_workers > 0` decodes in DataLoader worker processes, fed the same batches of keys the
    sampler hands out (from its saved position after a resume), so the batch order, and any
    augmentation seeded by (seed, epoch, index), is the same with or without workers.
    """

    def __init__(self, dataset: Dataset, sampler: StatefulSampler,
                 collate_fn: Callable[[list[Any]], Any] | None = None, num_workers: int = 0):
        if num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {num_workers}")
        self.dataset, self.sampler = dataset, sampler
        self.collate_fn = collate_fn or default_collate
        self.num_workers = num_workers
        self._fast = collate_fn is None and hasattr(dataset, "get_batch") and num_workers == 0
        self._it: Iterator[Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        return self

    def _worker_iter(self) -> Iterator[Any]:
        from torch.utils.data import DataLoader

        keys = _BatchKeys(self.sampler, getattr(self.dataset, "epoch_keys", False))
        return iter(DataLoader(self.dataset, batch_sampler=keys, num_workers=self.num_workers,
                               collate_fn=self.collate_fn, worker_init_fn=_worker_init,
                               prefetch_factor=2))

    def __next__(self) -> Any:
        if self.num_workers:
            if self._it is None:
                self._it = self._worker_iter()
            self.sampler.next_indices()  # keep the saved position in step with what was consumed
            return next(self._it)
        idx = self.sampler.next_indices()
        if self._fast:
            return self.dataset.get_batch(idx)
        return self.collate_fn([self.dataset[k] for k in item_keys(self.dataset, self.sampler.epoch, idx)])

    def close(self) -> None:
        """Stop the worker processes (they restart on the next batch)."""
        self._it = None

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)
        self.close()  # prefetched batches belong to the old position


def iter_eval_batches(dataset: Dataset, batch_size: int, collate_fn: Callable | None = None,
                      max_batches: int | None = None, num_workers: int = 0) -> Iterator[Any]:
    """Sequential, non-shuffled batches over the whole dataset (the last one may be short);
    decoded in `num_workers` DataLoader worker processes when > 0."""
    n = len(dataset)
    collate = collate_fn or default_collate
    if num_workers > 0:
        from torch.utils.data import DataLoader

        starts = list(range(0, n, batch_size))[:max_batches]
        batches = [list(range(s, min(s + batch_size, n))) for s in starts]
        yield from DataLoader(dataset, batch_sampler=batches, num_workers=min(num_workers, len(batches)) or 0,
                              collate_fn=collate, worker_init_fn=_worker_init)
        return
    fast = collate_fn is None and hasattr(dataset, "get_batch")
    for b, start in enumerate(range(0, n, batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        idx = torch.arange(start, min(start + batch_size, n))
        yield dataset.get_batch(idx) if fast else collate([dataset[int(i)] for i in idx])
