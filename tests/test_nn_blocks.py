"""Block-level tests for torchgraft.nn."""
import math

import pytest
import torch
import torch.nn.functional as F

from torchgraft.nn import (
    MLP,
    Attention,
    BasicBlock,
    GatedMLP,
    KVCache,
    LayerNorm,
    PatchEmbed,
    PostNormBlock,
    PreNormBlock,
    RMSNorm,
    RotaryEmbedding,
    TokenPositionEmbedding,
    apply_rope,
    make_attention_mask,
    repeat_kv,
)
from torchgraft.testing import assert_close_computed, tolerance
from torchgraft.nn.attention import reference_attention


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numeric]  # float comparisons: re-run under a forced CPU capability (docs/testing.md)



def _qkv(attn, x):
    b, t, _ = x.shape
    q = attn.q_proj(x).view(b, t, attn.n_head, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, attn.n_kv_head, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(b, t, attn.n_kv_head, attn.head_dim).transpose(1, 2)
    return q, k, v


def _merge(attn, y):
    b, h, t, d = y.shape
    return attn.o_proj(y.transpose(1, 2).reshape(b, t, h * d))


@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_reference(causal):
    attn = Attention(32, 4, causal=causal)
    x = torch.randn(2, 7, 32)
    q, k, v = _qkv(attn, x)
    mask = torch.ones(7, 7, dtype=torch.bool).tril() if causal else None
    ref = _merge(attn, reference_attention(q, k, v, mask))
    assert_close_computed(attn(x), ref, _attn_tol(32, 7))


def test_causal_mask_blocks_future():
    attn = Attention(16, 2, causal=True)
    x = torch.randn(1, 6, 16)
    y = attn(x)
    x2 = x.clone()
    x2[:, 4:] = torch.randn(1, 2, 16)  # change the future
    assert torch.equal(attn(x2)[:, :4], y[:, :4])  # same shapes, same kernels; masked keys add exact zeros
    assert not torch.allclose(attn(x2)[:, 4:], y[:, 4:])


@pytest.mark.parametrize("causal", [True, False])
def test_padding_mask_ignores_pad_tokens(causal):
    attn = Attention(16, 2, causal=causal)
    x = torch.randn(2, 6, 16)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    y = attn(x, attention_mask=mask)
    x2 = x.clone()
    x2[0, 4:] = 100.0  # garbage in the padding
    y2 = attn(x2, attention_mask=mask)
    assert torch.equal(y2[0, :4], y[0, :4])  # garbage only where the mask gives exact zeros
    assert_close_computed(attn(x[:1, :4])[0], y[0, :4], _attn_tol(16, 6))  # same as the unpadded sequence
    assert torch.isfinite(y).all()


def test_left_padding_rows_stay_finite():
    attn = Attention(16, 2, causal=True)
    x = torch.randn(1, 5, 16)
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    y = attn(x, attention_mask=mask)
    assert torch.isfinite(y).all()
    # real tokens match the unpadded run (no RoPE: positions don't matter)
    assert_close_computed(attn(x[:, 2:]), y[:, 2:], _attn_tol(16, 5))


def test_make_attention_mask_shapes():
    m, causal = make_attention_mask(None, 5, 5, True)
    assert m is None and causal
    m, causal = make_attention_mask(None, 1, 9, True)
    assert m is None and not causal
    m, _ = make_attention_mask(None, 3, 8, True)
    assert m.shape == (1, 1, 3, 8)
    assert m[0, 0, 0].tolist() == [True] * 6 + [False] * 2
    with pytest.raises(ValueError, match="attention_mask must be"):
        make_attention_mask(torch.ones(2, 4), 4, 6, True)


@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_gqa_equals_mha_with_repeated_kv_heads(n_kv_head):
    torch.manual_seed(0)
    n_head, hd, dim = 4, 8, 32
    gqa = Attention(dim, n_head, n_kv_head=n_kv_head, bias=False)
    mha = Attention(dim, n_head, n_kv_head=n_head, bias=False)
    rep = n_head // n_kv_head
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            w = getattr(gqa, name).weight.view(n_kv_head, hd, dim)
            getattr(mha, name).weight.copy_(w.repeat_interleave(rep, dim=0).reshape(n_head * hd, dim))
    x = torch.randn(2, 5, dim)
    assert_close_computed(gqa(x), mha(x), _attn_tol(dim, 5))
    assert gqa.k_proj.weight.shape == (n_kv_head * hd, dim)


def test_repeat_kv_layout():
    x = torch.arange(2).view(1, 2, 1, 1).float()
    assert repeat_kv(x, 3).flatten().tolist() == [0, 0, 0, 1, 1, 1]


def _rope_reference(x, pos, base):
    """Hand-written rotate-half RoPE: pair (i, i + d/2) rotated by pos * base^(-2i/d)."""
    d = x.shape[-1]
    out = x.clone()
    for t in range(x.shape[-2]):
        for i in range(d // 2):
            theta = pos[t] * base ** (-2 * i / d)
            a, b = x[..., t, i], x[..., t, i + d // 2]
            out[..., t, i] = a * math.cos(theta) - b * math.sin(theta)
            out[..., t, i + d // 2] = a * math.sin(theta) + b * math.cos(theta)
    return out


# an attention layer: input projections, scores, weighted sum, output projection (depth 3 sums)
def _attn_tol(dim, t):
    return tolerance(reduction=max(dim, t), depth=3)


# cos/sin of the same fp32 angle by two code paths (libm / SLEEF, vectorised or not): each within 1 ulp
ULP2 = tolerance(reduction=1, depth=2)


@pytest.mark.parametrize("base", [10000.0, 500000.0])
def test_rope_matches_hand_written_reference(base):
    rope = RotaryEmbedding(8, base)
    x = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    pos = torch.tensor([0, 1, 2, 7, 100])
    cos, sin = rope(pos[None])
    y = apply_rope(x, cos.double(), sin.double())
    # the fp32 angle pos * theta is off by up to pos * eps radians; the reference is exact fp64
    assert_close_computed(y, _rope_reference(x, pos.tolist(), base), tolerance(reduction=int(pos.max()), depth=2))


def test_rope_relative_property_and_meta():
    rope = RotaryEmbedding(16, 10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq, pk):
        cq, sq = rope(torch.tensor([[pq]]))
        ck, sk = rope(torch.tensor([[pk]]))
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    assert_close_computed(score(5, 3), score(12, 10), tolerance(reduction=16, depth=2), scale=float(q.abs().max() * k.abs().max()) * 16)
    assert "inv_freq" not in rope.state_dict()
    m = RotaryEmbedding(16, 10000.0, device="meta")
    m.to_empty(device="cpu")
    m.reset_parameters()
    assert torch.equal(m.inv_freq, rope.inv_freq)  # the same computation
    assert rope.to(torch.bfloat16).inv_freq.dtype == torch.float32


def test_rope_matches_transformers_llama_rotary():
    tr = pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama as ml

    cfg = tr.LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=500000.0,
                         max_position_embeddings=128)
    hf = ml.LlamaRotaryEmbedding(config=cfg)
    x = torch.randn(2, 4, 6, 16)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5], [3, 4, 5, 6, 7, 8]])
    hcos, hsin = hf(x, pos)
    cos, sin = RotaryEmbedding(16, 500000.0)(pos)
    assert_close_computed(cos, hcos, ULP2)
    assert_close_computed(sin, hsin, ULP2)
    q = torch.randn(2, 4, 6, 16)
    hq, _ = ml.apply_rotary_pos_emb(q, q, hcos, hsin)
    assert_close_computed(apply_rope(q, cos, sin), hq, tolerance(reduction=2, depth=2))


