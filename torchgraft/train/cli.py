"""`torchgraft train`: read a YAML, apply key=value overrides, run, print a one-line summary."""
from __future__ import annotations

from pathlib import Path

from torchgraft.config import load_yaml, parse_overrides
from torchgraft.train.config import load_run_config


def train_from_cli(config: Path, overrides: list[str], out: Path | None, resume: bool) -> None:
    import math
    import warnings

    from torchgraft.train.trainer import run_training

    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"

    tree = load_yaml(config)
    ov = parse_overrides(overrides)
    if "resume" in ov:  # `resume=true` works like --resume
        resume = bool(ov.pop("resume")) or resume
    cfg = load_run_config(tree, ov)
    run_dir = out or Path("runs") / Path(config).stem
    result = run_training(cfg, run_dir, resume=resume)
    from torchgraft.distributed.env import cleanup, is_main_process

    main = is_main_process()
    cleanup()  # the process group of a distributed run, if any
    if not main:
        return
    bad = {k: v for k, v in result.metrics.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        from torchgraft.train.trainer import NonFiniteError

        raise NonFiniteError(f"run ended at step {result.step} with non-finite "
                             f"{', '.join(f'{k}={v}' for k, v in bad.items())}: the model diverged; lower "
                             f"optim.lr or set trainer.grad_clip (checkpoints and metrics are in {run_dir})")
    metrics = "  ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
    print(f"done: step {result.step} ({result.stop_reason}) {metrics}  [{result.elapsed_s:.1f}s] -> {run_dir}")
