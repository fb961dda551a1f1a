"""Every kind of artifact is served: Hugging Face GPT-2 / Llama directories (greedy text equal to
`transformers`' generate), a LoRA run and its merged folder (equal to `generate` on the loaded
run), a text classification run (`/v1/classify` equal to `predict --json`, `/v1/embeddings` the
mean of the real tokens' hidden states) and a Hugging Face BERT encoder (embeddings equal to
transformers' hidden states mean-pooled and normalised as sentence-transformers does)."""
from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch
import yaml

from serve_util import CHARS, client, served
from test_lora_path import lora_run  # noqa: F401  (the fixture: a LoRA fine-tune of a tiny GPT, merged too)
from test_textclass_data import ROWS, make_tokenizer, write
from torchgraft.data.tokenizers import char_tokenizer, load_tokenizer
from torchgraft.testing import assert_close_computed, model_tol

T = pytest.importorskip("transformers")
T.logging.set_verbosity_error()


def _hf_decoder(kind, d):
    tok = char_tokenizer([CHARS])
    common = dict(vocab_size=tok.vocab_size, bos_token_id=tok.eos_id, eos_token_id=tok.eos_id, initializer_range=0.2)
    if kind == "gpt2":
        cfg, cls = T.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, **common), T.GPT2LMHeadModel
    else:
        cfg, cls = T.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=96, max_position_embeddings=64, **common), T.LlamaForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    model.save_pretrained(d)
    tok.save(d)
    return model, tok


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hf_directory_greedy_equals_transformers(kind, tmp_path, one_thread):
    hf, tok = _hf_decoder(kind, tmp_path / kind)
    prompts = ["Hello world", "The quick fox", "Q: why?"]
    want = []
    for p in prompts:
        ids = torch.tensor([tok.encode(p)])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                              pad_token_id=tok.pad_id)[0, ids.shape[1]:].tolist()
        want.append(tok.decode([t for t in out if t != tok.eos_id]))
    assert len(set(want)) == len(want)
    with served(tmp_path / kind, max_batch=2, max_tokens=32) as (url, _, art):
        assert art.context == 64
        c = client(url)
        got = [c.completions.create(model=kind, prompt=p, max_tokens=20, temperature=0).choices[0].text
               for p in prompts]
        assert got == want
        batched = c.completions.create(model=kind, prompt=prompts, max_tokens=20, temperature=0)
        assert [ch.text for ch in sorted(batched.choices, key=lambda ch: ch.index)] == want
        chat = c.chat.completions.create(model=kind, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 5


@pytest.mark.parametrize("where", ["ft", "ft/merged"])
def test_lora_run_and_merged_folder(lora_run, where, one_thread):  # noqa: F811
    from torchgraft.generation import generate
    from torchgraft.recipes.lm import load_lm

    lm = load_lm(lora_run / where)
    prompts = ["ab", "The "]
    want = [generate(lm.model, [p], lm.tokenizer, max_new_tokens=12).texts[0] for p in prompts]
    with served(lora_run / where, name="lora", max_batch=2, max_tokens=16) as (url, _, art):
        assert art.context == 32
        r = client(url).completions.create(model="lora", prompt=prompts, max_tokens=12, temperature=0)
        assert [ch.text for ch in r.choices] == want


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    from torchgraft.cli import main

    root = tmp_path_factory.mktemp("textclass")
    tokdir, vocab = make_tokenizer(root / "tok")
    data = write(root / "train.csv", "csv", ROWS * 3)
    cfg = {"model": {"name": "bert-tiny", "task": "sequence_classification", "vocab_size": len(vocab)},
           "data": {"name": "textclass", "path": str(data), "tokenizer": str(tokdir), "max_len": 16,
                    "val_fraction": 0.2},
           "optim": {"name": "adamw", "lr": 3e-3}, "schedule": {"name": "constant"},
           "trainer": {"max_steps": 20, "batch_size": 8, "seed": 0}, "eval": {"every": 20},
           "checkpoint": {"every": 20}, "logging": {"progress": False, "tensorboard": False,
                                                  "measure_flops": False, "every": 5}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    main(["train", str(root / "cfg.yaml"), "--out", str(root / "run")])
    return root / "run"


@pytest.mark.numeric
def test_classifier_run_classifies_and_embeds(text_run, one_thread):
    from torchgraft.recipes.predict import load_classifier

    texts = ["wonderful great acting", "dull boring plot", "an okay film"]
    clf = load_classifier(text_run)
    want = clf.predict(texts, top_k=2)
    tok = load_tokenizer(text_run / "tokenizer")
    with served(text_run, name="minilm-run") as (url, _, art):
        r = httpx.post(url + "/v1/classify", json={"model": "minilm-run", "input": texts, "top_k": 2}).json()
        assert [{k: v for k, v in d.items() if k != "index"} for d in r["data"]] == want  # = predict --json
        emb = client(url).embeddings.create(model="minilm-run", input=texts)  # base64 on the wire
        assert httpx.get(url + "/health").json()["kind"] == "encoder"
        with pytest.raises(openai.BadRequestError) as e:  # an encoder has no completions
            client(url).completions.create(model="minilm-run", prompt="x")
        assert e.value.body["code"] == "unsupported_route"
    n_tokens = 0
    for text, got in zip(texts, emb.data):
        ids = torch.tensor([tok.backend.encode(text, add_special_tokens=True).ids])  # [CLS] ... [SEP], alone
        n_tokens += ids.shape[1]
        with torch.no_grad():
            ref = clf.model.forward_features(ids)[0].mean(0)  # mean over the tokens: no padding here
        # served (batched, padded) vs alone: the same model, other shapes, so other kernels' orders
        assert_close_computed(torch.tensor(got.embedding), ref, model_tol(clf.model, seq_len=ids.shape[1]))
    assert emb.usage.prompt_tokens == n_tokens


@pytest.mark.numeric
def test_hf_bert_encoder_embeddings_match_sentence_transformers_pooling(tmp_path, one_thread):
    from tokenizers import Tokenizer

    d, vocab = make_tokenizer(tmp_path / "bert")
    torch.manual_seed(0)
    hf = T.BertModel(T.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=len(vocab), max_position_embeddings=40)).eval()
    hf.save_pretrained(d)
    (d / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    texts = ["the film was wonderful", "boring", "an okay plot it is good"]
    tk = Tokenizer.from_file(str(d / "tokenizer.json"))
    tk.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tk.encode_batch(texts)
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    with torch.no_grad():
        hidden = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask[..., None].float()
    want = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    with served(d, name="bert") as (url, _, _):
        r = httpx.post(url + "/v1/embeddings", json={"model": "bert", "input": texts, "encoding_format": "float"}).json()
        got = torch.tensor([x["embedding"] for x in r["data"]])
        assert r["usage"]["prompt_tokens"] == int(mask.sum())
        r = httpx.post(url + "/v1/classify", json={"model": "bert", "input": "x"})
        assert r.status_code == 400 and "without a classification head" in r.json()["error"]["message"]
    assert_close_computed(got, want, model_tol(hf, seq_len=ids.shape[1]))  # ours vs transformers


@pytest.mark.numeric
@pytest.mark.slow
def test_real_minilm_embeddings_equal_transformers_mean_pooling(one_thread):
    """all-MiniLM-L6-v2 (the `real` extra) served: embeddings equal transformers' BertModel hidden
    states mean-pooled over real tokens and normalised (its modules.json has Normalize)."""
    from test_minilm_real import SENTENCES, _mean_pool, _model_dir
    from tokenizers import Tokenizer

    d = _model_dir()
    texts = [s for s in SENTENCES if s]
    tk = Tokenizer.from_file(str(d / "tokenizer.json"))
    tk.enable_padding(pad_id=0, pad_token="[PAD]")
    tk.enable_truncation(256)
    enc = tk.encode_batch(texts)
    ids, mask = torch.tensor([e.ids for e in enc]), torch.tensor([e.attention_mask for e in enc])
    hf = T.BertModel.from_pretrained(str(d)).eval()
    with torch.no_grad():
        want = _mean_pool(hf(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
    with served(d, name="minilm") as (url, _, _):
        emb = client(url).embeddings.create(model="minilm", input=texts)
    assert_close_computed(torch.tensor([e.embedding for e in emb.data]), want, model_tol(hf, seq_len=ids.shape[1]))
