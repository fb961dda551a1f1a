"""`torchgraft eval --tasks`: parity with lm-evaluation-harness (same tiny HF model, same local JSONL
task: tokenization, per-choice log-likelihoods, acc, acc_norm, stderr), few-shot, generation exact
match on a model trained to answer, the CLI and bad task files."""
import json
import os
from pathlib import Path

import pytest
import torch

from torchgraft.errors import ConfigError
from torchgraft.recipes.eval_tasks import (encode_pair, eval_tasks, find_task_files, load_task_file,
                                           score_multiple_choice)

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "configs" / "eval"
MC, SHOTS, GEN = SAMPLES / "sample-mc.jsonl", SAMPLES / "sample-mc.fewshot.jsonl", SAMPLES / "sample-gen.jsonl"


def _save_tiny_hf(d: Path, family: str) -> Path:
    """A tiny random HF model of `family` with a byte-level BPE tokenizer trained on the sample task,
    saved as an HF directory (the tokenizer both lm-eval's AutoTokenizer and torchgraft load)."""
    transformers = pytest.importorskip("transformers")
    from torchgraft.data.tokenizers import train_bpe

    tok = train_bpe([line for f in (MC, SHOTS) for line in f.read_text().splitlines()] * 3, 400)
    tok.save(d)
    torch.manual_seed(0)
    # initializer_range 0.3: log-likelihoods far apart (no near-ties that fp32 rounding could flip)
    ids = dict(vocab_size=tok.vocab_size, initializer_range=0.3, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
               pad_token_id=tok.pad_id)
    if family == "llama":
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **ids)
        transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    else:
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **ids)
        transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return _save_tiny_hf(tmp_path_factory.mktemp("hf"), "llama")


def _lm_eval(model_dir: Path, test: Path, train: Path | None, k: int):
    """lm-eval's HFLM + a ConfigurableTask on the local JSONL, offline: (results, samples, lm)."""
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    pytest.importorskip("lm_eval")
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    files = {"test": str(test), **({"train": str(train)} if train else {})}
    cfg = {"task": "tg_mc", "dataset_path": "json", "dataset_kwargs": {"data_files": files},
           "test_split": "test", "fewshot_split": "train" if train else "test", "output_type": "multiple_choice",
           "doc_to_text": "{{context}}", "doc_to_choice": "choices", "doc_to_target": "gold",
           "target_delimiter": " ", "fewshot_delimiter": "\n\n",
           "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}], "fewshot_config": {"sampler": "first_n"},
           "num_fewshot": k}
    lm = HFLM(pretrained=str(model_dir), batch_size=1, device="cpu", dtype="float32")
    res = evaluate(lm, {"tg_mc": ConfigurableTask(config=cfg)}, log_samples=True, bootstrap_iters=10)
    samples = sorted(res["samples"]["tg_mc"], key=lambda s: s["doc_id"])
    return res["results"]["tg_mc"], samples, lm


