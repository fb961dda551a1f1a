"""Hugging Face layout <-> torchgraft models: `load_hf(dir)` and `save_hf(model, dir)`.

Import: read `config.json`, translate it into the family's Config, build the model on the meta
device (nothing allocated), then read tensors one at a time from `model.safetensors` or the shards
of `model.safetensors.index.json`, convert them with the family's rule table and assign them as
the model's parameters. Peak memory stays at one copy of the weights plus one tensor in flight.
Buffers that Hugging Face stores but we recompute (causal masks, RoPE frequencies, position ids)
are skipped and reported; our own non-persistent buffers are rebuilt by their `reset_parameters`.
Any other tensor that does not map is an error naming it.

Export: the same rule table run backwards, streamed into safetensors (sharded above
`max_shard_size`), with a `config.json` that `transformers.AutoModel*.from_pretrained` reads.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchgraft.errors import CheckpointError, ConfigError, did_you_mean
from torchgraft.interop.hf_spec import HFSpec, Rule
from torchgraft.interop.safetensors_io import (
    CheckpointReader,
    PendingTensor,
    write_hf_weights,
    write_json,
)

log = logging.getLogger(__name__)


def _specs() -> list[HFSpec]:
    from torchgraft.interop import hf_bert, hf_decoders, hf_gemma3_vlm, hf_gpt2, hf_llama, hf_moe

    return [hf_gpt2.SPEC, hf_llama.SPEC, hf_bert.SPEC,
            *hf_decoders.SPECS, *hf_moe.SPECS,
            hf_gemma3_vlm.SPEC]  # after the text-only gemma3 spec, which save_hf uses


def supported_architectures() -> list[str]:
    return [a for s in _specs() for a in s.architectures]


@dataclass
class LoadReport:
    """What `load_hf` did: tensors read; HF tensors skipped because they are derivable (causal masks,
    RoPE frequencies, position ids) or a tied duplicate; our buffers recomputed; extras ignored."""
    architecture: str
    family: str
    loaded: int = 0
    bytes_read: int = 0
    skipped: list[str] = field(default_factory=list)
    recomputed_buffers: list[str] = field(default_factory=list)
    tied: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.architecture} -> {self.family}: {self.loaded} tensors "
                 f"({self.bytes_read / 1e6:.1f} MB)"]
        if self.tied:
            parts.append(f"tied: {', '.join(self.tied)}")
        if self.skipped:
            parts.append(f"{len(self.skipped)} HF tensors skipped (derivable buffers, tied duplicates)")
        if self.recomputed_buffers:
            parts.append(f"recomputed: {_short(self.recomputed_buffers)}")
        if self.ignored:
            parts.append(f"ignored (strict=False): {_short(self.ignored)}")
        return "; ".join(parts)


def _short(names: list[str], n: int = 6) -> str:
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


# ---------------------------------------------------------------------------------------------
# config

def read_hf_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist (give a Hugging Face model directory)")
    if not (p / "config.json").is_file():
        raise CheckpointError(f"no config.json in {p}; a Hugging Face model directory needs "
                              "config.json next to model.safetensors")
    try:
        cfg = json.loads((p / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p / 'config.json'} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{p / 'config.json'} must hold a JSON object")
    return cfg


def find_spec(hf_cfg: dict[str, Any]) -> tuple[HFSpec, str]:
    """(family mapping, architecture) for a Hugging Face config, from `architectures` or `model_type`."""
    archs = hf_cfg.get("architectures") or []
    known = supported_architectures()
    for arch in archs:
        for spec in _specs():
            if arch in spec.architectures:
                return spec, arch
    if not archs:
        for spec in _specs():
            if hf_cfg.get("model_type") == spec.model_type:
                return spec, spec.architectures[0]
    what = ", ".join(archs) if archs else f"model_type {hf_cfg.get('model_type')!r}"
    hint = did_you_mean(archs[0], known) if archs else ""
    raise ConfigError(f"unsupported Hugging Face architecture {what}{hint}; "
                      f"torchgraft reads {', '.join(known)}")


def config_from_hf(hf_cfg: dict[str, Any], tensor_names: set[str] | None = None,
                   prefix: str = "") -> tuple[Any, HFSpec, str]:
    """Translate a Hugging Face config dict (plus, optionally, the checkpoint's tensor names) into
    (our Config instance, spec, architecture)."""
    from torchgraft.models.registry import get_config

    spec, arch = find_spec(hf_cfg)
    fields = spec.config_from_hf(hf_cfg, arch)
    if tensor_names is not None and spec.from_tensors is not None:
        fields = spec.from_tensors(fields, tensor_names, prefix)
    return get_config({"family": spec.family, **fields}), spec, arch


def _spec_for_model(model: nn.Module) -> HFSpec:
    from torchgraft.models.registry import family_of_config

    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ConfigError("save_hf needs a torchgraft model (built with torchgraft.build or load_hf); "
                          "this module has no .config")
    fam = family_of_config(cfg).name
    for spec in _specs():
        if spec.family == fam:
            return spec
    raise ConfigError(f"no Hugging Face layout for family {fam!r}; "
                      f"supported: {', '.join(s.family for s in _specs())}")


# ---------------------------------------------------------------------------------------------
# import

def _detect_prefix(spec: HFSpec, arch: str, keys: list[str] | set[str]) -> str:
    keys = set(keys)
    candidates = spec.prefixes[arch]
    for p in candidates + tuple(x for ps in spec.prefixes.values() for x in ps if x not in candidates):
        if p + spec.anchor in keys:
            return p
    raise CheckpointError(f"no {arch} tensors in this checkpoint (looked for "
                          f"{candidates[0] + spec.anchor!r}); is config.json from another model?")


def _applicable(rules: list[Rule], names: set[str]) -> list[Rule]:
    """Rules whose torchgraft tensors exist in the model (bias rules vanish for bias-free models)."""
    out = []
    for r in rules:
        present = [n for n in r.ours if n in names]
        if len(present) == len(r.ours):
            out.append(r)
        elif present:  # a half-present rule means the mapping table and the model disagree
            raise ConfigError(f"mapping bug: {r.ours} only partly present in the model")
    return out


def _alias_groups(model: nn.Module) -> dict[str, list[str]]:
    """state-dict name -> every name sharing the same tensor (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        by_id.setdefault(id(t), []).append(name)
    return {n: group for group in by_id.values() for n in group}


def _set(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    if leaf in mod._parameters:
        old = mod._parameters[leaf]
        mod._parameters[leaf] = value if isinstance(value, nn.Parameter) else \
            nn.Parameter(value, requires_grad=old.requires_grad if old is not None else True)
    elif leaf in mod._buffers:
        mod._buffers[leaf] = value
    else:  # pragma: no cover - names come from state_dict()
        raise KeyError(name)


def _is_param(model: nn.Module, name: str) -> bool:
    mod_name, _, leaf = name.rpartition(".")
    return leaf in model.get_submodule(mod_name)._parameters


@torch.no_grad()
def rebuild_meta_buffers(model: nn.Module, device: torch.device, report: LoadReport) -> None:
    """Allocate buffers still on meta (ours, e.g. RoPE inv_freq) and recompute them with the owning
    module's `reset_parameters`, keeping any loaded parameters of that module intact."""
    for mod_name, mod in model.named_modules():
        metas = [k for k, b in mod._buffers.items() if b is not None and b.is_meta]
        if not metas:
            continue
        if not callable(getattr(mod, "reset_parameters", None)):
            raise CheckpointError(f"buffer {mod_name}.{metas[0]} is not in the checkpoint and "
                                  f"{type(mod).__name__} cannot recompute it")
        for k in metas:
            mod._buffers[k] = torch.empty_like(mod._buffers[k], device=device)
        saved = {k: p.detach().clone() for k, p in mod._parameters.items() if p is not None}
        mod.reset_parameters()
        for k, v in saved.items():
            mod._parameters[k].copy_(v)
        report.recomputed_buffers += [f"{mod_name}.{k}" if mod_name else k for k in metas]


def load_into(model: nn.Module, reader: CheckpointReader, rules: list[Rule], *, derived: tuple[str, ...] = (),
              dtype: torch.dtype | None = None, device: str | torch.device = "cpu", strict: bool = True,
              report: LoadReport) -> nn.Module:
    """Fill a meta-device `model` from `reader` through `rules`, one tensor at a time."""
    device = torch.device(device)
    targets = model.state_dict(keep_vars=True)
    aliases = _alias_groups(model)
    rules = _applicable(rules, set(targets))
    consumed: set[str] = set()
    done: set[str] = set()
    missing: list[str] = []
    for rule in rules:
        if all(n in done for n in rule.ours):  # tied: already set through its alias
            consumed.update(k for k in rule.hf if k in reader)
            report.tied += [f"{n}={aliases[n][0]}" for n in rule.ours]
            continue
        absent = [k for k in rule.hf if k not in reader]
        if absent:
            missing += absent
            continue
        hf_tensors = [reader.get(k) for k in rule.hf]
        report.bytes_read += sum(t.numel() * t.element_size() for t in hf_tensors)
        ours = rule.to_ours(*hf_tensors)
        del hf_tensors
        for name, value in zip(rule.ours, ours):
            want = targets[name]
            if tuple(value.shape) != tuple(want.shape):
                raise CheckpointError(f"shape mismatch for {name}: checkpoint gives {tuple(value.shape)}, "
                                      f"model expects {tuple(want.shape)} (config.json disagrees with "
                                      f"the weights)")
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            value = value.to(device)
            if _is_param(model, name):
                value = nn.Parameter(value, requires_grad=want.requires_grad)
            for alias in aliases[name]:
                _set(model, alias, value)
                done.add(alias)
            report.loaded += 1
        consumed.update(rule.hf)
    unmapped = []
    for k in reader.keys():
        if k in consumed:
            continue
        if any(re.search(pat, k) for pat in derived):
            report.skipped.append(k)
        else:
            unmapped.append(k)
    still_meta = [n for n, t in model.state_dict(keep_vars=True).items()
                  if t.is_meta and _is_param(model, n)]
    if missing or still_meta:
        names = missing or still_meta
        raise CheckpointError(f"checkpoint is missing {len(names)} tensor(s) the model needs: "
                              f"{_short(names)}")
    if unmapped:
        if strict:
            raise CheckpointError(f"{len(unmapped)} tensor(s) in the checkpoint map to nothing in "
                                  f"torchgraft's {report.family}: {_short(unmapped)} "
                                  "(pass --no-strict on the command line, strict=False in Python, to ignore them)")
        report.ignored = unmapped
    rebuild_meta_buffers(model, device, report)
    return model


def load_hf_with_report(path: str | Path, *, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", strict: bool = True) -> tuple[nn.Module, LoadReport]:
    """`load_hf`, also returning the `LoadReport`."""
    from torchgraft.models.registry import build

    path = Path(path)
    hf_cfg = read_hf_config(path)
    spec, arch = find_spec(hf_cfg)
    reader = CheckpointReader(path)
    names = set(reader.keys())
    prefix = _detect_prefix(spec, arch, names)
    cfg, _, _ = config_from_hf(hf_cfg, names, prefix)
    model = build(cfg, device="meta")
    report = LoadReport(architecture=arch, family=spec.family)
    load_into(model, reader, spec.rules(cfg, prefix, arch), derived=spec.derived, dtype=dtype,
              device=device, strict=strict, report=report)
    log.info("load_hf %s: %s", path, report.summary())
    return model.eval(), report


def load_hf(path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
            strict: bool = True) -> nn.Module:
    """Load a Hugging Face model directory (GPT-2, Llama, BERT) as a torchgraft model in eval mode.

    `dtype`: cast floating tensors (default: keep the file's dtype). `strict=False` ignores
    checkpoint tensors that map to nothing (e.g. BERT pretraining heads) instead of raising.
    LM families return logits from `forward(input_ids)`; `BertModel` returns last hidden states.
    """
    return load_hf_with_report(path, dtype=dtype, device=device, strict=strict)[0]


# ---------------------------------------------------------------------------------------------
# export

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def hf_config_for(model: nn.Module) -> tuple[HFSpec, str, dict[str, Any]]:
    """(spec, architecture, full config.json dict) for a torchgraft model."""
    spec = _spec_for_model(model)
    arch, fields = spec.config_to_hf(model.config)
    return spec, arch, {"architectures": [arch], "model_type": spec.model_type, **fields}


def save_hf(model: nn.Module, path: str | Path, *, max_shard_size: int | str = "5GB",
            dtype: torch.dtype | None = None, config_overrides: dict[str, Any] | None = None) -> Path:
    """Write `model` as a Hugging Face directory (config.json + model.safetensors, sharded with an
    index above `max_shard_size`) that `transformers`' `from_pretrained` loads. Tied embeddings are
    written once, as Hugging Face expects. `config_overrides` adds/replaces config.json fields
    (e.g. `{"bos_token_id": 1, "eos_token_id": 2}`). Returns the directory."""
    spec, arch, hf_cfg = hf_config_for(model)
    prefix = spec.prefixes[arch][0]
    state = model.state_dict()
    aliases = _alias_groups(model)
    rules = _applicable(spec.rules(model.config, prefix, arch), set(state))
    covered: set[str] = set()
    pending: list[PendingTensor] = []
    for rule in rules:
        if all(n in covered for n in rule.ours):  # tied alias already written
            continue
        srcs = [state[n] for n in rule.ours]
        metas = rule.to_hf(*[torch.empty_like(t, device="meta") for t in srcs])
        for j, (name, m) in enumerate(zip(rule.hf, metas)):
            out_dtype = dtype if dtype is not None and m.is_floating_point() else m.dtype

            def produce(srcs=srcs, j=j, out_dtype=out_dtype, rule=rule) -> torch.Tensor:
                return rule.to_hf(*srcs)[j].to(out_dtype)

            pending.append(PendingTensor(name, tuple(m.shape), out_dtype, produce))
        for n in rule.ours:
            covered.update(aliases[n])
    leftover = [n for n in state if n not in covered]
    if leftover:
        hint = " (merge LoRA/DoRA adapters into the base weights first)" if any(
            "lora" in n or "dora" in n for n in leftover) else ""
        raise ConfigError(f"{len(leftover)} tensor(s) have no Hugging Face {arch} name: "
                          f"{_short(leftover)}{hint}")
    floats = {t.dtype for t in state.values() if t.is_floating_point()}
    out_dtype = dtype or (floats.pop() if len(floats) == 1 else torch.float32)
    hf_cfg["torch_dtype"] = hf_cfg["dtype"] = _DTYPE_NAMES.get(out_dtype, "float32")
    hf_cfg.update(config_overrides or {})
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    write_hf_weights(d, pending, max_shard_size=max_shard_size)
    write_json(d / "config.json", hf_cfg)
    return d
