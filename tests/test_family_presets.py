"""The Llama-shaped family presets have their published parameter counts, and `torchgraft inspect`
(built on meta, memory estimate included) works on each."""
import json

import pytest

import torchgraft
from torchgraft.cli import main

# from the checkpoints' safetensors metadata / model cards (tied embeddings counted once)
PUBLISHED = {
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-0.6b": 596_049_920,
    "qwen3-1.7b": 1_720_574_976,
    "qwen3-8b": 8_190_735_360,
    "mistral-7b": 7_241_732_096,
    "gemma2-2b": 2_614_341_888,
    "gemma2-9b": 9_241_705_984,
    "gemma3-1b": 999_885_952,
    "phi-3-mini": 3_821_079_552,
    "phi-4-mini": 3_836_021_760,
    "olmo2-7b": 7_298_617_344,
    "olmo2-13b": 13_716_198_400,
    "smollm2-135m": 134_515_008,
    "smollm2-360m": 361_821_120,
    "smollm2-1.7b": 1_711_376_384,
    "smollm3-3b": 3_075_098_624,
}


@pytest.mark.parametrize("name,count", sorted(PUBLISHED.items()))
def test_published_parameter_counts(name, count):
    model = torchgraft.build(name, device="meta")
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize("name", sorted([*PUBLISHED, "gemma3-4b"]))
def test_inspect_reports_memory(name, capsys):
    main(["inspect", name, "--json", "--seq", "256"])
    d = json.loads(capsys.readouterr().out)
    n = sum(p.numel() for p in torchgraft.build(name, device="meta").parameters())
    assert d["parameters"] == n
    assert d["memory_bytes"]["weights"] == 4 * n  # fp32
    assert d["memory_bytes"]["activations"] > 0 and d["memory_bytes"]["total"] > d["memory_bytes"]["weights"]


def test_chunked_ce_refuses_soft_capped_logits():
    """Gemma 2 caps its logits after the head; chunked CE (hidden @ head inside the loss) would skip it."""
    import torch

    from torchgraft.errors import ConfigError
    from torchgraft.train.tasks import build_task

    model = torchgraft.build("gemma2-2b", n_layer=1, n_embd=32, n_head=2, n_kv_head=1, head_dim=16,
                             intermediate_size=48, vocab_size=64)
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": torch.zeros(1, 4, dtype=torch.long)}
    with pytest.raises(ConfigError, match="soft-caps"):
        build_task({"name": "lm", "chunked_ce": 8}).loss_sum(model, batch)
    assert torch.isfinite(build_task("lm").loss_sum(model, batch))


SMALL = dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=96, vocab_size=256, block_size=64,
             head_dim=16)


@pytest.mark.parametrize("name,extra", [("gemma2-2b", {"sliding_window": 4}), ("gemma3-1b", {"sliding_window": 4}),
                                        ("olmo2-7b", {}), ("smollm3-3b", {"no_rope_layers": [1, 0]}),
                                        ("phi-4-mini", {"rope_scaling": {"type": "default"}})])
def test_grow_deeper_keeps_the_function_and_per_layer_config(name, extra):
    """Sandwich / post-norm blocks are the identity with zeroed output projections; the new blocks
    take their template's layer type (window, NoPE), so the grown config rebuilds the same model."""
    import torch

    m = torchgraft.build(name, **SMALL, **extra).eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    big, report = torchgraft.grow(m, depth=2, example_inputs=ids)
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-6
    assert big.config.n_layer == 4
    for f in type(big.config).per_layer_fields:
        if getattr(big.config, f) is not None:
            assert len(getattr(big.config, f)) == 4
    rebuilt = torchgraft.build(big.config).eval()
    rebuilt.load_state_dict(big.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids), big.eval()(ids), rtol=0, atol=0)