def _check_parity(model_dir: Path, tmp_path: Path, k: int, shots) -> None:
    """Our scores of the sample task equal lm-eval's on the same HF directory: requests, token split,
    per-choice log-likelihoods (fp32 tolerance), per-example and overall acc / acc_norm, stderr."""
    test_file = MC
    if shots == "same-file":  # few-shot pool = the task itself minus the scored example
        test_file = tmp_path / "mc.jsonl"
        kept = [line for line in MC.read_text().splitlines() if '"context": ""' not in line]
        test_file.write_text("".join(line + "\n" for line in kept))
    train = shots if isinstance(shots, Path) else None
    ref, samples, lm = _lm_eval(model_dir, test_file, train, k)

    from torchgraft.recipes.lm import load_lm

    loaded = load_lm(model_dir)
    task = load_task_file(test_file)
    if train is None:
        task.fewshot = None  # no NAME.fewshot.jsonl next to the copy; MC's own would be picked up otherwise
    ours = score_multiple_choice(loaded.model, loaded.tokenizer, task, num_fewshot=k, max_len=256, batch_size=5)
    assert len(samples) == len(ours["loglikelihoods"]) == len(task.examples)
    for s, ex, lls in zip(samples, task.examples, ours["loglikelihoods"]):
        for (ctx, cont), choice in zip(s["arguments"], ex.choices):  # the same prompts ...
            assert cont == " " + choice
            if ctx:  # ... and the same token split as lm-eval's own _encode_pair
                assert tuple(encode_pair(loaded.tokenizer, ctx, cont)) == tuple(lm._encode_pair(ctx, cont))
        ref_ll = [r[0][0] for r in s["resps"]]
        n_tokens = [len(encode_pair(loaded.tokenizer, a[0], a[1])[1]) for a in s["arguments"]]
        # fp32: each token's log-prob carries ~1e-6 relative rounding of logits of size ~10 through two
        # layers of width 64 (torch vs HF kernels, batched vs not); allow 2e-5 per token, or relative
        # 2e-5 of the sum when that is larger: ~20 ulps
        for ll, r, n in zip(lls, ref_ll, n_tokens):
            assert abs(ll - r) <= 2e-5 * max(n, abs(r)), (ll, r, n)
        gaps = sorted(ref_ll)
        assert gaps[-1] - gaps[-2] > 1e-3  # no near-tie: acc cannot flip on rounding
        norm = [ll / len(c) for ll, c in zip(lls, ex.choices)]
        assert s["acc"] == float(lls.index(max(lls)) == ex.gold)
        assert s["acc_norm"] == float(norm.index(max(norm)) == ex.gold)
    assert ours["acc"] == ref["acc,none"] and ours["acc_norm"] == ref["acc_norm,none"]
    assert ours["acc_stderr"] == pytest.approx(ref["acc_stderr,none"], rel=1e-9)
    assert ours["acc_norm_stderr"] == pytest.approx(ref["acc_norm_stderr,none"], rel=1e-9)
    worst = max(abs(a - r[0][0]) for s, ll in zip(samples, ours["loglikelihoods"]) for a, r in zip(ll, s["resps"]))
    print(f"{model_dir.name} {k}-shot: acc {ours['acc']:.4f} acc_norm {ours['acc_norm']:.4f} "
          f"(lm-eval {ref['acc,none']:.4f} {ref['acc_norm,none']:.4f}); max |dll| {worst:.2e}")


@pytest.mark.parametrize("k, shots", [(0, None), (2, SHOTS), (1, "same-file")])
def test_llama_scores_equal_lm_evaluation_harness(hf_dir, tmp_path, k, shots):
    _check_parity(hf_dir, tmp_path, k, shots)


def test_gpt2_scores_equal_lm_evaluation_harness(tmp_path):
    """The other decoder family (learned positions, LayerNorm, GELU, Conv1D weights in the HF file)."""
    _check_parity(_save_tiny_hf(tmp_path / "gpt2", "gpt2"), tmp_path, 2, SHOTS)


def test_encode_pair_moves_trailing_space_and_keeps_boundary_merges(hf_dir):
    from torchgraft.data.tokenizers import load_tokenizer

    tok = load_tokenizer(hf_dir)
    ctx, cont = encode_pair(tok, "the statement that imports a module is ", " import")
    assert ctx == tok.encode("the statement that imports a module is")
    assert ctx + cont == tok.encode("the statement that imports a module is  import")
    empty_ctx, whole = encode_pair(tok, "", " Python")
    assert empty_ctx == [tok.bos_id] and whole == tok.encode(" Python")


