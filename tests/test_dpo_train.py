"""Preference tuning through `torchgraft finetune`: LoRA DPO with the adapters-off reference, full
fine-tuning against a frozen reference checkpoint, SimPO / ORPO / reward model runs, exact resume,
and (slow) the measured effect of DPO on a hidden rule.

The synthetic task: the prompt is a random lowercase word; the answer is the word's last letter and
"yes" or "no" ("k yes"). The SFT data says yes or no at random (50/50, whatever the word), so an
SFT'd model reads the last letter but has no preference. The preference pairs follow a hidden rule:
"yes" is preferred when the word's last letter is in a..m, else "no".
"""
from __future__ import annotations

import json
import math
import random
import string

import pytest
import torch

from torchgraft.data import build_data
from torchgraft.data.chat_template import ChatTemplate, chat_prompt
from torchgraft.data.tokenizers import char_tokenizer, load_tokenizer
from torchgraft.errors import ConfigError
from torchgraft.recipes.finetune import run_finetune
from torchgraft.train import run_training
from torchgraft.checkpoint.files import list_checkpoints
from torchgraft import load_model
from torchgraft.train.tasks import build_task
from torchgraft.train.tasks.pairwise import pair_logps
from conftest import interrupt_after_step

MODEL = {"family": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 64, "intermediate_size": 176,
         "block_size": 64, "tie_embeddings": True}
QUIET = {"progress": False, "tensorboard": False, "measure_flops": False, "every": 1}
LORA = {"targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "rank": 8,
        "alpha": 16}


def rule(word: str) -> str:
    """The hidden preference: "yes" when the last letter is in a..m."""
    return "yes" if word[-1] <= "m" else "no"


def answer(word: str, verdict: str) -> str:
    return f"{word[-1]} {verdict}"


def words(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6))) for _ in range(n)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def make_files(d, n_sft=2000, n_pairs=1000, n_val=200):
    """tokenizer dir, SFT chats (random answers), train / held-out preference pairs (the rule)."""
    tok_dir = d / "tok"
    char_tokenizer([string.ascii_letters + string.digits + string.punctuation + " \n"]).save(tok_dir)
    rng = random.Random(0)
    sft = write_jsonl(d / "sft.jsonl", [{"prompt": w, "response": answer(w, rng.choice(["yes", "no"]))}
                                         for w in words(n_sft, 1)])

    def pairs(ws):
        return [{"prompt": w, "chosen": answer(w, rule(w)), "rejected": answer(w, "no" if rule(w) == "yes" else "yes")}
                for w in ws]
    train = write_jsonl(d / "pairs.jsonl", pairs(words(n_pairs, 2)))
    val = write_jsonl(d / "pairs_val.jsonl", pairs(words(n_val, 3)))
    return {"tok": str(tok_dir), "sft": sft, "pairs": train, "val": val}


def sft_run(d, files, steps=150):
    cfg = {"model": MODEL, "data": {"name": "sft", "path": files["sft"], "tokenizer": files["tok"], "seq_len": 64},
           "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.0},
           "schedule": {"name": "cosine", "warmup_steps": 10},
           "trainer": {"max_steps": steps, "batch_size": 32, "seed": 0},
           "eval": {"every": steps}, "checkpoint": {"every": steps, "keep_last": 1}, "logging": QUIET}
    run_training(cfg, d / "sft")
    return d / "sft"


def dpo_config(source, files, task, method="lora", steps=8, **trainer):
    return {"finetune": {"source": str(source), "method": method, "lora": LORA},
            "model": MODEL, "task": task,
            "data": {"name": "preference", "path": files["pairs"], "val_path": files["val"],
                     "tokenizer": files["tok"], "max_len": 48},
            "optim": {"name": "adamw", "lr": 5e-3, "weight_decay": 0.0},
            "schedule": {"name": "constant", "warmup_steps": 0},
            "trainer": {"max_steps": steps, "batch_size": 16, "seed": 0, **trainer},
            "eval": {"every": steps, "max_batches": 4}, "checkpoint": {"every": 4, "keep_last": 3},
            "logging": QUIET}


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    d = tmp_path_factory.mktemp("pref")
    files = make_files(d, n_sft=400, n_pairs=32, n_val=32)
    files["val"] = files["pairs"]  # fast tests: a few epochs over 32 pairs, evaluated on those pairs
    return sft_run(d, files, steps=30), files


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_lora_policy_starts_equal_to_its_reference(sft):
    """LoRA's B = 0 at the start: the adapters-off reference gives the same log-probs, so every DPO
    reward is 0 and the sigmoid loss is exactly log 2 (hinge: 1; IPO: 1/(2 beta)^2)."""
    from torchgraft.peft import apply_lora

    run, files = sft
    model = load_model(run)
    apply_lora(model, LORA["targets"], rank=8)
    bundle = build_data({"name": "preference", "path": files["val"], "tokenizer": files["tok"], "val_fraction": 0.0})
    batch = bundle.collate_fn([bundle.train[i] for i in range(8)])
    for loss_type, want in (("sigmoid", math.log(2)), ("hinge", 1.0), ("ipo", (1 / 0.2) ** 2)):
        task = build_task({"name": "dpo", "loss_type": loss_type, "beta": 0.1})
        with torch.no_grad():
            assert float(task.loss_sum(model, batch) / task.count(batch)) == pytest.approx(want, rel=1e-6)
            out = task.pair_outputs(model, batch)
        assert out.chosen_rewards.abs().max() == 0 and out.rejected_rewards.abs().max() == 0
    # sft_weight (RPO) adds the weight times the chosen completions' mean token NLL
    task = build_task({"name": "dpo", "sft_weight": 0.5})
    with torch.no_grad():
        chosen, _ = pair_logps(model, batch)
        got = float(task.loss_sum(model, batch) / task.count(batch))
    assert got == pytest.approx(math.log(2) + 0.5 * float(-chosen.mean.mean()), rel=1e-6)


