"""Run configuration: one YAML with sections model, data, task, optim, schedule, trainer, eval,
checkpoint, logging, distributed.

`model` and `data` stay mappings (validated by the model registry and the dataset builder); the other
sections are typed dataclasses, so unknown keys and wrong types fail with a clear message. To add a
section, add a dataclass field to `RunConfig`.

A config is read once: `load_run_config(path, overrides)` reads the YAML, applies the `key=value`
overrides, builds the typed `RunConfig` and checks it (values, combinations, the distributed
section's modes), without importing torch; the `RunConfig` is what the trainer, the engines and the
recipes take from then on (docs/architecture.md, "Config flow").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torchgraft.activation_checkpointing import parse_ac
from torchgraft.config import apply_overrides, from_dict, load_yaml, to_dict
from torchgraft.errors import ConfigError
from torchgraft.precision import check_fp32_master


@dataclass
class OptimConfig:
    name: Literal["adamw", "adam", "sgd", "adamw8bit", "adamw4bit"] = "adamw"  # 8/4-bit: torchao
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
    """`trainer:` the optimisation loop itself."""

    max_steps: int = 1000
    batch_size: int = 64               # examples per optimizer step (all micro-batches together)
    grad_accum_steps: int = 1          # micro-batches per step; batch_size must divide evenly
    seed: int = 0
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    grad_clip: float = 0.0             # max global grad norm; 0 = off
    max_bad_steps: int = 5             # consecutive NaN/Inf steps before the run stops
    init_from: str | None = None       # start from these weights (a run dir or checkpoint folder)


@dataclass
class EvalConfig:
    """`eval:` when and on how much data to evaluate, which metric is "best", early stopping."""

    every: int = 0                     # steps; 0 = only at the end
    batch_size: int = 256
    max_batches: int | None = None
    best_metric: str | None = None     # default: the task's default metric (val_loss for both built-ins)
    best_mode: Literal["min", "max", "auto"] = "auto"  # auto: the task's higher_is_better(best_metric)
    early_stopping_patience: int = 0   # evaluations without improvement; 0 = off
    early_stopping_min_delta: float = 0.0


@dataclass
class CheckpointConfig:
    """`checkpoint:` when to save and what to keep."""

    every: int = 0                     # steps; 0 = only at the end
    keep_last: int = 2                 # last-K checkpoints kept (the best one is kept too)
    save_best: bool = True             # checkpoint each new best evaluation (needs eval.every > 0)


@dataclass
class LoggingConfig:
    """`logging:` metrics.jsonl / TensorBoard cadence, the progress bar, FLOP counting."""

    every: int = 10                    # steps between metrics records
    progress: bool = True
    tensorboard: bool = True
    measure_flops: bool = True         # count model FLOPs once (for FLOP/s and MFU)


@dataclass
class DistributedConfig:
    """`distributed:` how a run is spread over processes (launch them with `--nproc N` or torchrun);
    read by `torchgraft.distributed.engine.DistributedEngine`.

    strategy: none (one process, or plain replicas without gradient sync: not useful), ddp
      (replicate + all-reduce), fsdp (FSDP2: parameters, gradients and optimizer state sharded).
      With several processes and strategy none, ddp is used.
    activation_checkpointing: none | full | k (every k-th block) | selective (every block, keeping
      matmul / attention outputs) - recompute instead of store (`torchgraft.activation_checkpointing`).
    mixed_precision (fsdp): bf16 | fp16 | none - compute dtype of the gathered parameters
      (`torchgraft.precision`); gradients are reduced in fp32 and master weights stay fp32. ddp uses
      trainer.precision.
    cpu_offload (fsdp): keep sharded parameters, gradients and optimizer state on the CPU.
    block_pattern: regex of the module names to shard / checkpoint as blocks (default: the
      children of a ModuleList named blocks / layers / h).
    """

    strategy: Literal["none", "ddp", "fsdp"] = "none"
    activation_checkpointing: str | int = "none"
    mixed_precision: str = "none"
    cpu_offload: bool = False
    block_pattern: str | None = None


# keys that moved out of `trainer:` -> their new dotted name
MOVED_KEYS = {
    "eval_every": "eval.every", "eval_batch_size": "eval.batch_size", "eval_max_batches": "eval.max_batches",
    "best_metric": "eval.best_metric", "best_mode": "eval.best_mode",
    "early_stopping_patience": "eval.early_stopping_patience",
    "early_stopping_min_delta": "eval.early_stopping_min_delta",
    "checkpoint_every": "checkpoint.every", "keep_last": "checkpoint.keep_last",
    "save_best": "checkpoint.save_best",
    "log_every": "logging.every", "progress": "logging.progress", "tensorboard": "logging.tensorboard",
    "measure_flops": "logging.measure_flops",
}


@dataclass
class RunConfig:
    model: dict[str, Any] = field(default_factory=lambda: {"name": "lenet"})
    data: dict[str, Any] = field(default_factory=lambda: {"name": "digits"})
    task: str | dict[str, Any] | None = None  # overrides the data's task (a name or {name: ..., options})
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def check_moved_keys(tree: dict[str, Any]) -> None:
    """An old `trainer.<key>` (before the eval/checkpoint/logging split) fails naming its new key."""
    trainer = tree.get("trainer")
    if isinstance(trainer, dict):
        for key in trainer:
            if key in MOVED_KEYS:
                raise ConfigError(f"trainer.{key} moved: use {MOVED_KEYS[key]}")


def load_run_config(source: str | Path | dict[str, Any] | RunConfig,
                    overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """The one parse of a run config: a YAML path, a mapping or a RunConfig, plus dotted overrides
    (`["trainer.seed=1"]` or `{"trainer.seed": 1}`), read, built and checked (`check_run_config`).
    A RunConfig without overrides is checked and comes back as is (nothing to parse)."""
    if isinstance(source, RunConfig):
        if not overrides:
            check_run_config(source)
            return source
        tree = source.to_dict()
    elif isinstance(source, dict):
        tree = source
    else:
        tree = load_yaml(source)
    if overrides:
        tree = apply_overrides(tree, overrides)
    check_moved_keys(tree)
    cfg = from_dict(RunConfig, tree)
    check_run_config(cfg)
    return cfg


def check_run_config(cfg: RunConfig) -> None:
    """Every value and combination of `cfg`, as one-line ConfigErrors (no torch import)."""
    t = cfg.trainer
    if t.max_steps < 1:
        raise ConfigError(f"trainer.max_steps must be >= 1, got {t.max_steps}")
    if t.grad_accum_steps < 1:
        raise ConfigError(f"trainer.grad_accum_steps={t.grad_accum_steps} is invalid: it must be an integer >= 1 "
                          "(1 = no accumulation)")
    if t.batch_size % t.grad_accum_steps:
        raise ConfigError(f"trainer.batch_size={t.batch_size} must be a multiple of "
                          f"trainer.grad_accum_steps={t.grad_accum_steps}")
    for where, value in (("eval.every", cfg.eval.every), ("checkpoint.every", cfg.checkpoint.every),
                         ("logging.every", cfg.logging.every), ("checkpoint.keep_last", cfg.checkpoint.keep_last),
                         ("eval.early_stopping_patience", cfg.eval.early_stopping_patience)):
        if value < 0:
            raise ConfigError(f"{where} must be >= 0, got {value}")
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
    parse_ac(cfg.distributed.activation_checkpointing, "distributed.activation_checkpointing")
    check_fp32_master(cfg.distributed.mixed_precision, "distributed.mixed_precision")
    from torchgraft.train.validate import check_combinations, check_values

    tree = cfg.to_dict()
    check_values(tree)  # finite positive lr, 0 <= betas < 1, sizes >= 1, device available, ...
    check_combinations(tree)  # e.g. a warm-up longer than the run