def _answerer_cfg(root: Path, steps: int) -> dict:
    """A char GPT config on the generation sample's lines (context + answer), repeated."""
    src = root / "qa.txt"
    src.write_text("".join(f"{json.loads(line)['context']} {json.loads(line)['answer']}\n"
                           for line in GEN.read_text().splitlines()) * 40)
    cfg = {"model": {"family": "gpt", "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64},
           "data": {"name": "text", "source": str(src), "tokenizer": "char", "seq_len": 64, "stride": 16,
                    "val_fraction": 0.1, "cache_dir": str(root / "cache"), "progress": False},
           "optim": {"name": "adamw", "lr": 3e-3}, "trainer": {"max_steps": steps, "batch_size": 16, "seed": 0},
           "eval": {"every": steps, "max_batches": 1}, "checkpoint": {"every": steps, "keep_last": 1},
           "logging": {"progress": False, "tensorboard": False, "measure_flops": False}}
    return cfg


@pytest.fixture(scope="module")
def answerer(tmp_path_factory):
    """A tiny char GPT run trained on the generation sample's lines until it recites most of them."""
    from torchgraft.recipes.training import run_training

    root = tmp_path_factory.mktemp("answerer")
    run_training(_answerer_cfg(root, 200), root / "run")
    return root


def test_generation_exact_match_on_a_model_that_learned_the_answers(answerer, tmp_path):
    run = answerer / "run"
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "qa.jsonl").write_text(GEN.read_text())
    wrong = [json.loads(line) for line in GEN.read_text().splitlines()]
    for w in wrong:
        w["answer"] = w["answer"] + "x"
    (tasks / "qa_wrong.jsonl").write_text("".join(json.dumps(w) + "\n" for w in wrong))
    out = eval_tasks(run, tasks, max_new_tokens=8)["tasks"]
    examples = [json.loads(line) for line in GEN.read_text().splitlines()]
    # the outputs are plain greedy decoding cut at the stop string "\n"
    from torchgraft.generation import generate
    from torchgraft.recipes.lm import load_lm

    lm = load_lm(run)
    for ex, o in zip(examples, out["qa"]["outputs"]):
        full = generate(lm.model, ex["context"], lm.tokenizer, max_new_tokens=8, temperature=0.0).texts[0]
        assert o == full.split("\n")[0] and "\n" not in o
    hits = [o.strip() == ex["answer"] for ex, o in zip(examples, out["qa"]["outputs"])]
    assert out["qa"]["exact_match"] == sum(hits) / len(hits)
    assert out["qa"]["exact_match"] >= 0.5, out["qa"]["outputs"]  # an untrained model scores 0
    assert out["qa_wrong"]["exact_match"] == 0.0


