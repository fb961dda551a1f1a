"""Issue 15 item 0: a LoRA fine-tune of a language model works end to end from the command line:
generate, eval, convert and load_model accept the run directory (adapters re-applied and merged) and
its merged/ folder, with the same numbers; the fine-tune reuses the source's tokenizer; an HF
tokenizer.json's padding/truncation never leaks into encode."""
import json

import pytest
import torch

from torchgraft.cli import main
from torchgraft.testing import assert_close_computed, transformer_tol
from conftest import invoke_cli

QUIET = ["logging.progress=false", "logging.tensorboard=false", "logging.measure_flops=false"]
SMALL = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "data.seq_len=32", "model.block_size=32"]


def cli(argv, capsys):
    return invoke_cli(argv, capsys)[:3]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("lora")
    main(["train", "configs/gpt-char.yaml", *SMALL, "trainer.max_steps=3", "schedule.warmup_steps=0", "trainer.batch_size=4",
          "eval.max_batches=1", "eval.every=0", *QUIET, "--out", str(base / "src")])
    cfg = base / "ft.yaml"
    cfg.write_text(f"""
finetune: {{source: {base / 'src'}, method: lora, lora: {{targets: [q_proj, v_proj], rank: 4, alpha: 8}}}}
model: {{name: gpt-tiny, n_layer: 1, n_embd: 32, n_head: 2, block_size: 32}}
data: {{name: text, source: builtin, tokenizer: byte, seq_len: 32}}
optim: {{lr: 5.0e-2}}
trainer: {{max_steps: 3, batch_size: 4}}
eval: {{max_batches: 1}}
logging: {{progress: false, tensorboard: false, measure_flops: false}}
""")
    with pytest.warns(UserWarning, match="using the source's tokenizer"):
        main(["finetune", str(cfg), "--out", str(base / "ft"), "--merge"])
    return base


def test_finetune_reused_the_source_tokenizer(lora_run):
    report = json.loads((lora_run / "ft" / "transfer.json").read_text())
    assert report["summary"]["mismatched"] == 0 and report["summary"]["copied"] > 0  # tok_emb kept its meaning
    src = json.loads((lora_run / "src" / "tokenizer" / "tokenizer.json").read_text())
    ft = json.loads((lora_run / "ft" / "tokenizer" / "tokenizer.json").read_text())
    assert src["model"]["vocab"] == ft["model"]["vocab"]


@pytest.mark.parametrize("where", ["ft", "ft/merged"])
def test_generate_eval_convert_accept_lora_run_and_merged(lora_run, tmp_path, capsys, where, one_thread):
    path = lora_run / where
    code, out, err = cli(["generate", path, "-p", "The ", "-n", "8", "-t", "0"], capsys)
    assert code == 0 and out.startswith("The ") and len(out) > len("The \n"), err
    code, out, err = cli(["eval", path, "--json", "--max-batches", "2"], capsys)
    assert code == 0, err
    loss = json.loads(out)["loss"]
    assert 0 < loss < 10
    code, out, err = cli(["convert", path, tmp_path / "hf"], capsys)
    assert code == 0 and (tmp_path / "hf" / "config.json").is_file(), err
    code, out2, err = cli(["eval", tmp_path / "hf", "--json", "--max-batches", "2", "--data", "builtin",
                           "--seq-len", "32"], capsys)
    assert code == 0, err


def test_run_dir_and_merged_give_the_same_model(lora_run, one_thread):
    from torchgraft import load_model

    a, b = load_model(lora_run / "ft").eval(), load_model(lora_run / "ft" / "merged").eval()
    assert set(a.state_dict()) == set(b.state_dict())  # plain names: the adapters are merged
    x = torch.randint(0, a.config.vocab_size, (2, 16))
    assert_close_computed(a(x), b(x), transformer_tol(a.config, x.shape[1]))  # adapters vs merged weights
    base = load_model(lora_run / "src").eval()
    assert not torch.allclose(a(x), base(x), atol=1e-4)  # the adapters did change the model


def test_hf_tokenizer_padding_and_truncation_do_not_leak(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from torchgraft.data.tokenizers import load_tokenizer

    backend = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "hello": 2, "world": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.enable_padding(pad_id=0, pad_token="[PAD]", length=128)
    backend.enable_truncation(max_length=1)
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert tok.encode("hello world") == [2, 3]
    assert tok.encode_batch(["hello", "hello world world"]) == [[2], [2, 3, 3]]


def test_inspect_honours_the_finetune_section(capsys):
    code, out, err = cli(["inspect", "configs/finetune-llama-lora.yaml", "--json"], capsys)
    assert code == 0, err
    lora = json.loads(out)
    code, out, err = cli(["inspect", "configs/llama-char.yaml", "--json"], capsys)
    full = json.loads(out)
    assert lora["trainable_parameters"] < 0.05 * lora["parameters"]  # only the adapters train
    assert lora["memory_bytes"]["optimizer"] < 0.05 * full["memory_bytes"]["optimizer"]


def test_progress_is_plain_lines_when_stdout_is_not_a_terminal(capsys):
    from torchgraft.train.logging import ProgressBar

    bar = ProgressBar(10, enabled=True)  # pytest's captured stdout is not a tty
    bar.update(2, {"loss": 1.5, "lr": 1e-3})
    bar.print("step 2: val_loss 1.4")
    bar.close()
    assert capsys.readouterr().out.splitlines() == ["step 2/10  loss 1.5000  lr 1.00e-03", "step 2: val_loss 1.4"]
