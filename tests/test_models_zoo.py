"""Model zoo: published parameter counts, forward contracts, KV cache, toy training."""
import time

import pytest
import torch
import torch.nn.functional as F

import torchgraft
from torchgraft.testing import assert_close_computed, tolerance, transformer_tol

PUBLISHED = {
    "gpt2": 124_439_808,
    "llama2-7b": 6_738_415_616,
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "llama3.2-1b": 1_235_814_400,
    "bert-base": 109_482_240,
    "resnet18": 11_689_512,
    "vit-base": 86_567_656,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "bert-large": 335_141_888,
    "minilm-l6-h384": 22_713_216,
    "vit-tiny": 5_717_416,
    "vit-small": 22_050_664,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
}


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numeric]  # float comparisons: re-run under a forced CPU capability (docs/testing.md)



def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,count", sorted(PUBLISHED.items()))
def test_published_parameter_counts(name, count):
    model = torchgraft.build(name, device="meta")
    assert n_params(model) == count
    assert all(p.is_meta for p in model.parameters())


def test_llama3_70b_meta_build_is_fast():
    t = time.perf_counter()
    model = torchgraft.build("llama3-70b", device="meta")
    assert time.perf_counter() - t < 10
    assert model.config.n_kv_head == 8 and model.config.rope_base == 500000.0
    assert model.blocks[0].attn.k_proj.weight.shape == (1024, 8192)


def test_gpt2_state_dict_names_and_tied_embeddings():
    model = torchgraft.build("gpt2", device="meta")
    sd = model.state_dict()
    assert "lm_head.weight" not in sd
    for key in ["tok_emb.weight", "pos_emb.weight", "blocks.0.attn_norm.weight", "blocks.0.attn_norm.bias",
                "blocks.11.attn.q_proj.weight", "blocks.0.attn.o_proj.bias", "blocks.0.mlp_norm.weight",
                "blocks.0.mlp.fc_in.weight", "blocks.0.mlp.fc_out.bias", "norm.weight", "norm.bias"]:
        assert key in sd, key
    assert sd["pos_emb.weight"].shape == (1024, 768)
    untied = torchgraft.build("gpt-tiny", tie_embeddings=False)
    assert "lm_head.weight" in untied.state_dict()


def test_llama_state_dict_names():
    model = torchgraft.build("llama3-8b", device="meta")
    sd = model.state_dict()
    assert "lm_head.weight" in sd and "pos_emb.weight" not in sd
    assert not any(k.endswith(".bias") for k in sd)
    assert not any("inv_freq" in k for k in sd)
    assert sd["blocks.0.mlp.gate_proj.weight"].shape == (14336, 4096)
    assert sd["blocks.0.attn.v_proj.weight"].shape == (1024, 4096)
    tied = torchgraft.build("llama-tiny", tie_embeddings=True)
    assert "lm_head.weight" not in tied.state_dict()


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_decoder_forward_contract_and_causality(name):
    model = torchgraft.build(name).eval()
    ids = torch.randint(0, 256, (2, 10))
    logits = model(ids)
    assert logits.shape == (2, 10, 256)
    ids2 = ids.clone()
    ids2[:, 7:] = (ids2[:, 7:] + 1) % 256
    assert torch.equal(model(ids2)[:, :7], logits[:, :7])  # same shapes, same kernels: masked keys add exact zeros


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_kv_cache_prefill_then_decode_matches_full_forward(name):
    model = torchgraft.build(name).eval()
    ids = torch.randint(0, 256, (2, 12))
    full = model(ids)
    cache = model.make_kv_cache(2, 32)
    assert cache.dtype == torch.float32 and cache.max_seq_len == 32
    outs = [model(ids[:, :5], kv_cache=cache)]
    for t in range(5, 12):
        outs.append(model(ids[:, t:t + 1], kv_cache=cache))
    assert cache.pos == 12
    assert_close_computed(torch.cat(outs, 1), full, transformer_tol(model.config, cache.max_seq_len))


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_kv_cache_with_left_padding(name):
    model = torchgraft.build(name).eval()
    ids = torch.randint(0, 256, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[0, :4] = 0
    mask[2, :1] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    full = model(ids, attention_mask=mask, position_ids=pos)
    assert torch.isfinite(full).all()
    # each real token's logits equal the unpadded sequence's
    tol = transformer_tol(model.config, 20)  # up to the cache's 20 slots
    assert_close_computed(model(ids[:1, 4:])[0], full[0, 4:], tol)
    cache = model.make_kv_cache(3, 20)
    outs = [model(ids[:, :6], attention_mask=mask[:, :6], position_ids=pos[:, :6], kv_cache=cache)]
    for t in range(6, 11):
        outs.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, t:t + 1],
                          kv_cache=cache))
    assert_close_computed(torch.cat(outs, 1), full, tol)