def test_cli_tasks_dir_prints_metrics_and_json(hf_dir, capsys):
    from tests.conftest import invoke_cli

    code, out, err, _ = invoke_cli(["eval", hf_dir, "--tasks", SAMPLES, "--max-new-tokens", "4"], capsys)
    assert code == 0, err
    assert "sample-mc: acc " in out and "acc_norm" in out and "sample-gen: exact_match " in out
    code, out, err, _ = invoke_cli(["eval", hf_dir, "--tasks", MC, "--num-fewshot", "2", "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["num_fewshot"] == 2 and set(res["tasks"]["sample-mc"]) >= {"acc", "acc_norm", "n"}
    code, out, err, _ = invoke_cli(["eval", hf_dir, "--tasks", MC, "--data", "builtin"], capsys)
    assert code == 2 and "exclusive" in err
    code, out, err, _ = invoke_cli(["eval", hf_dir, "--num-fewshot", "2"], capsys)
    assert code == 2 and "apply to --tasks" in err


@pytest.mark.parametrize("line, words", [
    ("{not json", "not valid JSON"),
    ('{"context": "a", "choices": ["x", "y"]}', '"gold" must be the index'),
    ('{"context": "a", "choices": ["x", "y"], "gold": 2}', '"gold" must be the index'),
    ('{"context": "a", "choices": ["x"], "gold": 0}', "at least two"),
    ('{"context": "a"}', 'needs "choices"'),
    ('{"context": "a", "answer": "b", "until": "\\n"}', '"until" must be a list'),
])
def test_bad_task_lines_name_file_and_line(tmp_path, line, words):
    f = tmp_path / "t.jsonl"
    f.write_text('{"context": "ok", "choices": ["a", "b"], "gold": 1}\n' + line + "\n")
    with pytest.raises(ConfigError, match=words) as e:
        load_task_file(f)
    assert f"{f}:2" in str(e.value) and "\n" not in str(e.value)


def test_task_files_mixed_kinds_missing_and_too_few_shots(tmp_path, hf_dir):
    f = tmp_path / "mix.jsonl"
    f.write_text('{"context": "a", "choices": ["x", "y"], "gold": 0}\n{"context": "b", "answer": "c"}\n')
    with pytest.raises(ConfigError, match="mixes"):
        load_task_file(f)
    with pytest.raises(ConfigError, match="not found"):
        find_task_files(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no \\*.jsonl"):
        find_task_files(tmp_path / "empty")
    assert [p.name for p in find_task_files(SAMPLES)] == ["sample-gen.jsonl", "sample-mc.jsonl"]
    with pytest.raises(ConfigError, match="4 few-shot examples asked for but only 3"):
        eval_tasks(hf_dir, MC, num_fewshot=4)


def test_lora_run_scores_as_its_merged_weights(answerer, tmp_path):
    """A LoRA fine-tune's run directory (adapters re-applied and merged on load) scores exactly as
    its `merged/` folder, and differently from the base model."""
    from torchgraft.recipes.finetune import run_finetune

    tree = {**_answerer_cfg(answerer, 3), "optim": {"name": "adamw", "lr": 5e-2},
            "finetune": {"source": str(answerer / "run"), "method": "lora",
                         "lora": {"targets": ["q_proj", "v_proj"], "rank": 4, "alpha": 8}}}
    run_finetune(tree, tmp_path / "ft", merge=True)
    lora = eval_tasks(tmp_path / "ft", MC)["tasks"]["sample-mc"]
    merged = eval_tasks(tmp_path / "ft" / "merged", MC)["tasks"]["sample-mc"]
    base = eval_tasks(answerer / "run", MC)["tasks"]["sample-mc"]
    for a, b, c in zip(lora["loglikelihoods"], merged["loglikelihoods"], base["loglikelihoods"]):
        assert a == pytest.approx(b, abs=1e-4)  # the same merge, fp32
        assert a != pytest.approx(c, abs=1e-4)
    assert (lora["acc"], lora["acc_norm"]) == (merged["acc"], merged["acc_norm"])


def test_generation_equals_lm_evaluation_harness_generate_until(hf_dir, tmp_path):
    """Greedy outputs cut at the stop string equal lm-eval's `generate_until` on the same HF model,
    and so does exact_match (answers set to the model's own output on every other example)."""
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    pytest.importorskip("lm_eval")
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    ours = eval_tasks(hf_dir, GEN, max_new_tokens=8)["tasks"]["sample-gen"]["outputs"]
    lines = [json.loads(line) for line in GEN.read_text().splitlines()]
    for i, ex in enumerate(lines):
        ex["answer"] = ours[i] if i % 2 == 0 else ex["answer"]
    task_file = tmp_path / "gen.jsonl"
    task_file.write_text("".join(json.dumps(ex) + "\n" for ex in lines))
    scored = eval_tasks(hf_dir, task_file, max_new_tokens=8)["tasks"]["gen"]
    assert scored["outputs"] == ours and scored["exact_match"] == 0.5

    cfg = {"task": "tg_gen", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(task_file)}},
           "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{context}}",
           "doc_to_target": "{{answer}}", "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
           "metric_list": [{"metric": "exact_match"}], "num_fewshot": 0}
    lm = HFLM(pretrained=str(hf_dir), batch_size=1, device="cpu", dtype="float32")
    res = evaluate(lm, {"tg_gen": ConfigurableTask(config=cfg)}, log_samples=True, bootstrap_iters=0)
    ref = [s["resps"][0][0] for s in sorted(res["samples"]["tg_gen"], key=lambda s: s["doc_id"])]
    assert ref == ours
    assert res["results"]["tg_gen"]["exact_match,none"] == scored["exact_match"]
