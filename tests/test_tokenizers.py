"""Tokenizers: char / byte / byte-level BPE, special tokens, tokenizer.json round trips."""
import json

import pytest

from torchgraft.cli import main
from torchgraft.data.tokenizers import (EOS, PAD, UNK, byte_tokenizer, char_tokenizer, load_tokenizer,
                                        train_bpe)
from torchgraft.data.text import builtin_documents
from torchgraft.errors import ConfigError, TorchgraftError

UNICODE = "naïve café — 日本語 😀\n\ttabs and  spaces  "


@pytest.fixture(scope="module")
def corpus():
    return builtin_documents()


@pytest.fixture(scope="module")
def bpe(corpus):
    return train_bpe(corpus, vocab_size=1000)


def test_char_tokenizer_round_trip_and_specials(corpus):
    tok = char_tokenizer(corpus)
    text = "".join(corpus)
    assert tok.vocab_size == 3 + len(set(text))
    assert (tok.eos_id, tok.pad_id, tok.token_to_id(UNK)) == (0, 1, 2)
    assert tok.bos_id == tok.eos_id  # GPT-2 convention: one <|endoftext|> for both ends
    ids = tok.encode(corpus[0])
    assert len(ids) == len(corpus[0])  # one id per character
    assert tok.decode(ids) == corpus[0]
    assert tok.encode("ab", add_bos=True, add_eos=True) == [0, tok.token_to_id("a"), tok.token_to_id("b"), 0]
    assert tok.encode("a\U0001F600b")[1] == tok.token_to_id(UNK)  # unseen character
    assert tok.decode([0, *tok.encode("x"), 1], skip_special_tokens=False) == f"{EOS}x{PAD}"


def test_byte_tokenizer_covers_any_text():
    tok = byte_tokenizer()
    assert tok.vocab_size == 258
    ids = tok.encode(UNICODE)
    assert len(ids) == len(UNICODE.encode("utf-8"))
    assert tok.decode(ids) == UNICODE


def test_bpe_training_compresses_and_round_trips(bpe, corpus):
    assert bpe.vocab_size == 1000
    text = corpus[5]
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert len(text.encode()) / len(ids) > 2.0  # merges learned on English: > 2 bytes per token
    assert bpe.decode(bpe.encode(UNICODE)) == UNICODE  # bytes fallback: nothing is unknown
    assert bpe.encode("hi", add_eos=True)[-1] == bpe.eos_id == bpe.token_to_id(EOS)
    assert bpe.pad_id == bpe.token_to_id(PAD) != bpe.eos_id


def test_save_load_round_trip_and_transformers_parity(bpe, corpus, tmp_path):
    path = bpe.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert path.name == "tokenizer.json"
    assert (again.bos_id, again.eos_id, again.pad_id) == (bpe.bos_id, bpe.eos_id, bpe.pad_id)
    assert again.encode(corpus[3]) == bpe.encode(corpus[3])
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tok"))
    assert hf.encode(corpus[3]) == bpe.encode(corpus[3])
    assert (hf.eos_token_id, hf.pad_token_id) == (bpe.eos_id, bpe.pad_id)


def test_loading_bare_tokenizer_json_finds_specials_by_name(bpe, tmp_path):
    bpe.save(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert tok.eos_id == bpe.eos_id and tok.pad_id == bpe.pad_id


def test_hf_style_config_with_dict_tokens_and_no_pad(bpe, tmp_path):
    bpe.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": EOS, "special": True}, "bos_token": EOS, "pad_token": None}))
    tok = load_tokenizer(tmp_path)
    assert tok.pad_token is None and tok.pad_id == tok.eos_id  # pads with eos when there is no pad


def test_bad_tokenizer_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="at least 258"):
        train_bpe(["abc"], vocab_size=100)
    with pytest.raises(ConfigError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not a valid tokenizer.json"):
        load_tokenizer(bad)


def test_cli_tokenizer_train(tmp_path, corpus, capsys):
    (tmp_path / "a.txt").write_text("\n\n".join(corpus[:40]))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in corpus[40:]))
    out = tmp_path / "out"
    main(["tokenizer", "train", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"),
          "--vocab-size", "600", "--out", str(out)])
    assert "600 ids" in capsys.readouterr().out
    tok = load_tokenizer(out)
    assert tok.vocab_size == 600 and tok.decode(tok.encode(corpus[50])) == corpus[50]


def test_cli_tokenizer_train_missing_file_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["tokenizer", "train", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: training file not found") and err.count("\n") == 1
    assert issubclass(ConfigError, TorchgraftError)
