"""`torchgraft eval`: perplexity = exp(mean next-token NLL) for run dirs, checkpoints and HF dirs."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import torchgraft
from torchgraft.cli import main
from torchgraft.data import build_data
from torchgraft.data.tokenizers import byte_tokenizer
from torchgraft.data.text import builtin_documents
from torchgraft.errors import CheckpointError, ConfigError
from torchgraft.recipes.lm import eval_lm, perplexity
from torchgraft.testing import assert_close_computed, tolerance, transformer_tol
from torchgraft.checkpoint.files import write_checkpoint
from torchgraft.train.trainer import model_meta


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    section = {"name": "text", "tokenizer": "char", "seq_len": 64, "cache_dir": str(cache), "progress": False}
    return section, build_data(section)


def _save_run(run, model, data_section):
    write_checkpoint(run / "checkpoints" / "step_00000001", model_state=model.state_dict(),
                     meta={"model": model_meta(model), "step": 1,
                           "run_config": {"model": {"name": "gpt-tiny"}, "data": data_section}})


def test_uniform_model_has_perplexity_vocab_size(data):
    _, bundle = data
    v = bundle.info["vocab_size"]
    model = torchgraft.build("gpt-tiny", vocab_size=v)
    with torch.no_grad():
        model.tok_emb.weight.zero_()  # tied head: every logit is 0, so p = 1/V everywhere
    out = perplexity(model, bundle.val, batch_size=32, max_batches=2)
    assert out["tokens"] == 2 * 32 * 64
    # log-softmax of V equal logits, averaged over the tokens
    tol = tolerance(reduction=max(v, out["tokens"]), depth=2)
    assert_close_computed(torch.tensor(out["loss"]), torch.tensor(math.log(v)), tol)
    assert_close_computed(torch.tensor(out["perplexity"]), torch.tensor(float(v)), tol * math.log(v))  # exp


def test_perplexity_equals_hand_computed_mean_nll(data):
    _, bundle = data
    model = torchgraft.build("gpt-tiny", vocab_size=bundle.info["vocab_size"]).eval()
    out = perplexity(model, bundle.val, batch_size=7, max_batches=3)  # uneven last batch is fine
    nll = []
    for i in range(21):
        item = bundle.val[i]
        logits = model(item["input_ids"][None])[0]
        nll.append(F.cross_entropy(logits, item["labels"], reduction="none"))
    ref = torch.cat(nll).mean()
    # batched (7 rows) vs one row at a time, then a mean over the tokens
    tol = transformer_tol(model.config, model.config.block_size) + tolerance(len(nll) * 64)
    assert_close_computed(torch.tensor(out["loss"]), ref, tol)


def test_training_lowers_eval_loss_of_a_run_dir(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCHGRAFT_CACHE", str(tmp_path / "home_cache"))
    section, bundle = data
    torch.manual_seed(0)
    model = torchgraft.build("gpt-tiny", vocab_size=bundle.info["vocab_size"])
    _save_run(tmp_path / "before", model, section)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        batch = bundle.train.get_batch(torch.randint(len(bundle.train), (16,), generator=g))
        loss = F.cross_entropy(model(batch["input_ids"]).flatten(0, 1), batch["labels"].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    _save_run(tmp_path / "after", model, section)
    main(["eval", str(tmp_path / "before"), "--max-batches", "4", "--json"])
    before = json.loads(capsys.readouterr().out)
    main(["eval", str(tmp_path / "after"), "--max-batches", "4", "--json"])
    after = json.loads(capsys.readouterr().out)
    assert before["data"] == after["data"] == "validation split of text"
    assert before["loss"] > math.log(bundle.info["vocab_size"]) - 0.1  # untrained: about uniform
    assert after["loss"] < before["loss"] - 1.0  # 60 steps already learn character statistics
    assert after["perplexity"] == pytest.approx(math.exp(after["loss"]))
    # the tokenizer was rebuilt from the run's data section (no tokenizer.json in the run dir)
    main(["eval", str(tmp_path / "after"), "--data", "builtin", "--max-batches", "1"])
    assert "perplexity" in capsys.readouterr().out


def test_eval_hf_dir_matches_transformers_loss(tmp_path):
    tr = pytest.importorskip("transformers")
    tok = byte_tokenizer()
    torch.manual_seed(0)
    hf = tr.GPT2LMHeadModel(tr.GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=32,
                                          n_layer=2, n_head=4)).eval()
    hf.save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf")
    text = tmp_path / "held_out.txt"
    text.write_text(builtin_documents()[7][:3000])
    out = eval_lm(tmp_path / "hf", str(text), seq_len=32, cache_dir=str(tmp_path / "cache"))
    ids = torch.tensor(tok.encode(text.read_text(), add_eos=True))
    n = (len(ids) - 1) // 32
    windows = torch.stack([ids[i * 32:i * 32 + 33] for i in range(n)])  # (N, 33)
    with torch.no_grad():
        ref = hf(input_ids=windows, labels=windows).loss.item()  # HF shifts labels itself
    assert out["tokens"] == n * 32
    assert_close_computed(torch.tensor(out["loss"]), torch.tensor(ref),
                          transformer_tol(hf.config, 32) + tolerance(n * 32))  # ours vs transformers, a mean


def test_eval_errors(tmp_path, data, capsys):
    _, bundle = data
    with pytest.raises(CheckpointError, match="not found"):
        eval_lm(tmp_path / "missing")
    model = torchgraft.build("gpt-tiny", vocab_size=bundle.info["vocab_size"])
    write_checkpoint(tmp_path / "ck", model_state=model.state_dict(),
                     meta={"model": model_meta(model), "step": 1})
    with pytest.raises(ConfigError, match="pass --data"):
        eval_lm(tmp_path / "ck")
    with pytest.raises(SystemExit) as e:
        main(["eval", str(tmp_path / "ck")])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: ")
