"""Rebuild a model from a checkpoint, including one saved mid-LoRA/DoRA fine-tune.

A LoRA run's checkpoints hold the wrapped state dict (`<layer>.base_layer.weight`,
`<layer>.lora_A.default.weight`, ...) and, in meta.json, the adapter spec the model wrote
(`model.adapters`, see `torchgraft.peft.spec`); runs written before that are read through their
`finetune.json` (`checkpoint.artifact.adapter_spec_of`). Here the same adapters are injected, the
weights loaded strictly, and (by default) the adapters merged. `model_from_checkpoint` is the one
"build, rebuild adapters, load weights" path; `torchgraft.interop.artifacts.load_model` calls it for
every torchgraft checkpoint kind.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchgraft.errors import CheckpointError

_LORA_MARKERS = (".lora_A.", ".lora_embedding_A.", ".lora_magnitude_vector.")


def adapter_layers_in(state: dict[str, torch.Tensor]) -> list[str]:
    """Module names that carry LoRA/DoRA tensors in a state dict (empty for a plain model)."""
    names = set()
    for key in state:
        for marker in _LORA_MARKERS:
            if marker in key:
                names.add(key.split(marker)[0])
    return sorted(names)


def attach_saved_adapters(model: nn.Module, state: dict[str, torch.Tensor], meta: dict[str, Any],
                          ck_path: Path) -> bool:
    """Wrap the layers of `model` that carry adapters in `state`, as the fine-tune did (the spec in
    meta.json, or a legacy run's finetune.json). False when `state` is a plain state dict."""
    from torchgraft.checkpoint.artifact import adapter_spec_of, checkpoint_run_dir
    from torchgraft.peft.spec import apply_adapter_spec

    layers = adapter_layers_in(state)
    if not layers:
        return False
    spec = adapter_spec_of(meta, checkpoint_run_dir(Path(ck_path)))
    if spec is None:
        raise CheckpointError(f"{ck_path} holds LoRA adapter tensors but its meta.json has no adapter spec "
                              "(model.adapters) and no finetune.json lies next to it to give their rank and "
                              "alpha; load the base model, apply_lora as in training, then load_state_dict")
    spec = {"groups": [_legacy_group(g, layers, state) if not g.get("layers") else g
                       for g in spec.get("groups") or []]}
    try:
        apply_adapter_spec(model, spec, layers)
    except Exception as e:  # a ConfigError from apply_lora: the adapters do not fit this model
        raise CheckpointError(f"{ck_path}: cannot rebuild its LoRA adapters on {type(model).__name__} "
                              f"({str(e).splitlines()[0]})") from None
    return True


def _legacy_group(group: dict[str, Any], layers: list[str], state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A spec group of a run written before meta.json held the spec: the tensors say the layers, the
    rank (whatever the YAML said) and whether it is DoRA."""
    rank = next((int(state[k].shape[0]) for name in layers
                 for k in (f"{name}.lora_A.default.weight", f"{name}.lora_embedding_A.default") if k in state),
                int(group.get("rank", 8)))
    dora = bool(group.get("dora")) or any(".lora_magnitude_vector." in k for k in state)
    return {**group, "layers": layers, "rank": rank, "dora": dora}


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], where: Path, *,
                 assign: bool = False) -> None:
    """`load_state_dict(strict=True)` with a one-line CheckpointError naming the first differences."""
    try:
        model.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as e:
        ours = set(model.state_dict())
        missing = sorted(ours - set(state))[:3]
        extra = sorted(set(state) - ours)[:3]
        shape = [k for k in sorted(ours & set(state))
                 if tuple(model.state_dict()[k].shape) != tuple(state[k].shape)][:3]
        detail = "; ".join(part for part in (
            f"missing {', '.join(missing)}" if missing else "",
            f"unexpected {', '.join(extra)}" if extra else "",
            f"shape differs for {', '.join(shape)}" if shape else "") if part) \
            or str(e).splitlines()[0]
        raise CheckpointError(f"{where}: weights do not match meta.json's model ({detail})") from None


def model_from_checkpoint(ck: Any, device: str | torch.device = "cpu", *, merge: bool = True) -> nn.Module:
    """Rebuild the registered model of a `LoadedCheckpoint` (adapters re-applied, merged unless
    `merge=False`) on `device`, in eval mode."""
    from torchgraft.models.registry import build
    from torchgraft.peft import unload

    m = ck.meta.get("model") or {}
    if not m.get("family"):
        raise CheckpointError(f"checkpoint {ck.path} does not name a registered model family; build the "
                              "model yourself and load_state_dict(load_checkpoint(...)[0])")
    model = build({"family": m["family"], **(m.get("config") or {})}, device=device)
    model.model_name = m.get("name", m["family"])
    adapted = attach_saved_adapters(model, ck.model_state, ck.meta, Path(ck.path))
    if adapted:
        model.to(device)
    load_weights(model, ck.model_state, Path(ck.path))
    if adapted and merge:
        from torchgraft.quant.converters import dequantize_model

        dequantize_model(model)  # a QLoRA base: back to float before the merge
        unload(model, merge=True)
    return model.eval()

