"""LoRA and DoRA for nn.Linear, nn.Conv2d and nn.Embedding of any model (PEFT-compatible math and names).

    lora_layers = apply_lora(model, ["q_proj", "v_proj"], rank=8, alpha=16)   # only adapters train
    merge(model); unmerge(model)                                                # fold into / out of W
    with disabled(model): base_out = model(x)                                   # the base model

A targeted layer is replaced by a wrapper that keeps it as `base_layer`, so state-dict names follow
PEFT (`q_proj.base_layer.weight`, `q_proj.lora_A.default.weight`, `q_proj.lora_B.default.weight`,
embeddings `lora_embedding_A.default` / `lora_embedding_B.default`, DoRA `lora_magnitude_vector.default`).

Math (as PEFT): `y = base(x) + B(A(dropout(x))) * s` with `s = alpha / r` (rsLoRA: `alpha / sqrt(r)`);
A is Kaiming-uniform and B zero, so a fresh adapter leaves the model unchanged (embeddings: A zero,
B normal). DoRA rescales every output row of `W + s*B@A` to a learned magnitude `m` (initialised
to the row norms of W): `y = m / ||W + s*B@A|| * (W + s*B@A) x + bias`, with the norm detached.
"""
from __future__ import annotations

import contextlib
import fnmatch
import math
import re
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from torchgraft.errors import ConfigError, did_you_mean
from torchgraft.quant.base import QuantizedLinear
from torchgraft.tools.transfer import NameAliases, register_name_aliases
from torchgraft.peft.variants import (
    ADAPTER,
    DoRAConv2d,
    DoRAEmbedding,
    DoRALinear,
    DoRAVariant,
    LoRAVariant,
)


def _is_conv1d(m: nn.Module) -> bool:
    """transformers' GPT-2 `Conv1D`: a linear layer storing its weight as (in, out)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers not installed
        return False
    return isinstance(m, Conv1D)


def supported(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding, QuantizedLinear)) or _is_conv1d(m)


class LoRALayer(nn.Module):
    """Shared state of the LoRA wrappers: rank, scaling, merged/disabled flags, and the variant
    (`LoRAVariant` or a `DoRAVariant`) that merge, unmerge and forward delegate to."""

    dora_variant: type[DoRAVariant]  # the DoRA variant for this layer type

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float, dora: bool,
                 use_rslora: bool):
        super().__init__()
        if rank <= 0:
            raise ConfigError(f"LoRA rank must be positive, got {rank}")
        self.base_layer = base_layer
        self.r = rank
        self.lora_alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.variant: LoRAVariant = self.dora_variant() if dora else LoRAVariant()
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False

    # attribute pass-through (in_features, padding_idx, ...) and `.weight` for tied embeddings
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def use_dora(self) -> bool:
        """True for a DoRA adapter (PEFT's `use_dora`)."""
        return self.variant.dora

    def adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for n, p in self.named_parameters():
            if not n.startswith("base_layer."):
                yield n, p

    # --- subclasses define these ------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """s * B @ A in the base weight's layout."""
        raise NotImplementedError

    # --- merge --------------------------------------------------------------------------------
    def _check_float_base(self) -> None:
        if isinstance(self.base_layer, QuantizedLinear):
            raise ConfigError(f"cannot merge a LoRA adapter into a frozen {self.base_layer.fmt} base in place; "
                              "dequantise first (torchgraft.quant.dequantize_model(model)), then merge")

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        self._check_float_base()
        w = self.base_layer.weight
        delta = self.delta_weight().float()
        new = self.variant.merged(self, w.float() + delta)
        w.copy_(new.to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base_layer.weight
        new = self.variant.unmerged(self, w.float())
        w.copy_((new - self.delta_weight().float()).to(w.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) + B(A(dropout(x))) * scaling, or DoRA's magnitude-rescaled version of it."""
        result = self.base_layer(x)
        if self.merged or self.disabled:
            return result
        A, B = self.lora_A[ADAPTER], self.lora_B[ADAPTER]
        h = self.lora_dropout(x).to(A.weight.dtype)
        lora = B(A(h)) * self.scaling  # (..., out) or (B, out, H', W')
        return result + self.variant.update(self, h, result, lora).to(result.dtype)

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.lora_alpha}, scaling={self.scaling:.4g}, dora={self.variant.dora}, "
                f"merged={self.merged}")


class LoRALinear(LoRALayer):
    """LoRA around nn.Linear (or transformers' Conv1D, whose weight is stored transposed)."""

    dora_variant = DoRALinear

    def __init__(self, base_layer: nn.Module, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
                 dora: bool = False, use_rslora: bool = False):
        super().__init__(base_layer, rank, alpha, dropout, dora, use_rslora)
        self.fan_in_fan_out = _is_conv1d(base_layer)
        w = base_layer.weight
        out_f, in_f = (w.shape[1], w.shape[0]) if self.fan_in_fan_out else w.shape
        quantized = isinstance(base_layer, QuantizedLinear)
        if quantized and dora:
            raise ConfigError("DoRA on a quantised base is not supported; use method qlora (LoRA) or dora on a "
                              "float base")
        out_f, in_f = (base_layer.out_features, base_layer.in_features) if quantized else (out_f, in_f)
        kw = {"device": w.device, "dtype": base_layer.compute_dtype if quantized else w.dtype}
        self.lora_A = nn.ModuleDict({ADAPTER: nn.Linear(in_f, rank, bias=False, **kw)})
        self.lora_B = nn.ModuleDict({ADAPTER: nn.Linear(rank, out_f, bias=False, **kw)})
        self.reset_lora_parameters()
        self.variant.init(self)

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A[ADAPTER].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[ADAPTER].weight)

    def w_out_in(self, w: torch.Tensor) -> torch.Tensor:
        return w.t() if self.fan_in_fan_out else w  # (out, in)

    def delta_weight(self) -> torch.Tensor:
        d = (self.lora_B[ADAPTER].weight @ self.lora_A[ADAPTER].weight) * self.scaling  # (out, in)
        return d.t() if self.fan_in_fan_out else d



