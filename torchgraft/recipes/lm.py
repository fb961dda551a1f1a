"""Language-model recipes: load a trained LM with its tokenizer, and measure perplexity.

`load_lm(path)` accepts any artifact `torchgraft.checkpoint.artifact.resolve` recognises and loads it
with `torchgraft.interop.artifacts.load_model`. The tokenizer is the artifact's (`Artifact.tokenizer`:
the checkpoint folder, the run directory's root or `tokenizer/`, the HF directory); failing that (runs
saved before the trainer wrote it) it is rebuilt from the run's `data:` section (tokenizer spec and
source), which gives the same tokenizer because char/byte/bpe tokenizers are deterministic.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchgraft.data.run_tokenizer import run_data_section, tokenizer_from_data
from torchgraft.data.tokenizers import Tokenizer, load_tokenizer
from torchgraft.errors import ConfigError

LM_TASKS = ("lm", "distill", "dpo", "simpo", "orpo")  # training tasks whose checkpoints hold a plain next-token LM


@dataclass
class LoadedLM:
    model: nn.Module
    tokenizer: Tokenizer | None
    data: dict[str, Any] | None  # the run's `data:` section, when known
    path: Path                   # the directory the weights came from


def load_lm(path: str | Path, device: str | torch.device = "cpu") -> LoadedLM:
    """Load a decoder LM and its tokenizer from any artifact (`torchgraft.checkpoint.artifact.resolve`):
    a run dir, checkpoint or merged folder, Hugging Face directory or PEFT adapter directory."""
    from torchgraft.checkpoint.artifact import resolve
    from torchgraft.interop.artifacts import load_model

    a = resolve(path)
    if a.is_checkpoint:
        m = a.model_section
        if a.weights is not None and ("vocab_size" not in (m.get("config") or {})
                                      or (a.task or "lm") not in LM_TASKS):
            raise ConfigError(f"{a.what} of a {m.get('name') or m.get('family') or 'non-language'} model "
                              f"(task {a.task or 'unknown'}), not a language model; generate and eval need "
                              "a GPT/Llama run")
    model = load_model(a, device)  # a LoRA run's adapters re-applied and merged
    if not hasattr(getattr(model, "config", None), "vocab_size"):
        raise ConfigError(f"{a.what} holding a {type(model).__name__}, not a language model; generate and "
                          "eval need a GPT/Llama run or a decoder's Hugging Face directory")
    tok = load_tokenizer(a.tokenizer / "tokenizer.json") if a.tokenizer is not None else None
    data = None
    if a.is_checkpoint:
        data = run_data_section(a.run_dir, a.meta)
        tok = tok or tokenizer_from_data(data)  # runs saved before the trainer wrote tokenizer.json
    return LoadedLM(model.eval(), tok, data, a.weights or a.path)


def check_tokenizer_fits(lm: LoadedLM) -> None:
    """A tokenizer with more ids than the model's embedding is the wrong one: say so in one line."""
    vocab = getattr(getattr(lm.model, "config", None), "vocab_size", None)
    if lm.tokenizer is not None and vocab is not None and lm.tokenizer.vocab_size > vocab:
        raise ConfigError(f"tokenizer has {lm.tokenizer.vocab_size} ids but the model only {vocab}; "
                          "wrong tokenizer for this model")


