"""Chat templates: render a conversation exactly as `transformers`' `apply_chat_template` does.

A template is Jinja source, from (in this order) an explicit `chat_template:` option (a `.jinja`
file or inline source), the `chat_template` key of the tokenizer's `tokenizer_config.json`, a
`chat_template.jinja` file next to it, or the plain built-in `DEFAULT_TEMPLATE`.

Rendering matches transformers (`utils/chat_template_utils.py`): a sandboxed Jinja environment
with `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension and a `{% generation %}` tag;
`tojson` that does not escape HTML (`ensure_ascii=False`); globals `raise_exception(msg)` and
`strftime_now(fmt)`; the template sees `messages`, `add_generation_prompt` and the special tokens
of `tokenizer_config.json` (`bos_token`, `eos_token`, `pad_token`, ... as strings), and keyword
arguments override those. Rendered text is tokenised without the tokenizer's post-processor (as
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

ROLES = ("system", "user", "assistant", "tool")
TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

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
        cfg: dict[str, Any] = {}
        if d is not None and (d / CONFIG_FILE).is_file():
            try:
                cfg = json.loads((d / CONFIG_FILE).read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                raise ConfigError(f"{d / CONFIG_FILE} is not valid JSON") from None
        tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        for key in _SPECIAL_KEYS:
            s = _token_string(cfg.get(key))
            if s is not None:
                tokens[key] = s
        extra = cfg.get("additional_special_tokens")
        if isinstance(extra, list):
            tokens["additional_special_tokens"] = [t for t in (_token_string(x) for x in extra) if t]
        if override:
            p = Path(override).expanduser()
            if len(override) < 4096 and p.is_file():
                return cls(p.read_text(encoding="utf-8"), tokens, name=str(p))
            return cls(override, tokens, name="inline")
        source = cfg.get("chat_template")
        if isinstance(source, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default") or next(iter(named.values()), None)
        if isinstance(source, str) and source:
            return cls(source, tokens, name=f"{d / CONFIG_FILE}")
        if d is not None and (d / TEMPLATE_FILE).is_file():
            return cls((d / TEMPLATE_FILE).read_text(encoding="utf-8"), tokens, name=str(d / TEMPLATE_FILE))
        return cls(DEFAULT_TEMPLATE, tokens, name="built-in")

    # ---- rendering
    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False, **kwargs: Any) -> str:
        """The conversation as text, exactly as `apply_chat_template(..., tokenize=False)` gives it."""
        import jinja2

        try:
            return self._template.render(messages=messages, tools=None, documents=None,
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
