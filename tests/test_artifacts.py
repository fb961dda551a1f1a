"""Issue 22 item 2: one answer to "what is this path?" (`checkpoint.artifact.resolve`) and one
`load_model`. One tiny artifact of every kind is built (a LoRA fine-tune run, its checkpoint folder and
merged/ folder, a `transformers` GPT-2 saved with save_pretrained, a PEFT adapter saved by `peft` on
it, the run's own adapter/ (no base), an ONNX file, a torch.export program, a bare safetensors file)
and fed to every command that takes a model path: each works, or exits 2 with one line naming what
the path is.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import torchgraft
from conftest import invoke_cli
from torchgraft.checkpoint.artifact import KIND_NAMES, resolve
from torchgraft.errors import CheckpointError
from torchgraft.testing import assert_close_computed, transformer_tol

QUIET = ["logging.progress=false", "logging.tensorboard=false", "logging.measure_flops=false"]
SMALL = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "data.seq_len=16", "model.block_size=32"]
LM_OK = ("run", "checkpoint", "merged", "hf", "peft-adapter")  # kinds that hold a whole decoder LM
# the words of KIND_NAMES each error must contain (the path's kind)
NOT_A_MODEL = ("adapter-no-base", "onnx", "pt2", "safetensors")


def _kind_words(label: str) -> str:
    return KIND_NAMES["peft-adapter" if label == "adapter-no-base" else label].split(" (")[0]


@pytest.fixture(scope="module")
def kinds(tmp_path_factory) -> dict[str, object]:
    """{label: path} for one artifact of every kind (the LoRA run is a real 2-step fine-tune)."""
    import onnx
    import transformers
    from onnx import TensorProto, helper
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    from torchgraft.cli import main

    base = tmp_path_factory.mktemp("artifacts")
    main(["train", "configs/gpt-char.yaml", *SMALL, "trainer.max_steps=2", "schedule.warmup_steps=0",
          "trainer.batch_size=2", "eval.max_batches=1", "eval.every=0", *QUIET, "--out", str(base / "src")])
    cfg = base / "ft.yaml"
    cfg.write_text(f"""
finetune: {{source: {base / 'src'}, method: lora, lora: {{targets: [q_proj, v_proj], rank: 4, alpha: 8}}}}
model: {{name: gpt-tiny, n_layer: 1, n_embd: 32, n_head: 2, block_size: 32}}
data: {{name: text, source: builtin, tokenizer: char, seq_len: 16}}
optim: {{lr: 5.0e-2}}
trainer: {{max_steps: 2, batch_size: 2}}
eval: {{max_batches: 1}}
logging: {{progress: false, tensorboard: false, measure_flops: false}}
""")
    main(["finetune", str(cfg), "--out", str(base / "ft"), "--merge"])
    ck = sorted((base / "ft" / "checkpoints").glob("step_*"))[-1]
    vocab = json.loads((ck / "meta.json").read_text())["model"]["config"]["vocab_size"]

    hf = base / "hf"  # a transformers GPT-2 from a tiny config, with the run's tokenizer next to it
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=vocab, n_positions=32, n_embd=32, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0))
    gpt2.save_pretrained(hf)
    for f in (base / "src" / "tokenizer").iterdir():
        shutil.copyfile(f, hf / f.name)

    adapter = base / "peft"  # PEFT's own adapter, naming its base directory
    peft_model = get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(hf),
                                LoraConfig(r=2, lora_alpha=4, target_modules=["c_proj", "c_fc"], init_lora_weights=False))
    peft_model.save_pretrained(adapter)

    onnx_file = base / "m.onnx"
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), onnx_file)
    pt2 = base / "m.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),)), pt2)
    weights = base / "w.safetensors"
    save_file(torchgraft.load_model(base / "ft" / "merged").state_dict(), str(weights))
    return {"run": base / "ft", "checkpoint": ck, "merged": base / "ft" / "merged", "hf": hf,
            "peft-adapter": adapter, "adapter-no-base": base / "ft" / "adapter", "onnx": onnx_file,
            "pt2": pt2, "safetensors": weights, "_base": base, "_peft_model": peft_model}


def _one_line_naming(code: int, err: str, label: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert _kind_words(label) in err, err


def _cli(argv, capsys):
    return invoke_cli([str(a) for a in argv], capsys)[:3]


# ---- resolve and load_model ----------------------------------------------------------------------
def test_resolve_names_every_kind(kinds):
    for label in ("run", "checkpoint", "merged", "hf", "peft-adapter", "onnx", "pt2", "safetensors"):
        assert resolve(kinds[label]).kind == label
    assert resolve(kinds["adapter-no-base"]).kind == "peft-adapter"
    run = resolve(kinds["run"])
    assert run.weights == kinds["checkpoint"] and run.run_dir == kinds["run"] and run.task == "lm"
    assert run.tokenizer is not None and (run.tokenizer / "tokenizer.json").is_file()
    assert resolve(kinds["peft-adapter"]).base == kinds["hf"]
    assert resolve(kinds["hf"]).tokenizer == kinds["hf"]


def test_lora_checkpoint_describes_its_adapters(kinds):
    meta = json.loads((kinds["checkpoint"] / "meta.json").read_text())
    (group,) = meta["model"]["adapters"]["groups"]
    assert group["rank"] == 4 and group["alpha"] == 8.0 and not group["dora"]
    assert group["layers"] == ["blocks.0.attn.q_proj", "blocks.0.attn.v_proj"]


def test_old_run_without_spec_in_meta_still_loads(kinds, tmp_path):
    """A run written before meta.json held the spec: its finetune.json gives rank and alpha."""
    from torchgraft.checkpoint.files import read_checkpoint, write_checkpoint

    old = tmp_path / "old"
    shutil.copytree(kinds["run"], old)
    ck = sorted((old / "checkpoints").glob("step_*"))[-1]
    loaded = read_checkpoint(ck)
    meta = dict(loaded.meta, model={k: v for k, v in loaded.meta["model"].items() if k != "adapters"})
    shutil.rmtree(ck)
    write_checkpoint(ck, model_state=loaded.model_state, meta=meta)
    assert resolve(old).adapters["groups"][0]["layers"] is None  # from finetune.json
    x = torch.randint(0, 20, (1, 8))
    with torch.no_grad():
        assert torch.equal(torchgraft.load_model(old)(x), torchgraft.load_model(kinds["run"])(x))
    (old / "finetune.json").unlink()
    shutil.rmtree(old / "adapter")
    with pytest.raises(CheckpointError, match="no adapter spec"):
        torchgraft.load_model(old)


def test_peft_adapter_loads_on_its_base_like_peft(kinds):
    """torchgraft.load_model(adapter dir) equals PEFT's model on the transformers base."""
    peft_model = kinds["_peft_model"].eval()
    ours = torchgraft.load_model(kinds["peft-adapter"])
    x = torch.randint(0, ours.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = peft_model(x).logits
        got = ours(x)
    assert_close_computed(got, want, transformer_tol(ours.config, seq_len=8))


def test_load_model_errors_name_the_kind(kinds):
    for label in NOT_A_MODEL:
        with pytest.raises(CheckpointError) as e:
            torchgraft.load_model(kinds[label])
        assert _kind_words(label) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="give its run directory"):
        torchgraft.load_model(kinds["adapter-no-base"])