def test_learned_positions_block_size_error():
    model = torchgraft.build("gpt-tiny")
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_init_scheme_gpt2_style():
    model = torchgraft.build("gpt-tiny", n_embd=128, n_layer=4, vocab_size=1024)
    std = model.blocks[0].attn.q_proj.weight.std().item()
    assert 0.017 < std < 0.023
    res = model.blocks[0].mlp.fc_out.weight.std().item()
    assert 0.8 * 0.02 / 8 ** 0.5 < res < 1.2 * 0.02 / 8 ** 0.5
    assert model.blocks[0].attn.q_proj.bias.abs().max() == 0
    assert (model.norm.weight == 1).all()


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_toy_training_loss_falls(name):
    torch.manual_seed(0)
    model = torchgraft.build(name)
    ids = torch.randint(0, 256, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_bf16_forward_and_cache_dtype():
    model = torchgraft.build("llama-tiny").to(torch.bfloat16).eval()
    cache = model.make_kv_cache(1, 8)
    assert cache.dtype == torch.bfloat16
    out = model(torch.randint(0, 256, (1, 4)), kv_cache=cache)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert model.rotary.inv_freq.dtype == torch.float32


def test_bert_task_variants_and_names():
    ids = torch.randint(0, 30522, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    base = torchgraft.build("bert-tiny").eval()
    hidden = base(ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
    assert hidden.shape == (2, 7, 128)
    assert_close_computed(base(ids[1:, :5])[0], hidden[1, :5], transformer_tol(base.config, 7))
    assert base.pool(hidden).shape == (2, 128)
    sd = base.state_dict()
    for key in ["embeddings.tok_emb.weight", "embeddings.pos_emb.weight", "embeddings.type_emb.weight",
                "embeddings.norm.weight", "blocks.0.attn.q_proj.bias", "blocks.0.attn_norm.weight",
                "blocks.1.mlp.fc_in.weight", "blocks.1.mlp_norm.bias", "pooler.dense.weight"]:
        assert key in sd, key
    assert "classifier.weight" not in sd
    seq = torchgraft.build("bert-tiny", task="sequence_classification", num_labels=3).eval()
    assert seq(ids, attention_mask=mask).shape == (2, 3)
    tok = torchgraft.build("bert-tiny", task="token_classification", num_labels=5, pooler=False).eval()
    assert tok(ids).shape == (2, 7, 5) and "pooler.dense.weight" not in tok.state_dict()
    assert base.blocks[0].attn_norm.eps == 1e-12 and base.blocks[0].mlp.activation == "gelu"


def test_minilm_preset_shape():
    cfg = torchgraft.get_config("minilm-l6-h384")
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.intermediate_size, cfg.vocab_size, cfg.block_size,
            cfg.type_vocab_size) == (6, 384, 12, 1536, 30522, 512, 2)


def test_vit_names_and_shapes():
    model = torchgraft.build("vit-base", device="meta")
    sd = model.state_dict()
    assert sd["pos_embed"].shape == (1, 197, 768) and sd["cls_token"].shape == (1, 1, 768)
    assert sd["patch_embed.proj.weight"].shape == (768, 3, 16, 16)
    assert sd["head.weight"].shape == (1000, 768) and "norm.weight" in sd
    assert "blocks.11.attn.k_proj.bias" in sd and "blocks.0.mlp.fc_out.weight" in sd
    digits = torchgraft.build("vit-digits")
    assert digits(torch.randn(3, 1, 32, 32)).shape == (3, 10)
    feats = torchgraft.build("vit-tiny", image_size=64, num_classes=0, n_layer=1)
    assert feats(torch.randn(2, 3, 64, 64)).shape == (2, 192)


def test_resnet_torchvision_names_and_options():
    model = torchgraft.build("resnet18", device="meta")
    sd = model.state_dict()
    for key in ["conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.0.bn2.bias",
                "layer2.0.downsample.0.weight", "layer2.0.downsample.1.num_batches_tracked",
                "layer4.1.conv2.weight", "fc.weight", "fc.bias"]:
        assert key in sd, key
    assert "layer1.0.downsample.0.weight" not in sd
    small = torchgraft.build("resnet18", in_chans=1, num_classes=10, width=16)
    assert small(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    zero = torchgraft.build("resnet34", width=8, zero_init_residual=True)
    assert (zero.layer1[0].bn2.weight == 0).all()


def test_heads_on_any_backbone():
    from torchgraft.models.heads import (
        ImageClassificationHead,
        LMHead,
        SequenceClassificationHead,
        TaskModel,
        TokenClassificationHead,
        feature_dim,
        pool_tokens,
    )

    gpt = torchgraft.build("gpt-tiny")
    ids = torch.randint(0, 256, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    clf = TaskModel(gpt, SequenceClassificationHead(feature_dim(gpt), 3, pooling="last"))
    assert clf(ids, attention_mask=mask, position_ids=pos).shape == (2, 3)
    assert "head.classifier.weight" in clf.state_dict() and "backbone.tok_emb.weight" in clf.state_dict()
    h = torch.randn(2, 4, 8)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert torch.equal(pool_tokens(h, "last", right), torch.stack([h[0, 1], h[1, 3]]))  # a gather
    assert_close_computed(pool_tokens(h, "mean", right)[0], h[0, :2].mean(0), tolerance(reduction=4))  # masked mean
    bert = torchgraft.build("bert-tiny", pooler=False)
    tok = TaskModel(bert, TokenClassificationHead(128, 4))
    assert tok(torch.randint(0, 100, (2, 5))).shape == (2, 5, 4)
    seq = TaskModel(bert, SequenceClassificationHead(128, 2, dense=True))
    assert seq(torch.randint(0, 100, (2, 5))).shape == (2, 2)
    res = torchgraft.build("resnet18", num_classes=0, width=8)
    assert TaskModel(res, ImageClassificationHead(feature_dim(res), 7))(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    vit = torchgraft.build("vit-digits", num_classes=0)
    assert TaskModel(vit, ImageClassificationHead(64, 5, pooling="cls"))(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    assert ImageClassificationHead(8, 3)(torch.randn(2, 8, 4, 4)).shape == (2, 3)
    assert TaskModel(gpt, LMHead(64, 100))(ids).shape == (2, 6, 100)


def test_gpt_rope_and_gqa_variant_and_yaml(tmp_path):
    model = torchgraft.build("gpt-tiny", positions="rope", n_kv_head=2).eval()
    assert "pos_emb.weight" not in model.state_dict()
    assert model.blocks[0].attn.k_proj.weight.shape == (32, 64)
    ids = torch.randint(0, 256, (1, 70))  # RoPE has no block_size limit
    full = model(ids)
    cache = model.make_kv_cache(1, 80)
    out = torch.cat([model(ids[:, :69], kv_cache=cache), model(ids[:, 69:], kv_cache=cache)], 1)
    assert_close_computed(out, full, transformer_tol(model.config, 80))
    p = tmp_path / "m.yaml"
    p.write_text("model:\n  name: llama-tiny\n  n_layer: 3\n  rope_base: 500000\n")
    m = torchgraft.build(str(p))
    assert len(m.blocks) == 3 and m.rotary.base == 500000.0 and m.model_name == "llama-tiny"


def test_bad_transformer_configs_are_rejected():
    from torchgraft.errors import ConfigError

    with pytest.raises(ConfigError, match="divisible"):
        torchgraft.build("gpt-tiny", n_head=5)
    with pytest.raises(ConfigError, match="multiple of model.n_kv_head"):
        torchgraft.build("llama-tiny", n_kv_head=3)
    with pytest.raises(ConfigError, match="task"):
        torchgraft.build("bert-tiny", task="regression")
    with pytest.raises(ConfigError, match="multiple of"):
        torchgraft.build("vit-digits", patch_size=5)
