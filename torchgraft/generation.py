"""Autoregressive generation for decoder LMs with a KV cache.

Works with any model following the decoder-LM contract (docs/architecture.md):
`forward(input_ids (B, T), attention_mask=None, position_ids=None, kv_cache=None) -> logits (B, T, V)`
and `make_kv_cache(batch_size, max_seq_len)`.

- prefill: the whole (left-padded) prompt batch goes through the model once, filling the cache;
- decode: one token per step per row, attending over the cache.
Batched prompts are left-padded; the padding mask and `position_ids = cumsum(mask) - 1` make each
row behave exactly as if it were alone. `use_cache=False` recomputes the full sequence every step
(the reference the cached path must equal, token for token, under greedy decoding).

Decoding: `temperature=0` is greedy; otherwise logits / temperature, then top-k, then top-p
(nucleus) filtering, then a multinomial draw. `repetition_penalty` (CTRL / HF rule) divides positive
and multiplies negative logits of tokens already in the row. Generation of a row ends at
`eos_token_id`, at a `stop` string (needs a tokenizer; the returned text ends before it) or after
`max_new_tokens`.

Past the model's `block_size` the context shifts: when the window is full, its last
`block_size // 2` tokens are re-encoded from position 0 and decoding goes on (with or without the
cache alike, so the two stay equal), like nanoGPT's cropping but without re-encoding every step.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ContextManager

import torch
from torch import nn

from torchgraft.cpu_threads import DecodeThreads
from torchgraft.errors import ConfigError
from torchgraft.nn.kv_cache import StaticKVCache, static_attention_mask

if TYPE_CHECKING:
    from torchgraft.tools.converters import ConversionReport

_DEFAULT = object()


@dataclass
class GenerationResult:
    """What `generate` returns, one entry per prompt (in input order).

    tokens: generated ids per row (prompt excluded; eos excluded; a stop string's tokens included);
    texts: decoded completions (only with a tokenizer; cut before a stop string);
    finish_reasons: "eos", "stop" or "length"; prompt_lengths: prompt tokens per row (no padding).
    """
    tokens: list[list[int]]
    texts: list[str] | None
    finish_reasons: list[str]
    prompt_lengths: list[int]
    steps: int = 0  # decode steps run (the longest row)
    extras: dict[str, Any] = field(default_factory=dict)


# ---- logits processing ----------------------------------------------------------------------------
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty: logits (B, V) of token ids in `seen` (B, S) are divided by `penalty` when
    positive and multiplied when negative. Duplicates in `seen` are harmless."""
    if penalty == 1.0:
        return logits
    score = logits.gather(1, seen)  # (B, S)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, seen, score)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties at the k-th value kept), the rest -inf."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches p
    (always at least the most likely one)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
    drop_sorted = mass_before >= p
    drop_sorted[:, 0] = False
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row from logits (B, V) -> (B,)."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# ---- inputs ---------------------------------------------------------------------------------------
def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into input_ids (B, T) and attention_mask (B, T) (1 = real token)."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ConfigError("every prompt needs at least one token (give a non-empty prompt or a "
                          "tokenizer with a bos token)")
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, t - len(r):] = 1
    return ids, mask


def _prepare_inputs(prompts: Any, tokenizer: Any, attention_mask: torch.Tensor | None, add_bos: bool | None,
                    pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(prompts, torch.Tensor):
        ids = prompts if prompts.dim() == 2 else prompts[None]
        if attention_mask is None:
            mask = torch.ones_like(ids)
        else:
            mask = attention_mask if attention_mask.dim() == 2 else attention_mask[None]
            if mask.shape != ids.shape:
                raise ConfigError(f"attention_mask {tuple(mask.shape)} must match input_ids {tuple(ids.shape)}")
            if (mask[:, -1] == 0).any():
                raise ConfigError("batched prompts must be left-padded (the last position of every "
                                  "row must be a real token)")
        return ids.long(), mask.long()
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts
                                    and all(isinstance(p, str) for p in prompts)):
        if tokenizer is None:
            raise ConfigError("text prompts need a tokenizer (generate(model, prompts, tokenizer))")
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        rows = []
        for text in texts:
            bos = add_bos if add_bos is not None else (text == "")
            if bos and tokenizer.bos_id is None:
                raise ConfigError("an empty prompt needs a tokenizer with a bos token; give some text")
            rows.append(tokenizer.encode(text, add_bos=bos))
        return left_pad(rows, pad_id)
    if isinstance(prompts, Sequence) and prompts and all(isinstance(p, Sequence) for p in prompts):
        return left_pad(prompts, pad_id)
    if isinstance(prompts, Sequence) and prompts and all(isinstance(p, int) for p in prompts):
        return left_pad([prompts], pad_id)
    raise ConfigError("prompts must be a string, a list of strings, a list of token-id lists or an "
                      "input_ids tensor (B, T)")


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def _max_positions(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "block_size", None)


