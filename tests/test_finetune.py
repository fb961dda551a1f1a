"""The fine-tune recipe end to end on digits: transfer -> freeze / LoRA / DoRA -> trainer -> merge."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

import torchgraft
from torchgraft.cli import main
from torchgraft.recipes.finetune import run_finetune
from torchgraft.testing import assert_close_computed, tolerance

QUIET = {"progress": False, "tensorboard": False, "measure_flops": False, "every": 0}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from torchgraft.train import run_training

    out = tmp_path_factory.mktemp("pre") / "run"
    cfg = {"model": {"name": "lenet"}, "data": {"name": "digits", "labels": [0, 1, 2, 3, 4]},
           "optim": {"lr": 1e-3}, "trainer": {"max_steps": 40, "batch_size": 64}, "logging": QUIET}
    run_training(cfg, out)
    return out


def _cfg(source, **ft):
    return {"finetune": {"source": str(source), "exclude": ["fc2.*"], "train_also": ["fc2"], **ft},
            "model": {"name": "lenet"},
            "data": {"name": "digits", "labels": [5, 6, 7, 8, 9], "per_class": 10},
            "optim": {"lr": 1e-3},
            "trainer": {"max_steps": 12, "batch_size": 25}, "logging": QUIET}


def _source_weights(run):
    ck = sorted((run / "checkpoints").glob("step_*"))[-1]
    return load_file(str(ck / "model.safetensors"))


def test_freeze_method_keeps_frozen_weights_bitwise(pretrained, tmp_path):
    out = tmp_path / "ft"
    summary = run_finetune(_cfg(pretrained, method="freeze", freeze=["conv1", "conv2"]), out)
    assert summary["transfer"]["copied"] == 6 and summary["transfer"]["excluded"] == 2
    assert summary["trainable"] == 1024 * 1600 + 1024 + 1024 * 5 + 5
    src = _source_weights(pretrained)
    final = _source_weights(out)
    for k in ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"):
        assert torch.equal(final[k], src[k]), k
    assert not torch.equal(final["fc1.weight"], src["fc1.weight"])
    t = json.loads((out / "transfer.json").read_text())
    assert t["excluded"] == ["fc2.weight", "fc2.bias"]
    assert "val_loss" in json.loads((out / "finetune.json").read_text())["metrics"]


def test_lora_method_adapter_and_merged_weights(pretrained, tmp_path):
    out = tmp_path / "lora"
    summary = run_finetune(_cfg(pretrained, method="lora", lora={"targets": ["fc1", "conv2"], "rank": 4}),
                           out, merge=True)
    assert summary["adapted_layers"] == ["conv2", "fc1"]
    lora_params = 4 * (1600 + 1024) + 4 * (20 * 25 + 64)
    assert summary["trainable"] == lora_params + 1024 * 5 + 5  # adapters + the new head
    # the merged checkpoint has plain lenet names and equals base + adapter
    merged = torchgraft.build("lenet", num_classes=5).eval()
    report = torchgraft.transfer(out / "merged", merged, strict=True)
    assert report.ok
    again = torchgraft.build("lenet", num_classes=5).eval()
    torchgraft.transfer(pretrained, again, exclude=["fc2.*"])
    from torchgraft import peft as tp

    tp.load_adapter(again, out / "adapter")
    # the head was trained too: take it from the run's final checkpoint
    final = _source_weights(out)
    with torch.no_grad():
        again.fc2.weight.copy_(final["fc2.weight"])
        again.fc2.bias.copy_(final["fc2.bias"])
    x = torch.randn(4, 1, 32, 32)
    # merged weights vs adapters on top: LeNet's longest sum is fc1's 1600 inputs, 4 layers
    assert_close_computed(merged(x), again(x), tolerance(reduction=1600, depth=4))


def test_gradual_unfreeze_and_layer_decay_with_the_trainer(pretrained, tmp_path):
    out = tmp_path / "gu"
    cfg = _cfg(pretrained, method="freeze", freeze=["*"], unfreeze_at={6: ["fc1"]}, layer_decay=0.5)
    cfg["checkpoint"] = {"every": 6}
    run_finetune(cfg, out)
    steps = sorted((out / "checkpoints").glob("step_*"))
    at6, at12 = load_file(str(steps[0] / "model.safetensors")), load_file(str(steps[-1] / "model.safetensors"))
    src = _source_weights(pretrained)
    assert steps[0].name == "step_00000006"
    assert torch.equal(at6["fc1.weight"], src["fc1.weight"])  # still frozen for the first 6 steps
    assert not torch.equal(at12["fc1.weight"], src["fc1.weight"])  # unfrozen afterwards
    assert torch.equal(at12["conv2.weight"], src["conv2.weight"])


def test_cli_finetune_dora_merge_and_errors(pretrained, tmp_path, capsys):
    cfg_path = tmp_path / "ft.yaml"
    cfg_path.write_text(yaml.safe_dump(_cfg(pretrained, method="lora", lora={"targets": ["fc1"], "rank": 2})))
    main(["finetune", str(cfg_path), "finetune.method=dora", "trainer.max_steps=4", "--out",
          str(tmp_path / "cli"), "--merge"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["method"] == "dora" and line["fraction"] < 0.01
    assert (tmp_path / "cli" / "merged" / "model.safetensors").is_file()
    adapter_cfg = json.loads((tmp_path / "cli" / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["use_dora"] is True

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"name": "lenet"}}))
    with pytest.raises(SystemExit) as e:
        main(["finetune", str(bad)])
    assert e.value.code == 2
    assert "needs a `finetune:` section" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["finetune", str(cfg_path), "finetune.method=lorra"])
    assert e.value.code == 2 and "did you mean 'lora'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["finetune", str(cfg_path), f"finetune.source={tmp_path / 'missing'}"])
    assert e.value.code == 2 and "not found" in capsys.readouterr().err


def test_recipe_on_a_user_defined_model(tmp_path):
    from safetensors.torch import save_file
    from torch import nn

    class Tiny(nn.Module):  # not in the registry
        def __init__(self, classes):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 4, 5, stride=4), nn.ReLU(), nn.Flatten())
            self.hidden = nn.Linear(4 * 7 * 7, 32)
            self.head = nn.Linear(32, classes)

        def forward(self, x):
            return self.head(torch.relu(self.hidden(self.features(x))))

    src = Tiny(10)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "src.safetensors"))
    cfg = _cfg(tmp_path / "src.safetensors", method="dora", lora={"targets": ["hidden", "features.0"], "rank": 2},
               policies={"head": "reset"}, exclude=[], train_also=["head"], strict=True)
    model = Tiny(5)
    summary = run_finetune(cfg, tmp_path / "run", model=model, merge=True)
    assert summary["transfer"]["reset"] == 2 and summary["transfer"]["copied"] == 4
    assert summary["adapted_layers"] == ["features.0", "hidden"]
    merged = load_file(str(tmp_path / "run" / "merged" / "model.safetensors"))
    assert set(merged) == set(Tiny(5).state_dict())


def test_hf_layout_source_through_load_hf(tmp_path):
    """finetune.source may be a Hugging Face directory; it is read with torchgraft.load_hf."""
    from torchgraft.interop.hf import save_hf

    src = torchgraft.build("gpt-tiny")
    save_hf(src, tmp_path / "hf")
    cfg = {"finetune": {"source": str(tmp_path / "hf"), "method": "lora", "strict": True,
                        "policies": {"tok_emb.weight": "vocab"},  # the char data has a smaller vocabulary
                        "lora": {"targets": ["q_proj", "v_proj"], "rank": 2}},
           "model": {"name": "gpt-tiny"},
           "data": {"name": "text", "tokenizer": "char", "seq_len": 32, "max_tokens": 20000,
                    "cache_dir": str(tmp_path / "cache"), "progress": False},
           "trainer": {"max_steps": 3, "batch_size": 4}, "eval": {"max_batches": 1, "batch_size": 4},
           "logging": QUIET}
    summary = run_finetune(cfg, tmp_path / "run")
    assert summary["source"] == type(torchgraft.load_hf(tmp_path / "hf")).__name__  # a model, not the file
    assert summary["transfer"]["copied"] == len(src.state_dict()) - 1 and summary["transfer"]["adapted"] == 1
    t = json.loads((tmp_path / "run" / "transfer.json").read_text())
    rec = next(r for r in t["tensors"] if r["name"] == "tok_emb.weight")
    assert rec["src_shape"] == [256, 64] and "vocab: kept" in rec["note"]
