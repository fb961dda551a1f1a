"""Generation speed: torchgraft's static-cache `generate` (eager and compiled) vs transformers' `generate`.

A GPT-2-shaped `transformers.GPT2LMHeadModel` with random weights is saved to a temporary
directory and loaded into torchgraft with `torchgraft.load_hf`, so both sides run identical
weights. For each batch size (1 and 4 by default; the batch-4 prompts are ragged, left-padded),
both decode greedily from the same prompts for a fixed number of new tokens (no early eos); the
greedy outputs of every variant are checked to be identical to transformers' before timing.
Variants: torchgraft eager (static KV cache), torchgraft compiled (`compile=True`: the decode step
under torch.compile; compile time is reported separately, not timed), transformers. Runs
alternate; each round times every variant once; the printed ratio is the median over rounds of
ours / transformers tokens/s measured back to back.

A decode step on CPU is bound by reading the weights, so the benchmark also prints the weight
bytes each implementation streams per second (parameter bytes x decode steps / s) beside the
machine's read bandwidth (`torch.sum` over 512 MB, same threads): the ceiling no fp32
implementation can pass. torchgraft's few-row products (`torchgraft.nn.linear`) are what moves
it towards that ceiling.

    python benchmarks/bench_generation.py                    # GPT-2 124M shape, batch 1 and 4
    python benchmarks/bench_generation.py --n-layer 4 --no-compile   # quicker
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from typing import Any

import torch
from contention import add_argument as add_contend_argument, contended  # benchmarks/contention.py


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def read_bandwidth_gbs(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """The best of `repeats` reads of an `nbytes` fp32 tensor (torch.sum), in GB/s."""
    x = torch.ones(nbytes // 4)
    x.sum()
    return max(nbytes / _timed(x.sum) for _ in range(repeats)) / 1e9


def run(n_layer: int = 12, n_embd: int = 768, n_head: int = 12, vocab_size: int = 50257,
        batches: tuple[int, ...] = (1, 4), prompt_len: int = 32, new_tokens: int = 32, rounds: int = 5,
        compile: bool = True, threads: int | None = None, device: str = "cpu") -> dict[str, Any]:
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
    hf.to(device)
    ours.to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters()) - \
        ours.pos_emb.weight.numel() * ours.pos_emb.weight.element_size()  # one position row is read per step
    ceiling = read_bandwidth_gbs()
    cases = []
    for batch in batches:
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(0, vocab_size, (batch, prompt_len), generator=g)
        mask = torch.ones_like(ids)
        for row in range(1, batch):  # ragged prompts: left padding on all but the first row
            mask[row, : row * prompt_len // (2 * batch)] = 0
        ids = ids.masked_fill(mask == 0, 0).to(device)
        mask = mask.to(device)

        def ours_fn(compiled: bool, ids=ids, mask=mask):
            out = generate(ours, ids, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=None,
                           compile=compiled)
            sync()
            return out.tokens

        def hf_fn(ids=ids, mask=mask):
            with torch.inference_mode():
                out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                                  eos_token_id=None)
            sync()
            return out[:, prompt_len:].tolist()

        variants = {"eager": lambda f=ours_fn: f(False)}
        expected = hf_fn()  # also the warm-up of transformers
        same = {"eager": variants["eager"]() == expected}
        compile_s = None
        if compile:
            variants["compiled"] = lambda f=ours_fn: f(True)
            compile_s = _timed(lambda: same.__setitem__("compiled", variants["compiled"]() == expected))
        times: dict[str, list[float]] = {k: [] for k in [*variants, "transformers"]}
        for _ in range(rounds):  # alternate: load drifts hit every variant alike
            for name, fn in variants.items():
                times[name].append(_timed(fn))
            times["transformers"].append(_timed(hf_fn))
        n = batch * new_tokens
        case = {"batch": batch, "greedy_outputs_identical": same, "compile_s": compile_s,
                "transformers_tok_s": n / statistics.median(times["transformers"])}
        case["transformers_weight_gbs"] = weight_bytes * new_tokens / statistics.median(times["transformers"]) / 1e9
        for name in variants:
            case[f"torchgraft_{name}_tok_s"] = n / statistics.median(times[name])
            case[f"torchgraft_{name}_weight_gbs"] = weight_bytes * new_tokens / statistics.median(times[name]) / 1e9
            case[f"ratio_{name}_rounds"] = [h / o for o, h in zip(times[name], times["transformers"])]
            case[f"ratio_{name}"] = statistics.median(case[f"ratio_{name}_rounds"])
        cases.append(case)
    return {"benchmark": "generation", "model": f"gpt2-shape L{n_layer} C{n_embd} V{vocab_size}",
            "device": device, "prompt_len": prompt_len, "new_tokens": new_tokens, "rounds": rounds,
            "threads": torch.get_num_threads(), "weight_mb": weight_bytes / 2**20, "read_bandwidth_gbs": ceiling,
            "cases": cases}


def _ratio(case: dict[str, Any], variant: str) -> str:
    rounds = case[f"ratio_{variant}_rounds"]
    return f"{case[f'ratio_{variant}']:.2f}x, rounds {min(rounds):.2f}-{max(rounds):.2f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="skip the compiled variant")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    add_contend_argument(p)
    a = p.parse_args(argv)
    with contended(a.contend):
        r = run(a.n_layer, a.n_embd, a.n_head, batches=tuple(a.batch), prompt_len=a.prompt_len,
                new_tokens=a.new_tokens, rounds=a.rounds, compile=not a.no_compile, threads=a.threads,
                device=a.device)
    r["contend"] = a.contend
    if a.json:
        print(json.dumps(r))
        return r
    print(f"generation ({r['model']}, {r['device']}, prompt {r['prompt_len']}, {r['new_tokens']} new tokens, "
          f"{r['threads']} threads, {a.contend} busy processes beside it, median of {r['rounds']} alternating rounds):")
    for c in r["cases"]:
        line = (f"  batch {c['batch']}: transformers {c['transformers_tok_s']:.1f} tok/s; torchgraft eager "
                f"{c['torchgraft_eager_tok_s']:.1f} tok/s ({_ratio(c, 'eager')})")
        if "ratio_compiled" in c:
            line += (f", compiled {c['torchgraft_compiled_tok_s']:.1f} tok/s ({_ratio(c, 'compiled')}; "
                     f"compile {c['compile_s']:.0f}s)")
        print(line + f"; greedy outputs identical: {c['greedy_outputs_identical']}")
        streamed = ", ".join(f"{k.removeprefix('torchgraft_').removesuffix('_weight_gbs')} {v:.1f}"
                             for k, v in c.items() if k.endswith("_weight_gbs"))
        print(f"    weights streamed, GB/s: {streamed} (read ceiling {r['read_bandwidth_gbs']:.1f})")
    return r


if __name__ == "__main__":
    main()
