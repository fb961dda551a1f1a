"""Issue 27 items 7-8 for `generate`: a special-token stop string stops (matched on token ids), `-n`
beyond the context is capped and said, `--system` needs `--chat`, `--chat` says when it falls back."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import torchgraft
from conftest import invoke_cli
from torchgraft.data.text import builtin_documents
from torchgraft.data.tokenizers import char_tokenizer
from torchgraft.generation import generate, stream

END = "<|im_end|>"


class Scripted(nn.Module):
    """A decoder LM (no cache) whose greedy continuation is `script`, whatever the prompt."""

    def __init__(self, script: list[int], vocab: int, prompt_len: int):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # device / dtype for generate
        self.script, self.vocab, self.prompt_len = script, vocab, prompt_len
        self.config = SimpleNamespace(block_size=64)

    def forward(self, input_ids, attention_mask=None, position_ids=None, kv_cache=None):
        b, t = input_ids.shape
        logits = torch.full((b, t, self.vocab), -1e4)
        logits[:, -1, self.script[min(t - self.prompt_len, len(self.script) - 1)]] = 0.0
        return logits


@pytest.fixture()
def chat_tok():
    tok = char_tokenizer(["hello world, ok"])
    tok.backend.add_special_tokens([END])
    return tok


def test_special_token_stop_string_stops_generate_and_stream(chat_tok):
    end = chat_tok.token_to_id(END)
    script = chat_tok.encode("ok") + [end] + chat_tok.encode("world")
    prompt = chat_tok.encode("hello")
    model = Scripted(script, chat_tok.vocab_size, len(prompt))
    free = generate(model, "hello", chat_tok, max_new_tokens=8, use_cache=False)
    assert free.texts == ["okworld"] and free.finish_reasons == ["length"]  # the special token is not in the text
    out = generate(model, "hello", chat_tok, max_new_tokens=8, use_cache=False, stop=[END])
    assert out.texts == ["ok"] and out.finish_reasons == ["stop"] and out.tokens[0] == script[:3]
    out = generate(model, "hello", chat_tok, max_new_tokens=8, use_cache=False, stop=[END + "wor"])
    assert out.finish_reasons == ["stop"] and out.texts == ["ok"]  # a stop string around a special token
    assert "".join(stream(model, "hello", chat_tok, max_new_tokens=8, use_cache=False, stop=END)) == "ok"
    plain = generate(model, "hello", chat_tok, max_new_tokens=8, use_cache=False, stop=["wo"])  # text match as before
    assert plain.texts == ["ok"] and plain.finish_reasons == ["stop"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    from torchgraft.checkpoint.files import write_checkpoint
    from torchgraft.train.trainer import model_meta

    tok = char_tokenizer(builtin_documents())
    torch.manual_seed(0)
    model = torchgraft.build("gpt-tiny", vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_embd=32,
                             n_head=2).eval()
    run = tmp_path_factory.mktemp("gen") / "run"
    write_checkpoint(run / "checkpoints" / "step_00000001", model_state=model.state_dict(),
                     meta={"model": model_meta(model), "step": 1})
    tok.save(run)
    return run


def test_n_beyond_the_context_is_capped_and_said(small_run, capsys):
    code, out, err, secs = invoke_cli(["generate", small_run, "-p", "The ", "-n", "1000000000", "-t", "0"], capsys)
    assert code == 0, err
    assert "note: -n 1000000000 capped to 28: the model's context is 32 tokens and the longest prompt takes 4" in err
    assert len(out) == len("The ") + 28 + 1 and secs < 60  # 28 characters, then the newline
    code, out, err, _ = invoke_cli(["generate", small_run, "-p", "a", "-p", "bcd", "-n", "100", "-t", "0"], capsys)
    assert code == 0 and "capped to 29" in err


def test_system_without_chat_is_refused(small_run, capsys):
    code, _, err, _ = invoke_cli(["generate", small_run, "-p", "x", "--system", "be brief"], capsys)
    assert code == 2 and "--system is the system message of a chat prompt; add --chat" in err


def test_chat_on_a_run_without_template_says_it_falls_back(small_run, capsys):
    code, out, err, _ = invoke_cli(["generate", small_run, "-p", "hi", "--chat", "-n", "3", "-t", "0"], capsys)
    assert code == 0, err
    assert "has no chat template (its run saved none); --chat falls back to torchgraft's built-in template" in err
