"""Freeze and unfreeze parts of any nn.Module by glob patterns; frozen BatchNorm keeps its statistics.

    torchgraft.freeze(model, ["conv*", "layer1"])      # module or parameter names
    torchgraft.unfreeze(model, ["layer1.1.*"])

A pattern matches a parameter when it matches the parameter's full name, or the name of a module
that (recursively) owns it. A BatchNorm module all of whose parameters are frozen (or that a
pattern names directly) is kept in eval mode even after `model.train()`: its running statistics
stop changing, so "frozen" means bitwise unchanged.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from torchgraft.errors import ConfigError, did_you_mean

_HOOK_ATTR = "_torchgraft_frozen_bn_hook"


def _as_list(patterns: str | Iterable[str] | None) -> list[str]:
    if patterns is None:
        return ["*"]
    if isinstance(patterns, str):
        return [patterns]
    return list(patterns)


def _hit(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def select(model: nn.Module, patterns: str | Iterable[str] | None) -> tuple[list[str], list[str]]:
    """(parameter names, module names) matched by `patterns`; a pattern matching nothing is an error."""
    pats = _as_list(patterns)
    params = [n for n, _ in model.named_parameters()]
    modules = [n for n, _ in model.named_modules() if n]
    sel_p: list[str] = []
    sel_m: list[str] = []
    for pat in pats:
        hit_p = [n for n in params if _hit(n, pat)]
        hit_m = [n for n in modules if _hit(n, pat)]
        if not hit_p and not hit_m:
            raise ConfigError(f"pattern {pat!r} matches no module or parameter of {type(model).__name__}"
                              + did_you_mean(pat, modules + params)
                              + " (globs like 'blocks.0.*' or module names like 'layer1')")
        sel_p += [n for n in hit_p if n not in sel_p]
        sel_m += [n for n in hit_m if n not in sel_m]
    return sel_p, sel_m


def _keep_eval(module: nn.Module, args: tuple) -> None:
    module.training = False  # a frozen BatchNorm never updates its running statistics


def _set_requires_grad(model: nn.Module, patterns: str | Iterable[str] | None, flag: bool) -> list[str]:
    names, mod_names = select(model, patterns)
    chosen = set(names)
    for n, p in model.named_parameters():
        if n in chosen:
            p.requires_grad_(flag)
    named_mods = set(mod_names)
    for mname, m in model.named_modules():
        if not isinstance(m, _BatchNorm):
            continue
        own = list(m.parameters())
        named = mname in named_mods or any(mname.startswith(x + ".") for x in named_mods)
        if flag:
            # unfreeze: a BN module named by a pattern, or with any trainable parameter, trains again
            if hasattr(m, _HOOK_ATTR) and (named or any(p.requires_grad for p in own)):
                getattr(m, _HOOK_ATTR).remove()
                delattr(m, _HOOK_ATTR)
                m.train(model.training)
        else:
            frozen = named or (own and all(not p.requires_grad for p in own))
            if frozen and not hasattr(m, _HOOK_ATTR):
                setattr(m, _HOOK_ATTR, m.register_forward_pre_hook(_keep_eval))
                m.eval()
    return names


def freeze(model: nn.Module, patterns: str | Iterable[str] | None = None) -> list[str]:
    """Set `requires_grad=False` on parameters matched by `patterns` (default: all); freeze their
    BatchNorm statistics too. Returns the names of the parameters frozen."""
    return _set_requires_grad(model, patterns, False)


def unfreeze(model: nn.Module, patterns: str | Iterable[str] | None = None) -> list[str]:
    """Undo `freeze` for the matched parameters (default: all) and their BatchNorm modules."""
    return _set_requires_grad(model, patterns, True)


def is_frozen_bn(module: nn.Module) -> bool:
    return hasattr(module, _HOOK_ATTR)


def trainable_summary(model: nn.Module) -> dict[str, float]:
    """{'trainable': n, 'total': n, 'fraction': f} counting each shared parameter once."""
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {"trainable": trainable, "total": total, "fraction": trainable / max(total, 1)}


class GradualUnfreeze:
    """Training callback: unfreeze groups of modules on a schedule (ULMFiT-style gradual unfreezing).

        GradualUnfreeze({0: ["head"], 100: ["blocks.3"], 200: ["blocks.2"], 300: ["*"]})

    At the start of each listed step the patterns are unfrozen. Newly trainable parameters that the
    optimizer does not hold yet are added to it as a new param group (lr/weight decay of group 0).
    """

    def __init__(self, schedule: dict[int, str | list[str]]):
        if not schedule:
            raise ConfigError("GradualUnfreeze needs a schedule {step: patterns}, e.g. {0: ['head'], 100: ['*']}")
        self.schedule = {int(k): _as_list(v) for k, v in schedule.items()}
        self.done: set[int] = set()
        self.events: list[tuple[int, list[str]]] = []

    def unfreeze_due(self, model: nn.Module, step: int, optimizer=None) -> list[str]:
        """Unfreeze everything scheduled at or before `step` not yet done; returns the names unfrozen."""
        newly: list[str] = []
        for at in sorted(self.schedule):
            if at <= step and at not in self.done:
                self.done.add(at)
                before = {n for n, p in model.named_parameters() if p.requires_grad}
                unfreeze(model, self.schedule[at])
                names = [n for n, p in model.named_parameters() if p.requires_grad and n not in before]
                self.events.append((step, names))
                newly += names
        if newly and optimizer is not None:
            held = {id(p) for g in optimizer.param_groups for p in g["params"]}
            params = dict(model.named_parameters())
            extra = [n for n in newly if id(params[n]) not in held]
            if extra:
                g0 = optimizer.param_groups[0]
                group = {k: v for k, v in g0.items() if k not in ("params", "param_names", "initial_lr")}
                group["params"] = [params[n] for n in extra]
                if "param_names" in g0:
                    group["param_names"] = extra
                optimizer.add_param_group(group)
        return newly

    # torchgraft.train callback protocol (duck-typed: tools/ does not import train/)
    @staticmethod
    def _step(trainer) -> int:
        state = getattr(trainer, "state", None)
        return int(getattr(state, "step", getattr(trainer, "step", 0)))

    def _apply(self, trainer, step: int) -> None:
        names = self.unfreeze_due(trainer.model, step, getattr(trainer, "optimizer", None))
        held = getattr(trainer, "params", None)  # the trainer's list for gradient clipping / norms
        if names and isinstance(held, list):
            params = dict(trainer.model.named_parameters())
            ids = {id(p) for p in held}
            held += [params[n] for n in names if id(params[n]) not in ids]

    def on_train_start(self, trainer) -> None:
        self._apply(trainer, self._step(trainer))

    def on_step_start(self, trainer) -> None:
        self._apply(trainer, self._step(trainer))

    def on_step_end(self, trainer, record=None) -> None:
        self._apply(trainer, self._step(trainer))  # state.step is already the next update's number

    def on_eval_end(self, trainer, metrics=None) -> None: ...
    def on_checkpoint(self, trainer, path=None) -> None: ...
    def on_train_end(self, trainer, result=None) -> None: ...