class LoRAConv2d(LoRALayer):
    """LoRA around nn.Conv2d: A is a conv with the base kernel/stride/padding, B a 1x1 conv."""

    dora_variant = DoRAConv2d

    def __init__(self, base_layer: nn.Conv2d, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
                 dora: bool = False, use_rslora: bool = False):
        super().__init__(base_layer, rank, alpha, dropout, dora, use_rslora)
        if base_layer.groups != 1:
            raise ConfigError("LoRA on grouped/depthwise Conv2d is not supported; exclude that layer from targets")
        kw = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.ModuleDict({ADAPTER: nn.Conv2d(base_layer.in_channels, rank, base_layer.kernel_size,
                                                        base_layer.stride, base_layer.padding,
                                                        dilation=base_layer.dilation, bias=False, **kw)})
        self.lora_B = nn.ModuleDict({ADAPTER: nn.Conv2d(rank, base_layer.out_channels, 1, 1, bias=False, **kw)})
        self.reset_lora_parameters()
        self.variant.init(self)

    reset_lora_parameters = LoRALinear.reset_lora_parameters

    def delta_weight(self) -> torch.Tensor:
        a = self.lora_A[ADAPTER].weight  # (r, in, kh, kw)
        b = self.lora_B[ADAPTER].weight  # (out, r, 1, 1)
        d = (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:])  # (out, in, kh, kw)
        return d * self.scaling



