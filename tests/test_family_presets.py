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
