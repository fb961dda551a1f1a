"""Quickstart: the seed workflow end to end on built-in data.

1. pretrain `lenet` on digits 0-4;
2. build a new `lenet` for digits 5-9, transfer every tensor except the head (`fc2.*`), freeze the
   transferred convolutions and fine-tune the rest on 10 labelled images per class;
3. train the same model from scratch on the same 50 images, for comparison.
Digits 5-9 were never seen in step 1, so their validation split is made larger (half of the images)
to compare the two 5-9 models on ~450 images rather than ~180.
Writes `pretrain/`, `finetune/`, `scratch/` run directories, `report.json` and `curves.png` into `out`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torchgraft
from torchgraft.train import run_training

# (steps, eval_every) per stage; fast mode is what `make test`-sized machines finish in < 1 minute
SCHEDULE = {
    "fast": {"pretrain": (80, 40), "finetune": (40, 10), "scratch": (40, 10)},
    "full": {"pretrain": (400, 50), "finetune": (100, 10), "scratch": (100, 10)},
}
FROZEN = ["conv1.*", "conv2.*"]  # transferred feature extractor kept fixed while fine-tuning
FINETUNE_VAL_FRACTION = 0.5
PRETRAIN_DIGITS = [0, 1, 2, 3, 4]
FINETUNE_DIGITS = [5, 6, 7, 8, 9]


def _config(digits: list[int], steps: int, eval_every: int, *, per_class: int | None, batch_size: int,
            lr: float, progress: bool, val_fraction: float = 0.2) -> dict[str, Any]:
    data: dict[str, Any] = {"name": "digits", "labels": digits, "val_fraction": val_fraction}
    if per_class is not None:
        data["per_class"] = per_class
    return {
        "model": {"name": "lenet"},
        "data": data,
        "optim": {"name": "adamw", "lr": lr, "weight_decay": 0.01},
        "schedule": {"name": "cosine", "warmup_steps": min(10, steps // 10), "min_lr_ratio": 0.1},
        "trainer": {"max_steps": steps, "batch_size": batch_size, "seed": 0, "grad_clip": 1.0},
        "eval": {"every": eval_every},
        "checkpoint": {"every": steps, "keep_last": 1},
        "logging": {"every": min(10, eval_every), "progress": progress, "tensorboard": False},
    }


def _transfer(src, dst):
    """`torchgraft.transfer` (tools) moving everything but the head."""
    from torchgraft.tools.transfer import transfer

    return transfer(src, dst, exclude=["fc2.*"])


def run_quickstart(out: str | Path = "runs/quickstart", *, fast: bool = False, per_class: int = 10,
                   progress: bool = True, echo: bool = True,
                   plan: dict[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    """Run the three stages and return the report (also written to `out/report.json`).

    `plan` ({"pretrain"|"finetune"|"scratch": (steps, eval_every)}) overrides the fast/full schedule.
    """
    out = Path(out)
    for stage in ("pretrain", "finetune", "scratch"):  # this recipe's own outputs: start clean
        shutil.rmtree(out / stage, ignore_errors=True)
    plan = plan or SCHEDULE["fast" if fast else "full"]
    say = print if echo else (lambda *a, **k: None)

    say("[1/3] pretrain lenet on digits 0-4")
    steps, ev = plan["pretrain"]
    pre = run_training(_config(PRETRAIN_DIGITS, steps, ev, per_class=None, batch_size=64, lr=2e-3,
                               progress=progress), out / "pretrain")

    say("[2/3] transfer all but the head into a new lenet for digits 5-9, fine-tune on "
        f"{per_class} images per class")
    model = torchgraft.build("lenet", num_classes=len(FINETUNE_DIGITS))
    report = _transfer(pre.model, model)
    from torchgraft.tools.freeze import freeze

    frozen = freeze(model, FROZEN)
    if echo:
        say(str(report))
    steps, ev = plan["finetune"]
    ft_cfg = _config(FINETUNE_DIGITS, steps, ev, per_class=per_class,
                     batch_size=per_class * len(FINETUNE_DIGITS), lr=1e-3, progress=progress,
                     val_fraction=FINETUNE_VAL_FRACTION)
    ft = run_training(ft_cfg, out / "finetune", model=model)

    say("[3/3] the same model from scratch on the same images")
    scratch = run_training(ft_cfg, out / "scratch")

    result = {
        "pretrain": {"val_accuracy": pre.metrics["val_accuracy"], "val_loss": pre.metrics["val_loss"],
                     "digits": PRETRAIN_DIGITS, "steps": pre.step, "checkpoint": str(pre.last_checkpoint)},
        "finetune": {"val_accuracy": ft.metrics["val_accuracy"], "val_loss": ft.metrics["val_loss"],
                     "digits": FINETUNE_DIGITS, "train_images_per_class": per_class, "steps": ft.step,
                     "checkpoint": str(ft.last_checkpoint), "frozen": frozen,
                     "transfer": report.to_dict()},
        "scratch": {"val_accuracy": scratch.metrics["val_accuracy"], "val_loss": scratch.metrics["val_loss"],
                    "digits": FINETUNE_DIGITS, "train_images_per_class": per_class, "steps": scratch.step,
                    "checkpoint": str(scratch.last_checkpoint)},
        "fast": fast,
        "seconds": round(pre.elapsed_s + ft.elapsed_s + scratch.elapsed_s, 1),
    }
    (out / "report.json").write_text(json.dumps(result, indent=1))
    from torchgraft.train.plot import plot_runs

    plot_runs([out / "pretrain", out / "finetune", out / "scratch"], out / "curves.png",
              labels=["pretrain (0-4)", "fine-tune (5-9)", "scratch (5-9)"],
              title="torchgraft quickstart: lenet on digits")
    if echo:
        _print_table(result, out)
    return result


def _print_table(result: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="quickstart: validation accuracy")
    for col in ("model", "digits", "training images", "val accuracy"):
        t.add_column(col)
    t.add_row("pretrain", "0-4", "all (80%)", f"{result['pretrain']['val_accuracy']:.3f}")
    n = result["finetune"]["train_images_per_class"]
    t.add_row("fine-tuned (transfer)", "5-9", f"{n}/class", f"{result['finetune']['val_accuracy']:.3f}")
    t.add_row("from scratch", "5-9", f"{n}/class", f"{result['scratch']['val_accuracy']:.3f}")
    c = Console()
    c.print(t)
    c.print(f"report: {out / 'report.json'}  curves: {out / 'curves.png'}  ({result['seconds']}s of training)")
