"""What `torchgraft export SOURCE` exports: a model loaded from a run directory, a checkpoint folder,
a `finetune --merge` output (`merged/`) or a Hugging Face directory, plus the metadata the file
carries (labels, tokenizer location).

- run dir / checkpoint folder: the newest good checkpoint (`checkpoint.files.load_latest`), rebuilt from
  its meta.json. A LoRA/DoRA fine-tune run's checkpoints hold the adapter tensors next to the base
  weights: the adapters are recreated from the run's `adapter/adapter_config.json` first, so the
  model loads as trained (and `export` then merges them into a copy);
- `merged/` (model.safetensors + meta.json, no manifest): loaded as it is;
- Hugging Face dir (config.json + safetensors): `torchgraft.load_hf`.
Labels: the HF config's `id2label`, or the run config's `data.labels`. Tokenizer: the first folder with
a tokenizer.json among the checkpoint, the run root and `<run>/tokenizer/` (as `convert` looks).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchgraft.errors import CheckpointError


@dataclass
class ExportSource:
    model: nn.Module
    metadata: dict[str, Any] = field(default_factory=dict)  # labels, tokenizer, source
    notes: list[str] = field(default_factory=list)


def _labels_from_hf(cfg: dict[str, Any]) -> list[str] | None:
    id2label = cfg.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return None
    return [str(id2label[k]) for k in sorted(id2label, key=lambda k: int(k))]


def _run_labels(run_dir: Path | None) -> list[Any] | None:
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return None
    from torchgraft.config import load_yaml

    data = load_yaml(run_dir / "config.yaml").get("data")
    labels = data.get("labels") if isinstance(data, dict) else None
    return list(labels) if isinstance(labels, (list, tuple)) else None


def _tokenizer_dir(dirs: list[Path]) -> str | None:
    for d in dirs:
        for cand in (d, d / "tokenizer"):
            if (cand / "tokenizer.json").is_file():
                return str(cand.resolve())
    return None


def _build_loaded(meta: dict[str, Any], state: dict[str, torch.Tensor], where: Path,
                  notes: list[str]) -> nn.Module:
    """The registered model of `meta` with `state` loaded; the LoRA/DoRA adapters of a fine-tune run
    are rebuilt as in training (checkpoint/model.py), so `export` merges them into a copy and says so."""
    from torchgraft.checkpoint.model import adapter_layers_in, attach_saved_adapters, load_weights

    m = meta.get("model") or {}
    if not m.get("family"):
        raise CheckpointError(f"{where}/meta.json does not name a registered model family; load the model "
                              "yourself and call torchgraft.export(model, example, ...)")
    from torchgraft.models.registry import build

    model = build({"family": m["family"], **(m.get("config") or {})})
    model.model_name = m.get("name", m["family"])
    if attach_saved_adapters(model, state, meta, where):  # export() merges them into a copy and says so
        notes.append(f"recreated {len(adapter_layers_in(state))} LoRA adapter(s) of {where}")
    load_weights(model, state, where)
    return model


def load_export_source(source: str | Path) -> ExportSource:
    """Load the model at `source` (run dir, checkpoint folder, merged folder or HF dir) in eval mode."""
    from torchgraft.interop.convert import _tokenizer_dirs

    p = Path(source).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p} does not exist (give a run directory, a checkpoint folder or a "
                              "Hugging Face model directory)")
    if not p.is_dir():
        raise CheckpointError(f"{p} is a file; give a run directory, a checkpoint folder or a Hugging Face "
                              "model directory")
    notes: list[str] = []
    meta_extra: dict[str, Any] = {"source": str(p.resolve())}
    has_meta = (p / "meta.json").is_file()
    if (p / "config.json").is_file() and not has_meta:
        from torchgraft.interop.hf import load_hf, read_hf_config

        model = load_hf(p, strict=False)
        meta_extra["labels"] = _labels_from_hf(read_hf_config(p))
        meta_extra["tokenizer"] = _tokenizer_dir([p])
        return ExportSource(model.eval(), meta_extra, notes)
    if has_meta and (p / "model.safetensors").is_file() and not (p / "manifest.json").is_file():
        from safetensors.torch import load_file

        meta = json.loads((p / "meta.json").read_text())
        model = _build_loaded(meta, load_file(str(p / "model.safetensors")), p, notes)
        run_dir = p.parent if (p.parent / "config.yaml").is_file() else None
        meta_extra["labels"] = _run_labels(run_dir)
        meta_extra["tokenizer"] = _tokenizer_dir([p, *([run_dir] if run_dir else [])])
        return ExportSource(model.eval(), meta_extra, notes)
    from torchgraft.checkpoint.files import load_latest

    ck = load_latest(p)
    ck_dir = Path(ck.path)
    run_dir = ck_dir.parent.parent if ck_dir.parent.name == "checkpoints" else None
    model = _build_loaded(ck.meta, ck.model_state, ck_dir, notes)
    meta_extra["checkpoint"] = ck_dir.name
    meta_extra["labels"] = ck.meta.get("labels") or _run_labels(run_dir)
    meta_extra["tokenizer"] = _tokenizer_dir(_tokenizer_dirs(p, ck_dir))
    return ExportSource(model.eval(), meta_extra, notes)
