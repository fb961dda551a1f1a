"""Chat templates of the families people fine-tune, rendered by torchgraft and by transformers'
`apply_chat_template`, compared byte for byte.

The templates (tests/data/chat_templates/) are those of Qwen2.5 (tools), Qwen3 (enable_thinking,
reasoning, namespace, reversed loops), Gemma 3 (raise_exception, content lists), Phi-4 / Phi-4-mini,
Mistral and Llama 3.1 (tools with tojson(indent=4), date_string). Each is put into a transformers
`PreTrainedTokenizerFast` built from a tiny `tokenizers` BPE, saved with `save_pretrained`, and read
back by torchgraft from that directory as it is.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from torchgraft.data.chat_template import ChatTemplate
from torchgraft.errors import ConfigError

T = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

DATA = Path(__file__).parent / "data" / "chat_templates"
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def _tokenizer(template: str):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(["<unk>", "<s>", "</s>", "<pad>", *"abcdefghijklmnopqrstuvwxyz "])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)
    fast.chat_template = template
    return fast


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """template name -> (transformers tokenizer, torchgraft template read from its saved directory)."""
    made = {}

    def get(name: str):
        if name not in made:
            hf = _tokenizer((DATA / f"{name}.jinja").read_text(encoding="utf-8"))
            d = tmp_path_factory.mktemp(name.replace(".", "_"))
            hf.save_pretrained(d)
            made[name] = (hf, ChatTemplate.for_tokenizer(d))
        return made[name]
    return get


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city — «now»",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}
BASIC = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi <b>there</b>"},
         {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and now?"}]
NO_SYSTEM = BASIC[1:]
TOOL_TURNS = [{"role": "user", "content": "weather in Zürich?"},
              {"role": "assistant", "content": "", "tool_calls": [CALL]},
              {"role": "tool", "content": '{"temp": 3}'}, {"role": "tool", "content": '{"wind": 5}'},
              {"role": "assistant", "content": "3 degrees, windy."}]
THINKING = [{"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
            {"role": "user", "content": "3+3?"},
            {"role": "assistant", "content": "6", "reasoning_content": "add again"}]

CASES = [
    ("qwen2.5", BASIC, {}), ("qwen2.5", NO_SYSTEM, {}), ("qwen2.5", TOOL_TURNS, {"tools": [WEATHER]}),
    ("qwen2.5", BASIC, {"tools": [WEATHER]}),
    ("qwen3", NO_SYSTEM, {"enable_thinking": False}), ("qwen3", NO_SYSTEM, {"enable_thinking": True}),
    ("qwen3", THINKING, {}), ("qwen3", THINKING[:2] + [{"role": "user", "content": "x"},
                                                       {"role": "assistant", "content": "y", "thinking": "z"}], {}),
    ("qwen3", BASIC + [{"role": "assistant", "content": None, "tool_calls": [CALL]},
                       {"role": "tool", "content": "<tool_response>ok</tool_response>"}], {"tools": [WEATHER]}),
    ("gemma3", BASIC, {}), ("gemma3", [{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                       "text": " what is it? "}]}], {}),
    ("phi4", BASIC, {}),
    ("phi4-mini", [{"role": "system", "content": "sys", "tools": json.dumps([WEATHER])}, *NO_SYSTEM], {}),
    ("phi4-mini", BASIC, {}),
    ("mistral", BASIC, {}), ("mistral", NO_SYSTEM[:2], {}),
    ("llama3.1", BASIC, {}), ("llama3.1", BASIC, {"date_string": "03 Dec 2026"}),
    ("llama3.1", [*TOOL_TURNS[:2], {"role": "tool", "content": "3 degrees"}], {"tools": [WEATHER]}),
    ("llama3.1", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "tool_calls": None}], {}),
]


@pytest.mark.parametrize("gen", [False, True], ids=["no-gen", "gen-prompt"])
@pytest.mark.parametrize("name,messages,kwargs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_render_matches_apply_chat_template(saved, name, messages, kwargs, gen):
    hf, ours = saved(name)
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **kwargs)
    got = ours.render(messages, add_generation_prompt=gen, **kwargs)
    assert got == want
    assert got.encode() == want.encode()


@pytest.mark.parametrize("name,messages", [
    ("gemma3", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
    ("mistral", [{"role": "assistant", "content": "first"}]),
    ("llama3.1", [{"role": "user", "content": "q"},
                  {"role": "assistant", "content": "", "tool_calls": [CALL, CALL]}]),
])
def test_raise_exception_is_a_clear_error_on_both_sides(saved, name, messages):
    hf, ours = saved(name)
    with pytest.raises(Exception, match="alternate|only supports|roles") as theirs:
        hf.apply_chat_template(messages, tokenize=False)
    with pytest.raises(ConfigError, match="chat template .* failed") as mine:
        ours.render(messages)
    assert str(theirs.value) in str(mine.value)


def test_template_file_wins_over_tokenizer_config_and_tokens_come_from_the_directory(tmp_path):
    hf = _tokenizer("{{ bos_token }}config{{ eos_token }}")
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "from tokenizer_config"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}file{{ eos_token }}{{ pad_token }}")
    again = T.AutoTokenizer.from_pretrained(tmp_path)
    msgs = [{"role": "user", "content": "x"}]
    assert ChatTemplate.for_tokenizer(tmp_path).render(msgs) == again.apply_chat_template(msgs, tokenize=False) \
        == "<s>file</s><pad>"
    (tmp_path / "chat_template.jinja").unlink()
    again = T.AutoTokenizer.from_pretrained(tmp_path)
    assert ChatTemplate.for_tokenizer(tmp_path).render(msgs) == again.apply_chat_template(msgs, tokenize=False)


def test_namespace_refuses_underscore_attributes():
    t = ChatTemplate("{% set ns = namespace(_x=1) %}{{ ns._x }}")
    with pytest.raises(Exception, match="underscore"):
        t.render([{"role": "user", "content": "x"}])


def test_tools_must_be_schemas():
    with pytest.raises(ConfigError, match="JSON schemas"):
        ChatTemplate("{{ tools }}").render([{"role": "user", "content": "x"}], tools=[print])
