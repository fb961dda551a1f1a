"""From a (chat) completion request to scheduled sequences, and back to OpenAI responses.

`CompletionService.start(req, chat)` checks the request against the artifact (model name, context
length, the server's max_tokens), builds one `Sequence` per prompt and choice (choice `i` of prompt
`p` has index `p * n + i`; with a `seed`, choice `i` samples with seed `seed + i`) and submits them
all to the scheduler. The resulting `Job` is read either whole (`Job.collect`) or as server-sent
events (`Job.sse`, ending in `data: [DONE]`). A job that ends early (client gone, timeout, error)
cancels its sequences, which frees their slots.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from torchgraft.errors import TorchgraftError
from torchgraft.serve import protocol
from torchgraft.serve.artifact import DecoderArtifact
from torchgraft.serve.errors import APIError, bad_request
from torchgraft.serve.scheduler import Scheduler
from torchgraft.serve.sequence import SamplingParams, Sequence


@dataclass
class Job:
    """The sequences of one request and the queue their events arrive on (index, event)."""
    chat: bool
    model: str
    prompt_tokens: int
    seqs: list[Sequence]
    queue: asyncio.Queue
    scheduler: Scheduler
    include_usage: bool = False
    timeout: float = 600.0  # seconds the whole request may take
    id: str = field(default_factory=lambda: protocol.new_id("cmpl"))
    created: int = field(default_factory=protocol.now)

    def cancel(self) -> None:
        self.scheduler.cancel([s for s in self.seqs if not s.finished])

    def completion_tokens(self) -> int:
        return sum(s.completion_tokens for s in self.seqs)

    def _head(self, chunk: bool) -> dict[str, Any]:
        return {"id": self.id, "object": protocol.response_object(self.chat, chunk), "created": self.created,
                "model": self.model}

    async def _events(self) -> AsyncIterator[tuple[int, str, Any]]:
        """(choice index, kind, value) until every choice is done; raises the first error."""
        left = len(self.seqs)
        deadline = asyncio.get_running_loop().time() + self.timeout
        while left:
            try:
                index, (kind, value) = await asyncio.wait_for(
                    self.queue.get(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                self.cancel()
                raise APIError(504, f"the request took longer than {self.timeout:g} s (torchgraft serve "
                               "--timeout)", "timeout", code="timeout") from None
            if kind == "error":
                raise value
            if kind == "done":
                left -= 1
            yield index, kind, value

    async def collect(self) -> dict[str, Any]:
        """The whole response object."""
        texts = [""] * len(self.seqs)
        reasons: list[str | None] = [None] * len(self.seqs)
        async for index, kind, value in self._events():
            if kind == "text":
                texts[index] += value
            else:
                reasons[index] = value
        return {**self._head(False),
                "choices": [protocol.completion_choice(i, t, r, self.chat) for i, (t, r) in enumerate(zip(texts, reasons))],
                "usage": protocol.usage(self.prompt_tokens, self.completion_tokens())}

    async def sse(self) -> AsyncIterator[str]:
        """`data: {chunk}` lines as the text arrives, a closing chunk per choice, usage when asked,
        then `data: [DONE]`; an error mid-stream is sent as an error object before [DONE]."""
        started: set[int] = set()
        try:
            async for index, kind, value in self._events():
                first = index not in started
                started.add(index)
                choice = (protocol.delta_choice(index, value, None, self.chat, first) if kind == "text"
                          else protocol.delta_choice(index, None, value, self.chat, first))
                yield _sse({**self._head(True), "choices": [choice]})
            if self.include_usage:
                yield _sse({**self._head(True), "choices": [],
                            "usage": protocol.usage(self.prompt_tokens, self.completion_tokens())})
        except APIError as e:
            yield _sse(e.body())
        yield "data: [DONE]\n\n"


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class CompletionService:
    """Validates generation requests and hands them to the scheduler."""

    def __init__(self, artifact: DecoderArtifact, scheduler: Scheduler, max_tokens: int = 256,
                 timeout: float = 600.0):
        self.artifact, self.scheduler = artifact, scheduler
        self.max_tokens, self.timeout = max_tokens, timeout

    def start(self, req: protocol.CompletionRequest | protocol.ChatCompletionRequest, chat: bool) -> Job:
        """Encode, check and submit a request; its `Job` (raises `APIError` for a bad request)."""
        check_model(req.model, self.artifact.name)
        prompts = self._encode(req, chat)
        limit = req.token_limit() if chat else req.max_tokens
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        seqs: list[Sequence] = []
        tok = self.artifact.tokenizer
        for p, ids in enumerate(prompts):
            max_tokens = self._max_tokens(len(ids), limit)
            for i in range(req.n):
                index = p * req.n + i
                params = SamplingParams(max_tokens, req.temperature, req.top_p, req.top_k or None, tuple(req.stop),
                                        None if req.seed is None else req.seed + i)
                seqs.append(Sequence(ids, params, tok, _sink(loop, queue, index), eos_id=tok.eos_id))
        job = Job(chat, self.artifact.name, sum(len(ids) for ids in prompts) * req.n, seqs, queue,
                  self.scheduler, bool(req.stream_options and req.stream_options.include_usage), self.timeout)
        pending = [s for s in seqs if s.params.max_tokens > 0]
        for s in seqs:
            if s.params.max_tokens == 0:
                s.finish("length")
        self.scheduler.submit(pending)
        return job

    def _encode(self, req: Any, chat: bool) -> list[list[int]]:
        vocab = self.artifact.tokenizer.vocab_size
        try:
            if chat:
                return [self.artifact.encode_chat([m.model_dump(exclude_none=True, exclude={"name"})
                                                   for m in req.messages])]
            rows = [self.artifact.encode_prompt(p) if isinstance(p, str) else list(p) for p in req.prompts()]
        except TorchgraftError as e:  # e.g. a chat template that raises
            raise bad_request(str(e), "messages" if chat else "prompt") from None
        for ids in rows:
            if not ids:
                raise bad_request("the prompt is empty (and the tokenizer has no bos token)", "prompt")
            if any(not 0 <= t < vocab for t in ids):
                raise bad_request(f"token ids must be in [0, {vocab})", "prompt")
        return rows

    def _max_tokens(self, prompt_len: int, asked: int | None) -> int:
        context = self.artifact.context
        if asked is not None and asked > self.max_tokens:
            raise bad_request(f"max_tokens {asked} is more than this server allows ({self.max_tokens}; "
                              "torchgraft serve --max-tokens)", "max_tokens")
        want = asked if asked is not None else min(self.max_tokens, context - prompt_len)
        if prompt_len + max(want, 1) > context:
            want = max(want, 1)
            raise bad_request(f"This model's maximum context length is {context} tokens. However, you "
                              f"requested {prompt_len + want} tokens ({prompt_len} in the prompt, {want} in "
                              "the completion). Please reduce the prompt or max_tokens.", "messages",
                              "context_length_exceeded")
        return want


def check_model(asked: str, served: str) -> None:
    if asked != served:
        raise bad_request(f"the model {asked!r} does not exist; this server serves {served!r} "
                          "(GET /v1/models)", "model", "model_not_found")


def _sink(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int) -> Callable[[Any], None]:
    """A thread-safe callback that puts (index, event) on the job's queue."""
    def put(event: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (index, event))
        except RuntimeError:  # the loop is closed (shutdown): nobody is listening
            pass
    return put


async def run_job(job: Job, disconnected: Callable[[], Awaitable[bool]]) -> dict[str, Any]:
    """The job's whole response, watching for the client leaving meanwhile (then a 499 nobody
    reads); however it ends, unfinished sequences are cancelled and their slots freed."""
    async def watch() -> None:
        while not await disconnected():
            await asyncio.sleep(0.2)

    work = asyncio.ensure_future(job.collect())
    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result()
        raise APIError(499, "the client closed the request", "cancelled", code="client_closed")
    finally:
        job.cancel()
        for t in (work, watcher):
            t.cancel()


async def stream_job(job: Job) -> AsyncIterator[str]:
    """The job's server-sent events; when the client leaves, the response stops iterating and the
    sequences are cancelled."""
    try:
        async for line in job.sse():
            yield line
    finally:
        job.cancel()
