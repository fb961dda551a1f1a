"""Instruction tuning end to end: pretrain a small Llama here, LoRA-SFT it on a synthetic instruction
set, and measure exact match on held-out prompts before and after SFT (same run, same prompts).

    python benchmarks/bench_sft.py [--out runs/bench-sft] [--pretrain-steps 600] [--sft-steps 800]

1. Corpus (`corpus.txt`): every 6th page of Python's built-in documentation text (`pydoc_data.topics`) plus synthetic
   statements of five small skills, over words of that text: "42 is an even number.", "the letter
   after c is d.", "7 plus 5 is 12.", "moon twice is moon moon.", "the word apple in capitals is APPLE.".
2. Pretraining: a 4-layer, 128-wide character-level Llama (`torchgraft train`, data `text`).
3. Instructions (`sft_train.jsonl`): the same skills asked as questions ("What is 7 plus 5?",
   "Write apple in capitals.", ...) with the answer as the response, rendered with the built-in chat
   template; `heldout.jsonl` holds prompts whose operands never appear in an SFT example.
4. LoRA SFT (rank 16 on every projection; `torchgraft finetune`, data `sft` with packing) from the
   pretrained run; the loss is on the responses only.
5. Exact match: greedy answers (cut at eos or a newline) to the held-out prompts, rendered with the
   same template (`torchgraft generate --chat` does the same), from the pretrained model and from
   the SFT model.

Prints one JSON line with both exact-match rates, per skill, and the steps/timings.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

SKILLS = ("parity", "next", "add", "twice", "upper")
LETTERS = "abcdefghijklmnopqrstuvwxy"  # the letter after each is defined


def words(limit: int = 400) -> list[str]:
    """Distinct lowercase words (3-7 letters) of the built-in text, in a fixed order."""
    from pydoc_data.topics import topics

    seen: dict[str, None] = {}
    for k in sorted(topics):
        for w in re.findall(r"\b[a-z]{3,7}\b", topics[k]):
            seen.setdefault(w, None)
    return list(seen)[:limit]


def fact(skill: str, x) -> tuple[str, str, str]:
    """(statement for pretraining, question, answer) of one skill on operand `x`."""
    if skill == "parity":
        kind = "even" if x % 2 == 0 else "odd"
        return f"{x} is an {kind} number.", f"Is {x} even or odd?", kind
    if skill == "add":
        a, b = x
        return f"{a} plus {b} is {a + b}.", f"What is {a} plus {b}?", str(a + b)
    if skill == "upper":
        return f"the word {x} in capitals is {x.upper()}.", f"Write {x} in capitals.", x.upper()
    if skill == "next":
        nxt = chr(ord(x) + 1)
        return f"the letter after {x} is {nxt}.", f"Which letter comes after {x}?", nxt
    return f"{x} twice is {x} {x}.", f"Say {x} twice.", f"{x} {x}"


def operands(skill: str, vocab: list[str]) -> list:
    if skill == "parity":
        return list(range(100))
    if skill == "add":
        return [(a, b) for a in range(10) for b in range(10)]
    if skill == "next":
        return list(LETTERS)
    return vocab


def make_data(out: Path, seed: int = 0, heldout_fraction: float = 0.2) -> dict[str, int]:
    """Write corpus.txt, sft_train.jsonl, sft_val.jsonl and heldout.jsonl into `out`."""
    from torchgraft.data.text import builtin_documents

    rng = random.Random(seed)
    vocab = words()
    statements, train, held = [], [], []
    for skill in SKILLS:
        ops = operands(skill, vocab)
        rng.shuffle(ops)
        n_held = max(3, int(len(ops) * heldout_fraction))
        for i, x in enumerate(ops):
            s, q, a = fact(skill, x)
            statements.append(s)
            (held if i < n_held else train).append({"prompt": q, "response": a, "skill": skill})
    rng.shuffle(statements)
    docs = builtin_documents()
    builtin = "\n\n".join(docs[i] for i in range(0, len(docs), 6))  # every 6th help page (~70k chars)
    corpus = builtin + "\n\n" + "\n".join(statements * 5) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "corpus.txt").write_text(corpus)
    rng.shuffle(train)
    n_val = len(train) // 10
    for name, rows in (("sft_val.jsonl", train[:n_val]), ("sft_train.jsonl", train[n_val:]), ("heldout.jsonl", held)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"statements": len(statements), "sft_train": len(train) - n_val, "sft_val": n_val, "heldout": len(held)}


MODEL = {"family": "llama", "n_layer": 4, "n_head": 4, "n_kv_head": 2, "n_embd": 128,
         "intermediate_size": 352, "block_size": 256, "tie_embeddings": True}


def pretrain_config(out: Path, steps: int) -> dict:
    return {"model": MODEL,
            "data": {"name": "text", "source": str(out / "corpus.txt"), "tokenizer": "char", "seq_len": 64,
                     "val_fraction": 0.05, "cache_dir": str(out / "cache"), "progress": False},
            "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.0},
            "schedule": {"name": "cosine", "warmup_steps": 30},
            "trainer": {"max_steps": steps, "batch_size": 16, "grad_clip": 1.0, "seed": 0},
            "eval": {"every": steps, "max_batches": 10},
            "checkpoint": {"every": steps, "keep_last": 1},
            "logging": {"every": 50, "progress": False, "tensorboard": False, "measure_flops": False}}


def sft_config(out: Path, source: Path, steps: int) -> dict:
    return {"finetune": {"source": str(source), "method": "lora",
                         "lora": {"targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"], "rank": 16, "alpha": 32}},
            "model": MODEL,
            "data": {"name": "sft", "path": str(out / "sft_train.jsonl"), "val_path": str(out / "sft_val.jsonl"),
                     "tokenizer": str(source / "tokenizer"), "seq_len": 128, "packing": True},
            "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.0},
            "schedule": {"name": "cosine", "warmup_steps": 20},
            "trainer": {"max_steps": steps, "batch_size": 8, "grad_clip": 1.0, "seed": 0},
            "eval": {"every": steps},
            "checkpoint": {"every": steps, "keep_last": 1},
            "logging": {"every": 50, "progress": False, "tensorboard": False, "measure_flops": False}}


def exact_match(model, tokenizer, template, rows: list[dict], batch_size: int = 32) -> dict[str, float]:
    """Greedy answers to `rows`' prompts (cut at eos / newline) compared with their responses."""
    import torch

    from torchgraft.data.chat_template import chat_prompt
    from torchgraft.generation import generate

    model.eval()
    hits = {s: [0, 0] for s in SKILLS}
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            prompts = [chat_prompt(template, r["prompt"]) for r in chunk]
            res = generate(model, prompts, tokenizer, max_new_tokens=16, temperature=0.0, add_bos=False)
            for r, text in zip(chunk, res.texts):
                answer = text.split("\n")[0].strip()
                hits[r["skill"]][0] += int(answer == r["response"])
                hits[r["skill"]][1] += 1
    out = {s: h / n for s, (h, n) in hits.items() if n}
    out["all"] = sum(h for h, _ in hits.values()) / max(1, sum(n for _, n in hits.values()))
    return out


