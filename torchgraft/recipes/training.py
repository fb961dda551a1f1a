"""Training entry points that choose the engine: one process (`LocalEngine`) or several
(`DistributedEngine`: a `distributed:` option, torchrun, or resuming a distributed run's checkpoint).

They live here, above both `torchgraft.train` and `torchgraft.distributed`, so that the training
package never depends on the distributed one. `torchgraft train` and the recipes call
`run_training` from here; `torchgraft.train.run_training` is the one-process version.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import nn

from torchgraft.config import load_yaml, parse_overrides
from torchgraft.data.registry import DataBundle
from torchgraft.train.callbacks import Callback
from torchgraft.train.config import RunConfig, load_run_config
from torchgraft.train.engine import LocalEngine
from torchgraft.train.optim import ParamGroupsFn
from torchgraft.train.trainer import Trainer, TrainResult


def load_checked_config(tree: dict, overrides: dict | list[str] | None = None) -> RunConfig:
    """`load_run_config` plus the `distributed:` section's validation (done by its own package)."""
    from torchgraft.distributed.config import distributed_config

    cfg = load_run_config(tree, overrides)
    distributed_config(cfg.distributed)
    return cfg


def make_engine(cfg: RunConfig, out_dir: str | Path | None = None, resume: bool = False) -> LocalEngine:
    """The engine a run needs: distributed when asked for by the config, the launcher or the checkpoint."""
    from torchgraft.distributed.engine import DistributedEngine, wants_distributed

    if wants_distributed(cfg, out_dir, resume):
        return DistributedEngine(cfg)
    return LocalEngine(cfg.trainer.device)


def run_training(cfg: RunConfig | dict | str | Path, out_dir: str | Path, *, model: nn.Module | None = None,
                 data: DataBundle | None = None, resume: bool = False, callbacks: Sequence[Callback] = (),
                 param_groups_fn: ParamGroupsFn | None = None) -> TrainResult:
    """`torchgraft.train.run_training` with the engine chosen by `make_engine` (same arguments)."""
    cfg = cfg if isinstance(cfg, RunConfig) else load_run_config(cfg)
    trainer = Trainer(cfg, out_dir, model=model, data=data, callbacks=callbacks,
                      param_groups_fn=param_groups_fn, engine=make_engine(cfg, out_dir, resume))
    return trainer.fit(resume=resume)


def train_from_cli(config: Path, overrides: list[str], out: Path | None, resume: bool) -> None:
    """`torchgraft train`: read a YAML, apply key=value overrides, run, print a one-line summary."""
    import warnings

    from torchgraft.distributed.env import cleanup, is_main_process

    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"

    tree = load_yaml(config)
    ov = parse_overrides(overrides)
    if "resume" in ov:  # `resume=true` works like --resume
        resume = bool(ov.pop("resume")) or resume
    cfg = load_checked_config(tree, ov)
    run_dir = out or Path("runs") / Path(config).stem
    result = run_training(cfg, run_dir, resume=resume)
    main = is_main_process()
    cleanup()  # the process group of a distributed run, if any
    if not main:
        return
    metrics = "  ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
    print(f"done: step {result.step} ({result.stop_reason}) {metrics}  [{result.elapsed_s:.1f}s] -> {run_dir}")
