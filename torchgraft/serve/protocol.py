"""Request bodies (pydantic, unknown fields refused) and the OpenAI response / chunk shapes.

Field names, defaults and ranges follow OpenAI's API (temperature 1.0, top_p 1.0, n 1, up to four
stop strings); `top_k` is an extension sent through the client's `extra_body`. Fields OpenAI has
that torchgraft does not implement are accepted only at their neutral value (penalties 0, no
logprobs), so a client gets a 400 naming the field rather than silently different behaviour.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields shared by /v1/completions and /v1/chat/completions."""
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Any = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return [s for s in stops if s]

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float) -> float:
        if v != 0:
            raise ValueError("penalties are not supported by torchgraft serve (leave it at 0)")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: Any) -> Any:
        if v not in (None, False, 0):
            raise ValueError("logprobs are not supported by torchgraft serve")
        return None


class CompletionRequest(_Sampling):
    """/v1/completions: one prompt (text or token ids) or a list of them."""
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported by torchgraft serve")
        return v

    @field_validator("suffix", "best_of")
    @classmethod
    def _unsupported(cls, v: Any) -> Any:
        if v not in (None, 1):
            raise ValueError("not supported by torchgraft serve")
        return v

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    """/v1/chat/completions: a conversation rendered with the artifact's chat template."""
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class EmbeddingRequest(_Body):
    model: str
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    @field_validator("dimensions")
    @classmethod
    def _no_dims(cls, v: int | None) -> int | None:
        if v is not None:
            raise ValueError("dimensions is not supported by torchgraft serve (the model's width is used)")
        return v


class ClassifyRequest(_Body):
    model: str
    input: str | list[str] = Field(min_length=1)
    top_k: int = Field(5, ge=1)


def inputs_of(req: EmbeddingRequest | ClassifyRequest) -> list[str]:
    return [req.input] if isinstance(req.input, str) else list(req.input)


# ---- responses ------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_choice(index: int, text: str, finish_reason: str | None, chat: bool) -> dict[str, Any]:
    """A choice of a full response (streamed: `delta_choice`)."""
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def delta_choice(index: int, text: str | None, finish_reason: str | None, chat: bool,
                 first: bool = False) -> dict[str, Any]:
    """A choice of one streamed chunk: a piece of text, or (text None) the closing finish_reason."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}


def response_object(chat: bool, chunk: bool) -> str:
    if chat:
        return "chat.completion.chunk" if chunk else "chat.completion"
    return "text_completion"
