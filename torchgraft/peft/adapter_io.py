"""Adapter files in the Hugging Face PEFT layout: `adapter_config.json` + `adapter_model.safetensors`.

Keys are PEFT's: `base_model.model.<module>.lora_A.weight`, `.lora_B.weight`,
`.lora_embedding_A`, `.lora_embedding_B`, `.lora_magnitude_vector` (DoRA). An adapter saved here
from a `transformers` model loads with `peft.PeftModel.from_pretrained`, and a PEFT adapter loads
here with `load_adapter`, giving the same outputs.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchgraft.errors import CheckpointError, ConfigError
from torchgraft.io import atomic_write_file
from torchgraft.peft.lora import ADAPTER, LoRALayer, apply_lora, lora_layers

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

# internal key suffix (after the module name) <-> PEFT file suffix
_TO_FILE = {
    f"lora_A.{ADAPTER}.weight": "lora_A.weight",
    f"lora_B.{ADAPTER}.weight": "lora_B.weight",
    f"lora_embedding_A.{ADAPTER}": "lora_embedding_A",
    f"lora_embedding_B.{ADAPTER}": "lora_embedding_B",
    f"lora_magnitude_vector.{ADAPTER}": "lora_magnitude_vector",
}
_FROM_FILE = {v: k for k, v in _TO_FILE.items()}


def _one(layers: dict[str, LoRALayer], attr: str) -> Any:
    values = {getattr(l, attr) for l in layers.values()}
    if len(values) != 1:
        raise ConfigError(f"adapters differ in {attr} ({sorted(values)}); the PEFT layout needs one value")
    return values.pop()


def hf_module_names(model: nn.Module) -> tuple[dict[str, str], set[str]]:
    """({torchgraft module: Hugging Face module}, {HF modules stored transposed (GPT-2 Conv1D)}) for
    a zoo model, from the interop rule tables; only one-to-one tensor rules give a module pair
    (GPT-2's fused `c_attn` has no single counterpart for q/k/v_proj)."""
    from torchgraft.interop.hf import hf_config_for
    from torchgraft.interop.hf_spec import transpose

    spec, arch, _ = hf_config_for(model)
    out: dict[str, str] = {}
    transposed: set[str] = set()
    for rule in spec.rules(model.config, spec.prefixes[arch][0], arch):
        if len(rule.hf) == 1 and len(rule.ours) == 1 and rule.ours[0].endswith(".weight"):
            ours, hf = rule.ours[0][: -len(".weight")], rule.hf[0][: -len(".weight")]
            out[ours] = hf
            if rule.to_hf is transpose:
                transposed.add(hf)
    return out, transposed


def _hf_name(names: dict[str, str], name: str) -> str:
    if name not in names:
        raise ConfigError(f"LoRA layer {name!r} has no one-to-one Hugging Face counterpart (e.g. a fused "
                          "c_attn); target other layers or save with hf_names=False")
    return names[name]


def adapter_state_dict(model: nn.Module, hf_names: bool = False) -> dict[str, torch.Tensor]:
    """The adapter tensors of `model` under PEFT file key names (`hf_names`: Hugging Face module
    names of the zoo model's HF layout instead of torchgraft's)."""
    names = hf_module_names(model)[0] if hf_names else None
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model).items():
        mod = _hf_name(names, name) if names is not None else name
        for suffix, p in layer.adapter_parameters():
            if suffix not in _TO_FILE:
                continue
            out[f"{PREFIX}{mod}.{_TO_FILE[suffix]}"] = p.detach().contiguous().cpu()
    return out


