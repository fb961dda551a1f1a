"""Static KV cache and the compilable decode step: same logits as the dynamic cache, compiled ==
eager greedy tokens, eager fallback when compiling is unavailable, reuse across calls."""
import pytest
import torch

import torchgraft
from torchgraft.generation import StaticDecoder, generate, left_pad, static_decoder
from torchgraft.nn.kv_cache import StaticKVCache, static_attention_mask
from torchgraft.testing import assert_close_computed, transformer_tol

pytestmark = pytest.mark.numeric  # float comparisons: re-run under a forced CPU capability (docs/testing.md)

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 101, 102, 7]]


def _model(name):
    torch.manual_seed(0)
    return torchgraft.build(name, init_std=0.3).eval()


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
@torch.inference_mode()
def test_static_cache_logits_equal_dynamic_cache_logits(name):
    model = _model(name)
    ids, mask = left_pad(PROMPTS, 0)
    b, t = ids.shape
    n = 12
    # dynamic: KVCache growing one position per step
    cache = model.make_kv_cache(b, t + n)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    dyn = [model(ids, attention_mask=mask, position_ids=pos, kv_cache=cache)[:, -1]]
    # static: fixed-shape buffers, slot mask and positions as tensors
    dec = StaticDecoder(model, b, 64)
    stat = [dec.prefill(model, ids, mask)]
    win = mask
    for _ in range(n):
        tok = dyn[-1].argmax(-1)
        win = torch.cat([win, torch.ones_like(tok)[:, None]], dim=1)
        new_pos = win.sum(-1, keepdim=True) - 1
        dyn.append(model(tok[:, None], attention_mask=win, position_ids=new_pos, kv_cache=cache)[:, -1])
        stat.append(dec.step(model, tok))
    for a, s in zip(dyn, stat):
        # the static cache sums over its 64 slots (masked), the dynamic one over t + n: other kernels
        assert_close_computed(s, a, transformer_tol(model.config, dec.cache.max_seq_len))
    assert int(dec.cache.index) == t + n and cache.pos == t + n
    assert len({tuple(x.argmax(-1).tolist()) for x in dyn}) > 3  # the rows really change


def test_static_attention_mask_hides_padding_and_empty_slots():
    slots = torch.tensor([[0, 1, 1, 0, 0]])  # left pad, two real tokens, two empty slots
    m = static_attention_mask(slots, 0, 3)[0, 0]
    assert m.tolist() == [[True, False, False, False, False],  # a pad query: plain causal fallback
                          [False, True, False, False, False],
                          [False, True, True, False, False]]


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_static_generate_equals_dynamic_and_uncached_with_context_shift(name):
    model = _model(name)
    n = model.config.block_size + 10  # one context shift: the static cache is re-filled
    static = generate(model, PROMPTS, max_new_tokens=n)
    assert static.tokens == generate(model, PROMPTS, max_new_tokens=n, cache="dynamic").tokens
    assert static.tokens == generate(model, PROMPTS, max_new_tokens=n, use_cache=False).tokens


def test_decoder_is_reused_across_calls_and_rebuilt_for_a_new_shape():
    model = _model("gpt-tiny")
    a = generate(model, PROMPTS, max_new_tokens=5)
    dec = static_decoder(model, 3, 64)
    b = generate(model, PROMPTS, max_new_tokens=5)
    assert a.tokens == b.tokens and static_decoder(model, 3, 64) is dec
    assert isinstance(dec.cache, StaticKVCache)
    assert static_decoder(model, 1, 64) is not dec


def test_compile_unavailable_falls_back_to_eager(monkeypatch):
    model = _model("gpt-tiny")
    eager = generate(model, PROMPTS, max_new_tokens=8)

    def broken_compile(*args, **kwargs):
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(UserWarning, match="decoding eagerly"):
        out = generate(model, PROMPTS, max_new_tokens=8, compile=True)
    assert out.tokens == eager.tokens


def test_compile_failure_at_first_step_falls_back_to_eager(monkeypatch):
    model = _model("llama-tiny")
    eager = generate(model, PROMPTS, max_new_tokens=8)

    class BackendCompilerFailed(Exception):
        pass

    BackendCompilerFailed.__module__ = "torch._dynamo.exc"

    def compile_that_fails_on_call(fn, **kwargs):
        def run(*args):
            raise BackendCompilerFailed("no C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", compile_that_fails_on_call)
    with pytest.warns(UserWarning, match="decoding eagerly"):
        out = generate(model, PROMPTS, max_new_tokens=8, compile=True)
    assert out.tokens == eager.tokens


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_compiled_decode_gives_the_eager_greedy_tokens(name):
    model = _model(name)
    eager = generate(model, PROMPTS, max_new_tokens=20)
    compiled = generate(model, PROMPTS, max_new_tokens=20, compile=True)
    dec = static_decoder(model, 3, 64, compile=True)
    assert dec.compiled  # really compiled, not the eager fallback
    assert compiled.tokens == eager.tokens
    assert generate(model, PROMPTS, max_new_tokens=20, compile=True).tokens == eager.tokens  # reused graph
