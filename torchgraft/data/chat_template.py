"""Chat templates: render a conversation exactly as `transformers`' `apply_chat_template` does.

A template is Jinja source, from (in this order) an explicit `chat_template:` option (a `.jinja`
file or inline source), a `chat_template.jinja` file in the tokenizer directory (transformers gives it
priority), the `chat_template` key of its `tokenizer_config.json`, or the plain built-in
`DEFAULT_TEMPLATE`.

Rendering matches transformers (`utils/chat_template_utils.py`): a sandboxed Jinja environment
with `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension and a `{% generation %}` tag;
`tojson` that does not escape HTML (`ensure_ascii=False`); globals `raise_exception(msg)` and
`strftime_now(fmt)`, a `namespace` that refuses underscore names and a plain `dict`; the template
sees `messages`, `tools`, `documents`, `add_generation_prompt` and the named special tokens of
`tokenizer_config.json` / `special_tokens_map.json` (`bos_token`, `eos_token`, `pad_token`, ... as
strings), and keyword arguments (e.g. `enable_thinking=False`) override those. Messages are passed
as transformers 5 passes them: keys whose value is None dropped, and a reasoning given as
`reasoning_content`, `thinking` or `reasoning` available under the first two names. Rendered text is tokenised without the tokenizer's post-processor (as
transformers does with `add_special_tokens=False`): the template itself places bos/eos.

`assistant_spans` finds which characters of a rendering belong to each assistant turn (what the
model should learn to write: the content and the template's end-of-turn text) by rendering
growing prefixes of the conversation, so it works for any template that renders a conversation's
prefix as a prefix of the whole (Llama 3, ChatML, Mistral, Gemma and the built-in one do).
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from torchgraft.errors import ConfigError
from torchgraft.outputs import read_input_json, read_input_text

ROLES = ("system", "user", "assistant", "tool")
TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

# The plain template used when a tokenizer has none: readable markers that any tokenizer can encode,
# eos closing each assistant turn (so generation stops there).
DEFAULT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'tool' %}{{ '### Tool:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Assistant:\n' + message['content'] + (eos_token if eos_token else '') + '\n\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


@lru_cache(maxsize=16)
def compile_template(source: str) -> Any:
    """A Jinja template compiled in the environment transformers uses for chat templates."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` renders its body (transformers uses it to find
        assistant tokens; `assistant_spans` finds them without it)."""
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    class TemplateNamespace(jinja2.utils.Namespace):
        """`namespace(...)` that refuses underscore-prefixed attributes (as transformers' sandbox)."""

        def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature trick: `self` may be a kwarg
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace ({name!r})")

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = dict
    env.globals["namespace"] = TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ConfigError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None


def _token_string(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    """A chat template plus the special-token strings it may use.

    `render(messages, add_generation_prompt=False, **kwargs) -> str`;
    `assistant_spans(messages) -> (text, [(start, end), ...])`.
    """

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None, name: str = "custom"):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self.name = name
        self._template = compile_template(source)

    # ---- loading
    @classmethod
    def for_tokenizer(cls, tokenizer_path: str | Path | None, override: str | None = None,
                      special_tokens: dict[str, str] | None = None) -> ChatTemplate:
        """The template of a tokenizer directory / tokenizer.json (see the module docstring).
        `special_tokens` fills tokens `tokenizer_config.json` does not name (e.g. a built tokenizer's eos)."""
        d = None if tokenizer_path is None else Path(tokenizer_path)
        if d is not None and d.is_file():
            d = d.parent
        if d is not None and not (d / CONFIG_FILE).is_file() and (d / "tokenizer" / CONFIG_FILE).is_file():
            d = d / "tokenizer"  # a run directory
        cfg = _read_json(d / CONFIG_FILE) if d is not None else {}
        mapped = _read_json(d / SPECIAL_TOKENS_FILE) if d is not None else {}
        tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        for key in _SPECIAL_KEYS:  # transformers 5 passes only these named tokens to templates
            s = _token_string(cfg.get(key, mapped.get(key)))
            if s is not None:
                tokens[key] = s
        if override:
            p = Path(override).expanduser()
            if len(override) < 4096 and p.is_file():
                return cls(read_input_text(p, "chat template file"), tokens, name=str(p))
            return cls(override, tokens, name="inline")
        if d is not None and (d / TEMPLATE_FILE).is_file():
            return cls(read_input_text(d / TEMPLATE_FILE, "chat template file"), tokens, name=str(d / TEMPLATE_FILE))
        source = cfg.get("chat_template")
        if isinstance(source, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default") or next(iter(named.values()), None)
        if isinstance(source, str) and source:
            return cls(source, tokens, name=f"{d / CONFIG_FILE}")
        return cls(DEFAULT_TEMPLATE, tokens, name="built-in")

    # ---- rendering
    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
               tools: list[dict[str, Any]] | None = None, documents: list[dict[str, Any]] | None = None,
               **kwargs: Any) -> str:
        """The conversation as text, exactly as `apply_chat_template(..., tokenize=False)` gives it.
        `tools`: JSON schemas (dicts) of the functions the model may call; `kwargs`: template
        variables (e.g. `enable_thinking=False`), overriding the special tokens."""
        import jinja2

        if tools is not None and not all(isinstance(t, dict) for t in tools):
            raise ConfigError("chat template tools must be JSON schemas (dicts), e.g. "
                              '{"type": "function", "function": {"name": ..., "parameters": ...}}')
        try:
            return self._template.render(messages=template_messages(messages), tools=tools, documents=documents,
                                         add_generation_prompt=add_generation_prompt,
                                         **{**self.special_tokens, **kwargs})
        except jinja2.exceptions.TemplateError as e:
            raise ConfigError(f"chat template ({self.name}) failed: {e}") from None

    def assistant_spans(self, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
        """(full rendering, character spans of each assistant turn in it)."""
        full = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (upto.startswith(before) and full.startswith(upto)):
                raise ConfigError(f"chat template ({self.name}) does not render a conversation's beginning "
                                  "as the beginning of the whole, so the assistant's tokens cannot be found; "
                                  "give data.chat_template a template that does")
            spans.append((len(before), len(upto)))
        return full, spans

    def save(self, directory: str | Path) -> Path:
        """Write the template as `chat_template.jinja` into `directory` (transformers reads it too)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        p = d / TEMPLATE_FILE
        tmp = p.with_suffix(".jinja.tmp")
        tmp.write_text(self.source, encoding="utf-8")
        tmp.replace(p)
        return p


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or {} when absent; ConfigError when it is not valid JSON."""
    if not path.is_file():
        return {}
    data = read_input_json(path, "tokenizer file")
    return data if isinstance(data, dict) else {}


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as transformers 5 hands them to a template: keys whose value is None dropped (an
    API's `tool_calls: null` must read as absent), a reasoning under any of its names also given as
    `thinking` and `reasoning_content`."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def validate_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """Check a conversation: a list of {"role", "content"} with known roles and string contents."""
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: `messages` must be a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ConfigError(f"{where}: message {j} needs \"role\" and \"content\"")
        if m["role"] not in ROLES:
            raise ConfigError(f"{where}: message {j} has unknown role {m['role']!r} (use {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise ConfigError(f"{where}: message {j}: content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def chat_prompt(template: ChatTemplate, prompt: str, system: str | None = None) -> str:
    """The text a model continues to answer `prompt` as the assistant (`add_generation_prompt=True`)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return template.render(messages, add_generation_prompt=True)
