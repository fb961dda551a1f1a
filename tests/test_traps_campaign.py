"""Issue 27 item 8, the campaign on this landing's features (serve, DPO / SimPO / ORPO / reward /
distill configs, the new families through the CLI): the bad inputs that traced back or misled,
each now a one-line error with exit 2 (docs/safety.md)."""
from __future__ import annotations

import socket

import pytest

from conftest import invoke_cli
from torchgraft.errors import ConfigError
from torchgraft.train.tasks import build_task


def one_error(code: int, err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---- task options: a typo or a wrong type was a TypeError / ValueError traceback ---------------
@pytest.mark.parametrize("spec,words", [
    ({"name": "dpo", "betta": 0.1}, ["task.betta", "did you mean 'beta'"]),
    ({"name": "orpo", "alpha": 0.5}, ["task.alpha", "its options: beta"]),
    ({"name": "simpo", "gamma": "big"}, ["task.gamma must be a number", "'big'"]),
    ({"name": "dpo", "beta": True}, ["task.beta must be a number"]),
    ({"name": "reward_model", "center_rewards_coefficient": "0.01"}, ["must be a number (or null)"]),
    ({"name": "lm", "chunked_ce": 2.5}, ["task.chunked_ce must be a number"]),
])
def test_task_option_typos_and_types_are_one_line(spec, words):
    with pytest.raises(ConfigError) as e:
        build_task(spec)
    assert all(w in str(e.value) for w in words) and "\n" not in str(e.value)


def test_valid_task_options_still_build():
    assert build_task({"name": "dpo", "beta": 1, "loss_type": "ipo"}).beta == 1.0  # an int is a number
    assert build_task({"name": "reward_model", "center_rewards_coefficient": None})
    assert build_task({"name": "lm", "chunked_ce": None})


# ---- text data too short: "the training split has -11 tokens" ------------------------------------
def test_too_short_text_names_real_counts(tmp_path):
    from torchgraft.data import build_data
    from torchgraft.data.tokenizers import char_tokenizer

    (tmp_path / "t.txt").write_text("hello")
    char_tokenizer(["helo"]).save(tmp_path / "tok")
    with pytest.raises(ConfigError) as e:
        build_data({"name": "text", "source": str(tmp_path / "t.txt"), "tokenizer": str(tmp_path / "tok"),
                    "seq_len": 16, "val_fraction": 0.1, "cache_dir": str(tmp_path / "cache")})
    msg = str(e.value)
    assert " -" not in msg and "leaving 0 for training" in msg and "val_fraction=0.1" in msg


# ---- convert a file: NotADirectoryError traceback --------------------------------------------
def test_convert_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    code, _, err, _ = invoke_cli(["convert", tmp_path / "notes.txt", tmp_path / "out"], capsys)
    assert "is a .txt file, not a model" in one_error(code, err)
    assert not (tmp_path / "out").exists()


# ---- serve on an address it cannot use: uvicorn logged it and exited 3 after loading the model --
def test_serve_unresolvable_host_is_one_line_before_loading(tmp_path, capsys):
    code, _, err, _ = invoke_cli(["serve", tmp_path / "not-loaded", "--host", "999.1.1.1"], capsys)
    assert "--host '999.1.1.1'" in one_error(code, err)


def test_serve_on_a_port_in_use_is_one_line(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err, _ = invoke_cli(["serve", tmp_path / "not-loaded", "--port", port], capsys)
    assert f"cannot listen on 127.0.0.1:{port}" in one_error(code, err)


# ---- files read through the one checked path (torchgraft/outputs.py read_input_text / _json) ----
def test_corrupt_tokenizer_config_is_an_error_not_dropped(tmp_path):
    """A tokenizer_config.json that is not JSON was silently ignored, and with it its special tokens."""
    from torchgraft.data.tokenizers import char_tokenizer, load_tokenizer

    char_tokenizer(["abc"]).save(tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer_config.json").write_text('{"eos_token": "<|end|>",')
    with pytest.raises(ConfigError, match="tokenizer config .* is not valid JSON"):
        load_tokenizer(tmp_path / "tok")


def test_binary_chat_template_file_is_one_line(tmp_path):
    from torchgraft.data.chat_template import ChatTemplate

    (tmp_path / "t.jinja").write_bytes(b"\xff\xfe{{ messages }}\x81")
    with pytest.raises(ConfigError, match="chat template file .* is not UTF-8 text"):
        ChatTemplate.for_tokenizer(None, override=str(tmp_path / "t.jinja"))


def test_eval_files_missing_or_binary_are_one_line(tmp_path):
    from torchgraft.recipes.eval_convert import CONVERTERS, convert_jsonl
    from torchgraft.recipes.eval_tasks import read_examples

    with pytest.raises(ConfigError, match="not found"):
        convert_jsonl(tmp_path / "nope.jsonl", tmp_path / "out.jsonl", next(iter(CONVERTERS)))
    (tmp_path / "bin.jsonl").write_bytes(b"\x81\xff")
    with pytest.raises(ConfigError, match="task file .* is not UTF-8 text"):
        read_examples(tmp_path / "bin.jsonl")
    with pytest.raises(ConfigError, match="is a directory"):
        read_examples(tmp_path)
