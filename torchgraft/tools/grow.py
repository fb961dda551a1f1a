"""Grow a trained model into a bigger one that computes the same function (Net2Net / block expansion).

    bigger, report = torchgraft.grow(model, depth=2, width=2.0, example_inputs=x)
    print(report)            # what grew, parameters before/after, max |bigger(x) - model(x)|

- **deeper** (`depth=n`): residual block lists (`blocks`, HF `layers`, ResNet stages) get n new
  blocks, each a copy of the block before it with its residual output zeroed, so it is the identity:
  transformer pre-norm blocks zero their output projections (`o_proj`, `fc_out`, `down_proj`,
  `c_proj`, ...); ResNet blocks zero the last BatchNorm of the residual branch (torchvision's
  zero-init-residual). In ResNets `depth` adds blocks to every stage. Plain `nn.Sequential` MLPs and
  CNNs get Net2DeeperNet layers instead: an identity Linear / 3x3 Conv + ReLU after an existing ReLU.
- **wider** (`width=f`): hidden units are multiplied by f. Transformer MLPs (`fc_in`/`fc_out`,
  `gate_proj`/`up_proj`/`down_proj`) and consecutive Linear/Conv2d layers of `nn.Sequential` models
  (through activations, BatchNorm, pooling, dropout and flatten) get Net2WiderNet: new units copy
  random existing ones, and the next layer's incoming weights of every copied unit are split
  between its copies with random positive fractions summing to one (exact, and it breaks the
  symmetry so copies learn different features). Any other module (a hand-written `forward`) is
  traced with torch.fx and widened where its data flow allows (grow_traced.py).

The input model is not modified; the grown model is a deep copy.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchgraft.errors import ConfigError
from torchgraft.models.parts import ModelParts, parts_of
from torchgraft.tools.console import recording_console
from torchgraft.tools.grow_traced import CHANNELWISE_POOL, ELEMENTWISE, WidthPath, width_plan

# residual-branch output layers zeroed in a new transformer block (ours, HF Llama/GPT-2, timm, ...)
OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "c_proj", "fc_out", "down_proj", "fc2", "proj_out", "wo", "w2")


@dataclass
class GrowReport:
    """What `grow` changed; `max_abs_diff` is set when `example_inputs` were given."""
    changes: list[dict[str, Any]] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    max_abs_diff: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"changes": self.changes, "params_before": self.params_before, "params_after": self.params_after,
                "max_abs_diff": self.max_abs_diff}

    def table(self) -> Any:
        from rich.table import Table

        diff = f", max |diff| {self.max_abs_diff:.2e}" if self.max_abs_diff is not None else ""
        t = Table(title=f"grow: {self.params_before:,} -> {self.params_after:,} parameters{diff}")
        for col in ("kind", "where", "before", "after", "how"):
            t.add_column(col, overflow="fold")
        for c in self.changes:
            t.add_row(c["kind"], c["where"], str(c["before"]), str(c["after"]), c["how"])
        return t

    def __str__(self) -> str:
        console = recording_console(140)
        console.print(self.table())
        return console.export_text().rstrip()


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(_get(model, parent), child, new)


def _update_config(model: nn.Module, **changes: Any) -> None:
    cfg = getattr(model, "config", None)
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        fields = {f.name for f in dataclasses.fields(cfg)}
        model.config = dataclasses.replace(cfg, **{k: v for k, v in changes.items() if k in fields})


# ---------------------------------------------------------------------------------------------
# deeper


_BRANCHES = ("attn", "self_attn", "attention", "mlp", "ffn", "feed_forward")


Plan = Callable[[nn.Module], "list[str] | None"]


def _zero_plan(block: nn.Module) -> list[str] | None:
    """Heuristic for undeclared models: submodule names whose zeroing turns a copy of `block` into
    the identity, or None."""
    if not getattr(block, "zero_residual_is_identity", True):
        return None  # the block says so (post-norm: norm(x + 0) != x)
    if hasattr(block, "conv1") and hasattr(block, "bn2"):  # torchvision-style residual block
        if getattr(block, "downsample", None) is not None:
            return None
        return ["bn3"] if hasattr(block, "bn3") else ["bn2"]
    outs = [n for n, m in block.named_modules()
            if n and n.rpartition(".")[2] in OUTPUT_PROJECTIONS and len(list(m.parameters())) > 0]
    if not outs:
        return None
    # every residual branch (attention, MLP) must end in one of them, or the copy is not the identity
    branches = [n for n, _ in block.named_children() if n in _BRANCHES]
    if any(not any(o.startswith(b + ".") for o in outs) for b in branches):
        return None
    return outs


def _declared_plan(relative: list[str]) -> Plan:
    """Zero the declared residual projections; a block whose shortcut is not the identity
    (a ResNet stage's downsampling first block) cannot become the identity."""
    def plan(block: nn.Module) -> list[str] | None:
        return None if getattr(block, "downsample", None) is not None or not relative else list(relative)
    return plan


def _declared_block_lists(model: nn.Module, parts: ModelParts) -> list[tuple[str, nn.Module, Plan]]:
    """The containers of the declared blocks, each with the plan its declaration gives."""
    if not parts.zero_residual_is_identity:
        return []
    by_container: dict[str, list[str]] = {}
    for b in parts.blocks:
        by_container.setdefault(b.rpartition(".")[0], []).append(b)
    found = []
    for name, blocks in by_container.items():
        plan = _declared_plan(parts.residual_projections_in(blocks[-1]))
        container = _get(model, name)
        if isinstance(container, (nn.ModuleList, nn.Sequential)) and plan(container[-1]) is not None:
            found.append((name, container, plan))
    return found


def _block_lists(model: nn.Module) -> list[tuple[str, nn.Module, Plan]]:
    """Containers (ModuleList/Sequential) whose children are all residual blocks we can copy: the
    declared blocks (`parts_of`), else found by the `_zero_plan` heuristic."""
    parts = parts_of(model)
    if parts is not None and parts.blocks:
        return _declared_block_lists(model, parts)
    found = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)) or len(m) == 0:
            continue
        if any(name.startswith(f + ".") for f, _, _ in found):
            continue
        children = list(m.children())
        if _zero_plan(children[-1]) is None:  # new blocks copy the last block of the list
            continue
        # the others must be growable blocks too (a ResNet stage's first block may downsample)
        if all(_zero_plan(c) is not None or getattr(c, "downsample", None) is not None for c in children):
            found.append((name, m, _zero_plan))
    return found