def test_lora_dpo_finetune_logs_trl_metrics_and_moves_rewards(sft, tmp_path):
    run, files = sft
    summary = run_finetune(dpo_config(run, files, {"name": "dpo", "beta": 0.1}, steps=8), tmp_path / "dpo")
    rec = records(tmp_path / "dpo")
    evals = [r for r in rec if "val_rewards/margins" in r]
    assert evals and {"val_rewards/chosen", "val_rewards/rejected", "val_rewards/accuracies", "val_loss"} <= set(evals[-1])
    assert evals[-1]["val_rewards/margins"] > 0 and evals[-1]["val_loss"] < math.log(2)  # better than the start
    assert summary["method"] == "lora" and (tmp_path / "dpo" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "dpo" / "tokenizer" / "tokenizer.json").is_file()


def test_precomputed_reference_equals_on_the_fly(sft, tmp_path):
    """Cached reference log-probs (per pair_id) give the very same run."""
    run, files = sft
    a = run_finetune(dpo_config(run, files, {"name": "dpo"}, steps=4), tmp_path / "fly")
    b = run_finetune(dpo_config(run, files, {"name": "dpo", "precompute_reference": True}, steps=4), tmp_path / "pre")
    assert a["metrics"] == pytest.approx(b["metrics"], rel=1e-6, abs=1e-7)


def test_full_finetune_dpo_needs_and_uses_a_frozen_reference(sft, tmp_path):
    run, files = sft
    with pytest.raises(ConfigError, match="set task.reference"):
        run_finetune(dpo_config(run, files, {"name": "dpo"}, method="full", steps=2), tmp_path / "noref")
    cfg = dpo_config(run, files, {"name": "dpo", "reference": str(run)}, method="full", steps=4)
    cfg["optim"]["lr"] = 1e-3
    run_finetune(cfg, tmp_path / "full")
    ev = [r for r in records(tmp_path / "full") if "val_rewards/margins" in r][-1]
    assert ev["val_rewards/margins"] > 0
    ref = load_model(run)  # the reference on disk is untouched
    assert torch.equal(ref.state_dict()["tok_emb.weight"], load_model(run).state_dict()["tok_emb.weight"])


@pytest.mark.parametrize("task", [{"name": "simpo"}, {"name": "orpo"}])
def test_reference_free_tasks_train(sft, tmp_path, task):
    run, files = sft
    cfg = dpo_config(run, files, task, steps=12)
    cfg["eval"]["every"] = 3
    run_finetune(cfg, tmp_path / task["name"])
    evals = [r for r in records(tmp_path / task["name"]) if "val_rewards/margins" in r]
    assert len(evals) == 4
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert evals[-1]["val_rewards/margins"] > evals[0]["val_rewards/margins"]  # the preferred answer gains


def test_reward_model_on_a_decoder_learns_the_rule(sft, tmp_path):
    run, files = sft
    cfg = dpo_config(run, files, {"name": "reward_model"}, method="full", steps=40)
    cfg["finetune"]["rules"] = {"*": "backbone.*"}
    cfg["model"] = {"family": "reward", "backbone": MODEL}
    cfg["optim"]["lr"] = 2e-3
    cfg["eval"]["every"] = 10
    run_finetune(cfg, tmp_path / "rm")
    evals = [r for r in records(tmp_path / "rm") if "val_accuracy" in r]
    assert {"val_loss", "val_margin", "val_mean_reward"} <= set(evals[-1]) and len(evals) == 4
    assert evals[-1]["val_loss"] < min(evals[0]["val_loss"], math.log(2))
    assert evals[-1]["val_accuracy"] > max(evals[0]["val_accuracy"], 0.6)


