"""The `textclass` dataset: CSV / TSV / JSONL, label names, pairs, header: false, truncation, padding,
bad input, and the sequence classification task on a tiny BERT."""
from __future__ import annotations

import json

import pytest
import torch

from torchgraft.data import build_data
from torchgraft.errors import ConfigError
from torchgraft.testing import assert_close_computed, tolerance, transformer_tol

ROWS = [("the film was wonderful", "pos"), ("a dull and boring plot", "neg"), ("great acting", "pos"),
        ("boring", "neg"), ("wonderful great film", "pos"), ("dull film", "neg"),
        ("plot was great", "pos"), ("the acting was dull", "neg"), ("okay film", "neutral"),
        ("an okay plot", "neutral")]


def make_tokenizer(d):
    """A word-level tokenizer with a BERT-style post-processor ([CLS] a [SEP] (b [SEP]))."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = sorted({w for t, _ in ROWS for w in t.split()} | {"is", "it", "good"})
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"pad_token": "[PAD]", "cls_token": "[CLS]"}))
    return d, vocab


def write(path, fmt, rows=ROWS, header=True):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": t, "label": y} if header else [t, y]) + "\n" for t, y in rows))
        return path
    sep = "," if fmt == "csv" else "\t"
    lines = ([f"text{sep}label"] if header else []) + [f'"{t}"{sep}{y}' if fmt == "csv" else f"{t}{sep}{y}"
                                                       for t, y in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def tok(tmp_path):
    return make_tokenizer(tmp_path / "tok")


def build(path, tokdir, **kw):
    return build_data({"name": "textclass", "path": str(path), "tokenizer": str(tokdir), **kw})


def _all(ds):
    return [(ds[i]["input_ids"].tolist(), int(ds[i]["labels"])) for i in range(len(ds))]


def test_csv_tsv_jsonl_agree_and_label_names(tmp_path, tok):
    tokdir, vocab = tok
    bundles = [build(write(tmp_path / f"d.{fmt}", fmt), tokdir, val_fraction=0.3) for fmt in ("csv", "tsv", "jsonl")]
    for b in bundles:
        assert b.info["labels"] == ["neg", "neutral", "pos"] and b.info["num_classes"] == 3
        assert json.loads(b.files["labels.json"]) == ["neg", "neutral", "pos"]
        assert b.task == {"name": "sequence_classification", "label_names": ["neg", "neutral", "pos"]}
        assert len(b.train) == 7 and len(b.val) == 3  # stratified: one of each class held out
        assert sorted(int(b.val[i]["labels"]) for i in range(3)) == [0, 1, 2]
    assert _all(bundles[0].train) == _all(bundles[1].train) == _all(bundles[2].train)
    ids = bundles[0].train[0]["input_ids"].tolist()
    assert ids[0] == vocab["[CLS]"] and ids[-1] == vocab["[SEP]"]  # the post-processor's specials
    # explicit label order; integer labels sort numerically; header: false with positions
    b = build(tmp_path / "d.csv", tokdir, labels=["pos", "neg", "neutral"], val_fraction=0.0)
    assert b.info["labels"] == ["pos", "neg", "neutral"] and int(b.train[0]["labels"]) == 0
    ints = [(t, {"pos": 10, "neg": 2, "neutral": 7}[y]) for t, y in ROWS]
    b = build(write(tmp_path / "n.tsv", "tsv", ints, header=False), tokdir, header=False,
              text_column=0, label_column=1, val_fraction=0.0)
    assert b.info["labels"] == ["2", "7", "10"]
    assert [int(b.train[i]["labels"]) for i in range(3)] == [2, 0, 2]
    b = build(write(tmp_path / "n.jsonl", "jsonl", ints, header=False), tokdir, header=False,
              text_column=0, label_column=1, val_fraction=0.0)
    assert b.info["labels"] == ["2", "7", "10"]


def test_pairs_padding_and_truncation(tmp_path, tok):
    tokdir, vocab = tok
    p = tmp_path / "pairs.jsonl"
    rows = [{"a": "the film", "b": "was great", "y": "yes"}, {"a": "boring", "b": "it is good", "y": "no"},
            {"a": "dull dull dull dull dull dull", "b": "okay", "y": "no"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match="1 of 3 examples were longer than max_len=8"):
        b = build(p, tokdir, text_column="a", text_pair_column="b", label_column="y", max_len=8, val_fraction=0.0)
    it = b.train[0]
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    assert it["input_ids"].tolist() == [cls, vocab["the"], vocab["film"], sep, vocab["was"], vocab["great"], sep]
    assert it["token_type_ids"].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert len(b.train[2]["input_ids"]) == 8 and b.info["n_truncated"] == 1
    batch = b.collate_fn([b.train[i] for i in range(3)])
    assert batch["input_ids"].shape == (3, 8) and batch["attention_mask"].tolist()[0] == [1] * 7 + [0]
    assert batch["input_ids"][0, 7] == vocab["[PAD]"] and batch["token_type_ids"].shape == (3, 8)
    assert batch["labels"].tolist() == [1, 0, 0]


def test_bad_text_inputs(tmp_path, tok):
    tokdir, _ = tok
    csvp = write(tmp_path / "d.csv", "csv")
    with pytest.raises(ConfigError, match=r"data.text_column='review' is not a column of .*d.csv \(columns: text, label\)"):
        build(csvp, tokdir, text_column="review")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ConfigError, match="empty.csv is empty"):
        build(tmp_path / "empty.csv", tokdir)
    val = write(tmp_path / "v.csv", "csv", [("great film", "pos"), ("so so", "mixed")])
    with pytest.raises(ConfigError, match=r"v.csv: row 2 has label 'mixed', which the training data does not have"):
        build(csvp, tokdir, val_path=str(val))
    with pytest.raises(ConfigError, match="name columns by position"):
        build(write(tmp_path / "h.csv", "csv", header=False), tokdir, header=False)
    with pytest.raises(ConfigError, match="data.tokenizer is required"):
        build_data({"name": "textclass", "path": str(csvp)})
    with pytest.raises(ConfigError, match="at least 2 labels"):
        build(write(tmp_path / "one.csv", "csv", [("a", "x"), ("b", "x")]), tokdir)


@pytest.mark.parametrize("pooling", ["pooler", "cls", "mean"])
def test_sequence_task_loss_is_sum_of_unpadded_examples(tmp_path, tok, pooling):
    """Through the task protocol: a padded batch gives each example the loss it has alone."""
    from torchgraft import build as build_model
    from torchgraft.train.tasks import build_task

    tokdir, vocab = tok
    b = build(write(tmp_path / "d.csv", "csv"), tokdir, val_fraction=0.0)
    task = build_task(b.task)
    model = build_model("bert-tiny", vocab_size=len(vocab), task="sequence_classification",
                        num_labels=3, dropout=0.0, pooling=pooling).eval()
    items = [b.train[i] for i in range(len(b.train))]
    batch = b.collate_fn(items)
    assert batch["attention_mask"].min() == 0  # there is padding
    with torch.no_grad():
        total = task.loss_sum(model, batch)
        alone = sum(task.loss_sum(model, b.collate_fn([it])) for it in items)
        sums = task.eval_sums(model, batch)
    assert task.count(batch) == len(items)
    # padded vs unpadded attention, then a sum over the examples
    tol = transformer_tol(model.config, batch["input_ids"].shape[1]) + tolerance(len(items))
    assert_close_computed(alone, total, tol)
    m = task.metrics(sums)
    assert set(m) == {"val_loss", "val_accuracy", "val_macro_f1"}
    assert_close_computed(torch.tensor(m["val_loss"]), total / len(items), tol)
    assert int(sums["confusion"].sum()) == len(items)
