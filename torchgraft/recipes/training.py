"""The one training entry point, `run_training`: it chooses the engine, one process (`LocalEngine`)
or several (`DistributedEngine`: a `distributed:` option, torchrun, or resuming a distributed run's
checkpoint), and runs the one `Trainer`.

It lives here, above both `torchgraft.train` and `torchgraft.distributed`, so that the training
package never depends on the distributed one; `torchgraft.run_training` and
`torchgraft.train.run_training` are this function.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from torchgraft.data.registry import DataBundle
from torchgraft.train.callbacks import Callback
from torchgraft.train.config import RunConfig, load_run_config
from torchgraft.train.engine import LocalEngine
from torchgraft.train.optim import ParamGroupsFn
from torchgraft.train.trainer import NonFiniteError, Trainer, TrainResult


def make_engine(cfg: RunConfig, out_dir: str | Path | None = None, resume: bool = False) -> LocalEngine:
    """The engine a run needs: distributed when asked for by the config, the launcher or the checkpoint."""
    from torchgraft.distributed.engine import DistributedEngine, wants_distributed

    if wants_distributed(cfg, out_dir, resume):
        return DistributedEngine(cfg)
    return LocalEngine(cfg.trainer.device)


def run_training(cfg: RunConfig | dict | str | Path, out_dir: str | Path, *, model: nn.Module | None = None,
                 data: DataBundle | None = None, resume: bool = False, callbacks: Sequence[Callback] = (),
                 param_groups_fn: ParamGroupsFn | None = None, engine: LocalEngine | None = None) -> TrainResult:
    """Train `cfg` (a RunConfig, or a mapping / YAML path parsed once by `load_run_config`) into `out_dir`.

    `model` replaces the one named by cfg.model (only its requires_grad parameters are optimized);
    `data` replaces cfg.data; `param_groups_fn(model)` supplies custom optimizer groups;
    `resume=True` continues from the newest good checkpoint in `out_dir` (or starts if there is none).
    `engine` defaults to `make_engine` (DDP / FSDP when the config or the launcher asks for it).
    """
    cfg = cfg if isinstance(cfg, RunConfig) else load_run_config(cfg)
    trainer = Trainer(cfg, out_dir, model=model, data=data, callbacks=callbacks, param_groups_fn=param_groups_fn,
                      engine=engine if engine is not None else make_engine(cfg, out_dir, resume))
    return trainer.fit(resume=resume)


def train_from_cli(cfg: RunConfig, run_dir: Path, resume: bool) -> None:
    """`torchgraft train`: run the parsed config, print a one-line summary (on the main process)."""
    import warnings

    from torchgraft.distributed.env import cleanup, is_main_process
    from torchgraft.errors import warning_line

    warnings.formatwarning = warning_line
    result = run_training(cfg, run_dir, resume=resume)
    main = is_main_process()
    cleanup()  # the process group of a distributed run, if any
    if not main:
        return
    bad = {k: v for k, v in result.metrics.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        raise NonFiniteError(f"run ended at step {result.step} with non-finite "
                             f"{', '.join(f'{k}={v}' for k, v in bad.items())}: the model diverged; lower "
                             f"optim.lr or set trainer.grad_clip (checkpoints and metrics are in {run_dir})")
    metrics = "  ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
    print(f"done: step {result.step} ({result.stop_reason}) {metrics}  [{result.elapsed_s:.1f}s] -> {run_dir}")