# ---- every command that takes a path ---------------------------------------------------------------
ALL = ("run", "checkpoint", "merged", "hf", "peft-adapter", *NOT_A_MODEL)


@pytest.mark.parametrize("label", ALL)
def test_generate_eval_inspect(kinds, label, capsys, one_thread):
    path = kinds[label]
    runs = [["generate", path, "-p", "a", "-n", "2", "-t", "0"],
            ["eval", path, "--data", "builtin", "--seq-len", "16", "--max-batches", "1", "--json"],
            ["inspect", path, "--json"]]
    for argv in runs:
        code, out, err = _cli(argv, capsys)
        if label in LM_OK:
            assert code == 0, (argv[0], err)
        else:
            _one_line_naming(code, err, label)
    if label in LM_OK:
        code, out, err = _cli(["eval", path, "--data", "builtin", "--seq-len", "16", "--max-batches", "1",
                               "--json"], capsys)
        assert 0 < json.loads(out)["loss"] < 20


@pytest.mark.parametrize("label", ALL)
def test_predict_and_rl_eval_name_what_the_path_is(kinds, label, capsys):
    """Neither an LM nor an exported file is a classification run or a policy: one line saying what it is."""
    code, _, err = _cli(["predict", kinds[label], "some text"], capsys)
    _one_line_naming(code, err, label)
    code, _, err = _cli(["rl", "eval", kinds[label], "--episodes", "1"], capsys)
    _one_line_naming(code, err, label)


@pytest.mark.parametrize("label", ALL)
def test_convert(kinds, label, capsys, tmp_path):
    code, out, err = _cli(["convert", kinds[label], tmp_path / "out"], capsys)
    if label in ("run", "checkpoint", "merged"):
        assert code == 0 and (tmp_path / "out" / "config.json").is_file(), err
    elif label == "hf":
        assert code == 0 and (tmp_path / "out" / "meta.json").is_file(), err
    else:
        _one_line_naming(code, err, label)


@pytest.mark.parametrize("label", ALL)
def test_serve_loads_or_names_the_kind(kinds, label, capsys):
    from torchgraft.serve.artifact import DecoderArtifact, load_artifact

    if label in LM_OK:
        assert isinstance(load_artifact(kinds[label]), DecoderArtifact)
    else:
        code, _, err = _cli(["serve", kinds[label], "--port", "0"], capsys)
        _one_line_naming(code, err, label)