def test_interrupted_dpo_resumes_to_the_same_weights(sft, tmp_path, monkeypatch):
    """A LoRA DPO fine-tune that crashes after step 5 and is resumed (`finetune --resume`) from its
    step-4 checkpoint ends with weights bitwise equal to an uninterrupted run."""
    from safetensors.torch import load_file


    run, files = sft
    cfg = dpo_config(run, files, {"name": "dpo", "loss_type": "ipo"}, steps=8)
    run_finetune(cfg, tmp_path / "ref")
    with interrupt_after_step(monkeypatch, 5), pytest.raises(KeyboardInterrupt):
        run_finetune(cfg, tmp_path / "run")
    assert list_checkpoints(tmp_path / "run" / "checkpoints")[-1].name == "step_00000004"
    with pytest.raises(ConfigError, match="--resume"):  # the run directory is not silently overwritten
        run_finetune(cfg, tmp_path / "run")
    run_finetune(cfg, tmp_path / "run", resume=True)
    a = load_file(list_checkpoints(tmp_path / "ref" / "checkpoints")[-1] / "model.safetensors")
    b = load_file(list_checkpoints(tmp_path / "run" / "checkpoints")[-1] / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in records(tmp_path / "run")] == list(range(1, 9))


# ---- the measured effect (slow) -------------------------------------------------------------------
def val_pairs(files):
    return [json.loads(line) for line in open(files["val"])]


@torch.no_grad()
def preference_accuracy(model, files) -> float:
    """Fraction of held-out pairs where the model's own log-prob of the chosen answer is larger."""
    bundle = build_data({"name": "preference", "path": files["val"], "tokenizer": files["tok"], "val_fraction": 0.0})
    batch = bundle.collate_fn([bundle.train[i] for i in range(len(bundle.train))])
    chosen, rejected = pair_logps(model.eval(), batch)
    return float((chosen.sum > rejected.sum).double().mean())


@torch.no_grad()
def rule_rate(model, files) -> float:
    """Fraction of held-out prompts whose greedy answer gives the rule's verdict (its last word)."""
    from torchgraft.generation import generate

    tok = load_tokenizer(files["tok"])
    template = ChatTemplate.for_tokenizer(files["tok"], None, {"bos_token": tok.bos_token, "eos_token": tok.eos_token})
    prompts = [p["prompt"] for p in val_pairs(files)]
    out = generate(model.eval(), [chat_prompt(template, w) for w in prompts], tok, max_new_tokens=6)
    return sum(a.split()[-1:] == [rule(w)] for a, w in zip(out.texts, prompts)) / len(prompts)


@pytest.mark.parametrize("name", ["dpo-llama-char-lora", "simpo-llama-char-lora", "orpo-llama-char-lora",
                                  "reward-llama-char"])
def test_shipped_configs_resolve(name):
    """The configs parse: finetune section, run config, task options and model all valid."""
    from pathlib import Path

    from torchgraft.models import build
    from torchgraft.recipes.finetune import split_config
    from torchgraft.train import load_run_config

    ft, tree = split_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    cfg = load_run_config(tree)
    task = build_task(cfg.task)
    assert cfg.data["name"] == "preference" and task.name in ("dpo", "simpo", "orpo", "reward_model")
    assert sum(p.numel() for p in build({**cfg.model, "vocab_size": 100}, device="meta").parameters()) > 0


@pytest.mark.slow
def test_dpo_teaches_a_hidden_rule(tmp_path):
    """Expectation, stated before running: the SFT'd model (random yes/no answers) has no preference,
    so its held-out preference accuracy (own log-prob of chosen > rejected) and the share of its
    greedy answers that follow the rule are both ~50%. LoRA DPO (sigmoid, beta 0.5, with the RPO NLL
    term on the chosen answers) on 1000 rule-following pairs raises both clearly: accuracy > 0.75 and
    rule-following answers at least 15 points more than before.
    One run (2 CPU cores shared with other jobs, ~3 min): accuracy 0.415 -> 0.995, rule-following greedy
    answers 0.44 -> 0.995 (plain DPO without the NLL term: accuracy 0.94, but its generations drifted
    off the answer format, rule-following 0.30)."""
    files = make_files(tmp_path)
    sft_dir = sft_run(tmp_path, files, steps=600)
    before = load_model(sft_dir)
    acc0, rate0 = preference_accuracy(before, files), rule_rate(before, files)
    assert 0.3 < acc0 < 0.7 and 0.3 < rate0 < 0.7  # no preference yet
    cfg = dpo_config(sft_dir, files, {"name": "dpo", "beta": 0.5, "sft_weight": 1.0}, steps=200)
    cfg["trainer"]["batch_size"] = 32
    cfg["optim"]["lr"] = 1e-3
    cfg["eval"] = {"every": 50, "max_batches": 8}
    cfg["checkpoint"] = {"every": 200, "keep_last": 1}
    run_finetune(cfg, tmp_path / "dpo", merge=True)
    after = load_model(tmp_path / "dpo" / "merged")
    acc1, rate1 = preference_accuracy(after, files), rule_rate(after, files)
    print(f"held-out preference accuracy {acc0:.3f} -> {acc1:.3f}; rule-following greedy answers "
          f"{rate0:.3f} -> {rate1:.3f}")
    assert acc1 > 0.75 and acc1 > acc0 + 0.2
    assert rate1 > rate0 + 0.15
