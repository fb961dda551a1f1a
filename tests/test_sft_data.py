"""Chat templates rendered exactly like transformers, assistant-only labels, packing without
cross-attention (packed loss == unpacked loss), and bad chat records."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from torchgraft.data import build_data
from torchgraft.data.chat_template import DEFAULT_TEMPLATE, ChatTemplate
from torchgraft.data.sft import IGNORE_INDEX, document_mask, document_positions, encode_conversation
from torchgraft.data.tokenizers import load_tokenizer
from torchgraft.errors import ConfigError
from torchgraft.testing import assert_close_computed, tolerance, transformer_tol

# Llama-3.1 style: whitespace control, namespace, strftime_now, raise_exception, tojson, loop controls
LLAMA3 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- set ns = namespace(turns=0) %}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant', 'tool'] %}
        {{- raise_exception('unsupported role ' + message['role']) }}
    {%- endif %}
    {%- if message['role'] == 'tool' %}
        {{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + (message['content'] | tojson) + '<|eot_id|>' }}
        {%- continue %}
    {%- endif %}
    {%- set ns.turns = ns.turns + 1 %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# ChatML (Qwen style), written over several indented lines: trim_blocks / lstrip_blocks matter here
CHATML = """{% for message in messages %}
    {% if loop.first and messages[0]['role'] != 'system' %}
        {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' -}}
    {% endif %}
    {{- '<|im_start|>' + message['role'] + '\n' }}
    {%- if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}
    {{- '\n' -}}
{% endfor %}
{% if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' -}}
{% endif %}"""

SPECIALS = {"llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                       "<|eot_id|>"],
            "chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]}

CHATS = [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}],
    [{"role": "system", "content": "  Answer briefly.  "}, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy? <b>&</b>"},
     {"role": "assistant", "content": " Rome. "}],
    [{"role": "user", "content": "call the tool"}, {"role": "assistant", "content": "ok"},
     {"role": "tool", "content": "{\"temp\": \"20\u00b0C\"}"}, {"role": "assistant", "content": "It is 20\u00b0C."}],
]


def make_tokenizer(d, kind):
    """Byte-level BPE (no merges) + the template's special tokens, and a tokenizer_config.json."""
    from torchgraft.data.tokenizers import byte_tokenizer

    tok = byte_tokenizer()
    tok.backend.add_special_tokens(SPECIALS[kind])
    tok.save(d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    if kind == "llama3":
        cfg.update(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|end_of_text|>",
                   chat_template=LLAMA3)
    else:
        cfg.update(bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(params=["llama3", "chatml"])
def tokdir(request, tmp_path):
    return make_tokenizer(tmp_path / request.param, request.param), request.param


def test_rendering_matches_transformers(tokdir):
    transformers = pytest.importorskip("transformers")
    d, kind = tokdir
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(d))
    tmpl = ChatTemplate.for_tokenizer(d)
    ours_tok = load_tokenizer(d)
    for chat in CHATS:
        for gen in (False, True):
            want = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            got = tmpl.render(chat, add_generation_prompt=gen)
            assert got == want
            ids = hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            assert ours_tok.encode(got) == list(ids)
        # segment-wise tokenisation (for the label mask) gives the same ids as the whole text here
        assert encode_conversation(chat, tmpl, ours_tok).ids == ours_tok.encode(tmpl.render(chat))
    if kind == "llama3":
        # a keyword overrides the template's strftime_now default, as in transformers
        kw = {"date_string": "01 Jan 2030"}
        assert tmpl.render(CHATS[0], **kw) == hf.apply_chat_template(CHATS[0], tokenize=False, **kw)
        assert "Today Date: 01 Jan 2030" in tmpl.render(CHATS[0], **kw)
        # raise_exception inside the template becomes one clear error line
        with pytest.raises(ConfigError, match="unsupported role narrator"):
            tmpl.render([{"role": "narrator", "content": "x"}])


def test_labels_cover_exactly_the_assistant_tokens(tokdir, tmp_path):
    d, kind = tokdir
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS)
                    + json.dumps({"prompt": "Say hi", "response": "hi"}) + "\n")
    b = build_data({"name": "sft", "path": str(path), "tokenizer": str(d), "seq_len": 512,
                    "packing": False, "val_fraction": 0.0})
    tok = b.info["tokenizer"]
    end = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>"}[kind]
    convs = CHATS + [[{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]]
    for i, chat in enumerate(convs):
        item = b.train[i]
        ids, labels = item["input_ids"], item["labels"]
        shifted = torch.cat([ids[1:], labels[-1:]])  # labels are the next tokens where they are not ignored
        assert torch.equal(labels[labels != IGNORE_INDEX], shifted[labels != IGNORE_INDEX])
        trained = tok.decode(labels[labels != IGNORE_INDEX].tolist(), skip_special_tokens=False)
        answers = [m["content"] for m in chat if m["role"] == "assistant"]
        if kind == "llama3":
            want = "".join(a.strip() + end for a in answers)
        else:
            want = "".join(a + end + "\n" for a in answers)
        assert trained == want
        # and every other position is ignored: the trained tokens are exactly that many
        assert int((labels != IGNORE_INDEX).sum()) == len(tok.encode(want))
        full = torch.cat([ids, labels[-1:]])
        assert tok.decode(full.tolist(), skip_special_tokens=False) == ChatTemplate.for_tokenizer(d).render(chat)


def _per_example_losses(model, batch, doc_ids):
    logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                   position_ids=batch.get("position_ids"))
    ce = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), reduction="none",
                         ignore_index=IGNORE_INDEX).view_as(batch["labels"])
    return ce, doc_ids


