"""QLoRA end to end: the fine-tune recipe with method qlora (NF4 base), exact resume, adapters that
load in PEFT on the dequantised base, a merged model that loads in transformers, one-line errors."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from torchgraft.testing import assert_close_computed, transformer_tol
from conftest import interrupt_after_step

pytest.importorskip("torchao")
pytestmark = pytest.mark.numeric

QUIET = {"progress": False, "tensorboard": False, "measure_flops": False, "every": 0}
MODEL = {"family": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 64, "intermediate_size": 128,
         "block_size": 32}
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _data(cache):
    return {"name": "text", "tokenizer": "char", "seq_len": 32, "val_fraction": 0.05, "cache_dir": str(cache)}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from torchgraft.train import run_training

    root = tmp_path_factory.mktemp("qlora")
    cfg = {"model": MODEL, "data": _data(root / "cache"), "optim": {"lr": 3e-3},
           "trainer": {"max_steps": 20, "batch_size": 8}, "eval": {"max_batches": 2}, "logging": QUIET}
    run_training(cfg, root / "pre")
    return root


def _ft(root, steps=6, **ft):
    return {"finetune": {"source": str(root / "pre"), "method": "qlora", "strict": True,
                         "lora": {"targets": ALL, "rank": 4, "alpha": 8}, **ft},
            "model": MODEL, "data": _data(root / "cache"), "optim": {"lr": 3e-3},
            "trainer": {"max_steps": steps, "batch_size": 8}, "eval": {"max_batches": 2},
            "checkpoint": {"every": 2}, "logging": QUIET}


def test_qlora_recipe_resumes_bitwise_and_writes_adapter_and_merged(pretrained, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from torchgraft.checkpoint.files import list_checkpoints
    from torchgraft.recipes.finetune import run_finetune

    summary = run_finetune(_ft(pretrained), tmp_path / "ref", merge=True)
    assert summary["base_format"] == "nf4" and len(summary["adapted_layers"]) == 14
    assert (tmp_path / "ref" / "adapter" / "adapter_model.safetensors").is_file()
    merged = load_file(tmp_path / "ref" / "merged" / "model.safetensors")
    assert "blocks.0.attn.q_proj.weight" in merged and not any(".lora_" in k or "::" in k for k in merged)
    ck = load_file(list_checkpoints(tmp_path / "ref" / "checkpoints")[-1] / "model.safetensors")
    assert ck["blocks.0.attn.q_proj.base_layer.weight::quantized_data"].dtype == torch.uint8  # 4-bit on disk

    with interrupt_after_step(monkeypatch, 3), pytest.raises(KeyboardInterrupt):
        run_finetune(_ft(pretrained), tmp_path / "run")
    run_finetune(_ft(pretrained), tmp_path / "run", resume=True)
    a = load_file(list_checkpoints(tmp_path / "ref" / "checkpoints")[-1] / "model.safetensors")
    b = load_file(list_checkpoints(tmp_path / "run" / "checkpoints")[-1] / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _perturbed_qlora(name="llama-tiny"):
    import torchgraft
    from torchgraft import peft as tp

    torch.manual_seed(0)
    base = torchgraft.build(name).eval()
    model = copy.deepcopy(base)
    tp.apply_lora(model, ALL, rank=4, alpha=8, quantize_base="nf4")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return base, model


def test_qlora_adapter_loads_in_peft_on_the_dequantised_base(tmp_path):
    """PEFT on the dequantised base reproduces the QLoRA model to float tolerance; on the original
    float base it differs by the NF4 quantisation error (measured here, and larger)."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from torchgraft import peft as tp
    from torchgraft.interop.hf import save_hf
    from torchgraft.quant import dequantize_model

    base, model = _perturbed_qlora()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(ids)
    tp.save_adapter(model, tmp_path / "ad", hf_names=True)
    dequantize_model(model)  # in place (torchao's NF4Tensor re-quantises on deepcopy)
    save_hf(tp.unload(model, merge=False), tmp_path / "hf_deq")
    save_hf(base, tmp_path / "hf_float")
    tol = transformer_tol(base.config, ids.shape[1])
    outs = {}
    for kind in ("deq", "float"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"hf_{kind}").eval()
            pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ad").eval()
        with torch.no_grad():
            outs[kind] = pm(ids).logits
    assert_close_computed(outs["deq"], ours, tol)
    quant_err = float((outs["float"] - ours).abs().max() / ours.abs().max())
    assert quant_err > 10 * tol  # the base really is quantised, and the adapter sits on it
    print(f"QLoRA vs PEFT on the float base: max |diff| / max |logit| = {quant_err:.3e} (NF4 error); "
          f"on the dequantised base <= {tol:.1e}")


def test_merged_qlora_loads_in_transformers(pretrained, tmp_path):
    transformers = pytest.importorskip("transformers")
    from torchgraft import load_model
    from torchgraft.interop.hf import save_hf
    from torchgraft.recipes.finetune import run_finetune

    run_finetune(_ft(pretrained, steps=2), tmp_path / "ft", merge=True)
    merged = load_model(tmp_path / "ft" / "merged").eval()
    from_run = load_model(tmp_path / "ft").eval()  # the run's last checkpoint: NF4 base + adapters, merged
    ids = torch.randint(0, merged.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(from_run(ids), merged(ids), rtol=0, atol=0)
    save_hf(merged, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert_close_computed(hf(ids).logits, merged(ids), transformer_tol(merged.config, 16))


def _lenet_ft(tmp_path, **over):
    import yaml

    cfg = {"finetune": {"source": str(tmp_path / "pre"), "method": "qlora", "exclude": ["fc2.*"],
                        "lora": {"targets": ["conv1", "conv2"], "rank": 2}},
           "model": {"name": "lenet"}, "data": {"name": "digits", "labels": [5, 6, 7, 8, 9], "per_class": 5},
           "optim": {"lr": 1e-3}, "trainer": {"max_steps": 1, "batch_size": 25}, "logging": QUIET}
    for k, v in over.items():
        cfg[k] = v
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_bad_combinations_give_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    import sys

    from torchgraft.cli import main
    from torchgraft.errors import ConfigError
    from torchgraft.train import run_training

    run_training({"model": {"name": "lenet"}, "data": {"name": "digits", "labels": [0, 1, 2, 3, 4]},
                  "trainer": {"max_steps": 1, "batch_size": 8}, "logging": QUIET}, tmp_path / "pre")

    def fails(argv, match):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and match in err, err

    cfg = _lenet_ft(tmp_path)
    fails(["finetune", str(cfg), "--out", str(tmp_path / "a")], "none of the LoRA targets is an nn.Linear")
    monkeypatch.setitem(sys.modules, "torchao.optim", None)  # torchao's optimizers unavailable
    cfg = _lenet_ft(tmp_path, optim={"name": "adamw4bit", "lr": 1e-3})
    fails(["finetune", str(cfg), "--out", str(tmp_path / "b"), "finetune.method=lora"],
          "optim.name=adamw4bit needs torchao")
    from torchgraft.peft import apply_lora

    with pytest.raises(ConfigError, match="not a multiple of the NF4 block of 64"):
        apply_lora(torch.nn.Sequential(torch.nn.Linear(12, 6)), ["0"], rank=2, quantize_base="nf4")
