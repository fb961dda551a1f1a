"""End to end from the command line on the families people fine-tune (tiny random models, nothing
downloaded): a transformers Qwen3 / Gemma 3 / Qwen3-MoE checkpoint with a real tokenizer directory
(a byte-level BPE saved by `PreTrainedTokenizerFast.save_pretrained`, the family's chat template in
its `chat_template.jinja`) -> `torchgraft convert` -> `torchgraft finetune` with
`finetune.method=lora --merge` on chat data -> `generate --chat` (the template applied as is) ->
`eval` -> `convert` back to the Hugging Face layout, which transformers loads with the fine-tuned
model's logits."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch.testing import assert_close

from test_data_cli import run_cli
from torchgraft.testing import assert_close_computed, model_tol

T = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
T.logging.set_verbosity_error()

DATA = Path(__file__).parent / "data" / "chat_templates"
BASE = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=48, max_position_embeddings=128, head_dim=8)
FAMILIES = {  # name: (transformers config, chat template, specials, torchgraft model section extras)
    "qwen3": (lambda v: T.Qwen3Config(vocab_size=v, tie_word_embeddings=True, **BASE), "qwen3",
              {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, ["<|im_start|>"]),
    "gemma3": (lambda v: T.Gemma3TextConfig(vocab_size=v, sliding_window=8, query_pre_attn_scalar=8,
                                            layer_types=["sliding_attention", "full_attention"], **BASE),
               "gemma3", {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
               ["<start_of_turn>", "<end_of_turn>"]),
    "qwen3_moe": (lambda v: T.Qwen3MoeConfig(vocab_size=v, num_experts=4, num_experts_per_tok=2,
                                             moe_intermediate_size=16, norm_topk_prob=True, **BASE), "qwen3",
                  {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, ["<|im_start|>"]),
}


def _tokenizer(specials: dict[str, str], extra: list[str], template: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    fast.add_special_tokens({"additional_special_tokens": extra})
    fast.chat_template = template
    return fast


def _hf_dir(root: Path, family: str) -> Path:
    make_cfg, template, specials, extra = FAMILIES[family]
    tok = _tokenizer(specials, extra, (DATA / f"{template}.jinja").read_text())
    d = root / "hf"
    tok.save_pretrained(d)
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(make_cfg(len(tok))).save_pretrained(d)
    return d


@pytest.mark.parametrize("family", list(FAMILIES))
def test_convert_finetune_lora_generate_eval_convert_back(family, tmp_path, capsys):
    from torchgraft.data.chat_template import ChatTemplate, chat_prompt

    hf_dir = _hf_dir(tmp_path, family)
    tg = tmp_path / "tg"
    code, out, err = run_cli(["convert", hf_dir, tg], capsys)
    assert code in (0, None), err
    meta = json.loads((tg / "meta.json").read_text())["model"]
    assert meta["family"] == family
    assert (tg / "chat_template.jinja").is_file()  # the tokenizer directory travels whole

    rows = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
            for w in ["moon", "tree", "sun", "sky", "sea"] * 4]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"finetune": {"source": str(tg), "method": "lora", "strict": True,
                        "lora": {"targets": ["q_proj", "v_proj", "o_proj"], "rank": 4, "alpha": 8}},
           "model": {"family": family, **meta["config"]},
           "data": {"name": "sft", "path": str(tmp_path / "chat.jsonl"), "tokenizer": str(tg), "seq_len": 64,
                    "val_fraction": 0.2},
           "optim": {"lr": 1e-2}, "trainer": {"max_steps": 8, "batch_size": 4, "seed": 0},
           "eval": {"every": 8}, "checkpoint": {"every": 8},
           "logging": {"progress": False, "tensorboard": False, "measure_flops": False, "every": 4}}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    code, out, err = run_cli(["finetune", tmp_path / "ft.yaml", "finetune.method=lora", "--out", run, "--merge"],
                             capsys)
    assert code in (0, None), err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["method"] == "lora" and 0 < summary["fraction"] < 0.5
    assert (run / "adapter" / "adapter_config.json").is_file()

    template = ChatTemplate.for_tokenizer(run)
    hf_tok = T.AutoTokenizer.from_pretrained(hf_dir)
    msgs = [{"role": "user", "content": "Say moon."}]
    assert chat_prompt(template, "Say moon.") == hf_tok.apply_chat_template(msgs, tokenize=False,
                                                                           add_generation_prompt=True)
    code, out, err = run_cli(["generate", run, "--chat", "-p", "Say moon.", "-t", "0", "-n", "4"], capsys)
    assert code in (0, None), err
    from torchgraft.generation import generate
    from torchgraft.recipes.lm import load_lm

    lm = load_lm(run)
    want = generate(lm.model, [chat_prompt(template, "Say moon.")], lm.tokenizer, max_new_tokens=4,
                    temperature=0.0, add_bos=False).texts[0]
    assert out == want + "\n"
    code, out, err = run_cli(["eval", run, "--json", "--max-batches", "2", "--batch-size", "2"], capsys)
    assert code in (0, None), err
    ev = json.loads(out)
    assert ev["perplexity"] > 1.0 and ev["tokens"] > 0 and "validation split of sft" == ev["data"]

    back = tmp_path / "hf_back"
    code, out, err = run_cli(["convert", run / "merged", back], capsys)
    assert code in (0, None), err
    hf = T.AutoModelForCausalLM.from_pretrained(back).eval()
    assert hf.config.model_type == T.AutoConfig.from_pretrained(hf_dir).model_type
    import torchgraft
    from torchgraft import load_model

    ours = load_model(run / "merged").eval()
    ids = torch.tensor([hf_tok.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"]])
    with torch.no_grad():
        assert_close_computed(hf(ids).logits, ours(ids), model_tol(ours, seq_len=ids.shape[1]))
        base = torchgraft.load_hf(hf_dir)(ids)
    assert (base - ours(ids)).abs().max() > 1e-4  # the fine-tune changed the model
    assert T.AutoTokenizer.from_pretrained(back).apply_chat_template(msgs, tokenize=False) == \
        hf_tok.apply_chat_template(msgs, tokenize=False)
