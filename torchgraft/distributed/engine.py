"""`DistributedEngine`: what the one `Trainer` needs to run on several processes (DDP / FSDP2).

- the model is parallelised by `parallelize` (FSDP: built on the meta device, sharded, then
  initialised, unless `trainer.init_from` gives weights);
- each rank reads its slice of every global batch (`trainer.batch_size` stays the global batch)
  and of every evaluation batch;
- DDP skips the all-reduce on all but the last micro-batch (`no_sync`);
- counts, the logged loss and evaluation sums are summed over ranks (`all_reduce_sum`);
- only rank 0 logs, shows progress and writes run files;
- FSDP checkpoints hold the DCP shards of model + optimizer (`dcp/`) next to the usual files
  (a full `model.safetensors` gathered on rank 0, meta, trainer state, RNG, sha256 manifest), so
  they resume with any number of processes; DDP checkpoints are the single-file ones, written by
  rank 0. The engine only supplies that layout (`checkpoint_layout`,
  `torchgraft.distributed.checkpoint.DistributedLayout`); the `CheckpointManager` writes and reads.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, ContextManager

import torch
import torch.distributed as dist
from torch import nn

from torchgraft.data.registry import DataBundle
from torchgraft.checkpoint.manager import CheckpointManager
from torchgraft.distributed.checkpoint import DistributedLayout
from torchgraft.distributed.config import DistributedConfig, distributed_config
from torchgraft.distributed.env import DistInfo, barrier, init_distributed, launched_by_torchrun
from torchgraft.distributed.parallel import find_blocks, grad_sync, parallelize, unwrap
from torchgraft.errors import ConfigError
from torchgraft.train.config import RunConfig
from torchgraft.train.engine import LocalEngine, LossFn, ModelBuilder, apply_kernel_converters, resolve_device


def wants_distributed(cfg: RunConfig, out_dir: str | Path | None = None, resume: bool = False) -> bool:
    """True when the run needs `DistributedEngine`: a `distributed:` option is set, torchrun started
    us, or we resume a checkpoint written by a distributed run (sharded / other world size)."""
    if distributed_config(cfg.distributed) != DistributedConfig():  # any option (e.g. activation ckpt alone)
        return True
    if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        return True
    if resume and out_dir is not None:
        ckpts = CheckpointManager(Path(out_dir) / "checkpoints")
        meta, ts = ckpts.peek("meta.json") or {}, ckpts.peek("trainer_state.json") or {}
        if meta.get("engine") or "world_size" in ts:  # the engine's description (older checkpoints: in ts)
            return True
        if ts:
            return (ts.get("loader") or {}).get("world_size", 1) != 1
    return False


class DistributedEngine(LocalEngine):
    """DDP or FSDP2 over the processes torchrun started (or one process with a group of its own)."""

    def __init__(self, cfg: RunConfig):
        d, t = distributed_config(cfg.distributed), cfg.trainer
        super().__init__(resolve_device(t.device))
        self.dcfg = d
        self.info: DistInfo = init_distributed(self.device.type, force=d.strategy == "fsdp")
        self.device = self.info.device  # cuda:LOCAL_RANK on GPUs
        self.rank, self.world_size, self.is_main = self.info.rank, self.info.world_size, self.info.is_main
        self.strategy = d.strategy if d.strategy != "none" or self.world_size == 1 else "ddp"
        if t.batch_size % (self.world_size * t.grad_accum_steps):
            raise ConfigError(f"trainer.batch_size={t.batch_size} (the global batch) must be a multiple of "
                              f"processes x grad_accum_steps = {self.world_size} x {t.grad_accum_steps}")
        self._skeleton: nn.Module | None = None

    # ---- data
    def prepare_data(self, build) -> DataBundle:
        """Rank 0 prepares the data first (tokenizer, token caches), the others then read its caches:
        the work is done once and only rank 0 shows its progress."""
        if self.world_size == 1:
            return build()
        data = build() if self.is_main else None
        barrier()
        return data if data is not None else build()

    def shard_eval_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Rank r's contiguous slice of every evaluation batch: every rank runs the same number of
        forward passes (FSDP gathers parameters in each), the sums over ranks cover the batch once."""
        if self.world_size == 1:
            return batch
        return {k: v.tensor_split(self.world_size)[self.rank] if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    # ---- model
    def setup_model(self, model: nn.Module | None, build: ModelBuilder, load_init, compile: bool
                    ) -> tuple[nn.Module, nn.Module]:
        d = self.dcfg
        on_meta = model is None and self.strategy == "fsdp" and load_init is None
        given = model is not None
        if model is None:
            model = build("meta" if on_meta else None)
        if load_init is not None:
            load_init(model)
        if not on_meta:
            model.to(self.device)
        model.train()
        if compile:
            apply_kernel_converters(model, self.device)
        # A model handed in by a recipe is used again after training (adapters, merging, reports):
        # keep a free meta-device copy of it to return unsharded (see `finish`).
        self._skeleton = _meta_copy(model) if given and self.strategy == "fsdp" else None
        wrapped = parallelize(model, self.strategy, device=self.device, mixed_precision=d.mixed_precision,
                              cpu_offload=d.cpu_offload, activation_checkpointing=d.activation_checkpointing,
                              block_pattern=d.block_pattern)
        if compile:
            if self.strategy == "fsdp":
                for _, block in find_blocks(model, pattern=d.block_pattern):
                    block.compile()
            else:
                wrapped = torch.compile(wrapped)
        return unwrap(model), wrapped

    def training_loss(self, loss_sum: LossFn, compile: bool) -> LossFn:
        """The task's loss as it is: `setup_model` already compiled the wrapped model (DDP) or
        each block inside FSDP, the way those wrappers support."""
        return loss_sum

    def no_sync(self, train_model: nn.Module, last: bool) -> ContextManager:
        return grad_sync(train_model, sync=last)

    # ---- collectives
    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return value
        value = value.detach().clone()
        dist.all_reduce(value)
        return value

    def broadcast(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        barrier()

    # ---- checkpoints
    def describe(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "strategy": self.strategy}

    def checkpoint_layout(self) -> DistributedLayout:
        """FSDP: DCP shards by every rank (+ the full weights); DDP: single files by rank 0."""
        return DistributedLayout(self, sharded=self.strategy == "fsdp")

    def finish(self, model: nn.Module) -> nn.Module:
        """A model handed in and trained under FSDP comes back as a plain, full model on every rank,
        so recipes can save adapters or merge weights."""
        barrier()
        if self._skeleton is None:
            return model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        plain = self._skeleton.to_empty(device=self.device)
        plain.load_state_dict(full)
        plain.train(model.training)
        return plain


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose parameters and buffers are on the meta device (no memory):
    same classes, submodules, ties and attributes, as it was before sharding."""
    memo: dict[int, Any] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in memo:
            meta = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)