# ---- perplexity -----------------------------------------------------------------------------------
@torch.inference_mode()
def perplexity(model: nn.Module, dataset: Any, batch_size: int = 16, max_batches: int | None = None,
               device: str | torch.device | None = None, collate: Any = None) -> dict[str, float]:
    """Mean next-token NLL (nats) and its exp over an LM dataset of {"input_ids", "labels"} items
    (labels already shifted, -100 ignored). Every predicted token counts once. `collate`: the data's
    own batcher (e.g. SFT's, which pads rows of different lengths and adds the attention mask and
    positions the model is called with)."""
    if len(dataset) == 0:
        raise ConfigError("the evaluation set is empty (text shorter than seq_len + 1 tokens)")
    model.eval()
    device = device or next(model.parameters()).device
    total, count = 0.0, 0
    n = len(dataset)
    for bi, start in enumerate(range(0, n, batch_size)):
        if max_batches is not None and bi >= max_batches:
            break
        idx = torch.arange(start, min(start + batch_size, n))
        if hasattr(dataset, "get_batch"):
            batch = dataset.get_batch(idx)
        else:
            rows = [dataset[int(i)] for i in idx]
            batch = collate(rows) if collate is not None else \
                {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "labels")}
        x, y = batch["input_ids"].to(device), batch["labels"].to(device)
        extra = {k: batch[k].to(device) for k in ("attention_mask", "position_ids") if batch.get(k) is not None}
        logits = model(x, **extra).float()  # (B, T, V)
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100,
                                 reduction="sum").item()
        count += int((y != -100).sum())
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}


def eval_lm(path: str | Path, data: str | None = None, *, field: str = "text", seq_len: int | None = None,
            batch_size: int = 16, max_batches: int | None = None, device: str = "cpu",
            cache_dir: str | None = None) -> dict[str, Any]:
    """`torchgraft eval`: perplexity of the LM at `path`.

    Without `data`: the validation split of the run's own `data:` section. With `data` (a .txt /
    .jsonl file, a directory or 'builtin'): all of that text, tokenized with the model's tokenizer,
    in windows of `seq_len` tokens (default: the run's seq_len, else the model's block_size).
    """
    from torchgraft.data.text import PackedWindows, TokenStream, build_shards

    lm = load_lm(path, device=device)
    block = getattr(getattr(lm.model, "config", None), "block_size", None)
    run_seq = int(lm.data["seq_len"]) if lm.data and "seq_len" in lm.data else None
    seq_len = seq_len or run_seq or block or 256
    if block is not None and seq_len > block:
        raise ConfigError(f"seq_len {seq_len} exceeds the model's block_size {block}")
    if data is None:
        if not lm.data:
            raise ConfigError(f"{path} has no run config to take validation data from; pass --data "
                              "FILE_OR_DIR (or 'builtin')")
        from torchgraft.data import build_data

        section = {**lm.data, "seq_len": seq_len, "progress": False} if lm.data.get("name") == "text" \
            else dict(lm.data)
        bundle = build_data(section)
        if bundle.val is None:
            raise ConfigError("the run's data has no validation split; pass --data FILE_OR_DIR")
        dataset, what, collate = bundle.val, f"validation split of {lm.data.get('name')}", bundle.collate_fn
    else:
        if lm.tokenizer is None:
            raise ConfigError(f"no tokenizer.json found for {path}; put one next to the weights")
        shard_dir = build_shards(data, field, lm.tokenizer, cache_dir, progress=False)
        stream = TokenStream(shard_dir)
        dataset, what, collate = PackedWindows(stream, 0, len(stream), seq_len), str(data), None
    check_tokenizer_fits(lm)
    out = perplexity(lm.model, dataset, batch_size=batch_size, max_batches=max_batches, collate=collate)
    return {**out, "data": what, "seq_len": seq_len, "model": str(lm.path)}


def format_eval(result: dict[str, Any]) -> str:
    return (f"{result['data']}: loss {result['loss']:.4f} nats/token, perplexity "
            f"{result['perplexity']:.3f} over {result['tokens']:,} tokens (seq_len {result['seq_len']})")


def to_json(result: dict[str, Any]) -> str:
    return json.dumps(result)


def lm_chat_template(lm: LoadedLM) -> Any:
    """The chat template of a loaded LM: the one its run (SFT) saved or its HF directory holds,
    else the built-in one; special tokens from its tokenizer (`generate --chat`, `serve`)."""
    from torchgraft.data.chat_template import ChatTemplate

    tok = lm.tokenizer
    where = lm.path.parent.parent if lm.path.parent.name == "checkpoints" else lm.path
    specials = {} if tok is None else {"bos_token": tok.bos_token, "eos_token": tok.eos_token,
                                       "pad_token": tok.pad_token}
    return ChatTemplate.for_tokenizer(where, special_tokens=specials)
