"""Generation: KV cache equals full recompute, left-padded batches, sampling filters, stopping, CLI."""
import json

import pytest
import torch

import torchgraft
from torchgraft.data.tokenizers import char_tokenizer
from torchgraft.data.text import builtin_documents
from torchgraft.errors import ConfigError
from torchgraft.generation import (apply_repetition_penalty, generate, next_token, stream, top_k_filter,
                                   top_p_filter)

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 101, 102, 7]]


def _model(name):
    torch.manual_seed(0)
    return torchgraft.build(name, init_std=0.3).eval()  # large init: varied, non-repeating greedy output


def _naive_greedy(model, ids, n):
    """Reference: full forward each step, argmax of the last position, one prompt at a time."""
    ids = torch.tensor([ids])
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, -n:].tolist()


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_cached_greedy_equals_uncached_and_naive_with_left_padding(name):
    model = _model(name)
    cached = generate(model, PROMPTS, max_new_tokens=24)
    uncached = generate(model, PROMPTS, max_new_tokens=24, use_cache=False)
    naive = [_naive_greedy(model, p, 24) for p in PROMPTS]
    assert cached.tokens == uncached.tokens == naive
    assert len(set(map(tuple, naive))) == 3 and len(set(naive[0])) > 5  # a non-trivial comparison
    assert cached.prompt_lengths == [7, 2, 4] and cached.finish_reasons == ["length"] * 3


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_cached_sampling_equals_uncached(name):
    model = _model(name)
    opts = dict(max_new_tokens=20, temperature=0.9, top_k=30, top_p=0.9, repetition_penalty=1.3, seed=7)
    a = generate(model, PROMPTS, **opts)
    assert a.tokens == generate(model, PROMPTS, use_cache=False, **opts).tokens
    assert a.tokens == generate(model, PROMPTS, **opts).tokens  # same seed, same draws
    assert a.tokens != generate(model, PROMPTS, **{**opts, "seed": 8}).tokens


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_generating_past_block_size_shifts_the_context_identically_with_and_without_cache(name):
    model = _model(name)
    n = model.config.block_size + 40  # forces two context shifts for the longest row
    cached = generate(model, PROMPTS, max_new_tokens=n)
    assert all(len(t) == n for t in cached.tokens)
    assert cached.tokens == generate(model, PROMPTS, max_new_tokens=n, use_cache=False).tokens
    # up to the first shift, this is plain generation
    first = model.config.block_size - len(PROMPTS[0]) + 1
    assert cached.tokens[0][:first] == _naive_greedy(model, PROMPTS[0], first)


def test_input_ids_tensor_with_mask_matches_lists():
    model = _model("gpt-tiny")
    ids = torch.tensor([[0, 0, 3, 4], [5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    out = generate(model, ids, attention_mask=mask, max_new_tokens=10)
    assert out.tokens == generate(model, [[3, 4], [5, 6, 7, 8]], max_new_tokens=10).tokens
    with pytest.raises(ConfigError, match="left-padded"):
        generate(model, ids, attention_mask=mask.flip(-1), max_new_tokens=2)


def test_filters_match_transformers_logits_processors():
    tr = pytest.importorskip("transformers")
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor,
                                                         TopKLogitsWarper, TopPLogitsWarper)
    torch.manual_seed(1)
    logits = torch.randn(4, 50) * 3
    seen = torch.randint(0, 50, (4, 12))
    for p in (0.3, 0.75, 0.95):
        ref = TopPLogitsWarper(p)(seen, logits.clone())
        assert torch.equal(torch.isinf(top_p_filter(logits, p)), torch.isinf(ref)), p
    for k in (1, 5, 49):
        ref = TopKLogitsWarper(k)(seen, logits.clone())
        assert torch.equal(torch.isinf(top_k_filter(logits, k)), torch.isinf(ref)), k
    ref = RepetitionPenaltyLogitsProcessor(1.5)(seen, logits.clone())
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.5), ref)  # one multiply or divide per logit
    assert tr is not None


