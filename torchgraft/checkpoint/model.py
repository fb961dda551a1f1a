"""Rebuild a model from a checkpoint, including one saved mid-LoRA/DoRA fine-tune.

A LoRA run's checkpoints hold the wrapped state dict (`<layer>.base_layer.weight`,
`<layer>.lora_A.default.weight`, ...). Rank and alpha are not recoverable from the tensors alone, so
the fine-tune recipe writes its `finetune:` section to `<run>/finetune.json` before training; here the
same adapters are injected, the weights loaded strictly, and (by default) the adapters merged, so
`generate`, `eval`, `convert`, `export` and `load_model` all get a plain model with the original names.
"""
from __future__ import annotations

import json
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


def run_dir_of(ck_path: Path) -> Path | None:
    """The run directory of `<run>/checkpoints/step_X`, else None."""
    ck_path = Path(ck_path)
    if ck_path.parent.name == "checkpoints":
        return ck_path.parent.parent
    return None


def adapter_spec(meta: dict[str, Any], ck_path: Path) -> dict[str, Any]:
    """The `finetune:` section that made the adapters: meta.json's `finetune`, else the run's finetune.json."""
    if isinstance(meta.get("finetune"), dict):
        return meta["finetune"]
    run = run_dir_of(ck_path) or (Path(ck_path).parent if (Path(ck_path).parent / "config.yaml").is_file()
                                  else None)
    path = run / "finetune.json" if run is not None else None
    if path is not None and not path.is_file() and (run / "adapter" / "adapter_config.json").is_file():
        return _spec_of_peft_config(run / "adapter" / "adapter_config.json")
    if path is None or not path.is_file():
        raise CheckpointError(f"{ck_path} holds LoRA adapter tensors but no finetune.json was found next to "
                              "it to give their rank and alpha; load the base model, apply_lora as in "
                              "training, then load_state_dict")
    try:
        spec = json.loads(path.read_text())["finetune_config"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path} is unreadable or lacks finetune_config; cannot rebuild the adapters "
                              f"of {ck_path}") from None
    return spec


def _spec_of_peft_config(path: Path) -> dict[str, Any]:
    """A `finetune:`-like spec from a PEFT `adapter_config.json` (what `save_adapter` writes)."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"{path} is unreadable; cannot rebuild the adapters next to it") from None
    return {"method": "dora" if cfg.get("use_dora") else "lora",
            "lora": {"rank": cfg.get("r", 8), "alpha": cfg.get("lora_alpha", 16.0),
                     "use_rslora": cfg.get("use_rslora", False)}}


def attach_saved_adapters(model: nn.Module, state: dict[str, torch.Tensor], meta: dict[str, Any],
                          ck_path: Path) -> bool:
    """Wrap the layers of `model` that carry adapters in `state`, as the fine-tune did. False when
    `state` is a plain state dict (nothing to do)."""
    layers = adapter_layers_in(state)
    if not layers:
        return False
    from torchgraft.peft import apply_lora

    spec = adapter_spec(meta, ck_path)
    lora = spec.get("lora") or {}
    method = spec.get("method", "lora")
    rank = int(lora.get("rank", 8))
    for name in layers:  # the tensors say the rank, whatever the YAML said
        key = next((k for k in (f"{name}.lora_A.default.weight", f"{name}.lora_embedding_A.default")
                    if k in state), None)
        if key is not None:
            rank = int(state[key].shape[0])
            break
    try:
        apply_lora(model, layers, rank=rank, alpha=float(lora.get("alpha", 16.0)),
                   dropout=0.0, dora=method == "dora" or any(".lora_magnitude_vector." in k for k in state),
                   use_rslora=bool(lora.get("use_rslora", False)),
                   quantize_base=spec.get("quantize", "nf4") if method == "qlora" else None)
    except Exception as e:  # a ConfigError from apply_lora: the adapters do not fit this model
        raise CheckpointError(f"{ck_path}: cannot rebuild its LoRA adapters on {type(model).__name__} "
                              f"({str(e).splitlines()[0]})") from None
    return True


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


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a registered model from the newest good checkpoint at `path` (manifest verified); a
    LoRA/DoRA fine-tune's adapters are re-applied and merged."""
    from torchgraft.checkpoint.files import load_latest

    return model_from_checkpoint(load_latest(path), device).train()
