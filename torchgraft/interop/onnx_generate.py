"""Greedy generation with a plain onnxruntime loop over an exported decode step.

`torchgraft export RUN --format onnx --kv-cache --out step.onnx` writes the decode step
(`DecodeStep`): inputs `input_ids` (B, T), `attention_mask` (B, P + T), `position_ids` (B, T),
`past_key_i` / `past_value_i` (B, H_kv, P, D); outputs `logits` (B, T, V) and `present_key_i` /
`present_value_i` (B, H_kv, P + T, D). This loop needs only numpy and onnxruntime (no torch), and
follows `torchgraft.generation.iter_tokens` step for step, so its greedy tokens equal
`torchgraft generate -t 0`'s: prefill with an empty past, then one token per step; left-padded
batches use `position_ids = cumsum(mask) - 1`; when the window (`block_size`) is full its last
`block_size // 2` tokens are re-encoded from position 0.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from torchgraft.errors import ConfigError


class OnnxDecoder:
    """An onnxruntime session over an exported decode step, with its cache layout from the metadata."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("torchgraft.kind") != "decode_step":
            raise ConfigError(f"{path} is not a decode-step export; export it with --kv-cache (kv_cache=True)")
        kv = json.loads(meta["torchgraft.kv_cache"])
        self.n_layer, self.n_kv_head, self.head_dim = kv["n_layer"], kv["n_kv_head"], kv["head_dim"]
        self.block_size: int | None = kv.get("block_size")
        self.past_names = [i.name for i in self.session.get_inputs()][3:]
        self.dtype = np.float16 if kv.get("dtype") == "float16" else np.float32
        self.metadata = meta

    def empty_past(self, batch_size: int) -> list[np.ndarray]:
        return [np.zeros((batch_size, self.n_kv_head, 0, self.head_dim), self.dtype)
                for _ in range(2 * self.n_layer)]

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             past: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One forward: logits (B, T, V) and the present keys/values (the next step's past)."""
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                "position_ids": position_ids.astype(np.int64), **dict(zip(self.past_names, past))}
        out = self.session.run(None, feed)
        return out[0], out[1:]


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    if not rows or any(len(r) == 0 for r in rows):
        raise ConfigError("every prompt needs at least one token")
    t = max(len(r) for r in rows)
    ids = np.full((len(rows), t), pad_id, np.int64)
    mask = np.zeros((len(rows), t), np.int64)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = r
        mask[i, t - len(r):] = 1
    return ids, mask


def onnx_generate(decoder: OnnxDecoder | str | Path, prompts: Sequence[Sequence[int]] | np.ndarray, *,
                  max_new_tokens: int = 64, eos_token_id: int | None = None, pad_id: int = 0,
                  attention_mask: np.ndarray | None = None) -> list[list[int]]:
    """Greedy continuations of token-id prompts (a list of lists, left-padded here, or an (B, T)
    array with its `attention_mask`); eos ends a row (eos excluded), like `torchgraft.generate`."""
    dec = decoder if isinstance(decoder, OnnxDecoder) else OnnxDecoder(decoder)
    if isinstance(prompts, np.ndarray):
        ids = prompts.astype(np.int64).reshape(-1, prompts.shape[-1])
        mask = np.ones_like(ids) if attention_mask is None else attention_mask.astype(np.int64).reshape(ids.shape)
    else:
        ids, mask = _left_pad(prompts, pad_id)
    b, t = ids.shape
    limit = dec.block_size
    if limit is not None and t > limit:
        raise ConfigError(f"the prompt ({t} tokens) is longer than the model's block_size ({limit})")
    window = limit or t + max_new_tokens
    keep = max(1, window // 2)
    out: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b

    def encode(seq: np.ndarray, win_mask: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        positions = np.clip(np.cumsum(win_mask, -1) - 1, 0, None)  # (B, T); arange without padding
        logits, present = dec.step(seq, win_mask, positions, dec.empty_past(b))
        return logits[:, -1], present

    seq, win_mask = ids, mask
    logits, past = encode(seq, win_mask)  # prefill
    for step in range(max_new_tokens):
        tok = logits.argmax(-1).astype(np.int64)  # (B,)
        for row, tid in enumerate(tok.tolist()):
            if done[row]:
                continue
            if eos_token_id is not None and tid == eos_token_id:
                done[row] = True
            else:
                out[row].append(tid)
        if all(done) or step == max_new_tokens - 1:
            break
        seq = np.concatenate([seq, tok[:, None]], 1)
        win_mask = np.concatenate([win_mask, np.ones((b, 1), np.int64)], 1)
        if seq.shape[1] > window:  # context full: keep the last `keep` tokens, re-encode them
            seq, win_mask = seq[:, -keep:], win_mask[:, -keep:]
            logits, past = encode(seq, win_mask)
        else:  # decode: one token against the cache
            new_pos = win_mask.sum(-1, keepdims=True) - 1  # (B, 1)
            step_logits, past = dec.step(tok[:, None], win_mask, new_pos, past)
            logits = step_logits[:, -1]
    return out


def _run(argv: Sequence[str] | None = None) -> Any:  # pragma: no cover - a tiny command for docs
    import argparse

    ap = argparse.ArgumentParser(description="greedy tokens from an exported decode step")
    ap.add_argument("model")
    ap.add_argument("ids", nargs="+", type=int)
    ap.add_argument("-n", type=int, default=20)
    a = ap.parse_args(argv)
    print(onnx_generate(a.model, [a.ids], max_new_tokens=a.n)[0])


if __name__ == "__main__":  # pragma: no cover
    _run()
