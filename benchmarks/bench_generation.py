"""Generation speed: torchgraft's KV-cache `generate` vs transformers' `generate`, same model, same prompts.

A GPT-2-shaped `transformers.GPT2LMHeadModel` with random weights is saved to a temporary
directory and loaded into torchgraft with `torchgraft.load_hf`, so both sides run identical
weights. Both decode greedily from the same left-padded prompt batch for a fixed number of new
tokens (no early eos); the greedy outputs are checked to be identical before timing. Prints the
new-token throughput of each and the ratio (ours / transformers) measured in this one run.

    python benchmarks/bench_generation.py                 # GPT-2 124M shape
    python benchmarks/bench_generation.py --n-layer 4     # quicker
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from typing import Any

import torch


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(n_layer: int = 12, n_embd: int = 768, n_head: int = 12, vocab_size: int = 50257,
        batch: int = 4, prompt_len: int = 32, new_tokens: int = 48, repeats: int = 2,
        threads: int | None = None) -> dict[str, Any]:
    import transformers

    import torchgraft
    from torchgraft.generation import generate

    transformers.utils.logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=vocab_size, n_positions=1024, n_embd=n_embd,
                                  n_layer=n_layer, n_head=n_head)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = torchgraft.load_hf(d).eval()

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (batch, prompt_len), generator=g)
    mask = torch.ones_like(ids)
    for row in range(1, batch):  # ragged prompts: left padding on all but the first row
        mask[row, : row * prompt_len // (2 * batch)] = 0
    ids = ids.masked_fill(mask == 0, 0)

    def ours_fn():
        return generate(ours, ids, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=None)

    def hf_fn():
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                               eos_token_id=None)

    same = ours_fn().tokens == hf_fn()[:, prompt_len:].tolist()  # also the warm-up of both sides
    t_ours = t_hf = float("inf")
    for _ in range(repeats):  # interleaved, best of `repeats`: load drifts hit both sides alike
        t_ours = min(t_ours, _time(ours_fn, 1))
        t_hf = min(t_hf, _time(hf_fn, 1))
    n = batch * new_tokens
    return {"benchmark": "generation", "model": f"gpt2-shape L{n_layer} C{n_embd} V{vocab_size}",
            "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "threads": torch.get_num_threads(), "greedy_outputs_identical": same,
            "torchgraft_tok_s": n / t_ours, "transformers_tok_s": n / t_hf,
            "ratio": (n / t_ours) / (n / t_hf)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON line")
    a = p.parse_args(argv)
    r = run(a.n_layer, a.n_embd, a.n_head, batch=a.batch, prompt_len=a.prompt_len,
            new_tokens=a.new_tokens, repeats=a.repeats, threads=a.threads)
    if a.json:
        print(json.dumps(r))
    else:
        print(f"generation ({r['model']}, batch {r['batch']}, prompt {r['prompt_len']}, "
              f"{r['new_tokens']} new tokens, {r['threads']} threads): torchgraft "
              f"{r['torchgraft_tok_s']:.1f} tok/s, transformers {r['transformers_tok_s']:.1f} tok/s, "
              f"ratio {r['ratio']:.2f}x; greedy outputs identical: {r['greedy_outputs_identical']}")
    return r


if __name__ == "__main__":
    main()