class LoRAEmbedding(LoRALayer):
    """LoRA around nn.Embedding: A (r, num_embeddings) starts at zero, B (dim, r) normal."""

    dora_variant = DoRAEmbedding

    def __init__(self, base_layer: nn.Embedding, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
                 dora: bool = False, use_rslora: bool = False):
        super().__init__(base_layer, rank, alpha, dropout, dora, use_rslora)
        w = base_layer.weight
        self.lora_embedding_A = nn.ParameterDict(
            {ADAPTER: nn.Parameter(torch.empty(rank, w.shape[0], device=w.device, dtype=w.dtype))})
        self.lora_embedding_B = nn.ParameterDict(
            {ADAPTER: nn.Parameter(torch.empty(w.shape[1], rank, device=w.device, dtype=w.dtype))})
        self.reset_lora_parameters()
        self.variant.init(self)

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        nn.init.zeros_(self.lora_embedding_A[ADAPTER])
        nn.init.normal_(self.lora_embedding_B[ADAPTER])

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_embedding_B[ADAPTER] @ self.lora_embedding_A[ADAPTER]).t() * self.scaling  # (V, C)

    def _embed(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        e = self.base_layer
        return F.embedding(ids, weight, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(ids)
        if self.merged or self.disabled:
            return result
        A, B = self.lora_embedding_A[ADAPTER], self.lora_embedding_B[ADAPTER]
        lora = (self._embed(ids, A.t()) @ B.t()) * self.scaling  # (..., C)
        return result + self.variant.update(self, ids, result, lora).to(result.dtype)


# ---------------------------------------------------------------------------------------------
# model-level functions


def _wrap(m: nn.Module, **kw) -> LoRALayer:
    if isinstance(m, nn.Embedding):
        return LoRAEmbedding(m, **kw)
    if isinstance(m, nn.Conv2d):
        return LoRAConv2d(m, **kw)
    return LoRALinear(m, **kw)


def target_matches(name: str, target: str) -> bool:
    """Glob over module names; a pattern also matches as a name suffix (`q_proj` matches
    `blocks.0.attn.q_proj`, as PEFT's target_modules do). `re:<regex>` uses re.fullmatch."""
    if target.startswith("re:"):
        return re.fullmatch(target[3:], name) is not None
    return fnmatch.fnmatchcase(name, target) or fnmatch.fnmatchcase(name, "*." + target)


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """{module name: wrapper} for every LoRA wrapper in `model`."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def layer_width(m: nn.Module) -> int:
    """The largest rank an update of layer `m`'s weight can have: min(fan-in, fan-out)."""
    if isinstance(m, QuantizedLinear):
        return min(m.in_features, m.out_features)
    w = m.weight
    if isinstance(m, nn.Conv2d):
        return min(w.shape[0], w[0].numel())
    return min(w.shape[0], w.shape[1])


def _check_rank(layers: dict[str, nn.Module], rank: int) -> None:
    """A rank above a layer's width adds parameters without adding anything the layer can learn
    (rank 512 on a 64-wide layer trains more weights than the layer has)."""
    if rank <= 0:
        raise ConfigError(f"LoRA rank must be positive, got {rank}")
    narrow = [(n, layer_width(m)) for n, m in layers.items() if rank > layer_width(m)]
    if narrow:
        name, width = min(narrow, key=lambda x: x[1])
        raise ConfigError(f"LoRA rank {rank} is above the width of {len(narrow)} target layer(s), e.g. {name!r} "
                          f"(width {width}: an update of it has rank <= {width}); use a rank <= {width}, or "
                          "full fine-tuning")


def apply_lora(model: nn.Module, targets: str | Iterable[str], rank: int = 8, alpha: float = 16,
               dropout: float = 0.0, dora: bool = False, use_rslora: bool = False,
               quantize_base: str | None = None) -> dict[str, LoRALayer]:
    """Wrap every nn.Linear / nn.Conv2d / nn.Embedding (and transformers Conv1D) whose module name
    matches one of `targets` with a LoRA (or DoRA) adapter, freeze everything else.

    `quantize_base="nf4" | "int8"` (QLoRA) first stores the targeted nn.Linear bases frozen in that
    format (torchgraft.quant); layers already quantised stay as they are.
    Returns {module name: wrapper}. Each pattern must match at least one supported layer.
    """
    if lora_layers(model):
        raise ConfigError("model already has LoRA adapters; call torchgraft.peft.unload(model) first")
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ConfigError("apply_lora needs at least one target pattern, e.g. ['q_proj', 'v_proj']")
    named = [(n, m) for n, m in model.named_modules() if n]
    chosen: dict[str, nn.Module] = {}
    for t in targets:
        hits = [(n, m) for n, m in named if target_matches(n, t) and supported(m)]
        if not hits:
            others = [n for n, m in named if target_matches(n, t)]
            hint = (f" ({len(others)} modules match but none is Linear/Conv2d/Embedding, e.g. {others[0]!r})"
                    if others else did_you_mean(t, dict.fromkeys([n for n, _ in named] + [n.rpartition('.')[2] for n, _ in named])))
            raise ConfigError(f"LoRA target {t!r} matches no Linear, Conv2d or Embedding layer{hint}")
        for n, m in hits:
            chosen[n] = m
    _check_rank(chosen, rank)
    if quantize_base is not None:
        chosen = _quantized_bases(chosen, quantize_base)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped: dict[str, LoRALayer] = {}
    for n, m in chosen.items():
        w = _wrap(m, rank=rank, alpha=alpha, dropout=dropout, dora=dora, use_rslora=use_rslora)
        _set_submodule(model, n, w)
        wrapped[n] = w
    for w in wrapped.values():
        for _, p in w.adapter_parameters():
            p.requires_grad_(True)
    return wrapped


def _quantized_bases(chosen: dict[str, nn.Module], fmt: str) -> dict[str, nn.Module]:
    """`chosen` with its nn.Linear layers quantised to `fmt` (a ConfigError when there are none)."""
    from torchgraft.quant.formats import quantizer

    make = quantizer(fmt)
    if not any(isinstance(m, (nn.Linear, QuantizedLinear)) for m in chosen.values()):
        raise ConfigError(f"quantize_base={fmt}: none of the LoRA targets is an nn.Linear layer "
                          f"(e.g. {next(iter(chosen))!r} is {type(next(iter(chosen.values()))).__name__}); "
                          "QLoRA quantises linear layers, use method lora for this model")
    return {n: make(m, n) if isinstance(m, nn.Linear) else m for n, m in chosen.items()}


def _require(model: nn.Module) -> dict[str, LoRALayer]:
    layers = lora_layers(model)
    if not layers:
        raise ConfigError("model has no LoRA adapters; call torchgraft.peft.apply_lora(model, targets) first")
    return layers


def merge(model: nn.Module) -> None:
    """Fold every adapter into its base weight (forward then costs nothing extra)."""
    for layer in _require(model).values():
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Undo `merge`: base weights return to their pre-merge values (to float tolerance)."""
    for layer in _require(model).values():
        layer.unmerge()


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model without its adapters inside the block (merged adapters are unmerged)."""
    layers = _require(model)
    state = {n: (l.disabled, l.merged) for n, l in layers.items()}
    for l in layers.values():
        l.unmerge()
        l.disabled = True
    try:
        yield model
    finally:
        for n, l in layers.items():
            l.disabled, was_merged = state[n]
            if was_merged:
                l.merge()


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every wrapper by its base layer (merged first unless merge=False); returns `model`,
    whose state dict then has the original names. Parameters become trainable again."""
    for n, layer in _require(model).items():
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        _set_submodule(model, n, layer.base_layer)
    frozen = {id(p) for m in model.modules() if isinstance(m, QuantizedLinear) for p in m.parameters()}
    for p in model.parameters():
        if id(p) not in frozen:  # a quantised base stays frozen
            p.requires_grad_(True)
    return model


def trainable_fraction(model: nn.Module) -> float:
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / max(total, 1)


# ---------------------------------------------------------------------------------------------
# state-dict names for `tools.transfer`: a wrapped layer keeps its weights under `base_layer`


def plain_name(name: str) -> str | None:
    """`blocks.0.attn.q_proj.base_layer.weight` -> `blocks.0.attn.q_proj.weight`; None if not wrapped."""
    return name.replace(".base_layer.", ".") if ".base_layer." in name else None


def is_adapter_tensor(name: str) -> bool:
    """True for the tensors a LoRA wrapper adds (`lora_A`, `lora_B`, `lora_embedding_*`, `lora_magnitude_vector`)."""
    return ".lora_" in name


register_name_aliases(NameAliases(plain=plain_name, is_added=is_adapter_tensor, note="LoRA adapter: kept its init"))
