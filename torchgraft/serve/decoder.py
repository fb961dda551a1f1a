"""The model side of continuous batching: `SlotDecoder` holds one `SlotKVCache` of `n_slots` rows.

Each row (slot) is one sequence at its own length. A request is prefilled into a free row alone (a
one-row view of the cache, in chunks, so a long prompt never blocks decoding for long); then every
decode step runs one token for all rows at once, each row writing its keys/values at its own slot
and attending over its own filled slots. Rows that are free or still prefilling take part in the
step with a dummy token that writes to a scratch slot (the cache's last one) nobody else sees, so
the step has the same shapes whoever is running: one compiled graph serves every step
(`compile=True`; eager by default). Eager steps run only the rows up to the highest busy one,
rounded up to a power of two, so a lightly loaded server does less work.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from torchgraft.generation import apply_decode_converters, compile_failure, last_logits
from torchgraft.nn.kv_cache import static_attention_mask
from torchgraft.nn.slot_kv_cache import SlotKVCache


class SlotDecoder:
    """Decoding state for `n_slots` independent sequences of up to `max_len` tokens each.

    `slot_mask` (B, L+1) marks filled slots per row, `positions` (B, 1) the next token's position
    (= its slot: every row starts at slot 0), `active` (B,) the rows that decode.
    """

    def __init__(self, model: nn.Module, n_slots: int, max_len: int, compile: bool = False):
        self.n_slots, self.max_len = n_slots, max_len
        self.scratch = max_len  # the extra slot inactive rows write to
        self.cache = SlotKVCache.from_cache(model.make_kv_cache(n_slots, max_len + 1))
        self.conversions = apply_decode_converters(model, self.cache.device)
        device = self.cache.device
        self.slot_mask = torch.zeros(n_slots, max_len + 1, dtype=torch.bool, device=device)
        self.positions = torch.zeros(n_slots, 1, dtype=torch.long, device=device)
        self.active = torch.zeros(n_slots, dtype=torch.bool, device=device)
        self.compiled = False
        self._step: Callable[..., torch.Tensor] = _slot_step
        self._views: dict[int, tuple[SlotKVCache, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        if compile:
            self._step = self._compile()

    @property
    def device(self) -> torch.device:
        return self.cache.device

    def _compile(self) -> Callable[..., torch.Tensor]:
        mode = "reduce-overhead" if self.device.type == "cuda" else "default"
        for t in [*self.cache.k, *self.cache.v, self.slot_mask, self.positions, self.active, self.cache.index]:
            torch._dynamo.mark_static_address(t)
        try:
            step = torch.compile(_slot_step, fullgraph=True, dynamic=False, mode=mode)
        except RuntimeError as e:
            warnings.warn(f"torch.compile is unavailable ({e}); decoding eagerly", stacklevel=3)
            return _slot_step
        self.compiled = True
        return step

    # ---- slot lifecycle
    def release(self, row: int) -> None:
        """Forget row `row` (its buffers are reused, not zeroed: the mask hides them)."""
        self.slot_mask[row] = False
        self.positions[row] = 0
        self.active[row] = False

    def prefill(self, model: nn.Module, row: int, ids: list[int], start: int) -> torch.Tensor:
        """Write prompt tokens `ids` at slots [start, start + len(ids)) of row `row` (the earlier
        slots already hold the prompt's beginning); logits (V,) of the last one."""
        t = len(ids)
        view = self.cache.rows(row, row + 1)
        view.index = torch.arange(start, start + t, device=self.device)[None]  # (1, T)
        self.slot_mask[row, start:start + t] = True
        mask = static_attention_mask(self.slot_mask[row:row + 1], start, t)  # (1, 1, T, L+1)
        x = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, T)
        return last_logits(model, x, attention_mask=mask, position_ids=view.index, kv_cache=view)[0]

    def activate(self, row: int, length: int) -> None:
        """Row `row` holds `length` prompt tokens and decodes from the next step on."""
        self.slot_mask[row, self.scratch] = False
        self.positions[row] = length
        self.active[row] = True

    # ---- decoding
    def step(self, model: nn.Module, tokens: torch.Tensor, busy: int) -> torch.Tensor:
        """One token per row, tokens (B,) (ignored for inactive rows) -> logits (b, V) for the
        first b >= `busy` rows (all rows when compiled)."""
        if self.compiled:
            try:
                return self._step(model, self.cache, self.slot_mask, self.positions, self.active, tokens,
                                  self.scratch)
            except Exception as e:
                if not compile_failure(e):
                    raise
                warnings.warn(f"torch.compile of the serve decode step failed ({type(e).__name__}); "
                              "decoding eagerly", stacklevel=2)
                self.compiled, self._step = False, _slot_step
        b = min(self.n_slots, 1 << max(0, busy - 1).bit_length())  # next power of two >= busy
        cache, mask, pos, active = self._rows(b)
        return self._step(model, cache, mask, pos, active, tokens[:b], self.scratch)

    def _rows(self, b: int) -> tuple[SlotKVCache, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of the first `b` rows (cached per size)."""
        if b not in self._views:
            self._views[b] = (self.cache if b == self.n_slots else self.cache.rows(0, b), self.slot_mask[:b],
                              self.positions[:b], self.active[:b])
        return self._views[b]


def _slot_step(model: nn.Module, cache: SlotKVCache, slot_mask: torch.Tensor, positions: torch.Tensor,
               active: torch.Tensor, tokens: torch.Tensor, scratch: int) -> torch.Tensor:
    """One token per row against the slotted cache; advances the active rows in place; logits (B, V)."""
    index = torch.where(active[:, None], positions, scratch)  # (B, 1): where each row writes
    cache.index.copy_(index)
    slot_mask.scatter_(1, index, True)  # an inactive row sees only its scratch slot
    logits = model(tokens[:, None], attention_mask=slot_mask[:, None, None, :],  # (B, 1, 1, L+1)
                   position_ids=torch.where(active[:, None], positions, 0), kv_cache=cache)[:, -1]
    positions.add_(active[:, None].long())
    return logits
