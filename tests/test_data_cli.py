"""From the command line: bad data gives one clear line and exit code 2; `torchgraft predict` on a tiny
trained image run and text run (plain, --json, --top-k); the run directory holds labels.json and the
confusion-matrix PNG written at evaluation."""
from __future__ import annotations

import json

import pytest
import yaml

from torchgraft.cli import main
from test_images_data import make_tree
from test_textclass_data import ROWS, make_tokenizer, write

QUIET = {"logging": {"progress": False, "tensorboard": False, "measure_flops": False, "every": 5}}


def run_cli(args, capsys):
    """(exit code, stdout, stderr) of `torchgraft ARGS` run in this process."""
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def config(tmp_path, data, model, steps=4, **extra):
    cfg = {"model": model, "data": data, "optim": {"name": "adamw", "lr": 3e-3},
           "schedule": {"name": "constant"}, "trainer": {"max_steps": steps, "batch_size": 8, "seed": 0},
           "eval": {"every": steps}, "checkpoint": {"every": steps}, **QUIET, **extra}
    p = tmp_path / f"cfg{len(list(tmp_path.glob('cfg*.yaml')))}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_bad_data_is_one_line_exit_2(tmp_path, capsys):
    tokdir, _ = make_tokenizer(tmp_path / "tok")
    good = write(tmp_path / "d.csv", "csv")
    (tmp_path / "empty.csv").write_text("")
    val = write(tmp_path / "v.csv", "csv", [("great", "pos"), ("hm", "mixed")])
    one = tmp_path / "one"
    make_tree(tmp_path / "pics", per_class=2)
    (one / "cats").mkdir(parents=True)
    for f in (tmp_path / "pics" / "cats").iterdir():
        (one / "cats" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                                  {"role": "bot", "content": "yo"}]}) + "\n")
    text = {"name": "textclass", "tokenizer": str(tokdir)}
    bert = {"name": "bert-tiny", "task": "sequence_classification"}
    cases = [
        ({**text, "path": str(good), "label_column": "sentiment"}, bert, "data.label_column='sentiment' is not a column"),
        ({**text, "path": str(tmp_path / "empty.csv")}, bert, "empty.csv is empty"),
        ({**text, "path": str(good), "val_path": str(val)}, bert, "has label 'mixed', which the training data does not have"),
        ({"name": "images", "root": str(one)}, {"name": "lenet"}, "needs at least 2 classes, found only 'cats'"),
        ({"name": "images", "root": str(tmp_path / "missing")}, {"name": "lenet"}, "missing does not exist"),
        ({"name": "sft", "path": str(tmp_path / "chat.jsonl"), "tokenizer": str(tokdir)}, {"name": "llama-tiny"},
         "unknown role 'bot'"),
    ]
    for data, model, message in cases:
        code, out, err = run_cli(["train", config(tmp_path, data, model), "--out", tmp_path / "run"], capsys)
        lines = err.strip().splitlines()
        assert code == 2, (message, err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (message, err)
        assert "Traceback" not in err


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("imgrun")
    root = make_tree(tmp / "pics", per_class=8, size=(24, 24))
    cfg = config(tmp, {"name": "images", "root": str(root), "image_size": 32, "channels": 1,
                       "val_fraction": 0.25, "num_workers": 1},
                 {"name": "lenet"}, steps=30)
    code = 0
    try:
        main(["train", str(cfg), "--out", str(tmp / "run")])
    except SystemExit as e:
        code = e.code
    assert code in (0, None)
    return tmp / "run", root


def test_image_run_dir_and_predict(image_run, capsys):
    run, root = image_run
    assert json.loads((run / "labels.json").read_text()) == ["cats", "dogs", "owls"]
    assert (run / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    cm = json.loads((run / "confusion_matrix.json").read_text())
    assert cm["labels"] == ["cats", "dogs", "owls"] and sum(map(sum, cm["counts"])) == 6
    images = [root / "cats" / "0.png", root / "dogs" / "1.jpg", root / "owls" / "3.jpeg"]
    code, out, err = run_cli(["predict", run, *images, "--json", "--top-k", "2"], capsys)
    assert code == 0, err
    preds = [json.loads(line) for line in out.strip().splitlines()]
    assert [p["input"] for p in preds] == [str(i) for i in images]
    for p in preds:
        probs = list(p["probabilities"].values())
        assert len(probs) == 2 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert p["label"] == next(iter(p["probabilities"]))
    assert [p["label"] for p in preds] == ["cats", "dogs", "owls"]  # bright/dark classes: easy after training
    listing = run / "inputs.txt"
    listing.write_text("\n".join(str(i) for i in images) + "\n")
    code, out, _ = run_cli(["predict", run, "--file", listing, "--top-k", "1"], capsys)
    assert code == 0 and len(out.strip().splitlines()) == 3 and "\tcats\t(cats " in out.splitlines()[0]
    code, _, err = run_cli(["predict", run, root / "nope.png"], capsys)
    assert code == 2 and "image not found" in err


def test_text_run_predict(tmp_path, capsys):
    tokdir, vocab = make_tokenizer(tmp_path / "tok")
    path = write(tmp_path / "train.csv", "csv", ROWS * 3)
    cfg = config(tmp_path, {"name": "textclass", "path": str(path), "tokenizer": str(tokdir), "max_len": 16,
                            "val_fraction": 0.2},
                 {"name": "bert-tiny", "task": "sequence_classification", "vocab_size": len(vocab)}, steps=30)
    code, out, err = run_cli(["train", cfg, "--out", tmp_path / "run"], capsys)
    assert code in (0, None), err
    run = tmp_path / "run"
    assert json.loads((run / "labels.json").read_text()) == ["neg", "neutral", "pos"]
    assert (run / "confusion_matrix.png").is_file()
    code, out, err = run_cli(["predict", run, "wonderful great acting", "dull boring plot", "--json", "--top-k", "3"],
                             capsys)
    assert code == 0, err
    preds = [json.loads(line) for line in out.strip().splitlines()]
    assert [p["label"] for p in preds] == ["pos", "neg"]
    assert all(len(p["probabilities"]) == 3 and abs(sum(p["probabilities"].values()) - 1) < 1e-4 for p in preds)


def test_sft_run_and_generate_chat_uses_the_saved_template(tmp_path, capsys):
    from torchgraft.data.chat_template import ChatTemplate, chat_prompt
    from torchgraft.data.tokenizers import char_tokenizer
    from torchgraft.generation import generate
    from torchgraft.recipes.lm import load_lm

    tok = char_tokenizer(["abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ#:?\n.0123456789+"])
    tok.save(tmp_path / "tok")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"prompt": f"Say {w}.", "response": w}) + "\n"
                                              for w in ["moon", "tree", "sun", "sky", "sea"] * 4))
    cfg = config(tmp_path, {"name": "sft", "path": str(tmp_path / "c.jsonl"), "tokenizer": str(tmp_path / "tok"),
                            "seq_len": 64, "val_fraction": 0.2},
                 {"name": "llama-tiny"}, steps=6)
    code, out, err = run_cli(["train", cfg, "--out", tmp_path / "run"], capsys)
    assert code in (0, None), err
    run = tmp_path / "run"
    assert (run / "tokenizer" / "chat_template.jinja").is_file()
    code, out, err = run_cli(["generate", run, "--chat", "-p", "Say moon.", "-t", "0", "-n", "6"], capsys)
    assert code in (0, None), err
    lm = load_lm(run)
    template = ChatTemplate.for_tokenizer(run)
    want = generate(lm.model, [chat_prompt(template, "Say moon.")], lm.tokenizer, max_new_tokens=6,
                    temperature=0.0, add_bos=False).texts[0]
    assert out == want + "\n"
    assert chat_prompt(template, "Say moon.") == "<|endoftext|>### User:\nSay moon.\n\n### Assistant:\n"
