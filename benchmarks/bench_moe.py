"""Speed of torchgraft's mixture-of-experts block against transformers' at equal shapes, on CPU.

Both blocks get the same weights (checked: equal outputs) and the same input; transformers' block is
timed with each of its expert implementations ("grouped_mm", its default, which sorts tokens by
expert and calls `torch._grouped_mm`; "eager", a loop over the experts hit with one-hot masks).
Shapes: a prefill / training batch and decode steps (1 and 4 tokens), Mixtral-like routing (top 2
of 8) and Qwen3-MoE-like routing (top 8 of 64 narrow experts). Reported: the median of `rounds`
timings each, and the ratio transformers / torchgraft (> 1: torchgraft is faster).

    python benchmarks/bench_moe.py [--quick] [--rounds 7]
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import time
from collections.abc import Callable

import torch


def _median_s(fn: Callable[[], object], rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _blocks(kind: str, dim: int, hidden: int, n_experts: int, top_k: int, impl: str):
    import transformers as T

    from torchgraft.nn.linear import Linear
    from torchgraft.nn.moe import MoE, GroupedExperts, SoftmaxTopK

    if kind == "mixtral":
        cfg = T.MixtralConfig(hidden_size=dim, intermediate_size=hidden, num_local_experts=n_experts,
                              num_experts_per_tok=top_k)
        cls = importlib.import_module("transformers.models.mixtral.modeling_mixtral").MixtralSparseMoeBlock
    else:
        cfg = T.Qwen3MoeConfig(hidden_size=dim, moe_intermediate_size=hidden, num_experts=n_experts,
                               num_experts_per_tok=top_k, norm_topk_prob=True)
        cls = importlib.import_module("transformers.models.qwen3_moe.modeling_qwen3_moe").Qwen3MoeSparseMoeBlock
    cfg._experts_implementation = impl
    torch.manual_seed(0)
    hf = cls(cfg).eval()
    ours = MoE(Linear(dim, n_experts, bias=False), SoftmaxTopK(top_k, True), GroupedExperts(n_experts, dim, hidden))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.02)
        ours.gate.weight.copy_(hf.gate.weight)
        ours.experts.gate_up_proj.weight.copy_(hf.experts.gate_up_proj)
        ours.experts.down_proj.weight.copy_(hf.experts.down_proj)
    return hf, ours


def run(quick: bool = False, rounds: int = 7) -> list[dict]:
    torch.set_num_threads(1)
    configs = [("mixtral", 512, 1792, 8, 2), ("qwen3_moe", 512, 256, 64, 8)]
    tokens = [(4, 128, "prefill 4x128"), (1, 1, "decode 1"), (4, 1, "decode 4")]
    if quick:
        configs, tokens, rounds = configs[:1], tokens[:2], 3
    rows = []
    for kind, dim, hidden, n_experts, top_k in configs:
        for b, t, label in tokens:
            x = torch.randn(b, t, dim)
            for impl in ("grouped_mm", "eager"):
                hf, ours = _blocks(kind, dim, hidden, n_experts, top_k, impl)
                with torch.no_grad():
                    diff = float((hf(x) - ours(x)).abs().max())
                    t_hf = _median_s(lambda: hf(x), rounds)
                    t_ours = _median_s(lambda: ours(x), rounds)
                row = dict(block=kind, shape=label, impl=impl, mode="forward", hf_ms=t_hf * 1e3,
                           ours_ms=t_ours * 1e3, ratio=t_hf / t_ours, max_diff=diff)
                rows.append(row)
                if t > 1:  # training step: forward + backward
                    xg = x.clone().requires_grad_()

                    def step(m):
                        return lambda: m(xg).square().mean().backward()
                    row_fb = dict(row, mode="fwd+bwd", hf_ms=_median_s(step(hf), rounds) * 1e3,
                                  ours_ms=_median_s(step(ours), rounds) * 1e3)
                    row_fb["ratio"] = row_fb["hf_ms"] / row_fb["ours_ms"]
                    rows.append(row_fb)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    rows = run(args.quick, args.rounds)
    print(f"{'block':10s} {'shape':14s} {'transformers impl':18s} {'mode':8s} {'hf ms':>9s} {'ours ms':>9s} "
          f"{'hf/ours':>8s} {'max diff':>9s}")
    for r in rows:
        print(f"{r['block']:10s} {r['shape']:14s} {r['impl']:18s} {r['mode']:8s} {r['hf_ms']:9.2f} "
              f"{r['ours_ms']:9.2f} {r['ratio']:8.2f} {r['max_diff']:9.1e}")
    worst = max(r["max_diff"] for r in rows)
    assert worst < 1e-4, f"outputs differ by {worst}"
    print("goal: hf/ours >= 1.5 on CPU (single thread); ratios near 1 mean both are bound by the same matmuls")


if __name__ == "__main__":
    main()