def cap_new_tokens(model: nn.Module, tokenizer: Any, prompts: list[str], n: int,
                   add_bos: bool | None = None) -> tuple[int, str | None]:
    """(new-token budget, note): `n` lowered to what fits in the model's context after the longest
    prompt, with a note saying so. None of torchgraft's models has a sliding window, so tokens past
    `block_size` would come from a shifted, truncated context (and `-n 10**9` would never end)."""
    block = _max_positions(model)
    if not isinstance(block, int):
        return n, None
    def length(p: str) -> int:  # an empty prompt gets bos unless add_bos says otherwise (as generate does)
        bos = (not p) if add_bos is None else add_bos
        return len(tokenizer.encode(p)) + int(bos and tokenizer.bos_id is not None)

    longest = max(length(p) for p in prompts)
    room = max(1, block - longest)
    if n <= room:
        return n, None
    return room, (f"-n {n} capped to {room}: the model's context is {block} tokens and the longest "
                  f"prompt takes {longest} (this model has no sliding window)")


def last_logits(model: nn.Module, ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Logits of the last position (B, V). Models exposing `forward_features` + `logits` (the zoo's
    decoder LMs) skip the vocabulary projection of the other prompt positions."""
    if hasattr(model, "forward_features") and hasattr(model, "logits"):
        return model.logits(model.forward_features(ids, **kwargs)[:, -1])
    return model(ids, **kwargs)[:, -1]


# ---- static-cache decoding -----------------------------------------------------------------------
class StaticDecoder:
    """Fixed-shape decoding state of one model for `batch_size` rows and `max_seq_len` slots.

    Everything the decode step reads or writes is a preallocated tensor: the `StaticKVCache`
    buffers and its write slot `cache.index` (1,), `slot_mask` (B, L) (1 = a real token in that
    slot) and `positions` (B, 1) (the next token's position in its own row). `step(tok)` writes
    the new token's keys/values, advances the state in place and returns logits (B, V): one graph
    with the same shapes every step, so `torch.compile` (and CUDA graphs, mode "reduce-overhead")
    compile it once. `prefill` runs the prompt batch through the model in one eager pass.
    """

    def __init__(self, model: nn.Module, batch_size: int, max_seq_len: int, compile: bool = False,
                 mode: str | None = None):
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.cache = StaticKVCache.from_cache(model.make_kv_cache(batch_size, max_seq_len))
        self.conversions = apply_decode_converters(model, self.cache.device)
        device = self.cache.device
        # CPU: each step runs on the cores other processes leave free (torchgraft/cpu_threads.py)
        self.threads: ContextManager = DecodeThreads() if device.type == "cpu" else contextlib.nullcontext()
        self.slot_mask = torch.zeros(batch_size, max_seq_len, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self._decode_index = self.cache.index
        self.compile_requested = compile
        self.compiled = False
        self._step: Callable[..., torch.Tensor] = _decode_step
        if compile:
            self._step = self._compile(mode)

    def _compile(self, mode: str | None) -> Callable[..., torch.Tensor]:
        """`torch.compile(_decode_step)` with fixed shapes; buffers get static addresses (CUDA graphs)."""
        if mode is None:
            mode = "reduce-overhead" if self.cache.device.type == "cuda" else "default"
        for t in [*self.cache.k, *self.cache.v, self.slot_mask, self.positions, self._decode_index]:
            torch._dynamo.mark_static_address(t)
        # on CPU, kernels that read torch's thread count when they run (not when compiled), so
        # that `DecodeThreads` can lower it under load
        options = {"cpp.dynamic_threads": True} if self.cache.device.type == "cpu" and mode == "default" else None
        try:
            step = torch.compile(_decode_step, fullgraph=True, dynamic=False,
                                 **({"options": options} if options else {"mode": mode}))
        except RuntimeError as e:  # e.g. dynamo does not support this Python
            warnings.warn(f"torch.compile is unavailable ({e}); decoding eagerly", stacklevel=3)
            return _decode_step
        self.compiled = True
        return step

    def prefill(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Write the (left-padded) prompt batch ids (B, T) into slots [0, T); logits of its last
        position (B, V). Also used to re-encode the window after a context shift."""
        t = ids.shape[1]
        self.slot_mask.zero_()
        self.slot_mask[:, :t] = mask.bool()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T), 0 at each row's first real token
        self.cache.index = torch.arange(t, device=ids.device)
        try:
            with self.threads:
                logits = last_logits(model, ids, attention_mask=static_attention_mask(self.slot_mask, 0, t),
                                      position_ids=positions, kv_cache=self.cache)
        finally:
            self.cache.index = self._decode_index
        self.positions.copy_(mask.sum(-1, keepdim=True))
        self._decode_index.fill_(t)
        return logits

    def step(self, model: nn.Module, tok: torch.Tensor) -> torch.Tensor:
        """Decode one token per row, tok (B,) -> logits (B, V) of the next one."""
        with self.threads:
            if self.compiled:
                try:
                    return self._step(model, self, tok)
                except Exception as e:  # no compiler toolchain, an unsupported op...: decode eagerly
                    if not compile_failure(e):
                        raise
                    warnings.warn(f"torch.compile of the decode step failed ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}); decoding eagerly", stacklevel=3)
                    self.compiled, self._step = False, _decode_step
            return self._step(model, self, tok)


def apply_decode_converters(model: nn.Module, device: torch.device) -> list[ConversionReport]:
    """Swap the model's layers, in place, for the kernel rewrites that decode faster on `device`
    (`torchgraft.tools.cpu_kernels`: equal results up to float rounding, same state dict); their
    `ConversionReport`s. Already converted layers are left as they are."""
    from torchgraft.tools.cpu_kernels import kernel_converters  # the tools package: only when decoding
    from torchgraft.tools.converters import apply_converters

    return apply_converters(model, kernel_converters(device))


def compile_failure(e: Exception) -> bool:
    """True for errors raised by the compiler stack itself (not by the model's own code)."""
    mod = type(e).__module__ or ""
    return mod.startswith(("torch._dynamo", "torch._inductor", "torch.fx"))


def _decode_step(model: nn.Module, state: StaticDecoder, tok: torch.Tensor) -> torch.Tensor:
    """One token per row against the static cache; advances `state` in place; logits (B, V)."""
    cache = state.cache
    state.slot_mask.index_fill_(1, cache.index, True)
    logits = model(tok[:, None], attention_mask=state.slot_mask[:, None, None, :],  # (B, 1, 1, L)
                   position_ids=state.positions, kv_cache=cache)[:, -1]
    state.positions.add_(1)
    cache.index.add_(1)
    return logits


_DECODERS: "weakref.WeakKeyDictionary[nn.Module, StaticDecoder]" = weakref.WeakKeyDictionary()


def static_decoder(model: nn.Module, batch_size: int, max_seq_len: int, compile: bool = False) -> StaticDecoder:
    """The model's `StaticDecoder` for this shape, reused across calls (a compiled step is compiled
    once per model and shape; one decoder is kept per model, so a new shape frees the old buffers)."""
    dec = _DECODERS.get(model)
    device, dtype = _model_device_dtype(model)
    if (dec is None or (dec.batch_size, dec.max_seq_len) != (batch_size, max_seq_len)
            or dec.cache.device != device or dec.cache.dtype != dtype or dec.compile_requested != compile):
        _DECODERS.pop(model, None)  # free the old buffers first
        dec = StaticDecoder(model, batch_size, max_seq_len, compile=compile)
        _DECODERS[model] = dec
    return dec


def _cache_length(needed: int, window: int) -> int:
    """Static cache slots: `needed` rounded up to a multiple of 64 (so prompts of similar length
    share one compiled step), never more than the context window."""
    return min(window, -(-needed // 64) * 64)


# ---- the decoding loop ----------------------------------------------------------------------------
CACHES = ("static", "dynamic")


@torch.inference_mode()
def iter_tokens(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, repetition_penalty: float = 1.0, use_cache: bool = True,
                cache: str = "static", compile: bool = False,
                generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), for up to `max_new_tokens` steps.

    Low level: no stopping rules (the caller stops iterating); rows are independent, so a caller
    may ignore rows it considers finished. `input_ids` (B, T) left-padded with `attention_mask`.
    `cache`: "static" (preallocated fixed-shape cache, `StaticDecoder`; `compile=True` compiles its
    decode step) or "dynamic" (`KVCache` growing by one position per step, eager).
    """
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise ConfigError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty}")
    if cache not in CACHES:
        raise ConfigError(f"cache must be one of {', '.join(CACHES)}, got {cache!r}")
    if compile and not (use_cache and cache == "static"):
        raise ConfigError("compile=True compiles the static-cache decode step; use cache='static' with use_cache")
    device, _ = _model_device_dtype(model)
    ids = input_ids.to(device)
    b, t = ids.shape
    mask = (attention_mask if attention_mask is not None else torch.ones_like(ids)).to(device).long()
    limit = _max_positions(model)
    if limit is not None and t > limit:
        raise ConfigError(f"the prompt ({t} tokens) is longer than the model's block_size ({limit}); "
                          "shorten the prompt")
    if max_new_tokens == 0:
        return
    window = limit or t + max_new_tokens  # most positions the model attends over
    keep = max(1, window // 2)  # tokens kept when the context is full
    static = dynamic = None
    if use_cache and cache == "static":
        static = static_decoder(model, b, _cache_length(t + max_new_tokens, window), compile)
    elif use_cache:
        dynamic = model.make_kv_cache(b, min(t + max_new_tokens, window))
    penalize = repetition_penalty != 1.0
    seen = torch.where(mask.bool(), ids, ids[:, -1:]) if penalize else None  # pads -> a real token of the row
    track = static is None or t + max_new_tokens > window  # the window itself is needed
    seq, win_mask = ids, mask  # the current context window and its padding mask
    n_window = t  # its length

    def encode(seq: torch.Tensor, win_mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) after a full pass over the window (prefill, or every step without a cache)."""
        if static is not None:
            return static.prefill(model, seq, win_mask)
        padded = bool((win_mask == 0).any())
        # position of each token in its own row: 0 at the first real token
        positions = (win_mask.cumsum(-1) - 1).clamp(min=0) if padded else None  # (B, T)
        return last_logits(model, seq, attention_mask=win_mask if padded else None,
                            position_ids=positions, kv_cache=dynamic)

    logits = encode(seq, win_mask)  # prefill
    for step in range(max_new_tokens):
        if penalize:
            logits = apply_repetition_penalty(logits.float(), seen, repetition_penalty)
        tok = next_token(logits, temperature, top_k, top_p, generator)  # (B,)
        yield tok
        if step == max_new_tokens - 1:
            return
        if penalize:
            seen = torch.cat([seen, tok[:, None]], dim=1)
        n_window += 1
        if track:
            seq = torch.cat([seq, tok[:, None]], dim=1)
            win_mask = torch.cat([win_mask, torch.ones_like(tok)[:, None]], dim=1)
        if n_window > window:  # context full: keep the last `keep` tokens and re-encode them
            seq, win_mask, n_window = seq[:, -keep:], win_mask[:, -keep:], keep
            if dynamic is not None:
                dynamic.reset()
            logits = encode(seq, win_mask)
        elif static is not None:  # decode: one token against the fixed-shape cache
            logits = static.step(model, tok)
        elif dynamic is not None:  # decode against the growing cache
            padded = bool((win_mask == 0).any())
            new_pos = win_mask.sum(-1, keepdim=True) - 1  # (B, 1)
            logits = model(tok[:, None], attention_mask=win_mask if padded else None,
                           position_ids=new_pos if padded else None, kv_cache=dynamic)[:, -1]
        else:  # reference path: the whole window again
            logits = encode(seq, win_mask)


def _stop_index(text: str, stop: Sequence[str]) -> int:
    """Index of the earliest stop string in `text`, or -1."""
    hits = [i for s in stop if (i := text.find(s)) >= 0]
    return min(hits) if hits else -1


def stop_id_sequences(stop: Sequence[str], tokenizer: Any) -> list[list[int]]:
    """The token ids of each stop string that text matching cannot see: one holding a special token
    (`<|im_end|>`, `</s>`) vanishes from text decoded without special tokens, so it is matched on
    the generated ids instead (its ids as the tokenizer encodes it, special tokens included)."""
    seqs = []
    for s in stop:
        ids = tokenizer.encode(s)
        if ids and tokenizer.decode(ids) != s:
            seqs.append(ids)
    return seqs


def _ids_stop_at(ids: Sequence[int], seqs: Sequence[Sequence[int]]) -> int:
    """Start of a stop id sequence that `ids` ends with, or -1."""
    for seq in seqs:
        n = len(seq)
        if len(ids) >= n and list(ids[-n:]) == list(seq):
            return len(ids) - n
    return -1


def generate(model: nn.Module, prompts: Any, tokenizer: Any = None, *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float = 1.0, stop: Sequence[str] | str | None = None,
             eos_token_id: Any = _DEFAULT, attention_mask: torch.Tensor | None = None,
             add_bos: bool | None = None, use_cache: bool = True, cache: str = "static",
             compile: bool = False, seed: int | None = None,
             generator: torch.Generator | None = None,
             on_token: Callable[[int, int], None] | None = None) -> GenerationResult:
    """Generate continuations of `prompts`.

    `prompts`: a string or list of strings (with `tokenizer`), a list of token-id lists, or an
    input_ids tensor (B, T), left-padded with `attention_mask` if rows differ in length.
    `temperature=0` is greedy. `eos_token_id` defaults to the tokenizer's eos (None = never stop
    early). `add_bos`: prepend bos to text prompts (default: only to empty prompts).
    `cache`: "static" (fixed-shape preallocated KV cache, the default) or "dynamic";
    `compile=True` compiles the static-cache decode step (once per model and shape; CUDA graphs on
    GPU; falls back to eager with a warning when compiling is unavailable).
    `seed` / `generator`: reproducible sampling. `on_token(row, token_id)` is called for every
    new token of an unfinished row as it is produced (streaming; see also `stream`).
    """
    if isinstance(stop, str):
        stop = [stop]
    stop = [s for s in (stop or []) if s]
    if stop and tokenizer is None:
        raise ConfigError("stop strings need a tokenizer to decode the output")
    stop_ids = stop_id_sequences(stop, tokenizer) if stop else []
    if eos_token_id is _DEFAULT:
        eos_token_id = tokenizer.eos_id if tokenizer is not None else None
    pad_id = tokenizer.pad_id if tokenizer is not None else (eos_token_id if eos_token_id is not None else 0)
    ids, mask = _prepare_inputs(prompts, tokenizer, attention_mask, add_bos, pad_id)
    if generator is None and seed is not None:
        generator = torch.Generator(device=_model_device_dtype(model)[0]).manual_seed(seed)
    b = ids.shape[0]
    out: list[list[int]] = [[] for _ in range(b)]
    reasons = ["length"] * b
    texts: list[str] | None = [""] * b if tokenizer is not None else None
    done = [False] * b
    id_cut: list[int | None] = [None] * b  # where a stop id sequence starts in a row's tokens
    steps = 0
    for tok in iter_tokens(model, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                           use_cache=use_cache, cache=cache, compile=compile, generator=generator):
        steps += 1
        for row, t in enumerate(tok.tolist()):
            if done[row]:
                continue
            if eos_token_id is not None and t == eos_token_id:
                done[row], reasons[row] = True, "eos"
                continue
            out[row].append(t)
            if on_token is not None:
                on_token(row, t)
            if stop:
                at = _ids_stop_at(out[row], stop_ids)
                if at >= 0:
                    done[row], reasons[row], id_cut[row] = True, "stop", at
                elif _stop_index(tokenizer.decode(out[row]), stop) >= 0:
                    done[row], reasons[row] = True, "stop"
        if all(done):
            break
    if texts is not None:
        for row in range(b):
            text = tokenizer.decode(out[row] if id_cut[row] is None else out[row][:id_cut[row]])
            cut = _stop_index(text, stop) if stop else -1
            texts[row] = text[:cut] if cut >= 0 else text
    return GenerationResult(tokens=out, texts=texts, finish_reasons=reasons,
                            prompt_lengths=mask.sum(-1).tolist(), steps=steps)


class TextStream:
    """Incremental text of one generated row, with stop strings.

    `push(token) -> str` returns the text that became final with this token: pieces are held back
    while the decoded text ends in an incomplete UTF-8 sequence (byte-level BPE) or in the beginning
    of a stop string; once a stop string appears, `stopped` is True and the text ends before it.
    `finish()` returns what was held back. The pieces concatenate to `generate(...).texts[row]`.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] | str | None = None):
        if isinstance(stop, str):
            stop = [stop]
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.stop_ids = stop_id_sequences(self.stop, tokenizer) if self.stop else []
        self.tokens: list[int] = []
        self.emitted = 0  # characters handed out so far
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one generated token; the newly final text (may be empty)."""
        self.tokens.append(token)
        at = _ids_stop_at(self.tokens, self.stop_ids)  # a special-token stop string: cut at its ids
        text = self.tokenizer.decode(self.tokens if at < 0 else self.tokens[:at])
        cut = _stop_index(text, self.stop) if self.stop else -1
        if at >= 0 and cut < 0:
            cut = len(text)
        if cut >= 0:
            self.stopped = True
            piece = text[self.emitted:cut]
            self.emitted = max(self.emitted, cut)
            return piece
        safe = len(text.rstrip("\ufffd"))  # an incomplete multi-byte character: wait for its bytes
        hold = 0  # longest suffix that could still grow into a stop string
        for s in self.stop:
            hold = max([hold] + [k for k in range(1, min(len(s) - 1, safe) + 1)
                                 if text[:safe].endswith(s[:k])])
        safe -= hold
        if safe <= self.emitted:
            return ""
        piece, self.emitted = text[self.emitted:safe], safe
        return piece

    def finish(self) -> str:
        """The text still held back when generation ends without a stop string."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.tokens)
        piece, self.emitted = text[self.emitted:], max(self.emitted, len(text))
        return piece


def stream(model: nn.Module, prompt: str, tokenizer: Any, *, stop: Sequence[str] | str | None = None,
           **kwargs: Any) -> Iterator[str]:
    """Generate from one text prompt, yielding text pieces as soon as they are final (`TextStream`);
    the concatenated pieces equal `generate(...).texts[0]`. Takes the keyword arguments of `generate`.
    """
    text = TextStream(tokenizer, stop)
    eos = kwargs.pop("eos_token_id", _DEFAULT)
    eos = tokenizer.eos_id if eos is _DEFAULT else eos
    add_bos = kwargs.pop("add_bos", None)
    seed = kwargs.pop("seed", None)
    generator = kwargs.pop("generator", None)
    ids, mask = _prepare_inputs(prompt, tokenizer, None, add_bos, tokenizer.pad_id)
    if generator is None and seed is not None:
        generator = torch.Generator(device=_model_device_dtype(model)[0]).manual_seed(seed)
    for tok in iter_tokens(model, ids, mask, generator=generator, **kwargs):
        t = int(tok[0])
        if eos is not None and t == eos:
            break
        piece = text.push(t)
        if piece:
            yield piece
        if text.stopped:
            return
    piece = text.finish()
    if piece:
        yield piece
