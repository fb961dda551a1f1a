"""Up-front checks of a run config's values: one line naming the key, the value and the fix.

`check_values(tree)` runs on the plain mapping of a RunConfig (`to_dict(cfg)`), so it works for any
section layout: a rule whose key is absent is skipped. `check_model_against_data` compares the model's
declared sizes with what the data provides (seq_len vs block_size);
`inputs_must_fit` wraps the first forward so a shape mismatch (e.g. model.image_size=28 on 32x32 images)
is a ConfigError, not a traceback.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torchgraft.errors import ConfigError

MAX_STEPS = 10**9  # a bound, not a budget: beyond it a run never ends and counters lose meaning

_MISSING = object()


def _get(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v: Any) -> bool:
    return _number(v) and math.isfinite(v)


# (keys, check, requirement, fix): the first key present in the tree is checked
Rule = tuple[tuple[str, ...], Callable[[Any], bool], str, str]
RULES: list[Rule] = [
    (("optim.lr",), lambda v: _finite(v) and v > 0, "a finite number > 0", "e.g. optim.lr=3e-4"),
    (("optim.weight_decay",), lambda v: _finite(v) and v >= 0, "a finite number >= 0", "0 turns it off"),
    (("optim.eps",), lambda v: _finite(v) and v > 0, "a finite number > 0", "e.g. optim.eps=1e-8"),
    (("optim.momentum",), lambda v: _finite(v) and 0 <= v < 1, "in [0, 1)", "e.g. optim.momentum=0.9"),
    (("optim.betas",), lambda v: isinstance(v, (list, tuple)) and len(v) == 2
     and all(_finite(b) and 0 <= b < 1 for b in v), "two numbers in [0, 1)", "e.g. optim.betas=[0.9,0.999]"),
    (("trainer.max_steps",), lambda v: isinstance(v, int) and 1 <= v <= MAX_STEPS, f"an integer in [1, {MAX_STEPS:,}]",
     "set the number of optimizer steps to run"),
    (("trainer.batch_size",), lambda v: isinstance(v, int) and v >= 1, "an integer >= 1", "e.g. trainer.batch_size=32"),
    (("trainer.grad_accum_steps",), lambda v: isinstance(v, int) and v >= 1, "an integer >= 1", "1 = no accumulation"),
    (("trainer.grad_clip",), lambda v: _finite(v) and v >= 0, "a finite number >= 0", "0 turns clipping off"),
    (("trainer.max_bad_steps",), lambda v: isinstance(v, int) and v >= 1, "an integer >= 1", "e.g. 5"),
    (("eval.batch_size", "trainer.eval_batch_size"), lambda v: isinstance(v, int) and v >= 1, "an integer >= 1",
     "e.g. 64"),
    (("eval.max_batches", "trainer.eval_max_batches"), lambda v: v is None or (isinstance(v, int) and v >= 1),
     "an integer >= 1 or null", "null evaluates the whole validation split"),
    (("eval.every", "trainer.eval_every"), lambda v: isinstance(v, int) and 0 <= v <= MAX_STEPS, "an integer >= 0",
     "0 = only at the end"),
    (("eval.early_stopping_patience", "trainer.early_stopping_patience"), lambda v: isinstance(v, int) and v >= 0,
     "an integer >= 0", "0 = off"),
    (("eval.early_stopping_min_delta", "trainer.early_stopping_min_delta"), lambda v: _finite(v) and v >= 0,
     "a finite number >= 0", "e.g. 0.0"),
    (("checkpoint.every", "trainer.checkpoint_every"), lambda v: isinstance(v, int) and 0 <= v <= MAX_STEPS,
     "an integer >= 0", "0 = only at the end"),
    (("checkpoint.keep_last", "trainer.keep_last"), lambda v: isinstance(v, int) and v >= 0, "an integer >= 0",
     "e.g. 2"),
    (("logging.every", "trainer.log_every"), lambda v: isinstance(v, int) and 0 <= v <= MAX_STEPS,
     "an integer >= 0", "e.g. 10"),
    (("schedule.warmup_steps",), lambda v: isinstance(v, int) and v >= 0, "an integer >= 0", "0 = no warm-up"),
    (("schedule.min_lr_ratio",), lambda v: _finite(v) and 0 <= v <= 1, "in [0, 1]", "e.g. 0.1"),
    (("schedule.decay_fraction",), lambda v: _finite(v) and 0 < v <= 1, "in (0, 1]", "e.g. 0.2"),
    (("data.seq_len",), lambda v: isinstance(v, int) and v >= 1, "an integer >= 1", "e.g. data.seq_len=128"),
    (("data.val_fraction",), lambda v: _finite(v) and 0 <= v < 1, "in [0, 1)", "e.g. 0.1"),
    (("data.per_class",), lambda v: v is None or (isinstance(v, int) and v >= 1), "an integer >= 1 or null",
     "e.g. 10"),
]


def check_values(tree: dict[str, Any]) -> None:
    """Apply RULES to a run-config mapping; the first violation is a one-line ConfigError."""
    for keys, ok, need, fix in RULES:
        for key in keys:
            value = _get(tree, key)
            if value is _MISSING:
                continue
            if not ok(value):
                raise ConfigError(f"{key}={value!r} is invalid: it must be {need} ({fix})")
            break
    device = _get(tree, "trainer.device")
    if isinstance(device, str):
        from torchgraft.devices import check_device

        check_device(device, "trainer.device")


def check_model_against_data(model_cfg: Any, info: dict[str, Any]) -> None:
    """The data's windows fit the model's positions (data.seq_len <= model.block_size)."""
    block = getattr(model_cfg, "block_size", None)
    seq = info.get("seq_len")
    if isinstance(block, int) and isinstance(seq, int) and seq > block:
        raise ConfigError(f"data.seq_len={seq} is larger than model.block_size={block}; lower data.seq_len "
                          f"or raise model.block_size to at least {seq}")


@contextmanager
def inputs_must_fit(model: Any, batch: dict[str, Any]) -> Iterator[None]:
    """Around the first forward of a run: a shape error (e.g. model.image_size disagreeing with the
    data's images) becomes a one-line ConfigError naming the input shapes and the model's sizes.
    Costs nothing: it wraps work the run does anyway, and reads no extra data."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, IndexError) as e:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in batch.items() if isinstance(v, torch.Tensor))
        cfg = getattr(model, "config", None)
        sizes = ", ".join(f"model.{k}={getattr(cfg, k)}" for k in ("image_size", "in_chans", "block_size",
                                                                    "vocab_size") if hasattr(cfg, k))
        said = "; ".join(part for part in (shapes, sizes) if part)
        raise ConfigError(f"the model does not accept the data's inputs" + (f" ({said})" if said else "")
                          + f": {str(e).splitlines()[0]}; make the model's sizes match the data") from None


def check_combinations(tree: dict[str, Any]) -> None:
    """Settings that are each valid but together train nothing useful: one line naming both keys.

    `schedule.warmup_steps >= trainer.max_steps` would end the run before the learning rate reaches
    `optim.lr` (a warm-up of 10^9 steps trains at ~1e-12 and looks like a run that worked)."""
    steps, warm = _get(tree, "trainer.max_steps"), _get(tree, "schedule.warmup_steps")
    if isinstance(steps, int) and isinstance(warm, int) and warm > 0 and warm >= steps:
        raise ConfigError(f"schedule.warmup_steps={warm} is not below trainer.max_steps={steps}: the whole run "
                          f"would be warm-up (the learning rate reaches {steps / warm:.2g} x optim.lr only at its "
                          f"last step); lower schedule.warmup_steps (below {steps}, or 0 for none) or raise "
                          "trainer.max_steps")


def cadence_warnings(tree: dict[str, Any], total: int | None = None, said: str | None = None) -> list[str]:
    """Cadences longer than the run: not wrong (the run still evaluates and saves at its end), but not
    what the config says, so the run says so. `total` / `said`: the run's length in the cadences' unit
    and how to name it (default `trainer.max_steps`; PPO counts updates)."""
    steps = _get(tree, "trainer.max_steps") if total is None else total
    said = said or f"trainer.max_steps={steps}"
    notes = []
    for key, what in (("eval.every", "evaluates"), ("checkpoint.every", "saves a checkpoint")):
        every = _get(tree, key)
        if isinstance(steps, int) and isinstance(every, int) and every > steps:
            notes.append(f"{key}={every} is larger than {said}: the run {what} only at its end")
    return notes
