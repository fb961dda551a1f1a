"""Acceptance: a LoRA fine-tune of a small GPT trains < 2% of the parameters and reaches a validation
loss within 10% of full fine-tuning on the same data.

Setup: a character-level GPT (4 layers, 128 wide) is pretrained on the first half of the built-in
corpus (Python's pydoc topics, sorted by topic, as the "text" dataset's char-token stream: "domain A");
both fine-tunes then train on the second half ("domain B", ~212k characters, about 1.4 epochs) and are
evaluated on its last 20k characters, held out. Full: AdamW lr 5e-4; LoRA: rank 4 on o_proj and
fc_out (1.7% of the parameters), lr 5e-3. 150 steps of 32 x 64 characters each.

Measured (2 CPU cores, seed 0): pretrained model on domain B 1.793; full fine-tune 1.679; LoRA 1.765
(ratio 1.051). Other LoRA settings, measured on the earlier `chars` data (no eos between documents;
there full 1.734, LoRA 1.816): q/v/o_proj r4 lr 3e-3 (1.5%) 1.828, lr 1e-2 1.819; q/v/o_proj +
fc_in/fc_out r2 (1.97%) 1.807. LoRA meets the 10% bar but recovers only ~25% of the
full fine-tune's gain here: the 300-step pretrained model is still undertrained, which favours
updating every weight. The run takes minutes on 2 cores, so the test is marked slow (`make test-all`);
`python tests/test_finetune_lora_gpt.py [OUT_DIR]` prints the numbers.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

QUIET = {"progress": False, "tensorboard": False, "measure_flops": False, "every": 25}
MODEL = {"family": "gpt", "n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "dropout": 0.0}
LORA = {"targets": ["o_proj", "fc_out"], "rank": 4, "alpha": 8}  # the residual-stream writers


def _bundles(cache_dir: Path, block: int = 64):
    """Domain A / domain B: the two halves of the built-in corpus's char-token stream ("text" dataset,
    char tokenizer, eos between documents), each with its last 20k tokens held out."""
    from torchgraft.data import build_data
    from torchgraft.data.registry import DataBundle
    from torchgraft.data.text import PackedWindows

    full = build_data({"name": "text", "tokenizer": "char", "seq_len": block, "val_fraction": 0.0,
                       "cache_dir": str(cache_dir), "progress": False})
    stream, n = full.train.stream, full.info["n_train_tokens"]
    cut = n // 2
    info = {"vocab_size": full.info["vocab_size"], "tokenizer": full.info["tokenizer"]}

    def part(a: int, b: int) -> DataBundle:
        return DataBundle(PackedWindows(stream, a, b - 20_000, block),
                          PackedWindows(stream, b - 20_000, b, block), "lm", info=info)

    return part(0, cut), part(cut, n)


def run_experiment(root: Path, pre_steps: int = 300, ft_steps: int = 150) -> dict:
    from torchgraft.recipes.finetune import run_finetune
    from torchgraft.train import run_training

    pre_data, ft_data = _bundles(root / "cache")
    pre_cfg = {"model": MODEL, "data": {"name": "text", "tokenizer": "char", "seq_len": 64},
               "optim": {"lr": 3e-3, "weight_decay": 0.1}, "schedule": {"name": "cosine", "warmup_steps": 30},
               "trainer": {"max_steps": pre_steps, "batch_size": 32, "grad_clip": 1.0},
               "eval": {"max_batches": 20}, "logging": QUIET}
    done = root / "pretrain" / "result.json"
    if done.is_file():  # reuse a finished pretraining run (the script can be rerun on the same OUT_DIR)
        pre_metrics = json.loads(done.read_text())["metrics"]
    else:
        pre_metrics = run_training(pre_cfg, root / "pretrain", data=pre_data).metrics

    def finetune(name: str, method: str, lr: float, steps: int) -> dict:
        cfg = {"finetune": {"source": str(root / "pretrain"), "method": method, "lora": LORA, "strict": True},
               "model": MODEL, "data": {"name": "text", "tokenizer": "char", "seq_len": 64},
               "optim": {"lr": lr, "weight_decay": 0.0}, "schedule": {"name": "cosine", "warmup_steps": 10},
               "trainer": {"max_steps": steps, "batch_size": 32, "grad_clip": 1.0},
               "eval": {"every": 50, "max_batches": 20}, "logging": QUIET}
        return run_finetune(cfg, root / name, data=ft_data)

    zero = finetune("zero", "full", 1e-9, 1)  # the pretrained model on domain B (one step at lr ~ 0)
    full = finetune("full", "full", 5e-4, ft_steps)
    lora = finetune("lora", "lora", 5e-3, ft_steps)
    return {"pretrain_val_loss_domain_a": pre_metrics["val_loss"],
            "pretrained_val_loss_domain_b": zero["metrics"]["val_loss"],
            "full": {"val_loss": full["best"]["value"], "trainable_fraction": full["fraction"]},
            "lora": {"val_loss": lora["best"]["value"], "trainable_fraction": lora["fraction"],
                     "trainable": lora["trainable"], "total": lora["total"]},
            "ratio_lora_to_full": lora["best"]["value"] / full["best"]["value"]}


def _check(r: dict) -> None:
    assert r["lora"]["trainable_fraction"] < 0.02
    assert r["full"]["trainable_fraction"] == 1.0
    # both fine-tunes improve on the pretrained model, and LoRA is within 10% of full fine-tuning
    assert r["lora"]["val_loss"] < r["pretrained_val_loss_domain_b"]
    assert r["full"]["val_loss"] < r["pretrained_val_loss_domain_b"]
    assert r["lora"]["val_loss"] <= 1.10 * r["full"]["val_loss"]


@pytest.mark.slow
def test_lora_within_10_percent_of_full_finetune(tmp_path):
    r = run_experiment(tmp_path)
    print(json.dumps(r, indent=1))
    _check(r)


if __name__ == "__main__":  # python tests/test_finetune_lora_gpt.py [OUT_DIR [PRE_STEPS FT_STEPS]]
    import tempfile

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    steps = [int(a) for a in sys.argv[2:4]]
    result = run_experiment(out, *steps)
    print(json.dumps(result, indent=1))
    _check(result)
