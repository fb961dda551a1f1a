"""Optimizer parameter groups: no weight decay for norms/biases/embeddings, layer-wise LR decay,
per-pattern LR multipliers. Works on any nn.Module.

    groups = torchgraft.param_groups(model, lr=3e-4, weight_decay=0.05, layer_decay=0.75,
                                     lr_mult={"head.*": 10.0})
    opt = torch.optim.AdamW(groups)

Layer index (for `layer_decay`): parameters under a numbered module (`blocks.3`, `layers.3`,
`encoder.layer.3`, `h.3`, ResNet's `layer2.1`, or any `name.<int>.`) get 1..L in model order;
parameters registered before the first numbered block (embeddings, stem) are layer 0, those after
the last one (final norm, head) are layer L+1. The LR of layer i is `lr * layer_decay ** (L + 1 - i)`.
Each group holds `lr`, `weight_decay`, `lr_scale` (lr / base lr, for schedulers that rescale) and
`param_names`.
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from typing import Any

from torch import nn

from torchgraft.errors import ConfigError
from torchgraft.models.parts import ModelParts, parts_of

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
               nn.LocalResponseNorm)
_NO_DECAY_NAMES = re.compile(r"(^|\.)(cls_token|dist_token|pos_embed|pos_emb|position_embeddings|"
                             r"mask_token|register_tokens|relative_position_bias_table)($|\.)")
_BLOCK_PATTERNS = (
    re.compile(r"(?:^|\.)layer(\d+)\.(\d+)(?:\.|$)"),                          # ResNet: layer2.1
    re.compile(r"(?:^|\.)(?:blocks|layers|layer|h|block|stages)\.(\d+)(?:\.|$)"),  # transformers
    re.compile(r"(?:^|\.)(\d+)(?:\.|$)"),                                     # any numbered child
)


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, _NORM_TYPES) or "norm" in type(m).__name__.lower()


def _block_key(name: str) -> tuple[int, ...] | None:
    for rx in _BLOCK_PATTERNS:
        m = rx.search(name)
        if m:
            return tuple(int(g) for g in m.groups())
    return None


def _declared_block_key(parts: ModelParts):
    def key(name: str) -> tuple[int, ...] | None:
        i = parts.block_of(name)
        return None if i is None else (i,)
    return key


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """({param name: layer index 0..L+1}, L) for trainable parameters: block i is layer i + 1, by
    the blocks the model declares (`parts_of`), else by the name patterns above."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    parts = parts_of(model)
    block_key = _declared_block_key(parts) if parts is not None and parts.blocks else _block_key
    keys = {n: block_key(n) for n in names}
    ordered = sorted({k for k in keys.values() if k is not None})
    rank = {k: i + 1 for i, k in enumerate(ordered)}
    n_layers = len(ordered)
    ids: dict[str, int] = {}
    seen_block = False
    for n in names:
        k = keys[n]
        if k is not None:
            ids[n] = rank[k]
            seen_block = True
        elif parts is not None and parts.role_of(n) == "classifier":
            ids[n] = n_layers + 1  # a declared head is the last layer wherever it is registered
        else:
            ids[n] = n_layers + 1 if seen_block else 0
    return ids, n_layers


def no_decay(model: nn.Module) -> set[str]:
    """Names of parameters that should not get weight decay: biases, norm and embedding weights,
    1-D parameters and position/cls tokens."""
    out: set[str] = set()
    for mname, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if p.ndim <= 1 or _is_norm(m) or isinstance(m, nn.Embedding) or _NO_DECAY_NAMES.search(full):
                out.add(full)
    return out


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    layer_decay: float | None = None,
    lr_mult: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Torch optimizer param groups for the trainable parameters of `model` (see module docstring).

    `lr_mult`: `{glob over parameter names: factor}`; the first matching pattern multiplies the LR
    (applied on top of layer decay). Frozen parameters are left out.
    """
    if layer_decay is not None and not (0.0 < layer_decay <= 1.0):
        raise ConfigError(f"layer_decay must be in (0, 1], got {layer_decay}")
    lr_mult = dict(lr_mult or {})
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError(f"{type(model).__name__} has no trainable parameters (did you freeze everything?)")
    for pat in lr_mult:
        if not any(fnmatch.fnmatchcase(n, pat) or fnmatch.fnmatchcase(n, pat + ".*") for n, _ in named):
            raise ConfigError(f"lr_mult pattern {pat!r} matches no trainable parameter")
    skip_decay = no_decay(model)
    ids, n_layers = layer_ids(model) if layer_decay is not None else ({}, 0)

    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for n, p in named:
        scale = 1.0
        if layer_decay is not None:
            scale *= layer_decay ** (n_layers + 1 - ids[n])
        for pat, factor in lr_mult.items():
            if fnmatch.fnmatchcase(n, pat) or fnmatch.fnmatchcase(n, pat + ".*"):
                scale *= float(factor)
                break
        wd = 0.0 if n in skip_decay else float(weight_decay)
        key = (scale, wd)
        if key not in groups:
            groups[key] = {"params": [], "param_names": [], "lr": lr * scale, "lr_scale": scale,
                           "weight_decay": wd}
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(n)
    return sorted(groups.values(), key=lambda g: (g["lr_scale"], g["weight_decay"]))
