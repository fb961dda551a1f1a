"""The "preference" dataset: the sft chat rendering, labels on the completion only, truncation that
keeps the prompt, padded batches with masks, the record formats, and every bad-pair case as a
one-line error (exit 2 from the CLI) or a counted skip."""
from __future__ import annotations

import csv
import json
import string
import subprocess
import sys
import warnings

import pytest
import torch

from torchgraft.data import build_data
from torchgraft.data.chat_template import ChatTemplate
from torchgraft.data.sft import IGNORE_INDEX, encode_conversation
from torchgraft.data.tokenizers import char_tokenizer, load_tokenizer
from torchgraft.errors import ConfigError

CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"


@pytest.fixture
def tok_dir(tmp_path):
    d = tmp_path / "tok"
    char_tokenizer([CHARS]).save(d)
    return d


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def build(tmp_path, tok_dir, records, **opts):
    p = write_jsonl(tmp_path / "pairs.jsonl", records)
    return build_data({"name": "preference", "path": str(p), "tokenizer": str(tok_dir), "val_fraction": 0.0,
                       **opts})


PAIRS = [{"prompt": "What is 2+3?", "chosen": "5", "rejected": "six"},
         {"prompt": "Colour of the sky?", "chosen": "blue", "rejected": "green, mostly"}]


def test_pair_rendered_as_sft_with_completion_labels_only(tmp_path, tok_dir):
    bundle = build(tmp_path, tok_dir, PAIRS)
    tok = load_tokenizer(tok_dir)
    template = ChatTemplate.for_tokenizer(tok_dir, None, {"bos_token": tok.bos_token, "eos_token": tok.eos_token})
    item = bundle.train[1]
    for side in ("chosen", "rejected"):
        msgs = [{"role": "user", "content": PAIRS[1]["prompt"]}, {"role": "assistant", "content": PAIRS[1][side]}]
        sft = encode_conversation(msgs, template, tok)  # the sft dataset's tokens for the same chat
        assert item[f"{side}_ids"].tolist() == sft.ids[:-1]
        labels = item[f"{side}_labels"]
        trained = [t for t, keep in zip(sft.ids[1:], sft.trained[1:]) if keep]
        assert labels[labels != IGNORE_INDEX].tolist() == trained
        # the trained tokens are exactly the answer and the template's end of turn (eos, blank line)
        assert tok.decode(trained, skip_special_tokens=False) == PAIRS[1][side] + tok.eos_token + "\n\n"  # built-in template
    assert bundle.task == "dpo" and bundle.info["n_train_pairs"] == 2


def test_batches_padded_with_masks(tmp_path, tok_dir):
    bundle = build(tmp_path, tok_dir, PAIRS)
    batch = bundle.collate_fn([bundle.train[0], bundle.train[1]])
    t = max(len(bundle.train[i][f"{s}_ids"]) for i in range(2) for s in ("chosen", "rejected"))
    for s in ("chosen", "rejected"):
        assert batch[f"{s}_input_ids"].shape == (2, t)
        for r in range(2):
            n = len(bundle.train[r][f"{s}_ids"])
            assert batch[f"{s}_attention_mask"][r].tolist() == [1] * n + [0] * (t - n)
            assert (batch[f"{s}_labels"][r, n:] == IGNORE_INDEX).all()
            assert (batch[f"{s}_input_ids"][r, n:] == bundle.info["pad_id"]).all()
    assert batch["pair_id"].tolist() == [0, 1]


def test_truncation_keeps_prompt_and_cuts_completion(tmp_path, tok_dir):
    rec = {"prompt": "p" * 5, "chosen": "c" * 50, "rejected": "r" * 3}
    full = build(tmp_path, tok_dir, [rec], max_len=200).train[0]
    with pytest.warns(UserWarning, match="1 pairs had a completion cut to fit max_len=40"):
        cut = build(tmp_path, tok_dir, [rec], max_len=40).train[0]
    assert len(cut["chosen_ids"]) == 40                                    # max_len input tokens
    assert cut["chosen_ids"].tolist() == full["chosen_ids"][:40].tolist()  # prompt whole, completion cut
    assert cut["rejected_ids"].tolist() == full["rejected_ids"].tolist()   # short side untouched
    n_prompt = int((full["chosen_labels"] == IGNORE_INDEX).sum())  # prompt tokens - 1 (shifted)
    assert n_prompt < 40 and (cut["chosen_labels"] != IGNORE_INDEX).sum() == 40 - n_prompt


