"""Issue 27 item 8: nothing the user had is lost (export / rl eval --gif refuse to overwrite, check the
extension, clean a killed export's staging folder), bad files are one line instead of a traceback, and
data that shrinks silently (empty class folders, empty texts, empty assistant turns) is counted."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import invoke_cli
from torchgraft.data import build_data

QUIET = ["logging.progress=false", "logging.tensorboard=false", "logging.measure_flops=false"]
LENET = ["configs/lenet-digits.yaml", "trainer.max_steps=2", "trainer.batch_size=8", "eval.every=0",
         "eval.max_batches=1", "model.conv_channels=[4,8]", "model.hidden=16", "schedule.warmup_steps=0",
         "checkpoint.every=0", *QUIET]


def one_error(code: int, err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def word_tokenizer(d):
    """A tiny word-level tokenizer directory ([PAD], [UNK] and a few words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "word", "short", "text", "another", "more", "good", "bad"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"pad_token": "[PAD]"}))
    return str(d)


def image_tree(root, classes=("cats", "dogs"), per_class=8, size=16):
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray((rng.random((size, size, 3)) * 80 + c * 80).astype(np.uint8), "RGB").save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A 2-class image classification run (for export and predict)."""
    base = tmp_path_factory.mktemp("img")
    root = image_tree(base / "pics")
    from torchgraft.cli import main

    main(["train", *LENET, "data.name=images", f"data.root={root}", "data.image_size=32", "data.channels=1",
          "data.val_fraction=0.25", "--out", str(base / "run")])
    return base / "run"


# ---- data loss: export

def test_export_refuses_an_existing_file_and_a_wrong_extension(image_run, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    code, _, err, _ = invoke_cli(["export", image_run, "--format", "onnx", "--out", notes], capsys)
    assert "--format onnx writes a .onnx file, not '.txt'" in one_error(code, err)
    assert notes.read_text() == "my notes"
    code, _, err, _ = invoke_cli(["export", image_run, "--format", "pt2", "--out", tmp_path / "m.onnx"], capsys)
    assert "--format pt2 writes a .pt2 file" in one_error(code, err) and not (tmp_path / "m.onnx").exists()
    out = tmp_path / "m.onnx"
    out.write_bytes(b"an older export")
    code, _, err, _ = invoke_cli(["export", image_run, "--out", out], capsys)
    assert "already exists; nothing was written" in one_error(code, err) and "--overwrite" in err
    assert out.read_bytes() == b"an older export"
    code, stdout, err, _ = invoke_cli(["export", image_run, "--out", out, "--overwrite"], capsys)
    assert code == 0, err
    assert out.read_bytes()[:2] != b"an" and out.stat().st_size > 1000


def test_export_cleans_a_killed_exports_staging_folder(image_run, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    stale = tmp_path / ".m.onnx.999999999.abc123"  # a killed process's (pid gone) half-written export
    stale.mkdir()
    (stale / "m.onnx").write_bytes(b"half")
    live = tmp_path / f".m.onnx.{os.getpid()}.inuse"  # a running writer's folder is left alone
    live.mkdir()
    other = tmp_path / ".n.onnx.999999999.abc123"  # another target's
    other.mkdir()
    code, _, err, _ = invoke_cli(["export", image_run, "--out", out], capsys)
    assert code == 0, err
    assert out.is_file() and not stale.exists() and live.is_dir() and other.is_dir()


def test_export_under_a_file_is_refused_before_loading(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, _, err, _ = invoke_cli(["export", tmp_path / "no-such-run", "--out", tmp_path / "afile" / "m.onnx"], capsys)
    assert "lies under" in one_error(code, err) and "which is a file" in err


# ---- tracebacks: predict

def test_predict_with_a_broken_or_short_labels_json(image_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(image_run, run)
    img = next((image_run.parent / "pics" / "cats").iterdir())
    (run / "labels.json").write_text("cats, dogs")
    code, _, err, _ = invoke_cli(["predict", run, str(img)], capsys)
    assert "labels.json is not valid JSON" in one_error(code, err)
    (run / "labels.json").write_text('["cats"]')
    code, _, err, _ = invoke_cli(["predict", run, str(img)], capsys)
    assert "names 1 classes but the model predicts 2" in one_error(code, err)
    (run / "labels.json").write_text('["cats", "dogs"]')
    code, out, err, _ = invoke_cli(["predict", run, str(img)], capsys)
    assert code == 0 and "cats" in out


def test_predict_file_that_is_a_folder_or_binary(image_run, tmp_path, capsys):
    code, _, err, _ = invoke_cli(["predict", image_run, "--file", tmp_path], capsys)
    assert "is a directory" in one_error(code, err)
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe\x00bad")
    code, _, err, _ = invoke_cli(["predict", image_run, "--file", tmp_path / "b.txt"], capsys)
    assert "is not UTF-8 text" in one_error(code, err)


# ---- tracebacks and shrinkage: data

def test_textclass_csv_field_longer_than_the_csv_limit_is_read_and_truncated(tmp_path):
    path = tmp_path / "long.csv"
    long = "word " * 40_000  # 200,000 characters in one field (csv's default limit: 131,072)
    path.write_text("text,label\n" + f'"{long}",pos\nshort text,neg\nanother,pos\nmore,neg\n')
    with pytest.warns(UserWarning, match="were longer than max_len=32 tokens and were truncated"):
        b = build_data({"name": "textclass", "path": str(path), "tokenizer": word_tokenizer(tmp_path / "tok"),
                        "max_len": 32,
                        "val_fraction": 0.0})
    assert b.info["n_train"] == 4 and b.info["n_truncated"] == 1
    import csv

    assert csv.field_size_limit() == 131072  # the process-wide limit is left as it was


def test_textclass_empty_texts_are_counted(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text,label\ngood,pos\n,neg\n   ,pos\nbad,neg\n")
    with pytest.warns(UserWarning, match="textclass: 2 of 4 examples have an empty text"):
        b = build_data({"name": "textclass", "path": str(path), "tokenizer": word_tokenizer(tmp_path / "tok"),
                        "val_fraction": 0.0})
    assert b.info["n_empty"] == 2


def test_empty_class_folder_is_named(tmp_path):
    root = image_tree(tmp_path / "pics", classes=("cats", "dogs", "owls"))
    for f in (root / "owls").iterdir():
        f.unlink()
    with pytest.warns(UserWarning, match=r"class folder\(s\) 'owls' hold no images and are left out"):
        b = build_data({"name": "images", "root": str(root), "image_size": 16, "val_fraction": 0.25})
    assert json.loads(b.files["labels.json"]) == ["cats", "dogs"]


def test_class_folder_of_only_unreadable_images_is_named(tmp_path):
    root = image_tree(tmp_path / "pics", classes=("cats", "dogs", "owls"))
    for f in (root / "owls").iterdir():
        f.write_bytes(b"not an image")
    with pytest.warns(UserWarning) as rec:
        b = build_data({"name": "images", "root": str(root), "image_size": 16, "val_fraction": 0.25})
    assert any("'owls' hold only unreadable images and are left out" in str(w.message) for w in rec)
    assert b.info["labels"] == ["cats", "dogs"]


def test_sft_empty_assistant_turns_are_counted(tmp_path):
    from torchgraft.data.tokenizers import char_tokenizer

    tok = char_tokenizer(["abcdefghijklmnopqrstuvwxyz0123456789 #:?+=\n.ABCDEFGHIJKLMNOPQRSTUVWXYZ"])
    tok.save(tmp_path / "tok")
    recs = [{"prompt": "2+2?", "response": "4"}, {"prompt": "hi", "response": ""},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "},
                          {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.warns(UserWarning, match=r"sft: 2 assistant turn\(s\) are empty and are trained on"):
        b = build_data({"name": "sft", "path": str(path), "tokenizer": str(tmp_path / "tok"), "seq_len": 100,
                        "val_fraction": 0.0, "packing": False})
    assert b.info["n_empty_turns"] == 2
