"""`load_model(path_or_artifact)`: the one way every command gets a model from a path.

`torchgraft.checkpoint.artifact.resolve` says what a path is (file inspection only); here each kind
has one loader, chosen from a plain dict (`LOADERS`), so adding a kind is one function and one entry:

- run / checkpoint / merged folder: the newest good checkpoint (`checkpoint.files.load_latest`,
  manifest verified, falling back past bad ones), rebuilt by `checkpoint.model.model_from_checkpoint`
  (the LoRA/DoRA adapters of a fine-tune re-created from meta.json's spec, merged unless `merge=False`);
- Hugging Face directory: `interop.hf.load_hf`;
- PEFT adapter directory: its base model (the local `base_model_name_or_path` of adapter_config.json)
  loaded the same way, then `peft.load_adapter` (a fine-tune run's `adapter/` names no base: the error
  points to the run directory, whose checkpoints hold the whole model);
- ONNX / pt2 / bare safetensors files: a one-line error naming what the file is and what to give.

This lives in interop/ (not checkpoint/) because the Hugging Face loader does; checkpoint/ stays below
every package that reads checkpoints and imports nothing above models/peft.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from torchgraft.checkpoint.artifact import EXPORTED_HINT, Artifact, read_artifact_checkpoint, require_weights, resolve
from torchgraft.errors import CheckpointError

Loader = Callable[[Artifact, "str | torch.device", bool], nn.Module]


def load_model(source: str | Path | Artifact, device: str | torch.device = "cpu", *,
               merge: bool = True) -> nn.Module:
    """The model at `source` (any artifact kind, see the module docstring) on `device`, in eval mode.
    `merge=False` keeps a LoRA/DoRA fine-tune's adapters as wrappers (export merges a copy itself)."""
    artifact = source if isinstance(source, Artifact) else resolve(source)
    return LOADERS[artifact.kind](artifact, device, merge)


def _checkpoint(a: Artifact, device: str | torch.device, merge: bool) -> nn.Module:
    from torchgraft.checkpoint.model import model_from_checkpoint

    return model_from_checkpoint(read_artifact_checkpoint(a), device, merge=merge)


def _hf(a: Artifact, device: str | torch.device, merge: bool) -> nn.Module:
    from torchgraft.interop.hf import load_hf

    require_weights(a)
    return load_hf(a.path, device=device, strict=False).eval()


def _adapter(a: Artifact, device: str | torch.device, merge: bool) -> nn.Module:
    from torchgraft.peft import load_adapter, unload

    if a.base is None and a.run_dir is not None:  # torchgraft's adapter/ of a fine-tune run
        raise CheckpointError(f"{a.what} without a base model; give its run directory {a.run_dir} instead "
                              "(its checkpoints hold the whole fine-tuned model)")
    if a.base is None:
        raise a.missing("a base model", "set base_model_name_or_path in its adapter_config.json to a local "
                        "model directory (a Hugging Face or torchgraft one)")
    base = resolve(a.base)
    if base.kind == "peft-adapter":
        raise CheckpointError(f"{a.what} whose base {base.what}; the base must hold full weights")
    model = load_model(base, device)
    load_adapter(model, a.path, hf_names=not _names_fit(model, a.path))
    model.to(device)
    if merge:
        unload(model, merge=True)
    return model.eval()


def _names_fit(model: nn.Module, adapter_dir: Path) -> bool:
    """True when the adapter's module names are torchgraft's (saved by torchgraft), False when they are
    the Hugging Face layout's (PEFT on a `transformers` model)."""
    from safetensors import safe_open

    from torchgraft.peft.adapter_io import PREFIX, WEIGHTS_NAME

    path = adapter_dir / WEIGHTS_NAME
    if not path.is_file():
        return True  # load_adapter names the missing file
    with safe_open(str(path), framework="pt") as f:
        mods = {k.removeprefix(PREFIX).rpartition(".lora_")[0] for k in f.keys() if ".lora_" in k}
    ours = dict(model.named_modules())
    return all(m in ours for m in mods)


def _exported(a: Artifact, device: str | torch.device, merge: bool) -> nn.Module:
    raise CheckpointError(f"{a.what}; torchgraft loads trainable models from run, checkpoint, Hugging Face "
                          f"or adapter directories: {EXPORTED_HINT}")


def _bare_weights(a: Artifact, device: str | torch.device, merge: bool) -> nn.Module:
    raise a.missing("meta.json naming its model", "give the checkpoint folder it belongs to, or build the "
                    "model and load it with torchgraft.transfer(path, model)")


LOADERS: dict[str, Loader] = {
    "run": _checkpoint, "checkpoint": _checkpoint, "merged": _checkpoint, "hf": _hf,
    "peft-adapter": _adapter, "onnx": _exported, "pt2": _exported, "safetensors": _bare_weights,
}


def model_spec(source: str | Path | Artifact) -> object:
    """What `build` needs to make the model of `source` without reading its weights (for `inspect`):
    a `{"family": ..., **config}` mapping from a checkpoint's meta.json, an HF directory's translated
    config, a PEFT adapter's base model's spec; the one-line error for kinds that name no model."""
    a = source if isinstance(source, Artifact) else resolve(source)
    if a.is_checkpoint:
        require_weights(a)
        m = a.model_section
        if not m.get("family"):
            raise a.missing("a registered model family in meta.json", "inspect the model in Python "
                            "(torchgraft.summary(model))")
        return {"family": m["family"], **(m.get("config") or {})}
    if a.kind == "hf":
        from torchgraft.interop.hf import config_from_hf

        return config_from_hf(a.meta)[0]
    if a.kind == "peft-adapter" and a.base is not None:
        return model_spec(a.base)
    return LOADERS[a.kind](a, "meta", False)  # raises the kind's one-line error
