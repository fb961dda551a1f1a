"""`decode-step`: one forward of a decoder LM with its KV cache as explicit tensors (`DecodeStep`), for
`torchgraft.interop.onnx_generate`. Chosen by `kv_cache=True` / `--kv-cache` (or `spec="decode-step"`).

Inputs `input_ids` (B, T), `attention_mask` (B, P + T), `position_ids` (B, T), `past_key_i` /
`past_value_i` (B, H_kv, P, D); outputs `logits` (B, T, V), `present_key_i` / `present_value_i`
(B, H_kv, P + T, D). The example is made here (a 3-token step over a past of 4); the check adds a
1-token step over a past of 6 and a 5-token prefill (P = 0).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from torchgraft.errors import ConfigError
from torchgraft.interop.export_spec import ExportSpec, config_of, model_device, register_export_spec
from torchgraft.interop.export_specs.tokens import token_axes


def is_decoder_lm(model: nn.Module) -> bool:
    """The decoder-LM contract: `forward(input_ids, attention_mask, position_ids, kv_cache)` plus
    `make_kv_cache` (docs/architecture.md)."""
    return callable(getattr(model, "make_kv_cache", None))


class _PastLayer:
    """One layer's view of `_PastKV`: `update` appends the new keys/values to the past ones."""

    def __init__(self, parent: "_PastKV", k: torch.Tensor, v: torch.Tensor):
        self.parent, self.k, self.v = parent, k, v

    @property
    def pos(self) -> Any:
        return self.parent.pos

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.cat([self.k, k.to(self.k.dtype)], dim=2)  # (B, H_kv, P + T, D)
        v = torch.cat([self.v, v.to(self.v.dtype)], dim=2)
        self.parent.present += [k, v]
        return k, v


class _PastKV:
    """A KV cache (the `KVCache` protocol the zoo's decoders call: `pos`, `layer(i).update`,
    `advance`) whose past is graph inputs and whose present is graph outputs, not buffers."""

    def __init__(self, past: Sequence[torch.Tensor]):
        self.past = past
        self.present: list[torch.Tensor] = []
        self.pos = past[0].shape[2]

    def layer(self, i: int) -> _PastLayer:
        return _PastLayer(self, self.past[2 * i], self.past[2 * i + 1])

    def advance(self, n: int) -> None:
        pass


class DecodeStep(nn.Module):
    """One forward of a decoder LM over T new tokens with its KV cache as explicit tensors.

    `forward(input_ids (B, T), attention_mask (B, P + T), position_ids (B, T), past_key_0,
    past_value_0, ..., past_value_{L-1} (B, H_kv, P, D)) -> (logits (B, T, V), present_key_0, ...,
    present_value_{L-1} (B, H_kv, P + T, D))`. P = 0 (empty past tensors) is the prefill.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if not is_decoder_lm(model):
            raise ConfigError(f"{type(model).__name__} is not a decoder LM (no make_kv_cache); "
                              "kv_cache=True / --kv-cache is for gpt/llama-style models")
        self.model = model
        probe = model.make_kv_cache(1, 1)
        self.n_layer, self.n_kv_head, self.head_dim = probe.n_layer, probe.n_kv_head, probe.head_dim
        self.cache_dtype = probe.dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = _PastKV(past)
        logits = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            kv_cache=cache)
        return (logits, *cache.present)

    def cache_names(self, prefix: str) -> list[str]:
        return [f"{prefix}_{kv}_{i}" for i in range(self.n_layer) for kv in ("key", "value")]

    def example(self, batch_size: int = 2, seq_len: int = 3, past_len: int = 4,
                vocab_size: int = 2) -> tuple[torch.Tensor, ...]:
        device = model_device(self.model)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen).to(device)
        mask = torch.ones(batch_size, past_len + seq_len, dtype=torch.long, device=device)
        pos = torch.arange(past_len, past_len + seq_len, device=device)[None].expand(batch_size, -1)
        past = tuple(torch.randn(batch_size, self.n_kv_head, past_len, self.head_dim, generator=gen)
                     .to(device=device, dtype=self.cache_dtype) for _ in range(2 * self.n_layer))
        return (ids, mask, pos.contiguous(), *past)


@register_export_spec
class DecodeStepSpec(ExportSpec):
    name = "decode-step"
    priority = -50
    kind = "decode_step"

    def __init__(self, model: nn.Module, example: tuple[torch.Tensor, ...], axes: set[str]):
        super().__init__(model, example, axes)  # `example` is not used: the step makes its own
        self.step = DecodeStep(model)
        self.vocab_size = getattr(config_of(model), "vocab_size", 2)
        self.inputs = self.step.example(vocab_size=self.vocab_size)
        self.input_names = ["input_ids", "attention_mask", "position_ids", *self.step.cache_names("past")]
        self.output_names = ["logits", *self.step.cache_names("present")]
        b = {0: "batch"} if "batch" in axes else {}
        self.dynamic_axes = {"input_ids": token_axes(axes), "attention_mask": dict(b),
                             "position_ids": token_axes(axes),
                             **{n: {**b, 2: "past_seq"} for n in self.input_names[3:]}}
        self.derived_axes = {"attention_mask": {1: "past_seq + seq"},
                             **{n: {2: "past_seq + seq"} for n in self.output_names[1:]}}

    @classmethod
    def default_example(cls, model: nn.Module) -> tuple[torch.Tensor, ...]:
        return ()

    @classmethod
    def module_for(cls, model: nn.Module, input_names: Sequence[str]) -> nn.Module:
        return DecodeStep(model)

    def eager_module(self) -> nn.Module:
        return self.step

    def more_examples(self) -> list[tuple[torch.Tensor, ...]]:
        """A 1-token step over a past of 6 at batch 3, and a 5-token prefill at batch 1."""
        return [self.step.example(batch_size=3, seq_len=1, past_len=6, vocab_size=self.vocab_size),
                self.step.example(batch_size=1, seq_len=5, past_len=0, vocab_size=self.vocab_size)]

    def arrange(self, per_input: list[Any]) -> tuple[Any, ...]:
        """`DecodeStep.forward(input_ids, attention_mask, position_ids, *past)`."""
        return (*per_input[:3], tuple(per_input[3:]))

    def metadata(self) -> dict[str, Any]:
        """The cache layout `onnx_generate` reads back."""
        s = self.step
        return {**super().metadata(),
                "kv_cache": {"n_layer": s.n_layer, "n_kv_head": s.n_kv_head, "head_dim": s.head_dim,
                             "dtype": str(s.cache_dtype).removeprefix("torch."),
                             "block_size": getattr(config_of(self.model), "block_size", None)}}