@pytest.mark.parametrize("label", ALL)
def test_export_errors_name_the_kind(kinds, label, capsys, tmp_path):
    if label in LM_OK:
        pytest.skip("exporting every kind runs in test_export_every_model_kind (slow)")
    code, _, err = _cli(["export", kinds[label], "--out", tmp_path / "m.onnx"], capsys)
    _one_line_naming(code, err, label)


@pytest.mark.slow
@pytest.mark.parametrize("label", LM_OK)
def test_export_every_model_kind(kinds, label, capsys, tmp_path):
    code, out, err = _cli(["export", kinds[label], "--format", "pt2", "--out", tmp_path / "m.pt2",
                           "--dynamic", "none"], capsys)
    assert code == 0 and (tmp_path / "m.pt2").is_file(), err


def _finetune_argv(kinds, source, out):
    cfg = kinds["_base"] / "ft.yaml"
    return ["finetune", cfg, f"finetune.source={source}", "finetune.method=full", "trainer.max_steps=1",
            "schedule.warmup_steps=0",
            "eval.max_batches=1", "--out", out]


@pytest.mark.parametrize("label", ALL)
def test_finetune_source_and_init_from(kinds, label, capsys, tmp_path, one_thread):
    """finetune.source takes every kind that holds weights; trainer.init_from torchgraft weights only."""
    path = kinds[label]
    code, out, err = _cli(_finetune_argv(kinds, path, tmp_path / "ft"), capsys)
    if label in ("run", "checkpoint", "merged", "hf", "peft-adapter", "safetensors"):
        assert code == 0, err
        assert json.loads((tmp_path / "ft" / "transfer.json").read_text())["summary"]["copied"] > 0
    else:
        _one_line_naming(code, err, label)
    code, out, err = _cli(["train", "configs/gpt-char.yaml", *SMALL, "trainer.max_steps=1", "eval.max_batches=1",
                           "schedule.warmup_steps=0",
                           "trainer.batch_size=2", *QUIET, f"trainer.init_from={path}", "--out", tmp_path / "tr"],
                          capsys)
    if label in ("run", "checkpoint", "merged", "safetensors"):
        assert code == 0, err
    else:
        _one_line_naming(code, err, label)


def test_checkpoint_package_stays_below_train_and_interop():
    """checkpoint/ (resolve, the format, the rebuild) imports neither train/, interop/ nor recipes/, so
    every package can read paths and checkpoints through it."""
    from test_layering import import_graph

    g = import_graph()
    bad = sorted(f"{m} -> {t}" for m, ts in g.items() if m.startswith("torchgraft.checkpoint")
                 for t in ts if t.startswith(("torchgraft.train", "torchgraft.interop", "torchgraft.recipes")))
    assert not bad, "\n".join(bad)


def test_adapter_spec_round_trip_dora_and_two_ranks():
    """The spec a model writes re-creates its wrappers exactly: DoRA kept, two groups of different rank
    each get theirs, and the re-created model gives the same outputs once the weights are loaded."""
    from torchgraft.peft import apply_lora, lora_layers
    from torchgraft.peft.spec import adapter_spec, apply_adapter_spec

    torch.manual_seed(0)
    a = torchgraft.build("gpt-tiny", n_layer=1, n_embd=32, n_head=2, vocab_size=50, block_size=16)
    apply_lora(a, ["q_proj"], rank=4, alpha=8, dora=True)
    for layer in lora_layers(a).values():  # B starts at zero: make the adapters matter
        torch.nn.init.normal_(layer.lora_B.default.weight)
    spec = adapter_spec(a)
    assert spec == {"groups": [{"layers": ["blocks.0.attn.q_proj"], "rank": 4, "alpha": 8.0, "dora": True,
                                "use_rslora": False}]}
    b = torchgraft.build("gpt-tiny", n_layer=1, n_embd=32, n_head=2, vocab_size=50, block_size=16)
    apply_adapter_spec(b, json.loads(json.dumps(spec)), layers=[])
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))
    two = {"groups": [{"layers": ["blocks.0.attn.q_proj"], "rank": 2, "alpha": 4.0},
                      {"layers": ["blocks.0.attn.v_proj"], "rank": 6, "alpha": 6.0, "use_rslora": True}]}
    c = torchgraft.build("gpt-tiny", n_layer=1, n_embd=32, n_head=2, vocab_size=50, block_size=16)
    apply_adapter_spec(c, two, layers=[])
    got = {n: (l.r, l.lora_alpha, l.use_rslora) for n, l in lora_layers(c).items()}
    assert got == {"blocks.0.attn.q_proj": (2, 4.0, False), "blocks.0.attn.v_proj": (6, 6.0, True)}
    assert adapter_spec(c)["groups"] == [dict(g, dora=False, use_rslora=g.get("use_rslora", False))
                                         for g in two["groups"]]
    assert {n for n, p in c.named_parameters() if p.requires_grad} == {
        f"blocks.0.attn.{m}.{w}" for m in ("q_proj", "v_proj") for w in ("lora_A.default.weight",
                                                                         "lora_B.default.weight")}
