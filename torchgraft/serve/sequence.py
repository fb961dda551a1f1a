"""One generated choice: its prompt, sampling parameters, text so far and how it ended.

The scheduler thread drives a `Sequence` (`accept(token)` after every sampled token) and the
request's handler reads what it emits through `sink`, a thread-safe callback: `("text", piece)`
for each final piece of text (`generation.TextStream`: held back over incomplete UTF-8 and stop
prefixes), then exactly one `("done", finish_reason)` or `("error", APIError)`.
finish_reason is "stop" (eos or a stop string) or "length" (max_tokens), as OpenAI reports it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from torchgraft.generation import TextStream, next_token
from torchgraft.serve.errors import APIError

Event = tuple[str, Any]


@dataclass(frozen=True)
class SamplingParams:
    """How one choice is sampled; temperature 0 is greedy."""
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(eq=False)
class Sequence:
    """A choice in flight. `slot` is its cache row while it holds one; `prefilled` counts the
    prompt tokens already in the cache."""
    prompt: list[int]
    params: SamplingParams
    tokenizer: Any
    sink: Callable[[Event], None]
    eos_id: int | None = None
    slot: int | None = None
    prefilled: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None
    text: TextStream = field(init=False)

    def __post_init__(self) -> None:
        self.text = TextStream(self.tokenizer, list(self.params.stop))

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def make_generator(self, device: torch.device) -> None:
        """The choice's own random stream (seeded: reproducible whatever else runs beside it)."""
        if self.params.temperature > 0:
            self.generator = torch.Generator(device=device)
            if self.params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(self.params.seed)

    def sample(self, logits: torch.Tensor, greedy: int) -> int:
        """The next token from this row's logits (V,); `greedy` is its argmax, computed batched."""
        p = self.params
        if p.temperature == 0:
            return greedy
        return int(next_token(logits[None], p.temperature, p.top_k, p.top_p, self.generator)[0])

    def accept(self, token: int) -> bool:
        """Take one generated token; True when the choice is finished."""
        if self.eos_id is not None and token == self.eos_id:
            self.finish("stop")
            return True
        self.completion_tokens += 1
        piece = self.text.push(token)
        if piece:
            self.sink(("text", piece))
        if self.text.stopped:
            self.finish("stop")
        elif self.completion_tokens >= self.params.max_tokens:
            self.finish("length")
        return self.finished

    def finish(self, reason: str) -> None:
        if self.finished:
            return
        piece = self.text.finish()
        if piece:
            self.sink(("text", piece))
        self.finish_reason = reason
        self.sink(("done", reason))

    def fail(self, error: APIError) -> None:
        if self.finished:
            return
        self.finish_reason = "error"
        self.sink(("error", error))