def test_formats_give_the_same_pairs(tmp_path, tok_dir):
    """standard, conversational (explicit and implicit prompt), `messages` and CSV records agree."""
    p, c, r = "Name a fruit.", "apple", "a car"
    conv = [{"role": "user", "content": p}]
    forms = [{"prompt": p, "chosen": c, "rejected": r},
             {"prompt": conv, "chosen": [{"role": "assistant", "content": c}],
              "rejected": [{"role": "assistant", "content": r}]},
             {"messages": conv, "chosen": c, "rejected": r},
             {"chosen": conv + [{"role": "assistant", "content": c}],
              "rejected": conv + [{"role": "assistant", "content": r}]}]
    items = [build(tmp_path, tok_dir, [f]).train[0] for f in forms]
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["prompt", "chosen", "rejected"], [p, c, r]])
    items.append(build_data({"name": "preference", "path": str(tmp_path / "pairs.csv"), "tokenizer": str(tok_dir),
                             "val_fraction": 0.0}).train[0])
    for it in items[1:]:
        assert all(torch.equal(it[k], items[0][k]) for k in items[0])


def test_system_prompt_and_multi_turn_prompt_train_last_turn_only(tmp_path, tok_dir):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye?"}]
    item = build(tmp_path, tok_dir, [{"prompt": conv, "chosen": "bye", "rejected": "no"}]).train[0]
    tok = load_tokenizer(tok_dir)
    trained = item["chosen_labels"][item["chosen_labels"] != IGNORE_INDEX].tolist()
    assert tok.decode(trained, skip_special_tokens=False) == "bye" + tok.eos_token + "\n\n"  # not "hello"


BAD = [
    ({"prompt": "q", "chosen": "a"}, "missing field 'rejected'", "missing field"),
    ({"chosen": "a", "rejected": "b"}, "missing field 'prompt'", "missing field"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "chosen and rejected are the same", "chosen == rejected"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "the chosen completion is empty", "empty completion"),
    ({"prompt": "q" * 80, "chosen": "a", "rejected": "b"}, "longer than max_len=64", "prompt longer than max_len"),
    ({"prompt": "q", "chosen": [{"role": "bot", "content": "a"}], "rejected": "b"}, "unknown role 'bot'", "bad field"),
]


@pytest.mark.parametrize("record,message,reason", BAD, ids=[b[2] for b in BAD])
def test_bad_pair_is_a_one_line_error(tmp_path, tok_dir, record, message, reason):
    with pytest.raises(ConfigError) as e:
        build(tmp_path, tok_dir, [PAIRS[0], record], max_len=64)
    text = str(e.value)
    assert "\n" not in text and message in text and "record 2" in text and "data.on_bad=skip" in text


def test_bad_pairs_skipped_counted_and_reported(tmp_path, tok_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bundle = build(tmp_path, tok_dir, [PAIRS[0]] + [b[0] for b in BAD] + [PAIRS[1]], max_len=64, on_bad="skip")
    assert len(bundle.train) == 2
    assert bundle.info["n_skipped"] == {"missing field": 2, "chosen == rejected": 1, "empty completion": 1,
                                        "prompt longer than max_len": 1, "bad field": 1}
    msg = " ".join(str(w.message) for w in caught)
    assert "skipped 6 bad pairs" in msg and "chosen == rejected: 1" in msg


def test_cli_bad_pair_exits_2_without_traceback(tmp_path, tok_dir):
    data = write_jsonl(tmp_path / "bad.jsonl", [PAIRS[0], {"prompt": "q", "chosen": "x", "rejected": "x"}])
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {{name: llama-tiny, n_layer: 1}}\n"
                   f"data: {{name: preference, path: {data}, tokenizer: {tok_dir}, max_len: 64}}\n"
                   f"trainer: {{max_steps: 1, batch_size: 1}}\n")
    proc = subprocess.run([sys.executable, "-m", "torchgraft", "train", str(cfg), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "chosen and rejected are the same" in err[0] and "Traceback" not in proc.stderr