def run(out: Path, pretrain_steps: int, sft_steps: int) -> dict:
    import torch

    from torchgraft.data.chat_template import ChatTemplate
    from torchgraft.recipes.finetune import run_finetune
    from torchgraft.recipes.lm import load_lm
    from torchgraft.train import run_training

    torch.set_num_threads(min(2, torch.get_num_threads()))
    sizes = make_data(out)
    t0 = time.perf_counter()
    pre = run_training(pretrain_config(out, pretrain_steps), out / "pretrain")
    t1 = time.perf_counter()
    held = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    base = load_lm(out / "pretrain")
    template = ChatTemplate.for_tokenizer(None, special_tokens={"bos_token": base.tokenizer.bos_token,
                                                                "eos_token": base.tokenizer.eos_token})
    before = exact_match(base.model, base.tokenizer, template, held)
    summary = run_finetune(sft_config(out, out / "pretrain", sft_steps), out / "sft")
    t2 = time.perf_counter()
    tuned = load_lm(out / "sft")  # base model + the run's LoRA adapters, as `torchgraft generate` loads it
    after = exact_match(tuned.model, tuned.tokenizer, ChatTemplate.for_tokenizer(out / "sft"), held)
    return {"benchmark": "sft", "data": sizes, "pretrain_steps": pretrain_steps, "sft_steps": sft_steps,
            "pretrain_val_loss": pre.metrics.get("val_loss"), "sft_val_loss": summary["metrics"].get("val_loss"),
            "trainable_fraction": summary.get("fraction"),
            "exact_match_before": before, "exact_match_after": after,
            "pretrain_s": round(t1 - t0, 1), "sft_s": round(t2 - t1, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-sft"))
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--sft-steps", type=int, default=800)
    args = ap.parse_args(argv)
    import shutil

    for sub in ("pretrain", "sft"):
        shutil.rmtree(args.out / sub, ignore_errors=True)
    result = run(args.out, args.pretrain_steps, args.sft_steps)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
