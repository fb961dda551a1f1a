"""Optimizers with weight-decay groups.

Adam/AdamW use PyTorch's fused kernels (`fused=True`) on CPU and CUDA unless `optim.foreach` is
set (true: the multi-tensor path, false: the per-tensor loop).

By default weight decay skips 1-D parameters (norm weights, biases) and embedding tables; a recipe
can pass its own `param_groups_fn(model) -> list[dict]` (e.g. layer-wise learning rates); each
group's "lr" is then the peak that the schedule scales.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchgraft.train.config import OptimConfig
from torchgraft.train.optim_lowbit import LOWBIT, build_lowbit_adamw

ParamGroupsFn = Callable[[nn.Module], list[dict[str, Any]]]


def weight_decay_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed and a non-decayed group (one group if no decay)."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim < 2 and not cfg.decay_norm_and_bias:
            no_decay.append(p)
        elif id(p) in embedding_params and not cfg.decay_embeddings:
            no_decay.append(p)
        else:
            decay.append(p)
    if cfg.weight_decay == 0:  # nothing to split: one group keeps the optimizer step cheap
        return [{"params": decay + no_decay, "weight_decay": 0.0}]
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": cfg.weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _fused_ok(params: list[torch.Tensor]) -> bool:
    """PyTorch's fused Adam/AdamW kernels take floating-point CPU or CUDA tensors (not DTensors
    of a sharded run, which keep PyTorch's default path)."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                and type(p) is nn.Parameter for p in params)


def build_optimizer(model: nn.Module, cfg: OptimConfig,
                    param_groups_fn: ParamGroupsFn | None = None) -> torch.optim.Optimizer:
    """The optimizer named by `cfg` over the model's trainable parameters."""
    from torchgraft.errors import ConfigError

    groups = param_groups_fn(model) if param_groups_fn is not None else weight_decay_groups(model, cfg)
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["params"] = [p for p in g["params"] if p.requires_grad]
    if not any(g["params"] for g in groups):
        raise ConfigError("the model has no trainable parameters (all have requires_grad=False)")
    if cfg.name in LOWBIT:
        return _with_peak_lr(build_lowbit_adamw(groups, cfg))
    common: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cfg.foreach is not None:
        common["foreach"] = cfg.foreach
    elif cfg.name in ("adamw", "adam") and _fused_ok([p for g in groups for p in g["params"]]):
        common["fused"] = True  # one kernel per parameter: ~3x faster than the per-tensor loop on CPU
    if cfg.name == "adamw":
        opt = torch.optim.AdamW(groups, betas=cfg.betas, eps=cfg.eps, **common)
    elif cfg.name == "adam":
        opt = torch.optim.Adam(groups, betas=cfg.betas, eps=cfg.eps, **common)
    else:
        opt = torch.optim.SGD(groups, momentum=cfg.momentum, nesterov=cfg.nesterov, **common)
    return _with_peak_lr(opt)


def _with_peak_lr(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    for g in opt.param_groups:
        g.setdefault("peak_lr", float(g["lr"]))  # what the schedule multiplies
    return opt
