"""Continuous batching: a background thread that keeps every slot of a `SlotDecoder` busy.

Each iteration of the loop
1. drops cancelled sequences (client gone, timeout) and frees their slots;
2. admits waiting sequences into free slots (first come, first served), so nobody waits for
   another request to finish;
3. prefills at most `prefill_chunk` prompt tokens in total (a long prompt is split over several
   iterations), so running sequences are held up by one bounded chunk at most; a sequence whose
   prompt is complete samples its first token from the prefill's logits and joins decoding;
4. runs one decode step for all decoding rows and hands each its next token; finished sequences
   leave their slot at once.
Requests only touch `submit` / `cancel` (thread-safe); the waiting queue is bounded (`QueueFull`
becomes a 429). An exception inside a step fails the sequences involved with a 500 and the loop
goes on with fresh slots.
"""
from __future__ import annotations

import logging
import threading
from collections import deque

import torch
from torch import nn

from torchgraft.serve.decoder import SlotDecoder
from torchgraft.serve.errors import APIError
from torchgraft.serve.sequence import Sequence

log = logging.getLogger("torchgraft.serve")


class Scheduler:
    """Owns the model's decoding state; all model calls happen on its thread."""

    def __init__(self, model: nn.Module, decoder: SlotDecoder, max_queue: int = 64, prefill_chunk: int = 128):
        self.model, self.decoder = model, decoder
        self.max_queue, self.prefill_chunk = max_queue, prefill_chunk
        self._waiting: deque[Sequence] = deque()
        self._prefilling: list[Sequence] = []
        self._running: list[Sequence] = []
        self._free = list(range(decoder.n_slots))  # lowest slot first: busy rows stay at the front
        self._tokens = torch.zeros(decoder.n_slots, dtype=torch.long, device=decoder.device)
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="torchgraft-serve-scheduler", daemon=True)
        self.steps = 0  # decode steps run

    # ---- the request side (any thread)
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Fail whatever is left and end the thread."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue the choices of one request (all or none); 429 when the queue is full."""
        with self._cond:
            if self._stop:
                raise APIError(503, "the server is shutting down", "server_error")
            if len(self._waiting) + len(seqs) > self.max_queue:
                raise APIError(429, f"the server is busy ({len(self._waiting)} requests waiting); retry later",
                               "rate_limit_error", code="queue_full")
            for s in seqs:
                s.make_generator(self.decoder.device)
                self._waiting.append(s)
            self._cond.notify()

    def cancel(self, seqs: list[Sequence]) -> None:
        """Stop these choices; their slots are freed at the next iteration."""
        with self._cond:
            for s in seqs:
                s.cancelled = True
            self._cond.notify()

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"slots_total": self.decoder.n_slots, "slots_free": len(self._free),
                    "waiting": len(self._waiting), "running": len(self._running) + len(self._prefilling)}

    # ---- the loop (scheduler thread)
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stop and not (self._waiting or self._prefilling or self._running):
                        self._cond.wait()
                    if self._stop:
                        break
                    self._drop_cancelled()
                    self._admit()
                try:
                    self._prefill()
                    self._decode()
                except Exception:  # a bug or out of memory: fail what was running, keep serving
                    log.exception("decode step failed")
                    self._fail_all_busy(APIError(500, "internal error while generating", "server_error"))
            self._fail_all_busy(APIError(503, "the server is shutting down", "server_error"))
            with self._cond:
                for s in self._waiting:
                    s.fail(APIError(503, "the server is shutting down", "server_error"))
                self._waiting.clear()

    def _drop_cancelled(self) -> None:
        for s in [s for s in self._waiting if s.cancelled]:
            self._waiting.remove(s)
        for group in (self._prefilling, self._running):
            for s in [s for s in group if s.cancelled]:
                group.remove(s)
                self._release(s)

    def _admit(self) -> None:
        while self._free and self._waiting:
            s = self._waiting.popleft()
            s.slot = self._free.pop(0)
            self.decoder.release(s.slot)
            self._prefilling.append(s)

    def _release(self, s: Sequence) -> None:
        if s.slot is not None:
            self.decoder.release(s.slot)
            with self._cond:
                self._free.append(s.slot)
                self._free.sort()
            s.slot = None

    def _prefill(self) -> None:
        budget = self.prefill_chunk
        for s in list(self._prefilling):
            if budget <= 0:
                break
            n = min(budget, len(s.prompt) - s.prefilled)
            logits = self.decoder.prefill(self.model, s.slot, s.prompt[s.prefilled:s.prefilled + n], s.prefilled)
            s.prefilled += n
            budget -= n
            if s.prefilled < len(s.prompt):
                continue
            self._prefilling.remove(s)
            token = s.sample(logits, int(logits.argmax()))
            if s.accept(token):
                self._release(s)
            else:
                self.decoder.activate(s.slot, len(s.prompt))
                self._tokens[s.slot] = token
                self._running.append(s)

    def _decode(self) -> None:
        if not self._running:
            return
        busy = 1 + max(s.slot for s in self._running + self._prefilling)
        logits = self.decoder.step(self.model, self._tokens, busy)  # (b, V)
        greedy = logits.argmax(-1).tolist()
        self.steps += 1
        for s in list(self._running):
            token = s.sample(logits[s.slot], greedy[s.slot])
            if s.accept(token):
                self._running.remove(s)
                self._release(s)
            else:
                self._tokens[s.slot] = token

    def _fail_all_busy(self, error: APIError) -> None:
        for group in (self._prefilling, self._running):
            for s in list(group):
                s.fail(error)
                self._release(s)
            group.clear()