def test_sampling_frequencies_follow_filtered_softmax():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    draws = next_token(logits, temperature=1.0, top_k=2, generator=g)
    freq = torch.bincount(draws, minlength=4).float() / len(draws)

    def within_5_sigma(freq, p):  # a frequency of n draws has standard deviation sqrt(p (1 - p) / n)
        assert ((freq - p).abs() <= 5 * (p * (1 - p) / len(draws)).sqrt()).all(), (freq, p)

    within_5_sigma(freq, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    draws = next_token(logits, temperature=1.0, top_p=0.9, generator=g)  # keeps 0.5, 0.3, 0.15
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    within_5_sigma(freq, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    assert torch.equal(next_token(logits[:3], temperature=1.0, top_k=1), torch.zeros(3, dtype=torch.long))


def test_greedy_matches_transformers_generate_on_same_weights(tmp_path):
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = tr.GPT2LMHeadModel(tr.GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                          initializer_range=0.3)).eval()
    hf.save_pretrained(tmp_path)
    ours = torchgraft.load_hf(tmp_path).eval()
    ids = torch.tensor([[0, 0, 0, 5, 6], [9, 8, 7, 6, 5]])
    mask = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0,
                      eos_token_id=None)[:, 5:].tolist()
    assert generate(ours, ids, attention_mask=mask, max_new_tokens=16).tokens == ref


@pytest.fixture(scope="module")
def char_setup():
    tok = char_tokenizer(builtin_documents())
    torch.manual_seed(0)
    model = torchgraft.build("gpt-tiny", vocab_size=tok.vocab_size, block_size=128, init_std=0.3).eval()
    return model, tok


def test_eos_and_stop_strings_end_rows(char_setup):
    model, tok = char_setup
    free = generate(model, ["The ", "def"], tok, max_new_tokens=40)
    text = free.texts[0]
    assert free.texts == [tok.decode(t) for t in free.tokens] and len(text) == 40
    eos = free.tokens[0][5]
    first = free.tokens[0].index(eos)
    out = generate(model, ["The "], tok, max_new_tokens=40, eos_token_id=eos)
    assert out.tokens[0] == free.tokens[0][:first] and out.finish_reasons == ["eos"]
    stop = text[10:13]
    out = generate(model, ["The ", "def"], tok, max_new_tokens=40, stop=[stop, "\x00never"])
    cut = text.find(stop)
    assert out.texts[0] == text[:cut] and out.finish_reasons[0] == "stop"
    assert len(out.tokens[0]) == cut + len(stop)  # one char per token: stops right after the stop string
    other = free.texts[1]
    assert out.texts[1] == (other[:other.find(stop)] if stop in other else other)


def test_stream_pieces_concatenate_to_generate_text(char_setup):
    model, tok = char_setup
    full = generate(model, "Python ", tok, max_new_tokens=30).texts[0]
    pieces = list(stream(model, "Python ", tok, max_new_tokens=30))
    assert "".join(pieces) == full and len(pieces) > 5  # streamed as it goes, not in one piece
    stop = full[12:15]
    pieces = list(stream(model, "Python ", tok, max_new_tokens=30, stop=stop))
    assert "".join(pieces) == full[:full.find(stop)]
    sampled = dict(max_new_tokens=30, temperature=1.0, top_k=10, seed=3)
    assert "".join(stream(model, "a", tok, **sampled)) == generate(model, "a", tok, **sampled).texts[0]


def test_bad_generation_inputs(char_setup):
    model, tok = char_setup
    with pytest.raises(ConfigError, match="longer than the model's block_size"):
        generate(model, "x" * 129, tok, max_new_tokens=5)
    with pytest.raises(ConfigError, match="need a tokenizer"):
        generate(model, "hello", max_new_tokens=5)
    with pytest.raises(ConfigError, match="temperature"):
        generate(model, [[1, 2]], max_new_tokens=5, temperature=-1)
    with pytest.raises(ConfigError, match="top_p"):
        generate(model, [[1, 2]], max_new_tokens=5, top_p=1.5)


def _run_dir(model, tok, root):
    from torchgraft.checkpoint.files import write_checkpoint
    from torchgraft.train.trainer import model_meta

    run = root / "run"
    write_checkpoint(run / "checkpoints" / "step_00000005", model_state=model.state_dict(),
                     meta={"model": model_meta(model), "step": 5})
    tok.save(run)
    return run


