"""Widen any traceable module: find function-preserving hidden dimensions from its data flow.

`grow(model, width=f)` uses this strategy when the model has neither transformer MLPs nor
`nn.Sequential` stacks, e.g. a hand-written CNN whose `forward` calls `F.relu`, `F.max_pool2d` and
`x.view(-1, 64 * 5 * 5)`. The forward is traced with `torch.fx.symbolic_trace`; for every Linear /
Conv2d (the *producer*) its output is followed through channel-preserving steps (activations,
dropout, pooling, BatchNorm, `flatten(x, 1)`) to the layers that read it. The producer's output
units can be widened (Net2WiderNet, exactly as for `nn.Sequential`) only when that path ends in
exactly one Linear / Conv2d (the *consumer*). Any other reader fixes the width, and the layer is
left as it is, with the reason in the report: a `view`/`reshape` with literal sizes, an addition
(a residual), the model's output, a layer called twice, ...

This module only reads the fx graph (`width_plan`); grow.py swaps the wider layers in, so the
grown model keeps its own `forward`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from torchgraft.errors import ConfigError

# modules that act on each channel separately (so copies of a unit stay copies); grow.py uses them too
ELEMENTWISE = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Identity, nn.Dropout,
               nn.Dropout2d, nn.Mish, nn.Hardswish, nn.Softplus, nn.ReLU6)
CHANNELWISE_POOL = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
# functions / tensor methods that act on each channel separately (so copies of a unit stay copies)
_PASS_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.elu, F.leaky_relu, F.mish, F.hardswish,
                   torch.sigmoid, torch.tanh, F.dropout, F.dropout2d}
_POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.max_pool2d}
_PASS_METHODS = {"relu", "sigmoid", "tanh", "contiguous"}
_BATCHNORM = nn.modules.batchnorm._BatchNorm


@dataclass
class WidthPath:
    """A widenable hidden dimension: `producer`'s output units, read only by `consumer`."""

    producer: str
    consumer: str
    batchnorms: list[str] = field(default_factory=list)  # per-channel layers on the way, widened too
    flatten: bool = False  # a Conv2d output flattened into a Linear's inputs


@dataclass
class WidthPlan:
    """What tracing found: the widenable paths, and each other Linear/Conv2d with why it stays."""

    paths: list[WidthPath]
    kept: dict[str, str]  # layer name -> reason its output width is fixed


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure becomes one clear error
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(f"cannot widen {type(model).__name__}: torch.fx cannot trace its forward "
                          f"({type(e).__name__}: {first}); wrap data-dependent control flow in a "
                          "submodule, or grow an nn.Sequential") from None


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)


def _describe(node: fx.Node) -> str:
    if node.op == "output":
        return "it is the model's output"
    if node.op == "call_method":
        return f"it feeds `.{node.target}(...)`, whose sizes are fixed in forward"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        what = {"add": "an addition (a residual)", "mul": "a product", "cat": "a concatenation"}.get(name, f"`{name}`")
        return f"it feeds {what}"
    return f"it feeds {node.target} ({node.op})"


def _flattens(node: fx.Node) -> bool:
    """`torch.flatten(x, 1)` or `x.flatten(1)`: (B, C, H, W) -> (B, C*H*W), channel-major."""
    if not ((node.op == "call_function" and node.target is torch.flatten)
            or (node.op == "call_method" and node.target == "flatten")):
        return False
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return start == 1 and end == -1


def _follow(gm: fx.GraphModule, start: fx.Node) -> tuple[WidthPath | None, str]:
    """Follow `start`'s output to its one consumer layer, or say what stops it. Pooling, BatchNorm,
    flatten and a Conv2d reader need the units on dim 1 of an image, (B, C, H, W): a Conv2d output
    not yet flattened. A Linear reads the last dim: a Linear's output, or a flattened image."""
    modules = dict(gm.named_modules())
    node, bns, flat = start, [], False
    image = isinstance(modules[start.target], nn.Conv2d)
    while True:
        if len(node.users) != 1:
            return None, f"its output is read {len(node.users)} times" if node.users else "its output is unused"
        user = next(iter(node.users))
        spatial = image and not flat  # (B, C, H, W): channel-wise pooling and flatten keep the units
        if user.op == "call_module":
            m = modules[user.target]
            reads_units = (isinstance(m, nn.Linear) and (flat or not image)) or \
                (isinstance(m, nn.Conv2d) and m.groups == 1 and spatial)
            if reads_units:  # it reads exactly these units
                return WidthPath(start.target, user.target, bns, flat), ""
            if isinstance(m, _BATCHNORM) and spatial:  # BatchNorm2d: per channel
                bns.append(user.target)
            elif isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1 and spatial:
                flat = True
            elif not (isinstance(m, ELEMENTWISE) or (isinstance(m, CHANNELWISE_POOL) and spatial)):
                return None, f"it feeds {user.target} ({type(m).__name__})"
        elif not (user.args and user.args[0] is node) or any(
                isinstance(a, fx.Node) for a in list(user.args[1:]) + list(user.kwargs.values())):
            return None, _describe(user)  # another tensor enters: an addition, a product, ...
        elif _flattens(user) and spatial:
            flat = True
        elif user.op == "call_function":
            if not (user.target in _PASS_FUNCTIONS or (user.target in _POOL_FUNCTIONS and spatial)):
                return None, _describe(user)
        elif not (user.op == "call_method" and user.target in _PASS_METHODS):
            return None, _describe(user)
        node = user


def width_plan(model: nn.Module) -> WidthPlan:
    """Trace `model` and find which Linear/Conv2d output widths can grow without changing its function."""
    gm = _trace(model)
    modules = dict(gm.named_modules())
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and _is_layer(modules[node.target]):
            calls.setdefault(node.target, []).append(node)
    paths, kept = [], {}
    for name, nodes in calls.items():
        if len(nodes) != 1:
            kept[name] = f"it is called {len(nodes)} times in forward"
            continue
        path, why = _follow(gm, nodes[0])
        if path is None:
            kept[name] = why
        elif len(calls.get(path.consumer, [])) != 1:
            kept[name] = f"its reader {path.consumer} is called {len(calls.get(path.consumer, []))} times"
        else:
            paths.append(path)
    return WidthPlan(paths, kept)