@pytest.mark.parametrize("family", ["llama-tiny", "gpt-tiny"])
def test_packed_loss_equals_unpacked(tmp_path, family, one_thread):
    from torchgraft import build as build_model

    d = make_tokenizer(tmp_path / "tok", "chatml")
    recs = [{"prompt": f"question {i}: " + "x" * (3 + 5 * i), "response": "answer " + "y" * (2 + 3 * i)}
            for i in range(7)]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    opts = {"name": "sft", "path": str(path), "tokenizer": str(d), "seq_len": 200, "val_fraction": 0.0}
    packed = build_data({**opts, "packing": True})
    single = build_data({**opts, "packing": False})
    assert len(packed.train) < len(single.train) == 7  # several conversations share a window
    torch.manual_seed(0)
    model = build_model(family, vocab_size=packed.info["vocab_size"], block_size=256).eval()
    batch = packed.collate_fn([packed.train[i] for i in range(len(packed.train))])
    assert batch["attention_mask"].shape == (len(packed.train), 1, 200, 200)
    docs = torch.stack([F.pad(packed.train[i]["doc_ids"], (0, 200 - len(packed.train[i]["doc_ids"])), value=-1)
                        for i in range(len(packed.train))])
    with torch.no_grad():
        ce, _ = _per_example_losses(model, batch, docs)
        got = [ce[r][docs[r] == k].sum() for r in range(len(packed.train)) for k in range(int(docs[r].max()) + 1)]
        want = []
        for i in range(len(single.train)):
            one = single.collate_fn([single.train[i]])
            ce1, _ = _per_example_losses(model, one, None)
            want.append(ce1.sum())
        # also a padded, unpacked batch: the same per-example losses
        padded = single.collate_fn([single.train[i] for i in range(7)])
        cep, _ = _per_example_losses(model, padded, None)
    assert len(got) == 7
    tol = transformer_tol(model.config, batch["input_ids"].shape[1])  # packed / padded vs alone
    for g, w, p in zip(got, want, cep.sum(1)):
        assert_close_computed(g, w, tol)
        assert_close_computed(p, w, tol)
    # and through the lm task: the summed loss and count over the packed batch are the unpacked totals
    from torchgraft.train.tasks import build_task

    task = build_task("lm")
    with torch.no_grad():
        assert_close_computed(task.loss_sum(model, batch), sum(want), tol + tolerance(len(want)))  # and a sum
    assert int(task.count(batch)) == int(task.count(padded))


def test_document_positions_and_mask():
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1]])
    assert document_positions(docs).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    m = document_mask(docs)[0, 0]
    assert m[4].tolist() == [False, False, False, True, True, False, False, False]
    assert m[2].tolist() == [True, True, True, False, False, False, False, False]
    assert m.diagonal().all()


def test_default_template_and_truncation(tmp_path):
    from torchgraft.data.tokenizers import char_tokenizer

    tok = char_tokenizer(["abcdefghijklmnopqrstuvwxyz0123456789 #:?+=\n.ABCDEFGHIJKLMNOPQRSTUVWXYZ"])
    tok.save(tmp_path / "tok")
    recs = [{"prompt": "2+2?", "response": "4"}, {"prompt": "a" * 40, "response": "b" * 80},
            {"prompt": "c" * 300, "response": "d"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.warns(UserWarning, match=r"2 of 3 conversations were longer than seq_len \+ 1 = 101 tokens and were "
                                         r"truncated; 1 kept no assistant token and were dropped"):
        b = build_data({"name": "sft", "path": str(path), "tokenizer": str(tmp_path / "tok"), "seq_len": 100,
                        "val_fraction": 0.0, "packing": False})
    assert b.info["n_truncated"] == 2 and b.info["n_dropped"] == 1 and len(b.train) == 2
    assert b.info["chat_template"] == "built-in" and b.files["tokenizer/chat_template.jinja"] == DEFAULT_TEMPLATE
    text = tok.decode(torch.cat([b.train[0]["input_ids"], b.train[0]["labels"][-1:]]).tolist(),
                      skip_special_tokens=False)
    assert text == "<|endoftext|>### User:\n2+2?\n\n### Assistant:\n4<|endoftext|>\n\n"


def test_bad_chat_records(tmp_path):
    from torchgraft.data.tokenizers import byte_tokenizer

    byte_tokenizer().save(tmp_path / "tok")
    cases = {
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}':
            r"bad.jsonl:1: message 1 has unknown role 'robot' \(use system, user, assistant, tool\)",
        '{"question": "hi"}': r"needs \"messages\" or both \"prompt\" and \"response\"",
        '{"messages": [{"role": "user", "content": "hi"}]}': "no assistant message",
        "not json": "is not valid JSON",
        "": "is empty",
    }
    for line, pattern in cases.items():
        (tmp_path / "bad.jsonl").write_text(line + "\n")
        with pytest.raises(ConfigError, match=pattern):
            build_data({"name": "sft", "path": str(tmp_path / "bad.jsonl"), "tokenizer": str(tmp_path / "tok")})