@torch.no_grad()
def _identity_copy(block: nn.Module, plan: Plan) -> nn.Module:
    new = copy.deepcopy(block)
    for sub in plan(block) or []:
        for p in new.get_submodule(sub).parameters():  # recursive: a LoRA wrapper's base layer too
            p.zero_()
    return new


def _positions(n_old: int, n_new: int) -> list[int]:
    """Indices of the existing blocks after which new blocks go, spread evenly."""
    return sorted(max(0, (j + 1) * n_old // n_new - 1) if n_new <= n_old else j % n_old for j in range(n_new))


def _deepen_blocks(model: nn.Module, name: str, container: nn.Module, plan: Plan, n: int,
                   report: GrowReport) -> int:
    old = list(container.children())
    after = _positions(len(old), n)
    new_list: list[nn.Module] = []
    for i, b in enumerate(old):
        new_list.append(b)
        template = b if plan(b) is not None else old[-1]  # never copy a downsampling block
        for _ in range(after.count(i)):
            new_list.append(_identity_copy(template, plan))
    new_container = type(container)(new_list) if isinstance(container, nn.ModuleList) else nn.Sequential(*new_list)
    _set(model, name, new_container)
    zeroed = ", ".join(plan(old[-1]) or [])
    report.changes.append({"kind": "depth", "where": name, "before": len(old), "after": len(new_list),
                           "how": f"identity copies after blocks {sorted(set(after))} ({zeroed} zeroed)"})
    return len(new_list)


def _per_layer_fields(cfg: Any, n_old: int, n: int) -> dict[str, list]:
    """Config lists with one entry per block (`cfg.per_layer_fields`, e.g. Gemma's `layer_types`),
    extended as `_deepen_blocks` extends the blocks: each new block takes its template's entry."""
    after = _positions(n_old, n)
    sources = [j for i in range(n_old) for j in [i] * (1 + after.count(i))]
    out = {}
    for f in getattr(cfg, "per_layer_fields", ()):
        values = getattr(cfg, f, None)
        if values is not None:
            out[f] = [values[j] for j in sources]
    return out


def _relu_like(m: nn.Module) -> bool:
    return isinstance(m, (nn.ReLU, nn.ReLU6))


@torch.no_grad()
def _deepen_sequential(model: nn.Module, name: str, seq: nn.Sequential, n: int, report: GrowReport) -> None:
    """Net2DeeperNet: after a ReLU that follows a Linear/Conv2d, insert identity layer + ReLU."""
    layers = list(seq.children())
    spots = []  # (index of the ReLU, producer)
    last_prod = None
    for i, m in enumerate(layers):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            last_prod = m
        elif _relu_like(m) and last_prod is not None and i < len(layers) - 1:
            spots.append((i, last_prod))
    if not spots:
        raise ConfigError(f"cannot deepen {name or type(model).__name__}: no Linear/Conv2d followed by ReLU")
    chosen = [spots[p] for p in _positions(len(spots), n)]
    new_layers: list[nn.Module] = []
    for i, m in enumerate(layers):
        new_layers.append(m)
        for idx, prod in chosen:
            if idx != i:
                continue
            if isinstance(prod, nn.Linear):
                h = prod.out_features
                ident = nn.Linear(h, h, device=prod.weight.device, dtype=prod.weight.dtype)
                ident.weight.copy_(torch.eye(h))
            else:
                c = prod.out_channels
                ident = nn.Conv2d(c, c, 3, padding=1, device=prod.weight.device, dtype=prod.weight.dtype)
                ident.weight.zero_()
                ident.weight[torch.arange(c), torch.arange(c), 1, 1] = 1.0
            ident.bias.zero_()
            new_layers += [ident, type(m)()]
    if name:
        _set(model, name, nn.Sequential(*new_layers))
    else:  # the model itself is the Sequential: rebuild its children in place
        for k in list(model._modules):
            del model._modules[k]
        for i, m in enumerate(new_layers):
            model.add_module(str(i), m)
    report.changes.append({"kind": "depth", "where": name or "<model>", "before": len(layers),
                           "after": len(new_layers),
                           "how": f"{n} identity {type(chosen[0][1]).__name__} + ReLU layer(s) (Net2DeeperNet)"})


# ---------------------------------------------------------------------------------------------
# wider


def _split_fractions(idx: torch.Tensor, n_old: int, gen: torch.Generator) -> torch.Tensor:
    """Random positive fractions per new unit, summing to 1 over the copies of each old unit."""
    r = torch.empty(len(idx)).uniform_(0.5, 1.5, generator=gen)
    totals = torch.zeros(n_old).index_add_(0, idx, r)
    return r / totals[idx]


def _new_like(m: nn.Module, **shape: int) -> nn.Module:
    kw = {"device": m.weight.device, "dtype": m.weight.dtype}
    if isinstance(m, nn.Linear):
        return nn.Linear(shape.get("in_features", m.in_features), shape.get("out_features", m.out_features),
                         bias=m.bias is not None, **kw)
    if isinstance(m, nn.Conv2d):
        return nn.Conv2d(shape.get("in_channels", m.in_channels), shape.get("out_channels", m.out_channels),
                         m.kernel_size, m.stride, m.padding, m.dilation, 1, m.bias is not None, m.padding_mode, **kw)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):  # in the mode of the one it replaces (eval: running stats)
        bn = type(m)(shape["num_features"], m.eps, m.momentum, m.affine, m.track_running_stats, **kw)
        return bn.train(m.training)
    raise ConfigError(f"cannot widen a {type(m).__name__}")


@torch.no_grad()
def _widen_producer(m: nn.Module, idx: torch.Tensor) -> nn.Module:
    """Output units of a Linear/Conv2d (or channels of a BatchNorm) copied along `idx`."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        new = _new_like(m, num_features=len(idx))
        if m.affine:
            new.weight.copy_(m.weight[idx])
            new.bias.copy_(m.bias[idx])
        if m.track_running_stats:
            new.running_mean.copy_(m.running_mean[idx])
            new.running_var.copy_(m.running_var[idx])
            new.num_batches_tracked.copy_(m.num_batches_tracked)
        return new
    key = "out_features" if isinstance(m, nn.Linear) else "out_channels"
    new = _new_like(m, **{key: len(idx)})
    new.weight.copy_(m.weight[idx])
    if m.bias is not None:
        new.bias.copy_(m.bias[idx])
    return new


@torch.no_grad()
def _widen_consumer(m: nn.Module, idx: torch.Tensor, frac: torch.Tensor, spatial: int = 1) -> nn.Module:
    """Input units of a Linear/Conv2d: columns copied along `idx` and scaled by `frac`.
    `spatial` > 1: a Linear after Flatten, whose inputs are (channel, position) channel-major."""
    if isinstance(m, nn.Linear):
        w = m.weight.reshape(m.out_features, -1, spatial)  # (out, C, S)
        w = w[:, idx] * frac.to(w.dtype)[None, :, None]
        new = _new_like(m, in_features=len(idx) * spatial)
        new.weight.copy_(w.reshape(m.out_features, -1))
    else:
        new = _new_like(m, in_channels=len(idx))
        new.weight.copy_(m.weight[:, idx] * frac.to(m.weight.dtype)[None, :, None, None])
    if m.bias is not None:
        new.bias.copy_(m.bias)
    return new


def _new_index(n_old: int, factor: float, gen: torch.Generator) -> torch.Tensor:
    n_new = int(round(n_old * factor))
    extra = torch.randint(0, n_old, (n_new - n_old,), generator=gen)
    return torch.cat([torch.arange(n_old), extra])


def _transformer_mlps(model: nn.Module) -> list[tuple[str, list[str], str]]:
    """(mlp module name, producer attrs, consumer attr) for our GELU and SwiGLU MLPs."""
    out = []
    for name, m in model.named_modules():
        if isinstance(getattr(m, "fc_in", None), nn.Linear) and isinstance(getattr(m, "fc_out", None), nn.Linear):
            out.append((name, ["fc_in"], "fc_out"))
        elif all(isinstance(getattr(m, a, None), nn.Linear) for a in ("gate_proj", "up_proj", "down_proj")):
            out.append((name, ["gate_proj", "up_proj"], "down_proj"))
    return out


def _widen_mlps(model: nn.Module, mlps, factor: float, gen: torch.Generator, report: GrowReport) -> int:
    hidden = 0
    for name, producers, consumer in mlps:
        mod = _get(model, name)
        h = getattr(mod, producers[0]).out_features
        idx = _new_index(h, factor, gen)
        frac = _split_fractions(idx, h, gen)
        for p in producers:
            setattr(mod, p, _widen_producer(getattr(mod, p), idx))
        setattr(mod, consumer, _widen_consumer(getattr(mod, consumer), idx, frac))
        hidden = len(idx)
        report.changes.append({"kind": "width", "where": f"{name}.{'/'.join(producers)}", "before": h,
                               "after": len(idx), "how": "Net2WiderNet (copied units, split outgoing weights)"})
    return hidden


def _sequential_pairs(seq: nn.Sequential) -> list[tuple[int, list[int], int, bool]]:
    """(producer index, channelwise modules between, consumer index, flatten between)."""
    layers = list(seq.children())
    pairs = []
    for i, m in enumerate(layers):
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or (isinstance(m, nn.Conv2d) and m.groups != 1):
            continue
        between, flat = [], False
        for j in range(i + 1, len(layers)):
            n = layers[j]
            if isinstance(n, (nn.Linear, nn.Conv2d)):
                ok = not (isinstance(m, nn.Linear) and isinstance(n, nn.Conv2d)) and \
                    not (isinstance(n, nn.Conv2d) and (n.groups != 1 or flat))
                if ok:
                    pairs.append((i, between, j, flat))
                break
            if isinstance(n, nn.modules.batchnorm._BatchNorm):
                between.append(j)
            elif isinstance(n, nn.Flatten):
                flat = True
            elif not isinstance(n, ELEMENTWISE + CHANNELWISE_POOL):
                break
    return pairs


@torch.no_grad()
def _widen_sequential(model: nn.Module, name: str, seq: nn.Sequential, factor: float, gen: torch.Generator,
                      report: GrowReport) -> None:
    pairs = _sequential_pairs(seq)
    if not pairs:
        raise ConfigError(f"cannot widen {name or '<model>'}: no Linear/Conv2d feeding another one through "
                          "activations, BatchNorm, pooling or flatten")
    for i, between, j, flat in pairs:
        prod, cons = seq[i], seq[j]
        n_old = prod.out_features if isinstance(prod, nn.Linear) else prod.out_channels
        idx = _new_index(n_old, factor, gen)
        frac = _split_fractions(idx, n_old, gen)
        spatial = 1
        if isinstance(cons, nn.Linear):
            if cons.in_features % n_old:
                raise ConfigError(f"cannot widen {name}.{i}: {cons.in_features} inputs of layer {j} are not a "
                                  f"multiple of {n_old} channels")
            spatial = cons.in_features // n_old
        seq[i] = _widen_producer(prod, idx)
        for b in between:
            seq[b] = _widen_producer(seq[b], idx)
        seq[j] = _widen_consumer(cons, idx, frac, spatial)
        where = f"{name}.{i}" if name else str(i)
        report.changes.append({"kind": "width", "where": where, "before": n_old, "after": len(idx),
                               "how": "Net2WiderNet" + (f" (flatten: {spatial} positions per channel)"
                                                        if spatial > 1 else "")})


@torch.no_grad()
def _widen_path(model: nn.Module, p: WidthPath, factor: float, gen: torch.Generator) -> dict[str, Any]:
    """Net2WiderNet on one traced path: the producer's units (and BatchNorms on the way) copied,
    the consumer's inputs split between the copies. Returns the report row."""
    prod, cons = model.get_submodule(p.producer), model.get_submodule(p.consumer)
    n_old = prod.out_features if isinstance(prod, nn.Linear) else prod.out_channels
    spatial = 1
    if p.flatten:
        if cons.in_features % n_old:
            raise ConfigError(f"cannot widen {p.producer}: {p.consumer}'s {cons.in_features} inputs are not "
                              f"a multiple of its {n_old} channels")
        spatial = cons.in_features // n_old
    idx = _new_index(n_old, factor, gen)
    frac = _split_fractions(idx, n_old, gen)
    _set(model, p.producer, _widen_producer(prod, idx))
    for bn in p.batchnorms:
        _set(model, bn, _widen_producer(model.get_submodule(bn), idx))
    _set(model, p.consumer, _widen_consumer(cons, idx, frac, spatial))
    via = f" (via {', '.join(p.batchnorms)})" if p.batchnorms else ""
    return {"kind": "width", "where": f"{p.producer} -> {p.consumer}", "before": n_old, "after": len(idx),
            "how": f"Net2WiderNet, traced{via}"}


@torch.no_grad()
def _widen_traced(model: nn.Module, factor: float, gen: torch.Generator, report: GrowReport) -> None:
    """Widen, in place, every hidden dimension `width_plan` finds in the traced forward
    (Net2WiderNet); record what grew and what was left, and why, in `report`."""
    plan = width_plan(model)
    if not plan.paths:
        reasons = "; ".join(f"{k}: {v}" for k, v in plan.kept.items()) or "it has no Linear/Conv2d layers"
        raise ConfigError(f"cannot widen {type(model).__name__}: no Linear/Conv2d output is read only by "
                          f"another Linear/Conv2d ({reasons})")
    for path in plan.paths:
        report.changes.append(_widen_path(model, path, factor, gen))
    if getattr(model, "config", None) is not None:
        report.changes.append({"kind": "note", "where": "config", "before": "-", "after": "-",
                               "how": "not updated (traced widths are not config fields): keep the grown "
                                      "module or its state_dict, do not rebuild it from config"})
    for name, why in plan.kept.items():
        m = model.get_submodule(name)
        n = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        report.changes.append({"kind": "kept", "where": name, "before": n, "after": n, "how": why})


# ---------------------------------------------------------------------------------------------


def _sequentials(model: nn.Module) -> list[tuple[str, nn.Sequential]]:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Sequential) and not any(name.startswith(n + ".") or n == "" for n, _ in out):
            if any(isinstance(c, (nn.Linear, nn.Conv2d)) for c in m.children()):
                out.append((name, m))
    return out


