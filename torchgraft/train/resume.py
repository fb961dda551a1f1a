"""Resuming with a changed config: refuse what cannot change midway, really apply what can.

A run resumed from its checkpoint compares the checkpoint's `run_config` with the current one:
- keys that define what is trained (`model.*`, `data.*` including its split, `task`, `trainer.seed`,
  `trainer.batch_size`) cannot change: the resume is refused with the differing keys named;
- `optim.name` cannot change either: the saved optimizer state belongs to the old optimizer;
- everything else (max_steps, eval / checkpoint / logging cadence, lr, betas, weight decay, eps,
  momentum, schedule, grad_clip, ...) is applied: the optimizer's param groups take the values the
  current config builds (`fresh_hyperparameters` before loading, `apply_hyperparameters` after),
  and the changes are reported, so config.yaml and meta.json record what actually runs.
"""
from __future__ import annotations

from typing import Any

from torchgraft.errors import CheckpointError

FIXED_PREFIXES = ("model.", "data.", "task")
FIXED_KEYS = ("trainer.seed", "trainer.batch_size")
_SCHEDULED = ("lr",)  # set by the schedule at every step (from peak_lr), so not a change in itself


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a.b': value} for every leaf of a nested mapping (lists are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def _fmt(key: str, old: Any, new: Any) -> str:
    return f"{key} ({old!r} -> {new!r})"


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def config_changes(old: dict[str, Any], new: dict[str, Any], fixed_prefixes: tuple[str, ...] = FIXED_PREFIXES,
                   fixed_keys: tuple[str, ...] = FIXED_KEYS) -> tuple[list[str], list[str]]:
    """(changes that block a resume, changes that are applied), each as 'key (old -> new)'; blocked are
    the keys under `fixed_prefixes` and the `fixed_keys` (the trainer's by default; PPO passes its own)."""
    a, b = flatten(old), flatten(new)
    blocked, applied = [], []
    for key in sorted(set(a) | set(b)):
        va, vb = _norm(a.get(key)), _norm(b.get(key))
        if va == vb:
            continue
        fixed = key.startswith(fixed_prefixes) or key in fixed_keys
        (blocked if fixed else applied).append(_fmt(key, va, vb))
    return blocked, applied


def check_resumable(old: dict[str, Any] | None, new: dict[str, Any], where: Any, *,
                    fixed_prefixes: tuple[str, ...] = FIXED_PREFIXES, fixed_keys: tuple[str, ...] = FIXED_KEYS,
                    init_key: str = "trainer.init_from") -> list[str]:
    """Raise CheckpointError for changes a run cannot take midway; return the applied ones.
    `init_key` is the option that starts a new run from this one's weights (named in the message)."""
    if not old:
        return []
    a, b = flatten(old), flatten(new)
    if "optim.name" in a and a.get("optim.name") != b.get("optim.name"):
        raise CheckpointError(f"cannot resume {where} with optim.name={b.get('optim.name')!r}: it was trained "
                              f"with {a['optim.name']!r} and that optimizer's state cannot carry over; resume "
                              "with the original optimizer, or start a new --out with "
                              "trainer.init_from=<this run> to keep only the weights")
    blocked, applied = config_changes(old, new, fixed_prefixes, fixed_keys)
    if blocked:
        more = f" and {len(blocked) - 4} more" if len(blocked) > 4 else ""
        raise CheckpointError(f"cannot resume {where}: the config changes what is trained: "
                              f"{', '.join(blocked[:4])}{more}; resume with the run's own values, or start "
                              f"a new --out ({init_key}=<this run> keeps the weights)")
    return applied


def fresh_hyperparameters(optimizer: Any) -> list[dict[str, Any]]:
    """Every param group's settings (all but `params`) as the current config built them."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def apply_hyperparameters(optimizer: Any, fresh: list[dict[str, Any]]) -> list[str]:
    """After loading a checkpoint's optimizer state, put the current config's settings back into
    every param group (the loaded ones are the old run's); returns 'key (old -> new)' per change."""
    changed: dict[str, str] = {}
    for group, new in zip(optimizer.param_groups, fresh):
        for k, v in new.items():
            old = group.get(k)
            if _norm(old) != _norm(v) and k not in _SCHEDULED:
                changed.setdefault(k, _fmt(k, old, v))
            group[k] = v
    return list(changed.values())
