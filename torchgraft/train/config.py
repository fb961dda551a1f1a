"""Run configuration: one YAML with sections model, data, optim, schedule, trainer.

`model` and `data` stay mappings (validated by the model registry / dataset builder); the other
sections are typed dataclasses, so unknown keys and wrong types fail with a clear message.
To add a section (e.g. `distributed`), add a dataclass field to `RunConfig`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torchgraft.config import apply_overrides, from_dict, load_yaml, to_dict
from torchgraft.distributed.config import DistributedConfig
from torchgraft.errors import ConfigError


@dataclass
class OptimConfig:
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0            # sgd only
    nesterov: bool = False           # sgd only
    decay_norm_and_bias: bool = False  # also apply weight decay to 1-D params (norms, biases)
    decay_embeddings: bool = False     # also apply weight decay to nn.Embedding weights
    foreach: bool | None = None


@dataclass
class ScheduleConfig:
    name: Literal["constant", "cosine", "linear", "wsd"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0   # final lr as a fraction of the peak (cosine, linear, wsd)
    decay_fraction: float = 0.2  # wsd: share of the run spent in the final decay


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    batch_size: int = 64               # examples per optimizer step (all micro-batches together)
    grad_accum_steps: int = 1          # micro-batches per step; batch_size must divide evenly
    seed: int = 0
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    grad_clip: float = 0.0             # max global grad norm; 0 = off
    eval_every: int = 0                # steps; 0 = only at the end
    eval_batch_size: int = 256
    eval_max_batches: int | None = None
    log_every: int = 10
    checkpoint_every: int = 0          # steps; 0 = only at the end
    keep_last: int = 2                 # last-K checkpoints kept (the best one is kept too)
    save_best: bool = True             # checkpoint each new best evaluation (needs eval_every > 0)
    best_metric: str = "val_loss"
    best_mode: Literal["min", "max", "auto"] = "auto"
    early_stopping_patience: int = 0   # evaluations without improvement; 0 = off
    early_stopping_min_delta: float = 0.0
    max_bad_steps: int = 5             # consecutive NaN/Inf steps before the run stops
    progress: bool = True
    tensorboard: bool = True
    measure_flops: bool = True         # count model FLOPs once (for FLOP/s and MFU)
    init_from: str | None = None       # start from these weights (a run dir or checkpoint folder)


@dataclass
class RunConfig:
    model: dict[str, Any] = field(default_factory=lambda: {"name": "lenet"})
    data: dict[str, Any] = field(default_factory=lambda: {"name": "digits"})
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def load_run_config(source: str | Path | dict[str, Any] | RunConfig,
                    overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """Build a validated RunConfig from a YAML path, a mapping or a RunConfig, plus dotted overrides."""
    if isinstance(source, RunConfig):
        tree = source.to_dict()
    elif isinstance(source, dict):
        tree = source
    else:
        tree = load_yaml(source)
    if overrides:
        tree = apply_overrides(tree, overrides)
    cfg = from_dict(RunConfig, tree)
    check_run_config(cfg)
    return cfg


def check_run_config(cfg: RunConfig) -> None:
    from torchgraft.train.validate import check_values

    check_values(cfg.to_dict())  # finite positive lr, 0 <= betas < 1, sizes >= 1, device available, ...
    t = cfg.trainer
    if t.max_steps < 1:
        raise ConfigError(f"trainer.max_steps must be >= 1, got {t.max_steps}")
    if t.grad_accum_steps < 1 or t.batch_size % t.grad_accum_steps:
        raise ConfigError(f"trainer.batch_size={t.batch_size} must be a multiple of "
                          f"trainer.grad_accum_steps={t.grad_accum_steps}")
    for key in ("eval_every", "checkpoint_every", "log_every", "keep_last", "early_stopping_patience"):
        if getattr(t, key) < 0:
            raise ConfigError(f"trainer.{key} must be >= 0, got {getattr(t, key)}")
    if t.max_bad_steps < 1:
        raise ConfigError(f"trainer.max_bad_steps must be >= 1, got {t.max_bad_steps}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {cfg.optim.lr}")
    s = cfg.schedule
    if s.warmup_steps < 0 or not 0 <= s.min_lr_ratio <= 1 or not 0 < s.decay_fraction <= 1:
        raise ConfigError("schedule: need warmup_steps >= 0, 0 <= min_lr_ratio <= 1, "
                          "0 < decay_fraction <= 1")
    if not isinstance(cfg.model, dict) or not isinstance(cfg.data, dict):
        raise ConfigError("model and data must be sections (mappings)")