@torch.no_grad()
def grow(model: nn.Module, depth: int | None = None, width: float | None = None, *,
         example_inputs: Any = None, seed: int = 0) -> tuple[nn.Module, GrowReport]:
    """Return `(bigger_model, report)`: a deep copy of `model` grown `depth` blocks deeper and/or
    `width` times wider (hidden/MLP dims), computing the same function (see module docstring).

    `example_inputs` (a tensor or a tuple of positional inputs): both models are run on it in eval
    mode and `report.max_abs_diff` records the largest output difference.
    """
    if depth is None and width is None:
        raise ConfigError("grow needs depth=<new blocks> and/or width=<factor>")
    if depth is not None and (not isinstance(depth, int) or depth < 1):
        raise ConfigError(f"depth must be a positive number of new blocks, got {depth!r}")
    if width is not None and (not isinstance(width, (int, float)) or width <= 1.0):
        raise ConfigError(f"width must be a factor > 1 (e.g. 2.0 doubles hidden sizes), got {width!r}")
    gen = torch.Generator().manual_seed(seed)
    big = copy.deepcopy(model)
    report = GrowReport(params_before=_n_params(model))

    if width is not None:
        mlps = _transformer_mlps(big)
        if mlps:
            hidden = _widen_mlps(big, mlps, float(width), gen, report)
            _update_config(big, intermediate_size=hidden)
        else:
            seqs = _sequentials(big)
            if not seqs:  # any other module: trace its forward (grow_traced.py)
                _widen_traced(big, float(width), gen, report)
            for name, seq in seqs:
                _widen_sequential(big, name, seq, float(width), gen, report)

    if depth is not None:
        lists = _block_lists(big)
        if lists:
            sizes = {}
            for name, container, plan in lists:
                sizes[name] = _deepen_blocks(big, name, container, plan, depth, report)
            if len(lists) == 1:
                n_old = len(list(lists[0][1].children()))
                _update_config(big, n_layer=next(iter(sizes.values())),
                               **_per_layer_fields(getattr(big, "config", None), n_old, depth))
            else:
                cfg_layers = getattr(getattr(big, "config", None), "layers", None)
                if isinstance(cfg_layers, (tuple, list)) and len(cfg_layers) == len(lists):
                    _update_config(big, layers=tuple(sizes[n] for n, _, _ in lists))
        else:
            seqs = _sequentials(big)
            if not seqs:
                raise ConfigError(f"don't know how to deepen {type(model).__name__}: supported are lists of "
                                  "pre-norm transformer or ResNet blocks and nn.Sequential MLP/CNN stacks")
            name, seq = seqs[0]
            _deepen_sequential(big, name, seq, depth, report)

    report.params_after = _n_params(big)
    if example_inputs is not None:
        report.max_abs_diff = _max_diff(model, big, example_inputs)
    return big, report


def _max_diff(a: nn.Module, b: nn.Module, inputs: Any) -> float:
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    modes = (a.training, b.training)
    a.eval(), b.eval()
    try:
        ya, yb = a(*args), b(*args)
    finally:
        a.train(modes[0]), b.train(modes[1])
    ya = ya.logits if hasattr(ya, "logits") else ya
    yb = yb.logits if hasattr(yb, "logits") else yb
    return float((ya.float() - yb.float()).abs().max())
