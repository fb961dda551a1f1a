"""The "text" dataset: sources, cached shards, packed windows, deterministic split."""
import json
import os

import numpy as np
import pytest
import torch

from torchgraft.data import build_data
from torchgraft.data.loader import StatefulSampler  # noqa: F401  (the trainer's sampler indexes us)
from torchgraft.data.text import (PackedWindows, TokenStream, build_shards, builtin_documents, token_dtype)
from torchgraft.data.tokenizers import char_tokenizer
from torchgraft.errors import ConfigError


def _build(tmp_path, **opts):
    return build_data({"name": "text", "cache_dir": str(tmp_path / "cache"), "progress": False, **opts})


def test_builtin_char_stream_is_documents_joined_by_eos(tmp_path):
    b = _build(tmp_path, seq_len=32)
    tok, info = b.info["tokenizer"], b.info
    docs = builtin_documents()
    assert b.task == "lm" and info["vocab_size"] == tok.vocab_size
    stream = TokenStream(info["shard_dir"])
    expected = [i for d in docs for i in tok.encode(d, add_eos=True)]
    assert len(stream) == len(expected) == info["n_train_tokens"] + info["n_val_tokens"]
    assert np.array_equal(stream[0:len(stream)], np.array(expected))
    assert stream.dtype == np.uint16
    # windows: labels are the inputs shifted by one; consecutive windows tile the stream
    w0, w1 = b.train[0], b.train[1]
    assert w0["input_ids"].shape == (32,) and w0["input_ids"].dtype == torch.long
    assert torch.equal(w0["labels"][:-1], w0["input_ids"][1:])
    assert w0["labels"][-1] == w1["input_ids"][0]
    assert tok.decode(w0["input_ids"]) == docs[0][:32]
    # deterministic split: validation is the tail, disjoint from training windows
    n_train = info["n_train_tokens"]
    assert abs(info["n_val_tokens"] / len(stream) - 0.1) < 1e-3
    assert len(b.train) == (n_train - 33) // 32 + 1
    first_val = b.val[0]["input_ids"].numpy()
    assert np.array_equal(first_val, stream[n_train:n_train + 32])


def test_batches_via_get_batch_match_items(tmp_path):
    b = _build(tmp_path, seq_len=16, stride=8)
    batch = b.train.get_batch(torch.tensor([3, 0, 7]))
    assert batch["input_ids"].shape == (3, 16)
    assert torch.equal(batch["input_ids"][1], b.train[0]["input_ids"])
    assert torch.equal(b.train[1]["input_ids"][:8], b.train[0]["input_ids"][8:])  # stride 8 overlaps


def test_max_tokens_uses_a_prefix_of_the_same_stream(tmp_path):
    full = _build(tmp_path, seq_len=32)
    small = _build(tmp_path, seq_len=32, max_tokens=2000, val_fraction=0.2)
    assert small.info["shard_dir"] == full.info["shard_dir"]  # same shards, same tokenizer
    assert small.info["tokenizer"].fingerprint() == full.info["tokenizer"].fingerprint()
    assert small.info["n_train_tokens"] == 1600 and small.info["n_val_tokens"] == 400
    assert len(small.train) == (1600 - 33) // 32 + 1 and len(small.val) == (400 - 33) // 32 + 1
    assert torch.equal(small.train[3]["input_ids"], full.train[3]["input_ids"])
    assert torch.equal(small.val[0]["input_ids"], full.train.get_batch(torch.tensor([50]))["input_ids"][0])
    with pytest.raises(ConfigError, match="max_tokens"):
        _build(tmp_path, max_tokens=0)
    with pytest.raises(ConfigError, match="max_tokens"):
        _build(tmp_path, seq_len=32, max_tokens=40)


def test_shards_are_written_once_and_reused(tmp_path, monkeypatch):
    b = _build(tmp_path, seq_len=64)
    meta = os.path.join(b.info["shard_dir"], "meta.json")
    stamp = os.stat(meta).st_mtime_ns
    from torchgraft.data import tokenizers

    def boom(*a, **k):
        raise AssertionError("re-tokenized although the cache exists")

    monkeypatch.setattr(tokenizers.Tokenizer, "encode_batch", boom)
    b2 = _build(tmp_path, seq_len=128)  # another window length reuses the same shards
    assert b2.info["shard_dir"] == b.info["shard_dir"] and os.stat(meta).st_mtime_ns == stamp
    assert len(b2.train) < len(b.train)


def test_windows_across_shard_boundaries(tmp_path):
    tok = char_tokenizer(builtin_documents())
    one = TokenStream(build_shards("builtin", "text", tok, tmp_path / "a", progress=False))
    many = TokenStream(build_shards("builtin", "text", tok, tmp_path / "b", shard_tokens=1000,
                                    progress=False))
    assert len(many.meta["shards"]) == -(-len(one) // 1000)
    wa, wb = PackedWindows(one, 0, len(one), 100, 37), PackedWindows(many, 0, len(many), 100, 37)
    assert len(wa) == len(wb)
    for i in (0, 26, 27, len(wa) - 1):  # window 27 spans shards 0 and 1
        assert torch.equal(wa[i]["input_ids"], wb[i]["input_ids"])


def test_jsonl_directory_source_bpe_and_cache_invalidation(tmp_path):
    docs = builtin_documents()
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "b.jsonl").write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs[:30])))
    (src / "sub" / "c.txt").write_text(docs[30])
    (src / ".hidden.txt").write_text("QQZZXQ")
    b = _build(tmp_path, source=str(src), field="body", tokenizer="bpe", vocab_size=400, seq_len=32)
    tok = b.info["tokenizer"]
    assert tok.vocab_size == 400 and b.info["tokenizer_path"].endswith("tokenizer.json")
    stream = TokenStream(b.info["shard_dir"])
    assert stream.meta["n_documents"] == 31
    text = tok.decode(stream[0:len(stream)], skip_special_tokens=False)
    assert text.startswith(docs[0] + "<|endoftext|>" + docs[1]) and "QQZZXQ" not in text
    (src / "sub" / "c.txt").write_text(docs[30] + "more")  # changed source -> new shards
    b2 = _build(tmp_path, source=str(src), field="body", tokenizer=b.info["tokenizer_path"], seq_len=32)
    assert b2.info["shard_dir"] != b.info["shard_dir"]


def test_token_dtype_by_vocab_size():
    assert token_dtype(258) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_bad_options_raise_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="seq_len"):
        _build(tmp_path, seq_lenn=8)
    with pytest.raises(ConfigError, match="not found"):
        _build(tmp_path, source=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="unknown tokenizer"):
        _build(tmp_path, tokenizer="wordpiece")
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"content": "hello"}\n')
    with pytest.raises(ConfigError, match="no field 'text'"):
        _build(tmp_path, source=str(bad))
    small = tmp_path / "s.txt"
    small.write_text("tiny")
    with pytest.raises(ConfigError, match="lower data.seq_len"):
        _build(tmp_path, source=str(small), seq_len=64, val_fraction=0.0)
