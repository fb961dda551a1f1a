"""Shape policies: what `transfer` does with a tensor whose source and destination shapes differ.

Each policy is a function `(src, dst, name) -> (tensor or None, how)`: it returns the tensor to
copy into the destination (already in the destination's shape) and a short note saying what was
done, or `None` to keep the destination's own initialisation. A policy that cannot handle the
shapes raises `PolicyMismatch`, and `transfer` reports the tensor as shape-mismatched.

Built-in names (use them in `transfer(policies={pattern: name}, default_policy=name)`):

| name | what it does |
|---|---|
| `skip` | leave the destination tensor as initialised, report it as shape-mismatched |
| `reset` | keep the destination's init on purpose (e.g. a head with a new class count) |
| `slice` | copy the overlapping slice in every dimension, keep the rest of the destination |
| `conv_sum` / `conv_mean` / `conv_repeat` / `conv` | first-conv input-channel adaptation (timm) |
| `pos_interp` / `pos_1d` / `pos_2d` | position-embedding resize (1-D linear, 2-D bicubic grid) |
| `vocab` | embedding/vocabulary resize: keep overlapping rows, new rows = mean of the old rows |
| `auto` | pick one of the above from the tensor's name and shapes (see `auto_policy`) |
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F

from torchgraft.models.parts import ModelParts

PolicyFn = Callable[[torch.Tensor, torch.Tensor, str], "tuple[torch.Tensor | None, str]"]


class PolicyMismatch(Exception):
    """Raised by a policy that does not apply to the given shapes (reported, not fatal)."""


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(s) for s in t.shape) or "scalar"


def skip(src: torch.Tensor, dst: torch.Tensor, name: str) -> tuple[torch.Tensor | None, str]:
    raise PolicyMismatch("shapes differ")


def reset(src: torch.Tensor, dst: torch.Tensor, name: str) -> tuple[torch.Tensor | None, str]:
    return None, f"reset: kept destination init ({_shape(src)} -> {_shape(dst)})"


def copy_slice(src: torch.Tensor, dst: torch.Tensor, name: str) -> tuple[torch.Tensor | None, str]:
    """Copy src[:n0, :n1, ...] into the same corner of dst; the rest keeps dst's values."""
    if src.dim() != dst.dim():
        raise PolicyMismatch(f"slice needs the same number of dims ({src.dim()} vs {dst.dim()})")
    out = dst.detach().clone()
    idx = tuple(slice(0, min(a, b)) for a, b in zip(src.shape, dst.shape))
    out[idx] = src[idx].to(out.dtype)
    overlap = "x".join(str(min(a, b)) for a, b in zip(src.shape, dst.shape))
    return out, f"slice: copied overlap {overlap} of {_shape(src)} into {_shape(dst)}"


def _adapt_conv(mode: str) -> PolicyFn:
    def policy(src: torch.Tensor, dst: torch.Tensor, name: str) -> tuple[torch.Tensor | None, str]:
        if src.dim() != 4 or dst.dim() != 4 or src.shape[0] != dst.shape[0] or src.shape[2:] != dst.shape[2:]:
            raise PolicyMismatch("input-channel adaptation needs conv weights (O, I, kH, kW) differing in I only")
        w = src.float()
        i_old, i_new = w.shape[1], dst.shape[1]
        m = mode
        if m == "timm":  # timm.adapt_input_conv: sum for 1 channel, scaled repeat otherwise
            m = "sum" if i_new == 1 else "repeat"
        if m == "sum":
            # the output for an input whose channels are all equal is unchanged
            out = w.sum(1, keepdim=True).repeat(1, i_new, 1, 1) / i_new
        elif m == "mean":
            out = w.mean(1, keepdim=True).repeat(1, i_new, 1, 1)
        else:  # repeat the channels cyclically and rescale so activations keep their size
            reps = math.ceil(i_new / i_old)
            out = w.repeat(1, reps, 1, 1)[:, :i_new] * (i_old / i_new)
        return out.to(dst.dtype), f"conv_{m}: input channels {i_old} -> {i_new}"
    return policy


def _resize_1d(src: torch.Tensor, n_new: int) -> torch.Tensor:
    # src: (N, C) -> (n_new, C), linear interpolation along positions
    x = src.float().t().unsqueeze(0)  # (1, C, N)
    x = F.interpolate(x, size=n_new, mode="linear", align_corners=False)
    return x.squeeze(0).t()  # (n_new, C)


def _grid(n: int) -> tuple[int, int] | None:
    """(prefix tokens, grid side) when n = prefix + side*side with prefix in {0, 1, 2}."""
    for prefix in (0, 1, 2):
        side = math.isqrt(n - prefix) if n - prefix > 0 else 0
        if side > 1 and side * side == n - prefix:
            return prefix, side
    return None


