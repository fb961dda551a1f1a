"""The transformer sizes of a model config, read in one place with their defaults resolved.

Tools (the FLOP formula, the activation-memory formula) need a transformer's widths; configs spell
some of them as optional (`n_kv_head: None` = n_head, `head_dim: None` = n_embd // n_head,
`intermediate_size: None` = 4 * n_embd). `transformer_shape(config)` reads the config's declared
dataclass fields once and returns a typed `TransformerShape`, so no tool looks a field up by name
or repeats a default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

_REQUIRED = ("n_layer", "n_head", "n_embd")


@dataclass(frozen=True)
class TransformerShape:
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    n_embd: int             # h: the residual stream's width
    intermediate_size: int  # i: the MLP's hidden width
    vocab_size: int | None = None
    block_size: int | None = None

    @property
    def q_width(self) -> int:
        """Width of the queries (and of the attention output): n_head * head_dim."""
        return self.n_head * self.head_dim

    @property
    def kv_width(self) -> int:
        """Width of the keys (= of the values): n_kv_head * head_dim."""
        return self.n_kv_head * self.head_dim


def transformer_shape(config: Any) -> TransformerShape | None:
    """The `TransformerShape` of a model config (a dataclass with n_layer, n_head and n_embd), else None."""
    if config is None or not dataclasses.is_dataclass(config) or isinstance(config, type):
        return None
    f = {fld.name: getattr(config, fld.name) for fld in dataclasses.fields(config)}
    if not all(isinstance(f.get(k), int) for k in _REQUIRED):
        return None
    h, n_head = f["n_embd"], f["n_head"]
    return TransformerShape(n_layer=f["n_layer"], n_head=n_head, n_kv_head=f.get("n_kv_head") or n_head,
                            head_dim=f.get("head_dim") or h // n_head, n_embd=h,
                            intermediate_size=f.get("intermediate_size") or 4 * h,
                            vocab_size=f.get("vocab_size"), block_size=f.get("block_size"))
