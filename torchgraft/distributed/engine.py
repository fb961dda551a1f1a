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
  rank 0. Both go through the one writer, `torchgraft.checkpoint.files.write_checkpoint_dir`.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, ContextManager

import torch
import torch.distributed as dist
from torch import nn

from torchgraft.data.registry import DataBundle
from torchgraft.distributed.checkpoint import full_state_dict, is_sharded_checkpoint, load_sharded, save_sharded
from torchgraft.distributed.config import DistributedConfig, distributed_config
from torchgraft.distributed.env import DistInfo, barrier, init_distributed, launched_by_torchrun
from torchgraft.distributed.parallel import find_blocks, grad_sync, parallelize, strategy_of, unwrap
from torchgraft.errors import CheckpointError, ConfigError
from torchgraft.checkpoint.files import list_checkpoints, load_optimizer_state
from torchgraft.train.config import RunConfig
from torchgraft.train.engine import LocalEngine, LossFn, apply_kernel_converters, ModelBuilder, WriteShards, read_resumable, resolve_device


def wants_distributed(cfg: RunConfig, out_dir: str | Path | None = None, resume: bool = False) -> bool:
    """True when the run needs `DistributedEngine`: a `distributed:` option is set, torchrun started
    us, or we resume a checkpoint written by a distributed run (sharded / other world size)."""
    if distributed_config(cfg.distributed) != DistributedConfig():  # any option (e.g. activation ckpt alone)
        return True
    if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        return True
    if resume and out_dir is not None:
        ckpts = list_checkpoints(Path(out_dir) / "checkpoints")
        if ckpts:
            try:
                ts = json.loads((ckpts[-1] / "trainer_state.json").read_text())
            except (OSError, ValueError):
                return False
            return "world_size" in ts or ts.get("loader", {}).get("world_size", 1) != 1
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
        self._wrapped = wrapped
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

    def checkpoint_parts(self, model: nn.Module, optimizer: torch.optim.Optimizer
                         ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, WriteShards | None]:
        if self.strategy != "fsdp":
            return super().checkpoint_parts(model, optimizer)

        def write_shards(tmp: Path) -> None:
            save_sharded(tmp / "dcp", model, optimizer)

        return full_state_dict(model), None, write_shards

    def load_checkpoint(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer
                        ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        if is_sharded_checkpoint(path / "dcp"):
            ck = read_resumable(path)
            load_sharded(path / "dcp", model, optimizer)
            return ck.trainer_state, ck.rng_tensors
        if strategy_of(self._wrapped) != "fsdp":
            return super().load_checkpoint(path, model, optimizer)
        ck = read_resumable(path)
        if ck.optimizer_state is None:
            raise CheckpointError(f"{path} holds weights only; it cannot resume a run")
        _load_full_into_fsdp(model, optimizer, ck.model_state, ck.optimizer_state)
        return ck.trainer_state, ck.rng_tensors

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


def _load_full_into_fsdp(model: nn.Module, optimizer: torch.optim.Optimizer,
                         model_state: dict[str, torch.Tensor], optim_state: dict[str, Any]) -> None:
    """Load a single-file (unsharded) checkpoint into an FSDP-sharded model and its optimizer.

    Every rank has read the whole file, so each cuts its own shards locally (no communication).
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    def local_piece(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if isinstance(like, DTensor):
            return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)
        return full.to(dtype=like.dtype, device=like.device)

    expected = set(model.state_dict())
    if set(model_state) != expected:
        missing, extra = sorted(expected - set(model_state)), sorted(set(model_state) - expected)
        raise CheckpointError(f"checkpoint weights do not fit the model (missing {missing[:3]}, "
                              f"unexpected {extra[:3]}); resume with the same model config")
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            piece = local_piece(model_state[name], t)
            (t.to_local() if isinstance(t, DTensor) else t).copy_(
                piece.to_local() if isinstance(piece, DTensor) else piece)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for pid, st in optim_state["state"].items():
        p = params[int(pid)]
        state[pid] = {k: local_piece(v, p) if isinstance(v, torch.Tensor) and v.shape == p.shape else v
                      for k, v in st.items()}
    load_optimizer_state(optimizer, {"state": state, "param_groups": optim_state["param_groups"]})