def test_llama3_rope_scaling_matches_transformers():
    tr = pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama as ml

    scaling = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
    try:
        cfg = tr.LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_theta=500000.0,
                             rope_scaling=scaling, max_position_embeddings=131072)
        hf = ml.LlamaRotaryEmbedding(config=cfg)
    except Exception as e:  # pragma: no cover - depends on the installed transformers
        pytest.skip(f"transformers llama3 rope unavailable: {e}")
    mine = RotaryEmbedding(64, 500000.0, scaling=dict(type="llama3", factor=32.0, low_freq_factor=1.0,
                                                       high_freq_factor=4.0,
                                                       original_max_position_embeddings=8192))
    assert_close_computed(mine.inv_freq, hf.inv_freq.float(), tolerance(reduction=1, depth=5))  # ~5 elementwise steps
    pos = torch.tensor([[0, 5, 1000, 20000]])
    hcos, hsin = hf(torch.randn(1, 4, 64), pos)
    cos, sin = mine(pos)
    assert_close_computed(cos, hcos, ULP2)
    assert_close_computed(sin, hsin, ULP2)


@pytest.mark.parametrize("n_kv_head,rope", [(4, None), (2, 10000.0), (1, 500000.0)])
def test_kv_cache_equals_no_cache(n_kv_head, rope):
    rotary = RotaryEmbedding(8, rope) if rope is not None else None
    attn = Attention(32, 4, n_kv_head=n_kv_head, rotary=rotary, bias=False).eval()
    x = torch.randn(2, 9, 32)
    full = attn(x)
    cache = KVCache(1, 2, 16, n_kv_head, 8)
    outs = [attn(x[:, :4], kv_cache=cache.layer(0))]
    cache.advance(4)
    for t in range(4, 9):
        outs.append(attn(x[:, t:t + 1], kv_cache=cache.layer(0)))
        cache.advance(1)
    assert_close_computed(torch.cat(outs, 1), full, _attn_tol(32, 16))
    assert cache.pos == 9 and len(cache) == 9
    with pytest.raises(ValueError, match="overflow"):
        attn(torch.randn(2, 8, 32), kv_cache=cache.layer(0))