def save_adapter(model: nn.Module, path: str | Path, base_model_name_or_path: str | None = None,
                 hf_names: bool = False) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` for the LoRA/DoRA adapters of `model`.

    `hf_names=True` (zoo models with a Hugging Face layout, see `torchgraft.save_hf`) writes the
    Hugging Face module names, so PEFT loads the adapter onto the `transformers` model that
    `save_hf` produced."""
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ConfigError("model has no LoRA adapters to save; call torchgraft.peft.apply_lora first")
    if any(l.merged for l in layers.values()):
        raise ConfigError("adapters are merged into the base weights; call torchgraft.peft.unmerge(model) "
                          "before save_adapter")
    dropout = {getattr(l.lora_dropout, "p", 0.0) for l in layers.values()}
    fan = {getattr(l, "fan_in_fan_out", False) for l in layers.values()}
    targets = sorted(layers)
    if hf_names:
        names, transposed = hf_module_names(model)
        targets = sorted(_hf_name(names, n) for n in layers)
        fan = {t in transposed for t in targets}
    if len(fan) > 1:
        raise ConfigError("adapters mix Linear and transposed Conv1D layers; PEFT's fan_in_fan_out is one "
                          "setting per adapter, so save them separately")
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": _one(layers, "r"),
        "lora_alpha": _one(layers, "lora_alpha"),
        "lora_dropout": max(dropout),
        "use_rslora": _one(layers, "use_rslora"),
        "use_dora": _one(layers, "use_dora"),
        "target_modules": targets,  # full module names: exact under PEFT's suffix matching
        "fan_in_fan_out": any(fan),
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_file(out / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    state = adapter_state_dict(model, hf_names=hf_names)
    atomic_write_file(out / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    return out


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    p = Path(path) / CONFIG_NAME
    if not p.is_file():
        raise CheckpointError(f"no {CONFIG_NAME} in {path} (is it a PEFT adapter directory?)")
    try:
        cfg = json.loads(p.read_text())
    except ValueError as e:
        raise CheckpointError(f"cannot read {p}: {e}") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{p}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA, with use_dora)")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise CheckpointError(f"{p}: per-layer {key} is not supported yet")
    for key in ("modules_to_save", "layers_to_transform", "trainable_token_indices", "target_parameters",
                "exclude_modules"):
        if cfg.get(key):
            raise CheckpointError(f"{p}: {key} is not supported (only LoRA/DoRA on target_modules)")
    if cfg.get("bias", "none") != "none":
        raise CheckpointError(f"{p}: bias={cfg['bias']!r} is not supported (only 'none')")
    return cfg


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e} (is it a complete safetensors file?)") from None


def _targets_from_config(cfg: dict[str, Any]) -> list[str]:
    t = cfg.get("target_modules")
    if isinstance(t, str):  # PEFT: a regex matched with re.fullmatch
        return ["re:" + t]
    if not t:
        raise CheckpointError("adapter_config.json has no target_modules")
    return [str(x) for x in t]


def load_adapter(model: nn.Module, path: str | Path, strict: bool = True,
                 hf_names: bool = False) -> dict[str, LoRALayer]:
    """Load a PEFT-layout LoRA/DoRA adapter into `model`.

    If `model` has no adapters yet they are created from `adapter_config.json` (targets, rank,
    alpha, dropout, rsLoRA, DoRA). Tensors are matched by name; with `strict`, a missing or
    unexpected adapter tensor is a CheckpointError. Returns {module name: wrapper}.
    `hf_names=True`: the adapter was made for the Hugging Face layout of this zoo model (e.g. with
    PEFT on the `transformers` model); its module names are mapped to torchgraft's.
    """
    path = Path(path)
    cfg = read_adapter_config(path)
    if not (path / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"no {WEIGHTS_NAME} in {path} (torchgraft never reads pickled adapter_model.bin)")
    hf_to_ours: dict[str, str] | None = None
    if hf_names:
        hf_to_ours = {hf: ours for ours, hf in hf_module_names(model)[0].items()}
        keys = _load_safetensors(path / WEIGHTS_NAME)
        mods = {k[len(PREFIX):].rpartition(".lora_")[0] for k in keys if ".lora_" in k}
        unknown = sorted(m for m in mods if m not in hf_to_ours)
        if unknown:
            raise CheckpointError(f"adapter module {unknown[0]!r} has no one-to-one torchgraft counterpart")
        cfg = dict(cfg, target_modules=sorted(hf_to_ours[m] for m in mods))
    layers = lora_layers(model)
    if not layers:
        layers = apply_lora(model, _targets_from_config(cfg), rank=int(cfg["r"]), alpha=cfg["lora_alpha"],
                            dropout=float(cfg.get("lora_dropout") or 0.0), dora=bool(cfg.get("use_dora")),
                            use_rslora=bool(cfg.get("use_rslora")))
    file_state = _load_safetensors(path / WEIGHTS_NAME)
    own = dict(model.named_parameters())
    targets: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in file_state.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        mod, _, suffix = name.rpartition(".lora_")
        if hf_to_ours is not None and mod:
            mod = hf_to_ours.get(mod, mod)
        internal = None
        if mod:
            file_suffix = "lora_" + suffix
            if file_suffix in _FROM_FILE:
                internal = f"{mod}.{_FROM_FILE[file_suffix]}"
            m = re.fullmatch(r"lora_(A|B)\.(\w+)\.weight", file_suffix)  # keys saved with an adapter name
            if internal is None and m:
                internal = f"{mod}.lora_{m.group(1)}.{ADAPTER}.weight"
        elif name.endswith(".base_layer.weight") or name.endswith(".base_layer.bias"):
            # PEFT saves the base embedding when embeddings are targeted
            base_mod, _, leaf = name.rpartition(".base_layer.")
            if hf_to_ours is not None:
                base_mod = hf_to_ours.get(base_mod, base_mod)
            internal = f"{base_mod}.base_layer.{leaf}"
        if internal is None or internal not in own:
            unexpected.append(key)
            continue
        targets[internal] = value
    expected = {f"{n}.{s}" for n, l in layers.items() for s, _ in l.adapter_parameters()}
    missing = sorted(expected - set(targets))
    if strict and (missing or unexpected):
        what = (f"{len(missing)} missing (e.g. {missing[0]})" if missing else "") + \
               ("; " if missing and unexpected else "") + \
               (f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "")
        raise CheckpointError(f"adapter in {path} does not fit this model: {what}")
    with torch.no_grad():
        for internal, value in targets.items():
            p = own[internal]
            if p.shape != value.shape:
                raise CheckpointError(f"adapter tensor {internal} has shape {tuple(value.shape)}, "
                                      f"model expects {tuple(p.shape)} (was it trained on another model size?)")
            p.copy_(value.to(p.dtype))
    return layers
