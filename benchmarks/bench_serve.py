"""Continuous batching in `torchgraft serve`: 16 concurrent streaming clients vs the same 16
requests served one at a time.

A GPT-2-shaped model (learned positions, LayerNorm, GELU MLP, tied embeddings; 6 layers, width
384, random weights, byte-level tokenizer) is saved as a Hugging Face directory and served twice on
127.0.0.1 by `torchgraft serve` processes: with `--max-batch 1` (the baseline: one request at a
time, each streamed in turn) and with `--max-batch 16` (all 16 streams at once). Printed: total
completion tokens/s of both and their ratio (goal >= 3x), p50/p95 time to first token and
inter-token latency (client side, per streamed chunk), and whether every request's greedy text is
the same in both runs. Bounded: 16 requests x 64 tokens, loopback only, timeouts on everything.

Usage: python benchmarks/bench_serve.py [--requests 16] [--tokens 64] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["The history of", "In a distant galaxy", "def main():", "Once upon a time", "Dear customer,",
           "The recipe calls for", "Breaking news:", "In conclusion"]


def make_model(d: Path) -> Path:
    import torch

    import torchgraft
    from torchgraft.data.tokenizers import byte_tokenizer

    torch.manual_seed(0)
    tok = byte_tokenizer()
    model = torchgraft.build("gpt2", n_layer=6, n_embd=384, n_head=6, block_size=256, vocab_size=tok.vocab_size,
                             init_std=0.1).eval()
    torchgraft.save_hf(model, d)
    tok.save(d)
    return d


def start_server(d: Path, max_batch: int, max_tokens: int, log: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "torchgraft", "serve", str(d), "--port", "0", "--max-batch",
                             str(max_batch), "--max-tokens", str(max_tokens)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        line = proc.stdout.readline()
        if line.startswith("ready: "):
            return proc, line.strip().removeprefix("ready: ").removesuffix("/health")
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"server did not start: {log.read_text()[-2000:]}")


def one_stream(url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """Stream one greedy completion; its text, token count and chunk arrival times."""
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, text, tokens = [], "", 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for ch in chunk.get("choices", []):
                if ch["text"]:
                    times.append(time.perf_counter() - t0)
                    text += ch["text"]
    return {"text": text, "tokens": tokens, "ttft": times[0] if times else None,
            "gaps": [b - a for a, b in zip(times, times[1:])]}


def run(url: str, model: str, prompts: list[str], max_tokens: int, concurrent: bool) -> tuple[list[dict], float]:
    out: list[dict | None] = [None] * len(prompts)

    def work(i: int) -> None:
        out[i] = one_stream(url, model, prompts[i], max_tokens)

    t0 = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
    else:
        for i in range(len(prompts)):
            work(i)
    return out, time.perf_counter() - t0  # type: ignore[return-value]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="8 requests x 32 tokens")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.tokens = 8, 32
    prompts = [PROMPTS[i % len(PROMPTS)] + f" {i}" for i in range(args.requests)]
    with tempfile.TemporaryDirectory() as tmp:
        d = make_model(Path(tmp) / "gpt2-shaped")
        results = {}
        for label, max_batch, concurrent in (("one at a time", 1, False), ("batched", args.requests, True)):
            proc, url = start_server(d, max_batch, args.tokens, Path(tmp) / f"{max_batch}.log")
            try:
                one_stream(url, "gpt2-shaped", "warm up", 4)
                results[label] = run(url, "gpt2-shaped", prompts, args.tokens, concurrent)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    print(f"GPT-2-shaped model (6 x 384, vocab 258), {args.requests} streaming requests x {args.tokens} tokens, "
          f"greedy; torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"{'mode':<14} {'tokens':>7} {'wall s':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p95':>9} "
          f"{'ITL p50':>8} {'ITL p95':>8}")
    rate = {}
    for label, (out, wall) in results.items():
        tokens = sum(o["tokens"] for o in out)
        ttft = [o["ttft"] for o in out if o["ttft"] is not None]
        gaps = [g for o in out for g in o["gaps"]]
        rate[label] = tokens / wall
        print(f"{label:<14} {tokens:>7} {wall:>7.2f} {rate[label]:>8.1f} {pct(ttft, .5) * 1e3:>7.0f}ms "
              f"{pct(ttft, .95) * 1e3:>7.0f}ms {pct(gaps, .5) * 1e3:>6.1f}ms {pct(gaps, .95) * 1e3:>6.1f}ms")
    same = [a["text"] for a in results["one at a time"][0]] == [b["text"] for b in results["batched"][0]]
    ratio = rate["batched"] / rate["one at a time"]
    print(f"batched / one at a time: {ratio:.2f}x total tokens/s (goal >= 3x); greedy outputs equal to the "
          f"solo runs: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