def _pos(kind: str) -> PolicyFn:
    def policy(src: torch.Tensor, dst: torch.Tensor, name: str) -> tuple[torch.Tensor | None, str]:
        if src.dim() != dst.dim() or src.dim() not in (2, 3) or src.shape[-1] != dst.shape[-1]:
            raise PolicyMismatch("position-embedding resize needs (N, C) or (1, N, C) with equal C")
        if src.dim() == 3 and (src.shape[0] != 1 or dst.shape[0] != 1):
            raise PolicyMismatch("position-embedding resize needs a leading batch dim of 1")
        s = src.reshape(-1, src.shape[-1])  # (N, C)
        n_old, n_new = s.shape[0], dst.shape[-2]
        k = kind
        if k == "auto":  # 3-D (1, N, C) with a square grid is a ViT patch grid; else a sequence
            g_old, g_new = _grid(n_old), _grid(n_new)
            k = "2d" if src.dim() == 3 and g_old and g_new and g_old[0] == g_new[0] else "1d"
        if k == "1d":
            out = _resize_1d(s, n_new)
            how = f"pos_1d: linear interpolation {n_old} -> {n_new} positions"
        else:
            g_old, g_new = _grid(n_old), _grid(n_new)
            if not g_old or not g_new or g_old[0] != g_new[0]:
                raise PolicyMismatch(f"{n_old} and {n_new} positions are not prefix + square grids")
            prefix, side_old = g_old
            side_new = g_new[1]
            grid = s[prefix:].float().reshape(1, side_old, side_old, -1).permute(0, 3, 1, 2)  # (1, C, g, g)
            grid = F.interpolate(grid, size=(side_new, side_new), mode="bicubic", align_corners=False)
            grid = grid.permute(0, 2, 3, 1).reshape(side_new * side_new, -1)  # (g'*g', C)
            out = torch.cat([s[:prefix].float(), grid], dim=0)
            how = (f"pos_2d: bicubic grid {side_old}x{side_old} -> {side_new}x{side_new}"
                   + (f", kept {prefix} prefix token(s)" if prefix else ""))
        return out.reshape(dst.shape).to(dst.dtype), how
    return policy


def vocab(src: torch.Tensor, dst: torch.Tensor, name: str) -> tuple[torch.Tensor | None, str]:
    """Rows are tokens: keep the overlapping rows, initialise new rows with the mean of the old ones."""
    if src.dim() != dst.dim() or src.dim() not in (1, 2) or src.shape[1:] != dst.shape[1:]:
        raise PolicyMismatch("vocabulary resize needs (V, C) or (V,) tensors differing in V only")
    v_old, v_new = src.shape[0], dst.shape[0]
    keep = min(v_old, v_new)
    out = torch.empty(dst.shape, dtype=torch.float32)
    out[:keep] = src[:keep].float()
    if v_new > v_old:
        out[v_old:] = src.float().mean(0, keepdim=True)
    return out.to(dst.dtype), (f"vocab: kept {keep} rows" + (f", {v_new - v_old} new rows = mean of old rows"
                                                            if v_new > v_old else f", dropped {v_old - v_new}"))


_HEAD = re.compile(r"(^|\.)(head|fc|classifier|score|logits?)(\.|$)")
_POS = re.compile(r"pos|position")
_EMB = re.compile(r"emb|wte|tok|word|vocab|lm_head|embed_tokens")


def auto_policy(src: torch.Tensor, dst: torch.Tensor, name: str) -> tuple[torch.Tensor | None, str]:
    """Choose from the name and shapes: first-conv channels, positions, vocabulary, head reset."""
    if src.dim() == 4 and dst.dim() == 4 and src.shape[0] == dst.shape[0] and src.shape[2:] == dst.shape[2:]:
        return POLICIES["conv"](src, dst, name)
    if _POS.search(name):
        return POLICIES["pos_interp"](src, dst, name)
    if _EMB.search(name) and src.shape[1:] == dst.shape[1:]:
        return vocab(src, dst, name)
    if _HEAD.search(name) and src.shape[1:] == dst.shape[1:]:
        return reset(src, dst, name)
    raise PolicyMismatch("no automatic adaptation applies")


# the policy `auto` picks for each declared part (ModelParts.role_of), vocabulary first
ROLE_POLICIES = {"vocab": "vocab", "position_embedding": "pos_interp", "input_layer": "conv",
                 "classifier": "reset"}


def declared_auto_policy(parts: ModelParts) -> PolicyFn:
    """`auto` for a destination that declares its parts: the policy follows the declared part a
    tensor belongs to (vocabulary table, position embedding, first conv, classifier), never its name."""
    def policy(src: torch.Tensor, dst: torch.Tensor, name: str) -> tuple[torch.Tensor | None, str]:
        role = parts.role_of(name)
        if role is None:
            raise PolicyMismatch("not in a declared vocabulary, position embedding, input layer or classifier")
        return POLICIES[ROLE_POLICIES[role]](src, dst, name)
    return policy


POLICIES: dict[str, PolicyFn] = {
    "skip": skip,
    "reset": reset,
    "slice": copy_slice,
    "conv": _adapt_conv("timm"),
    "conv_sum": _adapt_conv("sum"),
    "conv_mean": _adapt_conv("mean"),
    "conv_repeat": _adapt_conv("repeat"),
    "pos_interp": _pos("auto"),
    "pos_1d": _pos("1d"),
    "pos_2d": _pos("2d"),
    "vocab": vocab,
    "auto": auto_policy,
}