def test_kv_cache_chunked_prefill_with_padding():
    attn = Attention(32, 4, n_kv_head=2, rotary=RotaryEmbedding(8, 10000.0)).eval()
    x = torch.randn(2, 10, 32)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    full = attn(x, attention_mask=mask, position_ids=pos)
    cache = KVCache(1, 2, 10, 2, 8)
    outs = []
    for a, b in [(0, 4), (4, 7), (7, 8), (8, 10)]:
        outs.append(attn(x[:, a:b], attention_mask=mask[:, :b], position_ids=pos[:, a:b], kv_cache=cache.layer(0)))
        cache.advance(b - a)
    assert_close_computed(torch.cat(outs, 1), full, _attn_tol(32, 10))


def test_kv_cache_crop_reset_reorder():
    cache = KVCache(2, 3, 8, 1, 4)
    cache.advance(5)
    cache.crop(2)
    assert cache.pos == 2
    cache.k[0][:, 0, 0, 0] = torch.tensor([0.0, 1.0, 2.0])
    cache.reorder(torch.tensor([2, 2, 0]))
    assert cache.k[0][:, 0, 0, 0].tolist() == [2.0, 2.0, 0.0]
    cache.reset()
    assert cache.pos == 0 and cache.nbytes() == 2 * 2 * 3 * 8 * 4 * 4


def test_rmsnorm_and_layernorm():
    n = RMSNorm(8, eps=1e-6).to(torch.bfloat16)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    ref = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert_close_computed(n(x), ref, tolerance(reduction=8, depth=1, dtype=torch.bfloat16))
    assert n(x).dtype == torch.bfloat16
    ln = LayerNorm(8, eps=1e-12, bias=False)
    assert ln.bias is None and ln.eps == 1e-12


def test_mlps():
    x = torch.randn(2, 3, 8)
    m = MLP(8, 32, activation="gelu_tanh")
    assert torch.equal(m(x), m.fc_out(F.gelu(m.fc_in(x), approximate="tanh")))  # the same ops in eager
    m = MLP(8, 32, activation="gelu")
    assert torch.equal(m(x), m.fc_out(F.gelu(m.fc_in(x))))
    g = GatedMLP(8, 24)
    assert torch.equal(g(x), g.down_proj(F.silu(g.gate_proj(x)) * g.up_proj(x)))
    assert g.gate_proj.bias is None
    with pytest.raises(ValueError, match="unknown activation"):
        MLP(8, 8, activation="nope")


def test_pre_and_post_norm_blocks():
    x = torch.randn(2, 5, 16)
    pre = PreNormBlock(Attention(16, 2), MLP(16, 32), LayerNorm(16), LayerNorm(16))
    h = x + pre.attn(pre.attn_norm(x))
    assert torch.equal(pre(x), h + pre.mlp(pre.mlp_norm(h)))  # the same ops
    post = PostNormBlock(Attention(16, 2, causal=False), MLP(16, 32), LayerNorm(16), LayerNorm(16))
    h = post.attn_norm(x + post.attn(x))
    assert torch.equal(post(x), post.mlp_norm(h + post.mlp(h)))
    assert [k.split(".")[0] for k in pre.state_dict()][:1] == ["attn_norm"]


def test_embeddings_and_patches():
    e = TokenPositionEmbedding(50, 8, max_positions=16, type_vocab_size=2, norm=LayerNorm(8))
    ids = torch.randint(0, 50, (2, 5))
    out = e(ids)
    ref = e.norm(e.tok_emb(ids) + e.pos_emb(torch.arange(5)) + e.type_emb(torch.zeros_like(ids)))
    assert torch.equal(out, ref)  # the same ops
    p = PatchEmbed(32, 8, 1, 24)
    assert p(torch.randn(2, 1, 32, 32)).shape == (2, 16, 24) and p.num_patches == 16


def test_basic_block_shapes():
    from torchgraft.nn.conv import downsample

    b = BasicBlock(8, 16, stride=2, downsample=downsample(8, 16, 2))
    assert b(torch.randn(2, 8, 16, 16)).shape == (2, 16, 8, 8)
    assert "downsample.0.weight" in b.state_dict() and "downsample.1.running_mean" in b.state_dict()
