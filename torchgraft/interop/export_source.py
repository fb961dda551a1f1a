"""What `torchgraft export SOURCE` exports: the model of any artifact (run directory, checkpoint folder,
`finetune --merge` output, Hugging Face directory, PEFT adapter directory with its base), resolved by
`torchgraft.checkpoint.artifact.resolve` and loaded by `torchgraft.interop.artifacts.load_model`, plus
the metadata the file carries (labels, tokenizer location, source, checkpoint name).

A LoRA/DoRA fine-tune's adapters are re-created from its checkpoint's adapter spec and kept, so the
model loads as trained and `export` then merges them into a copy (and says so).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn


@dataclass
class ExportSource:
    model: nn.Module
    metadata: dict[str, Any] = field(default_factory=dict)  # labels, tokenizer, source
    notes: list[str] = field(default_factory=list)


def load_export_source(source: str | Path) -> ExportSource:
    """Load the model at `source` (any artifact, `checkpoint.artifact.resolve`) in eval mode, with the
    metadata the exported file carries. A LoRA/DoRA fine-tune keeps its adapters (export merges them
    into a copy and says so)."""
    from torchgraft.checkpoint.artifact import read_artifact_checkpoint, resolve
    from torchgraft.interop.artifacts import load_model
    from torchgraft.peft import lora_layers

    a = resolve(source)
    notes: list[str] = []
    meta: dict[str, Any] = {"source": str(a.path.resolve()), "labels": a.labels,
                            "tokenizer": str(a.tokenizer.resolve()) if a.tokenizer is not None else None}
    if a.is_checkpoint:
        from torchgraft.checkpoint.model import model_from_checkpoint

        ck = read_artifact_checkpoint(a)  # newest good checkpoint: its name goes into the metadata
        model = model_from_checkpoint(ck, merge=False)
        if a.kind != "merged":
            meta["checkpoint"] = Path(ck.path).name
    else:
        model = load_model(a, merge=False)
    adapted = lora_layers(model)
    if adapted:
        notes.append(f"recreated {len(adapted)} LoRA adapter(s) of {a.weights}")
    return ExportSource(model.eval(), meta, notes)