def test_cli_generate_streams_from_a_run_dir(char_setup, tmp_path, capsys):
    from torchgraft.cli import main

    model, tok = char_setup
    run = _run_dir(model, tok, tmp_path)
    main(["generate", str(run), "--prompt", "The ", "-n", "25", "-t", "0"])
    out = capsys.readouterr().out
    assert out == "The " + generate(model, "The ", tok, max_new_tokens=25).texts[0] + "\n"
    main(["generate", str(run), "-p", "a", "-p", "bc", "-n", "5", "-t", "0"])
    out = capsys.readouterr().out
    assert "--- 'a'" in out and "--- 'bc'" in out
    with pytest.raises(SystemExit) as e:
        main(["generate", str(tmp_path / "nothing"), "--prompt", "x"])
    assert e.value.code == 2 and "not found" in capsys.readouterr().err
    assert json.loads((run / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"


def test_cli_generate_compile_reaches_the_decoder_and_rejects_no_cache(char_setup, tmp_path, capsys,
                                                                        monkeypatch):
    from torchgraft.cli import main

    model, tok = char_setup
    run = _run_dir(model, tok, tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["generate", str(run), "-p", "The ", "-n", "5", "--compile", "--no-cache"])
    assert e.value.code == 2 and "drop --no-cache" in capsys.readouterr().err

    def broken_compile(*args, **kwargs):
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", broken_compile)  # only a compiling decoder calls it
    with pytest.warns(UserWarning, match="decoding eagerly"):
        main(["generate", str(run), "-p", "The ", "-n", "25", "-t", "0", "--compile"])
    assert capsys.readouterr().out == "The " + generate(model, "The ", tok, max_new_tokens=25).texts[0] + "\n"


@pytest.mark.slow
def test_cli_generate_compiled_equals_eager(char_setup, tmp_path, capsys, recwarn):
    from torchgraft.cli import main

    model, tok = char_setup
    run = _run_dir(model, tok, tmp_path)
    main(["generate", str(run), "-p", "The ", "-p", "def", "-n", "20", "-t", "0"])
    eager = capsys.readouterr().out
    main(["generate", str(run), "-p", "The ", "-p", "def", "-n", "20", "-t", "0", "--compile"])
    assert capsys.readouterr().out == eager and "--- 'def'" in eager
    assert not [w for w in recwarn if "decoding eagerly" in str(w.message)]  # really compiled


def test_trained_run_saves_its_tokenizer_for_generate_and_convert(tmp_path, capsys, monkeypatch):
    """`torchgraft train` writes <run>/tokenizer/; generate uses it (no rebuild) and convert copies it."""
    from pathlib import Path

    import torchgraft.recipes.lm as lm_mod
    from torchgraft.cli import main
    from torchgraft.data import run_tokenizer
    from torchgraft.data.tokenizers import load_tokenizer

    config = Path(__file__).resolve().parents[1] / "configs" / "gpt-char.yaml"
    run, hf = tmp_path / "run", tmp_path / "hf"
    main(["train", str(config), "--out", str(run), "trainer.max_steps=2", "schedule.warmup_steps=0", "eval.max_batches=1",
          "logging.progress=false", "logging.tensorboard=false", "logging.measure_flops=false",
          f"data.cache_dir={tmp_path / 'cache'}", "data.progress=false", "data.seq_len=32"])
    capsys.readouterr()
    saved = run / "tokenizer" / "tokenizer.json"
    assert saved.is_file() and (run / "tokenizer" / "tokenizer_config.json").is_file()
    tok = load_tokenizer(saved)
    assert tok.vocab_size == 106 and tok.eos_token == "<|endoftext|>"

    def no_rebuild(data):
        raise AssertionError("the tokenizer was rebuilt from the config instead of read from the run")

    monkeypatch.setattr(run_tokenizer, "tokenizer_from_data", no_rebuild)
    main(["generate", str(run), "--prompt", "The", "--max-new-tokens", "5", "-t", "0"])
    out = capsys.readouterr().out
    lm = lm_mod.load_lm(run)
    assert out == "The" + generate(lm.model, "The", lm.tokenizer, max_new_tokens=5).texts[0] + "\n"
    main(["convert", str(run), str(hf)])
    assert (hf / "tokenizer.json").read_text() == saved.read_text()
    assert (hf / "tokenizer_config.json").is_file() and "tokenizer" in capsys.readouterr().out
    back = lm_mod.load_lm(hf)  # the HF directory carries the tokenizer, and the same weights
    assert back.tokenizer.fingerprint() == tok.fingerprint()
    assert generate(back.model, "The", back.tokenizer, max_new_tokens=5).texts == \
        generate(lm.model, "The", lm.tokenizer, max_new_tokens=5).texts
    # a run without the saved file (older runs): convert rebuilds the same tokenizer from the config
    monkeypatch.undo()
    for f in (run / "tokenizer").iterdir():
        f.unlink()
    main(["convert", str(run), str(tmp_path / "hf2")])
    assert load_tokenizer(tmp_path / "hf2").fingerprint() == tok.fingerprint()
