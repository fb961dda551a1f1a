"""torchgraft.export: decode-step export + onnxruntime greedy loop == `generate`, .pt2 reload, errors
that name the problem, LoRA merged into a copy, int8 quantisation, and `torchgraft export --check`."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import torchgraft  # noqa: E402
from torchgraft.errors import ConfigError, ExportError  # noqa: E402
from torchgraft.generation import generate  # noqa: E402
from torchgraft.interop.export import DecodeStep, max_abs_diff, read_metadata  # noqa: E402
from torchgraft.interop.onnx_generate import OnnxDecoder, onnx_generate  # noqa: E402
from torchgraft.testing import assert_close_computed, model_tol  # noqa: E402


def _bound(model, *inputs, seq_len=None) -> float:
    """The derived bound on |exported - eager| for `model` on inputs like these: its tolerance
    (torchgraft.testing) times the size of its outputs."""
    with torch.no_grad():
        out = model(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    return model_tol(model, seq_len) * max(o.abs().max().item() for o in outs)


def _run_cli(argv, capsys):
    from torchgraft.cli import main

    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


# ---- decoder LMs: the decode step with the KV cache as inputs/outputs ---------------------------------
@pytest.fixture(scope="module", params=["llama-tiny", "gpt-tiny"])
def step_export(request, tmp_path_factory):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torchgraft.build(request.param).eval()
    with torch.no_grad():  # larger weights than the init: sharper, more varied greedy tokens
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    path = tmp_path_factory.mktemp("step") / f"{request.param}-step.onnx"
    res = torchgraft.export(model, format="onnx", path=path, kv_cache=True, check=True)
    return model, res


def test_decode_step_signature_and_check(step_export):
    model, res = step_export
    L = len(model.blocks)
    assert res.kind == "decode_step"
    assert res.input_names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert res.input_names[3:] == [f"past_{kv}_{i}" for i in range(L) for kv in ("key", "value")]
    assert res.output_names[0] == "logits" and res.output_names[1] == "present_key_0"
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    # the checked example: a 1-token step over a past of 6, a 5-token prefill
    assert res.max_abs_diff <= _bound(model, ids)
    meta = read_metadata(res.path)["kv_cache"]
    assert (meta["n_layer"], meta["n_kv_head"], meta["head_dim"]) == (L, model.n_kv_head, model.head_dim)
    if model.model_name == "llama-tiny":
        assert model.n_kv_head < model.config.n_head  # GQA: the cache holds fewer heads than queries


def test_onnx_greedy_equals_generate_token_for_token(step_export):
    model, res = step_export
    dec = OnnxDecoder(res.path)
    block = model.config.block_size
    prompts = [[3, 17, 99, 5, 42], [7, 1], [200, 13, 13, 8, 9, 100, 4]]
    n = block + 20  # past block_size: the context shift re-encodes the window's second half
    ref = generate(model, prompts, max_new_tokens=n).tokens  # batched, left-padded
    got = onnx_generate(dec, prompts, max_new_tokens=n)
    assert got == ref
    assert len(set(ref[0])) > 3  # not a degenerate repeat of one token
    one = generate(model, [prompts[2]], max_new_tokens=30).tokens
    assert onnx_generate(dec, [prompts[2]], max_new_tokens=30) == one
    eos = ref[0][5]
    stopped = generate(model, [prompts[0]], max_new_tokens=30, eos_token_id=eos).tokens
    assert onnx_generate(dec, [prompts[0]], max_new_tokens=30, eos_token_id=eos) == stopped


def test_decode_step_rejects_a_non_decoder():
    with pytest.raises(ConfigError, match="not a decoder LM"):
        DecodeStep(torchgraft.build("lenet"))


# ---- .pt2 ------------------------------------------------------------------------------------------
def test_pt2_reloads_with_torch_export_load(tmp_path, one_thread):
    model = torchgraft.build("llama-tiny").eval()
    path = tmp_path / "llama.pt2"
    res = torchgraft.export(model, format="pt2", path=path)
    prog = torch.export.load(str(path)).module()
    for b, t in [(1, 4), (3, 11)]:
        ids = torch.randint(0, 256, (b, t))
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        with torch.no_grad():
            assert_close_computed(prog(ids, mask), model(ids, attention_mask=mask), model_tol(model, t))
    assert read_metadata(path)["name"] == "llama-tiny" and res.format == "pt2"
    step = tmp_path / "step.pt2"
    res = torchgraft.export(model, format="pt2", path=step, kv_cache=True, check=True)
    assert res.max_abs_diff <= _bound(model, torch.randint(0, 256, (2, 7)))


# ---- user modules: fine, and the error cases ---------------------------------------------------------
class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: one graph cannot hold both branches
            return self.fc(x)
        return -self.fc(x)


class FixedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) if x.shape[0] == 2 else -self.fc(x)


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.pi, self.v = nn.Linear(6, 256), nn.Linear(256, 3), nn.Linear(256, 1)

    def forward(self, obs):
        h = torch.tanh(self.body(obs))
        return self.pi(h), self.v(h)


def test_user_module_exports_with_explicit_example(tmp_path, one_thread, monkeypatch):
    import torchgraft.interop.export as ex

    monkeypatch.setattr(ex, "EXTERNAL_DATA_BYTES", 0)  # as if the model were over 2 GB
    m = TwoHeads()
    res = torchgraft.export(m, torch.randn(2, 6), format="onnx", path=tmp_path / "u.onnx", check=True)
    assert res.input_names == ["input_0"] and res.output_names == ["logits", "output_1"]
    assert res.max_abs_diff <= _bound(m, torch.randn(3, 6)) and res.checked_shapes == [[(2, 6)], [(3, 6)]]
    assert (tmp_path / "u.onnx.data").stat().st_size >= 0.8 * sum(p.numel() * 4 for p in m.parameters())
    assert any("external data" in n for n in res.notes)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["u.onnx", "u.onnx.data"]  # no temp leftovers
    with pytest.raises(ConfigError, match="pass example"):
        torchgraft.export(m, format="pt2", path=tmp_path / "u.pt2")


def test_data_dependent_branch_is_one_clear_line(tmp_path):
    with pytest.raises(ExportError) as e:
        torchgraft.export(Branchy(), torch.randn(2, 4), format="onnx", path=tmp_path / "b.onnx")
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400
    assert "branches on a tensor's value" in msg and "if x.sum() > 0" in msg and "test_export.py" in msg
    assert "torch.where" in msg
    assert not (tmp_path / "b.onnx").exists()
    with pytest.raises(ExportError, match="fixes the `batch` size to 2"):
        torchgraft.export(FixedBatch(), torch.randn(2, 4), format="pt2", path=tmp_path / "f.pt2")
    res = torchgraft.export(FixedBatch(), torch.randn(2, 4), format="pt2", path=tmp_path / "f.pt2",
                            dynamic=False, check=True)
    assert res.max_abs_diff == 0.0 and res.dynamic_axes == {"input_0": {}}


def test_bad_arguments(tmp_path):
    m = torchgraft.build("lenet")
    with pytest.raises(ConfigError, match="unknown export format 'tflite'"):
        torchgraft.export(m, format="tflite", path=tmp_path / "x")
    with pytest.raises(ConfigError, match="unknown dynamic axis 'time'"):
        torchgraft.export(m, format="pt2", path=tmp_path / "x.pt2", dynamic="batch,time")
    with pytest.raises(ConfigError, match="int8.*ONNX"):
        torchgraft.export(m, format="pt2", path=tmp_path / "x.pt2", quantize="int8")
    with pytest.raises(ConfigError, match="is a directory"):
        torchgraft.export(m, format="pt2", path=tmp_path)


# ---- LoRA ------------------------------------------------------------------------------------------
def test_unmerged_lora_is_merged_into_a_copy(tmp_path, one_thread):
    from torchgraft.peft import apply_lora, lora_layers

    model = torchgraft.build("gpt-tiny").eval()
    apply_lora(model, ["q_proj", "v_proj"], rank=4)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in layer.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.2)  # a non-trivial adapter (B starts at zero)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        want = model(ids)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = torchgraft.export(model, format="pt2", path=tmp_path / "lora.pt2")
    assert any("merged 4 LoRA adapter(s) into a copy" in str(x.message) for x in w)
    assert res.notes and "merged 4 LoRA" in res.notes[0]
    assert len(lora_layers(model)) == 4 and not any(l.merged for l in lora_layers(model).values())
    prog = torch.export.load(str(tmp_path / "lora.pt2")).module()
    with torch.no_grad():
        assert_close_computed(prog(ids, torch.ones_like(ids)), want, model_tol(model, 9))  # merged weights
    ep = torch.export.load(str(tmp_path / "lora.pt2"))
    assert not any("lora" in k for k in ep.state_dict)  # merged weights only


def test_export_sources_lora_run_and_hf_dir(tmp_path, one_thread):
    """A LoRA fine-tune run (adapter tensors in its checkpoint) and a Hugging Face dir load for export."""
    import json

    from torchgraft.interop.export_source import load_export_source
    from torchgraft.interop.hf import save_hf
    from torchgraft.peft import apply_lora, save_adapter
    from torchgraft.checkpoint.files import write_checkpoint
    from torchgraft.train.trainer import model_meta

    model = torchgraft.build("gpt-tiny").eval()
    apply_lora(model, ["q_proj", "v_proj"], rank=2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    run = tmp_path / "ft"
    write_checkpoint(run / "checkpoints" / "step_00000003", model_state=model.state_dict(),
                     meta={"model": model_meta(model), "step": 3})
    save_adapter(model, run / "adapter")
    (run / "config.yaml").write_text(json.dumps({"model": {"name": "gpt-tiny"}}))
    src = load_export_source(run)
    assert "recreated 4 LoRA adapter(s)" in src.notes[0] and src.metadata["checkpoint"] == "step_00000003"
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        want = model(ids)
        assert torch.equal(src.model(ids), want)  # the same adapters, bitwise, in the same modules
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = torchgraft.export(src.model, (ids,), format="pt2", path=tmp_path / "ft.pt2", check=True)
    assert "merged 4 LoRA" in res.notes[0] and res.max_abs_diff <= _bound(model, ids)
    with torch.no_grad():
        got = torch.export.load(str(tmp_path / "ft.pt2")).module()(ids, torch.ones_like(ids))
    assert_close_computed(got, want, model_tol(model, 7))

    hf = tmp_path / "hf"
    plain = torchgraft.build("llama-tiny").eval()
    save_hf(plain, hf)
    (hf / "tokenizer.json").write_text("{}")
    src = load_export_source(hf)
    assert src.metadata["tokenizer"] == str(hf.resolve())
    with torch.no_grad():
        assert torch.equal(src.model(ids), plain(ids))  # the same weights, bitwise, the same model


# ---- int8 --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_int8_quantisation_is_smaller_and_close(tmp_path, one_thread):
    model = torchgraft.build("gpt-tiny").eval()
    res = torchgraft.export(model, format="onnx", path=tmp_path / "g.onnx", quantize="int8", check=True)
    q = res.quantized_path
    assert q == tmp_path / "g.int8.onnx" and q.stat().st_size < 0.6 * res.path.stat().st_size
    assert res.max_abs_diff <= _bound(model, torch.randint(0, 256, (2, 8)))
    assert 0 < res.quantized_max_abs_diff < 0.2  # int8 is a lossy format: a sanity bound, not a rounding one
    meta = read_metadata(q)
    assert meta["quantization"] == "int8-dynamic" and meta["name"] == "gpt-tiny"


# ---- CLI ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lenet_run(tmp_path_factory):
    from torchgraft.config import load_yaml
    from torchgraft.train import load_run_config, run_training

    cfg = load_yaml("configs/lenet-digits.yaml")
    cfg["model"] = {"name": "lenet", "conv_channels": [4, 8], "hidden": 32}
    cfg["data"] = {**cfg["data"], "labels": [0, 1, 2, 3, 4]}
    cfg["trainer"] = {"max_steps": 6, "batch_size": 16, "seed": 0, "precision": "fp32"}
    cfg["schedule"] = {**cfg["schedule"], "warmup_steps": 0}  # a warm-up must end before the run does
    out = tmp_path_factory.mktemp("run") / "lenet"
    run_training(load_run_config(cfg), out)
    return out


def test_cli_export_check_and_int8_on_a_trained_run(lenet_run, tmp_path, capsys):
    out = tmp_path / "lenet.onnx"
    code, stdout, err = _run_cli(["export", str(lenet_run), "--format", "onnx", "--out", str(out), "--check",
                                  "--quantize", "int8"], capsys)
    assert code == 0, err
    assert "check (onnxruntime, inputs (2, 1, 32, 32), (3, 1, 32, 32)): max abs diff vs eager PyTorch" in stdout
    diff = float(stdout.split("vs eager PyTorch ")[1].split()[0])
    from torchgraft import load_model

    trained = load_model(lenet_run).eval()
    assert diff <= _bound(trained, torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(0)))
    q_diff = float(stdout.split("check int8: max abs diff vs eager PyTorch ")[1].split()[0])
    assert 0 < q_diff < 0.1  # int8: close, not exact
    q = tmp_path / "lenet.int8.onnx"
    assert q.stat().st_size < 0.7 * out.stat().st_size  # fc weights int8 (convs stay fp32)
    meta = read_metadata(out)
    assert meta["labels"] == [0, 1, 2, 3, 4] and meta["family"] == "lenet"
    assert meta["config"]["num_classes"] == 5 and meta["checkpoint"].startswith("step_")
    assert read_metadata(q)["quantization"] == "int8-dynamic" and read_metadata(q)["labels"] == [0, 1, 2, 3, 4]
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(None, {"images": np.zeros((7, 1, 32, 32), np.float32)})
    assert logits.shape == (7, 5)


def test_cli_export_errors_exit_2(tmp_path, capsys):
    code, _, err = _run_cli(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "x.onnx")], capsys)
    assert code == 2 and err.startswith("error: ") and "does not exist" in err and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    code, _, err = _run_cli(["export", str(tmp_path / "empty"), "--out", str(tmp_path / "x.onnx")], capsys)
    assert code == 2 and "neither a run directory nor a checkpoint folder" in err


def test_cli_export_bad_format_exit_2(lenet_run, tmp_path, capsys):
    code, _, err = _run_cli(["export", str(lenet_run), "--format", "tflite", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "unknown export format 'tflite'" in err


@pytest.mark.slow
def test_cli_export_pt2(lenet_run, tmp_path, capsys):
    out = tmp_path / "lenet.pt2"
    code, stdout, err = _run_cli(["export", str(lenet_run), "--format", "pt2", "--out", str(out), "--check",
                                  "--batch", "3"], capsys)
    assert code == 0, err
    assert "check (torch.export.load, inputs (3, 1, 32, 32), (4, 1, 32, 32))" in stdout
