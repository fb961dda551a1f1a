"""Engines: what differs between training in one process and on several (DDP / FSDP2).

The `Trainer` runs the same loop everywhere and asks its engine for
- the model it trains (`setup_model`: build, load initial weights, move, wrap / shard, compile) and
  the loss function the loop calls (`training_loss`: here the model and the task's loss compiled
  as one graph);
- each rank's share of the data (`sampler`, `shard_eval_batch`) and data preparation (`prepare_data`);
- the context of one micro-batch (`no_sync`: skip the gradient all-reduce but on the last one);
- sums over processes (`all_reduce_sum`: target counts, logged loss, evaluation sums) and `broadcast`;
- which process logs and writes run files (`is_main`);
- the checkpoint layout (`checkpoint_layout`: single-file state on the main process, or DCP shards
  written by every rank); the `torchgraft.checkpoint.manager.CheckpointManager` does the rest.

`LocalEngine` is the one-process engine (this module); `torchgraft.distributed.engine.DistributedEngine`
is the other. The choice is made above both packages (`torchgraft.recipes.training.make_engine`),
so `torchgraft.train` never imports `torchgraft.distributed`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, ContextManager

import torch
from torch import nn

from torchgraft.data.loader import StatefulSampler
from torchgraft.data.registry import DataBundle
from torchgraft.checkpoint.layout import SingleFileLayout
from torchgraft.errors import ConfigError

ModelBuilder = Callable[[str | None], nn.Module]  # device ("meta" or None) -> a new model
LossFn = Callable[[nn.Module, dict[str, Any]], torch.Tensor]  # (model, batch) -> summed loss


def resolve_device(name: str) -> torch.device:
    """`trainer.device` -> a torch.device (auto: CUDA when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name!r} but CUDA is not available; use device=cpu or auto")
    return dev


def apply_kernel_converters(model: nn.Module, device: torch.device) -> None:
    """Swap in the measured kernel rewrites for compiled training on `device` (in place)."""
    from torchgraft.tools.cpu_kernels import kernel_converters  # the tools package: only when compiling
    from torchgraft.tools.converters import apply_converters

    apply_converters(model, kernel_converters(device))


class LocalEngine:
    """Training in this one process: no wrapping but `torch.compile`, no reductions, single-file
    checkpoints. Also the base of the distributed engine, whose methods override these."""

    rank = 0
    world_size = 1
    is_main = True

    def __init__(self, device: str | torch.device = "auto"):
        self.device = resolve_device(device) if isinstance(device, str) else device

    # ---- data
    def prepare_data(self, build: Callable[[], DataBundle]) -> DataBundle:
        return build()

    def sampler(self, num_samples: int, global_batch: int, seed: int) -> StatefulSampler:
        """The training sampler of this process (global_batch / world_size examples per step)."""
        return StatefulSampler(num_samples, global_batch // self.world_size, shuffle=True, seed=seed,
                               rank=self.rank, world_size=self.world_size)

    def shard_eval_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """This process's part of an evaluation batch (all of it here)."""
        return batch

    # ---- model
    def setup_model(self, model: nn.Module | None, build: ModelBuilder,
                    load_init: Callable[[nn.Module], None] | None, compile: bool) -> tuple[nn.Module, nn.Module]:
        """(the model, the module the loop calls). `compile` is applied in `training_loss`, after
        the kernel converters for this device (`torchgraft.tools.cpu_kernels`)."""
        model = model if model is not None else build(None)
        if load_init is not None:
            load_init(model)
        model.to(self.device)
        model.train()
        if compile:
            apply_kernel_converters(model, self.device)
        return model, model

    def training_loss(self, loss_sum: LossFn, compile: bool) -> LossFn:
        """The task's `loss_sum(model, batch)` as the loop calls it. With `compile`, the model's
        forward and the task's loss become one `torch.compile` graph, so the loss (cross-entropy over
        the logits, masking, the sum) fuses with the model's last ops instead of running eagerly
        after a compiled model (measured in benchmarks/bench_gpt_step.py)."""
        return torch.compile(loss_sum) if compile else loss_sum

    def no_sync(self, train_model: nn.Module, last: bool) -> ContextManager:
        """Context of one micro-batch's forward/backward (DDP: no gradient sync unless `last`)."""
        return contextlib.nullcontext()

    # ---- collectives
    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def broadcast(self, obj: Any) -> Any:
        """The main process's `obj` on every process."""
        return obj

    def barrier(self) -> None:
        pass

    # ---- checkpoints
    def describe(self) -> dict[str, Any]:
        """What meta.json records about the engine ({} for one process)."""
        return {}

    def checkpoint_layout(self) -> SingleFileLayout:
        """How the model and optimizer entries of a checkpoint are stored (single files here)."""
        return SingleFileLayout(self)

    def finish(self, model: nn.Module) -> nn.Module:
        """The model a run returns (a plain module)."""
        return model

