"""The fine-tune memory planner: per-part arithmetic on a hand-countable model, the --fit search and the CLI."""
from __future__ import annotations

import json

import pytest
from torch import nn

from torchgraft.errors import ConfigError
from torchgraft.tools.finetune_memory import finetune_memory, nf4_bytes, parse_size, plan_fit


def test_parts_add_up_by_hand():
    import torchgraft

    m = torchgraft.build("llama-tiny", n_layer=2, device="meta")  # dim 64, MLP 160, vocab 256, untied
    lin = [x for n, x in m.named_modules() if isinstance(x, nn.Linear) and n.endswith("_proj")]
    n_lin = sum(x.weight.numel() for x in lin)
    n_all = sum(p.numel() for p in m.parameters())
    q = finetune_memory(m, "qlora", "adamw", 1, 32, rank=4)
    assert q.weights == int(sum(nf4_bytes(x.weight.numel()) for x in lin) + 2 * (n_all - n_lin))
    n_ad = sum(4 * (x.in_features + x.out_features) for x in lin)
    assert q.adapters == q.gradients == 2 * n_ad and q.optimizer_state == 4 * n_ad
    f = finetune_memory(m, "full", "adamw8bit", 1, 32)
    assert f.weights == f.gradients == 2 * n_all and f.adapters == 0
    big = [p.numel() for p in m.parameters() if p.numel() >= 4096]
    small = [p.numel() for p in m.parameters() if p.numel() < 4096]
    assert f.optimizer_state == int(sum(big) * 2 * (1 + 4 / 256) + 4 * sum(small))
    assert finetune_memory(m, "lora", "adamw", 1, 32, activation_checkpointing=True).activations < \
        finetune_memory(m, "lora", "adamw", 1, 32).activations


def test_fit_picks_the_cheapest_setting_that_fits():
    import torchgraft

    m = torchgraft.build("llama3-8b", device="meta")
    best, tried = plan_fit(m, parse_size("24GiB"), "full", seq_len=2048)
    assert best is not None and best.total <= 24 * 2**30 and best.method == "lora"
    assert all(t.total > 24 * 2**30 for t in tried[:-1])
    best, _ = plan_fit(m, parse_size("12GiB"), "lora", seq_len=2048)
    assert best.method == "qlora"
    assert plan_fit(m, parse_size("1GiB"), "qlora", seq_len=2048)[0] is None
    assert parse_size("1.5 GB") == 1_500_000_000
    with pytest.raises(ConfigError, match="24 gigs"):
        parse_size("24 gigs")


def test_cli_inspect_finetune_json(capsys):
    from torchgraft.cli import main

    main(["inspect", "llama3-8b", "--finetune", "qlora", "--optim", "adamw8bit", "--seq", "2048",
          "--fit", "24GiB", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["estimate"]["method"] == "qlora" and out["fit"]["fits"] is True
    with pytest.raises(SystemExit) as e:
        main(["inspect", "llama-tiny", "--finetune", "qlora", "--optim", "adamw5bit"])
    assert e.value.code == 2
